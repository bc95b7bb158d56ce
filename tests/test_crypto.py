import pytest

from tdml_core.crypto import CryptoError, derive_key, new_data_key, open_envelope, seal
from tdml_core.identity import Identity, seal_job_secrets, unseal_job_secrets


def test_both_sides_derive_the_same_key_and_others_do_not():
    a, b, c = Identity.generate("a"), Identity.generate("b"), Identity.generate("c")
    k_ab = derive_key(a.x25519, b.peer_key(b.public_key), "shard")
    k_ba = derive_key(b.x25519, a.peer_key(a.public_key), "shard")
    k_ac = derive_key(a.x25519, c.peer_key(c.public_key), "shard")
    assert k_ab == k_ba and k_ab != k_ac
    assert derive_key(a.x25519, b.peer_key(b.public_key), "other") != k_ab


@pytest.mark.parametrize("algorithm", ["aes-256-gcm", "chacha20-poly1305"])
def test_envelope_round_trip_and_every_refusal(algorithm):
    key = new_data_key()
    env = seal(key, b"stage 1 weights", job_id=7, role="shard/0/1", algorithm=algorithm)
    assert open_envelope(key, env, 7, "shard/0/1") == b"stage 1 weights"
    with pytest.raises(CryptoError, match="does not open"):
        open_envelope(new_data_key(), env, 7, "shard/0/1")  # wrong key
    flipped = bytearray(env)
    flipped[-5] ^= 1
    with pytest.raises(CryptoError):
        open_envelope(key, bytes(flipped), 7, "shard/0/1")  # altered byte
    with pytest.raises(CryptoError):
        open_envelope(key, env, 8, "shard/0/1")  # replayed under another job
    with pytest.raises(CryptoError):
        open_envelope(key, env, 7, "shard/1/1")  # replayed under another role
    with pytest.raises(CryptoError, match="not a TDML envelope"):
        open_envelope(key, b"garbage", 7, "shard/0/1")


def test_key_files_round_trip_with_and_without_passphrase(tmp_path):
    ident = Identity.generate("ps-0")
    plain = Identity.load(ident.save(tmp_path / "plain.json"))
    assert plain.address == ident.address and plain.public_key == ident.public_key
    enc_path = ident.save(tmp_path / "enc.json", passphrase="correct horse")
    assert ident.account.key.hex()[2:] not in enc_path.read_text()
    assert Identity.load(enc_path, "correct horse").address == ident.address
    with pytest.raises(CryptoError, match="wrong passphrase"):
        Identity.load(enc_path, "wrong")
    with pytest.raises(CryptoError, match="passphrase is needed"):
        Identity.load(enc_path)


def test_sealed_job_secrets_reach_only_their_server():
    client, ps, other = Identity.generate("client"), Identity.generate("ps"), Identity.generate("x")
    secrets = {"ledger": "0x" + "ab" * 20, "data_key": new_data_key()}
    env = seal_job_secrets(client, ps.public_key, 3, secrets)
    got = unseal_job_secrets(ps, client.public_key, 3, env)
    assert got == {"ledger": secrets["ledger"], "data_key": secrets["data_key"].hex()}
    with pytest.raises(CryptoError):
        unseal_job_secrets(other, client.public_key, 3, env)
    with pytest.raises(CryptoError):
        unseal_job_secrets(ps, client.public_key, 4, env)
