"""The addresses file that ``make services-up`` writes: a spec's ``chain: rpc``, ``store: s3`` and ``store: ipfs``.

``infra/services.sh up`` starts a chain node, an IPFS node, an S3 server and a Prefect server on free ports
and writes their addresses to one JSON file (``TDML_SERVICES``, or ``.services/services.json`` in the
checkout). A spec or a command line that names a service by its kind alone is given the address from it;
a full URL is used as it is. A run keeps the address it resolved (job.json), so a resumed run or an audit
goes back to the same node even after the services were started again elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"chain": ("rpc",), "store": ("s3", "ipfs")}


class ServicesError(ValueError):
    """A spec that names a service by its kind when no services file says where it is."""


def services_file() -> Path:
    return Path(os.environ.get("TDML_SERVICES") or ROOT / ".services" / "services.json")


def load(required_for: str | None = None) -> dict | None:
    """The services file's contents; None when there is none, unless ``required_for`` says who needs it."""
    path = services_file()
    if not path.is_file():
        if required_for is None:
            return None
        raise ServicesError(f"{required_for} needs the services' addresses, and {path} does not exist: "
                            "run `make services-up` (or set TDML_SERVICES to the file it wrote)")
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError
    except (OSError, ValueError):
        raise ServicesError(f"{path}: not a services file written by `make services-up`") from None
    return doc


def _field(doc: dict, what: str, *keys: str):
    value = doc
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if not value:
        raise ServicesError(f"{services_file()}: no {'.'.join(keys)} for {what}")
    return value


def resolve_chain(url: str) -> str:
    """``rpc``: the chain node of the services file; anything else as it is."""
    if url != "rpc":
        return url
    return _field(load("chain: rpc"), "chain: rpc", "chain")


def resolve_store(url: str) -> str:
    """``s3`` and ``ipfs``: the services file's S3 bucket or IPFS node, as a store URL; anything else as it is."""
    if url == "s3":
        doc = load("store: s3")
        return f"s3://{_field(doc, 'store: s3', 's3', 'bucket')}?endpoint={_field(doc, 'store: s3', 's3', 'endpoint')}"
    if url == "ipfs":
        return f"ipfs://{_field(load('store: ipfs'), 'store: ipfs', 'ipfs')}"
    return url


def s3_credentials(endpoint: str | None) -> tuple[str, str] | None:
    """The services file's S3 key and secret when ``endpoint`` is its S3 server and the environment names none."""
    if not endpoint or os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE"):
        return None
    try:
        doc = load()
    except ServicesError:
        return None
    s3 = (doc or {}).get("s3") or {}
    if s3.get("endpoint", "").rstrip("/") != endpoint.rstrip("/"):
        return None
    if s3.get("access_key_id") and s3.get("secret_access_key"):
        return s3["access_key_id"], s3["secret_access_key"]
    return None


def prefect_api() -> str | None:
    """The Prefect API the services file names, if there is one."""
    try:
        doc = load()
    except ServicesError:
        return None
    return (doc or {}).get("prefect_api") or None
