"""Signed messages between pipeline neighbours: each step, a stage signs the digests of what it sent.

After every step a stage signs, with its trainer's Ethereum key, the digests of
the activations it sent downstream and of the gradients it sent upstream, and
the receiver keeps the signature in its record of that step. The signature
names the pipeline, the epoch, the step, the direction and the sender's stage,
so it cannot be moved to another message. A receiver can then prove what it was
given, and a verifier that finds a sender's record and its receiver's apart
knows which one lies: the signer, if its signature covers what the receiver
holds; the receiver, if it cannot show one.
"""

from __future__ import annotations

import functools
import hashlib
import json

from eth_keys import keys
from eth_keys.exceptions import BadSignature, ValidationError
from eth_utils import keccak

ACTIVATIONS, GRADIENTS = "activations", "gradients"
SIGNATURE_BYTES = 65


def message_hash(pipeline: int, epoch: int, step: int, kind: str, sender: int, digests: list | None) -> bytes:
    """What a stage signs for one step's messages in one direction (``digests``: one per microbatch)."""
    doc = {"pipeline": pipeline, "epoch": epoch, "step": step, "kind": kind, "sender": sender, "digests": digests}
    return keccak(b"tdml message\x00" + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


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
