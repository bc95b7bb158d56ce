"""Key exchange, authenticated envelopes and digests.

X25519 → HKDF-SHA256 → AES-256-GCM (or ChaCha20-Poly1305), all from ``cryptography``.
An envelope binds the job id and the artifact's role as associated data, so a
ciphertext moved to another job or another role is refused like a wrong key.

    envelope = b"TDML" | version (1) | algorithm (1) | nonce (12) | ciphertext+tag
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"TDML"
VERSION = 1
ALGORITHMS = {1: AESGCM, 2: ChaCha20Poly1305}
ALGORITHM_IDS = {"aes-256-gcm": 1, "chacha20-poly1305": 2}
NONCE = 12
HEADER = len(MAGIC) + 2 + NONCE


class CryptoError(ValueError):
    """An envelope that does not open: wrong key, altered bytes, or another job's or role's."""


def digest(data: bytes) -> str:
    """The hex SHA-256 of ``data``: what commitments on the ledger carry."""
    return hashlib.sha256(data).hexdigest()


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def derive_key(private: X25519PrivateKey, peer: X25519PublicKey, context: str) -> bytes:
    """A 32-byte key both sides derive from their X25519 exchange; ``context`` separates uses."""
    shared = private.exchange(peer)
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"tdml/v1/" + context.encode()
    ).derive(shared)


def associated_data(job_id: int | str, role: str) -> bytes:
    return f"tdml/v1|job={job_id}|role={role}".encode()


def seal(key: bytes, plaintext: bytes, job_id: int | str, role: str, algorithm: str = "aes-256-gcm") -> bytes:
    alg = ALGORITHM_IDS[algorithm]
    nonce = os.urandom(NONCE)
    ct = ALGORITHMS[alg](key).encrypt(nonce, plaintext, associated_data(job_id, role))
    return MAGIC + bytes([VERSION, alg]) + nonce + ct


def open_envelope(key: bytes, envelope: bytes, job_id: int | str, role: str) -> bytes:
    if len(envelope) < HEADER + 16 or envelope[:4] != MAGIC:
        raise CryptoError("not a TDML envelope")
    version, alg = envelope[4], envelope[5]
    if version != VERSION or alg not in ALGORITHMS:
        raise CryptoError(f"unsupported envelope (version {version}, algorithm {alg})")
    nonce, ct = envelope[6:HEADER], envelope[HEADER:]
    try:
        return ALGORITHMS[alg](key).decrypt(nonce, ct, associated_data(job_id, role))
    except InvalidTag:
        raise CryptoError(
            f"envelope for job {job_id} role {role!r} does not open: wrong key, altered bytes, "
            "or it was sealed for another job or role"
        ) from None
