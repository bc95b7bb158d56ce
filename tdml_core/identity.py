"""Participants' keys: an Ethereum account (signing) and an X25519 key (key exchange).

A key file is JSON a user can keep. With a passphrase its secrets are encrypted
(scrypt → AES-256-GCM); without one they are stored in the clear, for local runs.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from eth_account import Account
from eth_account.signers.local import LocalAccount

from tdml_core.crypto import CryptoError

KEYFILE_VERSION = 1


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


def _scrypt(passphrase: str, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(passphrase.encode())


@dataclass
class Identity:
    name: str
    account: LocalAccount
    x25519: X25519PrivateKey

    @classmethod
    def generate(cls, name: str) -> "Identity":
        return cls(name, Account.create(), X25519PrivateKey.generate())

    @property
    def address(self) -> str:
        return self.account.address

    @property
    def public_key(self) -> bytes:
        return self.x25519.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def peer_key(self, public: bytes) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(public)

    def _secrets(self) -> bytes:
        x = self.x25519.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return json.dumps({"eth": self.account.key.hex(), "x25519": x.hex()}).encode()

    def save(self, path: str | Path, passphrase: str | None = None) -> Path:
        doc = {"version": KEYFILE_VERSION, "name": self.name, "address": self.address,
               "x25519_public": self.public_key.hex()}
        if passphrase:
            salt, nonce = os.urandom(16), os.urandom(12)
            ct = AESGCM(_scrypt(passphrase, salt)).encrypt(nonce, self._secrets(), self.address.encode())
            doc["encrypted"] = {"kdf": "scrypt", "salt": _b64(salt), "nonce": _b64(nonce), "ciphertext": _b64(ct)}
        else:
            doc["secrets"] = json.loads(self._secrets())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, passphrase: str | None = None) -> "Identity":
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise CryptoError(f"{path}: no such key file") from None
        except json.JSONDecodeError:
            raise CryptoError(f"{path}: not a TDML key file") from None
        if not isinstance(doc, dict) or "address" not in doc or not ("encrypted" in doc or "secrets" in doc):
            raise CryptoError(f"{path}: not a TDML key file")
        if "encrypted" in doc:
            if not passphrase:
                raise CryptoError(f"{path}: key file is encrypted; a passphrase is needed")
            enc = doc["encrypted"]
            try:
                raw = AESGCM(_scrypt(passphrase, _unb64(enc["salt"]))).decrypt(
                    _unb64(enc["nonce"]), _unb64(enc["ciphertext"]), doc["address"].encode()
                )
            except Exception:
                raise CryptoError(f"{path}: wrong passphrase or damaged key file") from None
            secrets = json.loads(raw)
        else:
            secrets = doc["secrets"]
        try:
            ident = cls(
                doc.get("name", path.stem),
                Account.from_key(bytes.fromhex(secrets["eth"].removeprefix("0x"))),
                X25519PrivateKey.from_private_bytes(bytes.fromhex(secrets["x25519"])),
            )
        except (KeyError, ValueError, TypeError, AttributeError):
            raise CryptoError(f"{path}: damaged key file") from None
        if ident.address != doc["address"]:
            raise CryptoError(f"{path}: key file's address does not match its key")
        return ident


def seal_secrets(sender: Identity, receiver_public: bytes, job_id: int, role: str, secrets: dict) -> bytes:
    """Seal a small JSON document from ``sender`` to one receiver (X25519 → HKDF → AEAD)."""
    from tdml_core.crypto import derive_key, seal

    key = derive_key(sender.x25519, X25519PublicKey.from_public_bytes(receiver_public), f"{role}/{job_id}")
    payload = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in secrets.items()}
    return seal(key, json.dumps(payload, sort_keys=True).encode(), job_id, role)


def open_secrets(receiver: Identity, sender_public: bytes, job_id: int, role: str, envelope: bytes) -> dict:
    """Either side of the exchange can open what was sealed between them."""
    from tdml_core.crypto import derive_key, open_envelope

    key = derive_key(receiver.x25519, X25519PublicKey.from_public_bytes(sender_public), f"{role}/{job_id}")
    return json.loads(open_envelope(key, envelope, job_id, role))


def seal_job_secrets(client: Identity, server_public: bytes, job_id: int, secrets: dict) -> bytes:
    """The client seals the job's secrets (ledger address, data key) to one parameter server."""
    return seal_secrets(client, server_public, job_id, "job-secrets", secrets)


def unseal_job_secrets(server: Identity, client_public: bytes, job_id: int, envelope: bytes) -> dict:
    return open_secrets(server, client_public, job_id, "job-secrets", envelope)
