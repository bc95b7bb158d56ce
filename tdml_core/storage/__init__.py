"""Content-addressed storage: local directory, IPFS node, S3 bucket."""

from tdml_core.storage.cid import compute_cid
from tdml_core.storage.store import ContentStore, IntegrityError, NotFound, StoreConfigError, StoreError, open_store

__all__ = ["ContentStore", "IntegrityError", "NotFound", "StoreConfigError", "StoreError", "compute_cid", "open_store"]
