"""Content-addressed stores: every blob is addressed by its IPFS CID and checked on the way back.

    store = open_store("local:runs/store")           # embedded default: a directory of blocks
    store = open_store("ipfs://127.0.0.1:5001")      # an IPFS node's RPC API
    store = open_store("s3://bucket?endpoint=http://127.0.0.1:8333")

``put`` returns the CID an IPFS node would give the bytes, whichever backend
holds them; ``get`` raises ``IntegrityError`` when what comes back does not
hash to the id asked for.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlparse

from tdml_core.storage.cid import DAG_PB, RAW, build_dag, cid_parse, cid_str, compute_cid, decode_links


class StoreError(RuntimeError):
    pass


class StoreConfigError(StoreError):
    """A store that cannot be used as configured: unknown scheme, no answer at the endpoint, credentials refused."""


class IntegrityError(StoreError):
    """What the store returned does not match its content id."""


class NotFound(StoreError, KeyError):
    pass


class ContentStore:
    url: str

    def put(self, data: bytes) -> str:
        raise NotImplementedError

    def get(self, cid: str) -> bytes:
        raise NotImplementedError

    def has(self, cid: str) -> bool:
        raise NotImplementedError


def _check_whole(cid: str, data: bytes) -> bytes:
    if compute_cid(data) != cid:
        raise IntegrityError(f"{cid}: the bytes returned do not match their content id")
    return data


class LocalStore(ContentStore):
    """Blocks in a directory, one file per block, named by the block's CID."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreConfigError(f"local store {root}: cannot create the folder ({exc.strerror or exc})") from None
        self.url = f"local:{self.root}"

    def _path(self, cid: str) -> Path:
        return self.root / cid[-2:] / cid

    def put(self, data: bytes) -> str:
        root = None
        for raw_cid, _codec, block in build_dag(data):
            cid = cid_str(raw_cid)
            path = self._path(cid)
            if not path.exists():
                path.parent.mkdir(exist_ok=True)
                tmp = path.with_name(f".{cid}.{os.getpid()}.tmp")
                tmp.write_bytes(block)
                tmp.replace(path)  # a crash never leaves a half-written block under its id
            root = cid
        return root

    def _block(self, cid: str) -> tuple[int, bytes]:
        try:
            codec, digest = cid_parse(cid)
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        try:
            block = self._path(cid).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{cid}: not in {self.url}") from None
        if hashlib.sha256(block).digest() != digest:
            raise IntegrityError(f"{cid}: stored block does not match its content id")
        return codec, block

    def iter_chunks(self, cid: str) -> Iterator[bytes]:
        """The blob's bytes chunk by chunk, each block checked before it is yielded."""
        codec, block = self._block(cid)
        if codec == RAW:
            yield block
        elif codec == DAG_PB:
            for child in decode_links(block):
                yield from self.iter_chunks(cid_str(child))
        else:
            raise StoreError(f"{cid}: unsupported codec {codec:#x}")

    def get(self, cid: str) -> bytes:
        """The blob; every block is checked against its id (the root's id covers the rest)."""
        chunks = self.iter_chunks(cid)
        first = next(chunks)
        out = None
        for chunk in chunks:
            if out is None:
                out = bytearray(first)
            out += chunk
        return first if out is None else out  # multi-block blobs come back as one bytearray

    def has(self, cid: str) -> bool:
        return self._path(cid).exists()


class IPFSStore(ContentStore):
    """An IPFS node's RPC API (Kubo, or js-ipfs), through ipfshttpclient.

    ``ipfshttpclient.connect()`` refuses every daemon newer than 0.8; ``Client()``
    skips that version check and speaks the same RPC API.
    """

    def __init__(self, host: str, port: int):
        import warnings

        import ipfshttpclient

        self.url = f"ipfs://{host}:{port}"
        with warnings.catch_warnings():  # it warns about every daemon version it does not know
            warnings.simplefilter("ignore")
            self.client = ipfshttpclient.Client(f"/ip4/{host}/tcp/{port}/http", timeout=120)
            try:  # fail now, with the address in the message, rather than at the first put
                self.client.version(timeout=10)
            except ipfshttpclient.exceptions.ConnectionError:
                raise StoreConfigError(f"IPFS node {host}:{port}: no answer (connection refused or unreachable)") from None
            except ipfshttpclient.exceptions.TimeoutError:
                raise StoreConfigError(f"IPFS node {host}:{port}: no answer within 10 s") from None
            except ipfshttpclient.exceptions.Error as exc:
                raise StoreConfigError(f"IPFS node {host}:{port}: its RPC API refused a version query "
                                       f"({_first_line(exc)})") from None

    def put(self, data: bytes) -> str:
        expected = compute_cid(data)
        res = self.client.add_bytes(
            data, opts={"cid-version": 1, "cid-base": "base32", "raw-leaves": "true", "chunker": "size-262144", "pin": "true"}
        )
        got = res if isinstance(res, str) else res["Hash"]
        if got != expected:
            raise IntegrityError(f"the IPFS node named the blob {got}, expected {expected}")
        return got

    def get(self, cid: str) -> bytes:
        try:
            data = self.client.cat(cid)
        except Exception as exc:  # ipfshttpclient raises its own error hierarchy
            raise NotFound(f"{cid}: {exc}") from None
        return _check_whole(cid, data)

    def has(self, cid: str) -> bool:
        try:
            self.client.block.stat(cid, timeout=5)
            return True
        except Exception:
            return False


