"""Signed messages between pipeline neighbours: once an epoch, a stage signs what it sent each neighbour.

Every step, a stage hashes the digests of the activations it sent downstream
and of the gradients it sent upstream (``message_hash``: the pipeline, the
epoch, the step, the direction and the sender's stage, so that no hash can be
moved to another message). At the epoch's end it signs, with its trainer's
Ethereum key, one Merkle root over each neighbour's step hashes
(``epoch_hash``), and gives each neighbour that signature and the step hashes.
The receiver computes the same hashes from what it received; if they give the
signed root, it keeps the signature, the root and each step's Merkle path in
its records. A receiver can then prove what it was given at any step, with one
signature per neighbour and epoch, and a verifier that finds a sender's record
and its receiver's apart knows which one lies: the signer, if its signature
covers what the receiver holds; the receiver, if it cannot show one.
"""

from __future__ import annotations

import functools
import hashlib
import json

from eth_keys import keys
from eth_keys.exceptions import BadSignature, ValidationError
from eth_utils import keccak

from tdml_core.verify import merkle

ACTIVATIONS, GRADIENTS = "activations", "gradients"
SIGNATURE_BYTES = 65
HASH_BYTES = 32


def message_hash(pipeline: int, epoch: int, step: int, kind: str, sender: int, digests: list | None) -> bytes:
    """One step's messages in one direction (``digests``: one per microbatch): a leaf of what is signed."""
    doc = {"pipeline": pipeline, "epoch": epoch, "step": step, "kind": kind, "sender": sender, "digests": digests}
    return merkle.leaf_hash(b"tdml message\x00" + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


def epoch_hash(pipeline: int, epoch: int, kind: str, sender: int, root: bytes, steps: int) -> bytes:
    """What a stage signs once an epoch for one neighbour: the root over its ``steps`` step hashes."""
    doc = {"pipeline": pipeline, "epoch": epoch, "kind": kind, "sender": sender, "root": root.hex(), "steps": steps}
    return keccak(b"tdml messages\x00" + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


def signed_by(pipeline: int, epoch: int, step: int, kind: str, sender: int, digests: list | None, steps: int,
              evidence: dict | None, path: list | None) -> str | None:
    """Who signed that ``digests`` are what stage ``sender`` sent at ``step`` of an epoch of ``steps`` steps.

    ``evidence`` is what the receiver's record holds ({"sig", "root"}, hex), ``path`` the step's Merkle
    path under that root (hex); None when anything is missing or does not add up."""
    try:
        root, sig = bytes.fromhex(evidence["root"]), evidence["sig"]
        nodes = [bytes.fromhex(h) for h in path]
    except (TypeError, KeyError, ValueError):
        return None
    if not merkle.verify(message_hash(pipeline, epoch, step, kind, sender, digests), step, steps, nodes, root):
        return None
    return signer(epoch_hash(pipeline, epoch, kind, sender, root, steps), sig)


@functools.lru_cache(maxsize=16)
def _private(private_key: bytes) -> keys.PrivateKey:
    return keys.PrivateKey(private_key)  # deriving the public key costs more than a signature: once per key


def sign(private_key: bytes, msg_hash: bytes) -> bytes:
    return _private(private_key).sign_msg_hash(msg_hash).to_bytes()


def signer(msg_hash: bytes, signature: bytes | str | None) -> str | None:
    """The address that signed ``msg_hash``, or None when ``signature`` is missing or not a signature."""
    if not signature:
        return None
    try:
        raw = bytes.fromhex(signature) if isinstance(signature, str) else bytes(signature)
        return keys.Signature(raw).recover_public_key_from_msg_hash(msg_hash).to_checksum_address()
    except (BadSignature, ValidationError, ValueError):
        return None


def slot_key(seed: int, pipeline: int, stage: int) -> bytes:
    """The signing key of a slot in a run without trainers' identities (``tdml train``, benchmarks)."""
    return hashlib.sha256(f"tdml slot key|{seed}|{pipeline}|{stage}".encode()).digest()


def slot_address(seed: int, pipeline: int, stage: int) -> str:
    return _private(slot_key(seed, pipeline, stage)).public_key.to_checksum_address()
