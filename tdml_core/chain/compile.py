"""Compile TDML's Vyper contracts in-process, with the EVM version pinned.

Compiling the market and the ledger takes seconds, and every ``tdml run`` and
``tdml audit`` needs both, so the compiler's output is kept on disk under the
digest of what determines it (the source, the compiler's version, the EVM
version): ``$TDML_CACHE_DIR`` or ``~/.cache/tdml``. A cache entry that is
missing, unreadable or not of that digest is compiled again; a cache that
cannot be written is only slower.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

CONTRACTS_DIR = Path(__file__).resolve().parents[2] / "contracts"
EVM_VERSION = "cancun"
FORMATS = ("abi", "bytecode", "blueprint_bytecode")


@dataclass(frozen=True)
class Artifact:
    name: str
    abi: list
    bytecode: str
    blueprint_bytecode: str


def cache_dir() -> Path:
    return Path(os.environ.get("TDML_CACHE_DIR") or Path.home() / ".cache" / "tdml") / "vyper"


def _key(file_name: str, source: str) -> str:
    from importlib.metadata import version

    what = json.dumps([file_name, source, version("vyper"), EVM_VERSION, FORMATS])
    return hashlib.sha256(what.encode()).hexdigest()


def _cached(path: Path, name: str, key: str) -> Artifact | None:
    try:
        doc = json.loads(path.read_text())
        if doc.pop("key") != key:
            return None
        return Artifact(**{**doc, "name": name})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _keep(path: Path, art: Artifact, key: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump({**asdict(art), "key": key}, f)
        os.replace(tmp, path)  # whole or not at all, whoever else compiles at the same time
    except OSError:
        pass


@functools.lru_cache(maxsize=None)
def compile_contract(name: str, directory: Path = CONTRACTS_DIR) -> Artifact:
    path = directory / f"{name}.vy"
    if not path.is_file():
        raise FileNotFoundError(f"contract source not found: {path}")
    source = path.read_text()
    key = _key(path.name, source)
    kept = cache_dir() / f"{key}.json"
    art = _cached(kept, name, key)
    if art is not None:
        return art

    from vyper import compile_code
    from vyper.compiler.settings import Settings

    out = compile_code(source, contract_path=path.name, output_formats=list(FORMATS),
                       settings=Settings(evm_version=EVM_VERSION))
    art = Artifact(name, out["abi"], out["bytecode"], out["blueprint_bytecode"])
    _keep(kept, art, key)
    return art