class S3Store(ContentStore):
    """An S3 bucket (boto3); objects keyed by CID, uploaded in parts for large blobs."""

    def __init__(self, bucket: str, endpoint: str | None, region: str = "us-east-1"):
        import boto3
        from botocore.config import Config

        from tdml_core.services import s3_credentials

        self.bucket = bucket
        self.url = f"s3://{bucket}" + (f"?endpoint={endpoint}" if endpoint else "")
        creds = s3_credentials(endpoint)  # the services file's, for its own S3 server, when the env names none
        keys = dict(zip(("aws_access_key_id", "aws_secret_access_key"), creds)) if creds else {}
        try:
            self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name=region, **keys,
                                   config=Config(connect_timeout=10, retries={"mode": "standard", "max_attempts": 4}))
            # one quick look first: an endpoint that is down or credentials that are refused say so at once,
            # instead of after minutes of retries in the middle of a run
            probe = boto3.client("s3", endpoint_url=endpoint, region_name=region, **keys,
                                 config=Config(connect_timeout=3, read_timeout=10,
                                               retries={"mode": "standard", "total_max_attempts": 1}))
        except ValueError as exc:  # botocore: "Invalid endpoint: ..."
            raise StoreConfigError(f"{self.url}: {_first_line(exc)}") from None
        self.endpoint = self.s3.meta.endpoint_url
        try:
            try:
                probe.head_bucket(Bucket=bucket)
            except Exception as exc:
                if _s3_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                probe.create_bucket(Bucket=bucket)
        except Exception as exc:
            raise s3_error(exc, self.endpoint, bucket) from None

    def put(self, data: bytes) -> str:
        import io

        cid = compute_cid(data)
        if not self.has(cid):
            self.s3.upload_fileobj(io.BytesIO(data), self.bucket, cid)
        return cid

    def get(self, cid: str) -> bytes:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=cid)["Body"]
        except self.s3.exceptions.NoSuchKey:
            raise NotFound(f"{cid}: not in {self.url}") from None
        out = bytearray()
        for chunk in body.iter_chunks(1 << 20):
            out += chunk
        return _check_whole(cid, bytes(out))

    def has(self, cid: str) -> bool:
        try:
            self.s3.head_object(Bucket=self.bucket, Key=cid)
            return True
        except Exception:
            return False


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _s3_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    err = response.get("Error") or {}
    code = err.get("Code")
    if code:
        return str(code)
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return None if status is None else str(status)


_S3_CREDENTIAL_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                        "ExpiredToken", "InvalidClientTokenId", "AuthorizationHeaderMalformed", "Forbidden"}


def s3_error(exc: BaseException, endpoint: str, bucket: str) -> StoreError:
    """botocore's error when first reaching a bucket, as one line naming the endpoint and the problem."""
    from botocore import exceptions as bce

    where = f"S3 endpoint {endpoint}, bucket {bucket!r}"
    if isinstance(exc, (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ReadTimeoutError)):
        return StoreConfigError(f"{where}: no answer ({_first_line(exc)})")
    if isinstance(exc, bce.NoCredentialsError):
        return StoreConfigError(f"{where}: no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                                "(or AWS_PROFILE)")
    if isinstance(exc, (bce.PartialCredentialsError, bce.ParamValidationError)):
        return StoreConfigError(f"{where}: {_first_line(exc)}")
    if isinstance(exc, bce.ClientError):
        code = _s3_code(exc)
        if code in _S3_CREDENTIAL_CODES:
            return StoreConfigError(f"{where}: credentials refused ({code}); check AWS_ACCESS_KEY_ID and "
                                    "AWS_SECRET_ACCESS_KEY, and their rights on the bucket")
        return StoreConfigError(f"{where}: {_first_line(exc)}")
    return StoreError(f"{where}: {type(exc).__name__}: {_first_line(exc)}")


def open_store(url: str) -> ContentStore:
    """``local:PATH``, ``ipfs://HOST:PORT`` or ``s3://BUCKET?endpoint=URL``."""
    if url.startswith("local:"):
        return LocalStore(url[len("local:") :])
    parsed = urlparse(url)
    if parsed.scheme == "ipfs":
        if not parsed.hostname or not parsed.port:
            raise StoreConfigError(f"{url}: expected ipfs://HOST:PORT")
        return IPFSStore(parsed.hostname, parsed.port)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreConfigError(f"{url}: expected s3://BUCKET?endpoint=URL")
        endpoint = parse_qs(parsed.query).get("endpoint", [None])[0]
        return S3Store(parsed.netloc, endpoint)
    raise StoreConfigError(f"unknown store {url!r}: use local:PATH, ipfs://HOST:PORT or s3://BUCKET?endpoint=URL")
