"""One signature per neighbour per epoch proves what arrived at every step, and nothing else."""

from tdml_core.verify import merkle, signing


def _epoch(n_steps=5, key=None):
    key = key or signing.slot_key(7, 1, 0)
    digests = [[f"{t:02x}" * 16, f"{t + 100:02x}" * 16] for t in range(n_steps)]
    hashes = [signing.message_hash(1, 3, t, signing.ACTIVATIONS, 0, d) for t, d in enumerate(digests)]
    root, paths = merkle.all_proofs(hashes)
    sig = signing.sign(key, signing.epoch_hash(1, 3, signing.ACTIVATIONS, 0, root, n_steps))
    evidence = {"sig": sig.hex(), "root": root.hex()}
    return digests, evidence, [[h.hex() for h in p] for p in paths]


def test_all_proofs_match_one_proof_at_a_time():
    for n in range(1, 14):
        leaves = [merkle.leaf_hash(bytes([i])) for i in range(n)]
        root, proofs = merkle.all_proofs(leaves)
        assert root == merkle.root(leaves)
        for i in range(n):
            assert proofs[i] == merkle.proof(leaves, i)
            assert merkle.verify(leaves[i], i, n, proofs[i], root)


def test_every_step_is_attributed_to_its_signer():
    digests, evidence, paths = _epoch()
    sender = signing.slot_address(7, 1, 0)
    for t, d in enumerate(digests):
        assert signing.signed_by(1, 3, t, signing.ACTIVATIONS, 0, d, 5, evidence, paths[t]) == sender


def test_altered_values_steps_paths_or_signatures_prove_nothing():
    digests, evidence, paths = _epoch()
    sender = signing.slot_address(7, 1, 0)
    forged = [digests[2][0], "ff" * 16]
    assert signing.signed_by(1, 3, 2, signing.ACTIVATIONS, 0, forged, 5, evidence, paths[2]) is None
    # another step's values or path, another direction, epoch or sender
    assert signing.signed_by(1, 3, 2, signing.ACTIVATIONS, 0, digests[3], 5, evidence, paths[2]) is None
    assert signing.signed_by(1, 3, 2, signing.ACTIVATIONS, 0, digests[2], 5, evidence, paths[3]) is None
    assert signing.signed_by(1, 3, 2, signing.GRADIENTS, 0, digests[2], 5, evidence, paths[2]) is None
    assert signing.signed_by(1, 4, 2, signing.ACTIVATIONS, 0, digests[2], 5, evidence, paths[2]) is None
    assert signing.signed_by(1, 3, 2, signing.ACTIVATIONS, 1, digests[2], 5, evidence, paths[2]) is None
    # a signature from someone else recovers someone else; a damaged or missing one, no one
    _, other, _ = _epoch(key=signing.slot_key(7, 1, 1))
    who = signing.signed_by(1, 3, 2, signing.ACTIVATIONS, 0, digests[2], 5,
                            {"sig": other["sig"], "root": evidence["root"]}, paths[2])
    assert who != sender
    bad = {"sig": evidence["sig"][:-4] + "zzzz", "root": evidence["root"]}
    assert signing.signed_by(1, 3, 2, signing.ACTIVATIONS, 0, digests[2], 5, bad, paths[2]) is None
    assert signing.signed_by(1, 3, 2, signing.ACTIVATIONS, 0, digests[2], 5, None, paths[2]) is None
    assert signing.signed_by(1, 3, 2, signing.ACTIVATIONS, 0, digests[2], 5, evidence, None) is None
