"""Verification of trainers' compute: per-step records, Merkle commitments, challenges, recomputation."""
