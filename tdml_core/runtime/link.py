"""Sealed links between pipeline neighbours: AES-256-GCM over every activation and gradient they exchange.

Each direction of a link (stage a → stage b of one pipeline) has its own key. Between trainers it comes
from their X25519 exchange (each side's private key and the other's key as published on the market), so
only the two neighbours can read what passes between them: not the client, not a server, not the network.
A run without identities (``tdml train``, benchmarks) derives it from the seed, so that both cost the same.

A message is the sender's counter (8 bytes, big-endian) then the ciphertext and its 16-byte tag. The nonce
is the sender's stage (4 bytes) and that counter; the associated data names the job, pipeline and
direction. The receiver knows which counter comes next from that sender, so a message is refused, naming
the sender's slot, when it was

- replayed: its counter was already received;
- reordered or one went missing: its counter is ahead of the next one expected;
- tampered with: its counter is the one expected but the tag does not verify (bytes altered, or sealed
  with another key, job, pipeline or direction).

Sealing and opening write straight between the tensor's memory and a preallocated byte tensor (the
``_into`` calls of ``cryptography``): no intermediate ``bytes`` copies.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from cryptography.exceptions import InvalidTag
from torch.distributed.pipelining import PipelineStage
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

COUNTER = 8  # bytes of the counter in front of each message
TAG = 16
OVERHEAD = COUNTER + TAG


class LinkError(RuntimeError):
    """A message between neighbours that is refused: replayed, reordered or tampered with."""


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor, as a writable byte view."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def seed_link_key(seed: int, job: str, pipeline: int, src: int, dst: int) -> bytes:
    """A direction's key in a run without identities: from the seed, like its slot's signing key."""
    return hashlib.sha256(f"tdml link key|{seed}|{job}|{pipeline}|{src}->{dst}".encode()).digest()


def link_context(job: str, pipeline: int, src: int, dst: int) -> str:
    """What a direction's key is derived under, and what its messages carry as associated data."""
    return f"link/{job}/{pipeline}/{src}->{dst}"


class Links:
    """One stage's sealed links to its neighbours: a key, a counter and buffers per direction."""

    def __init__(self, job: str, pipeline: int, stage: int, keys: dict[tuple[int, int], bytes]):
        """``keys``: (src, dst) → 32-byte key, for every direction this stage sends or receives on."""
        self.job, self.pipeline, self.stage = job, pipeline, stage
        self._aead = {d: AESGCM(k) for d, k in keys.items()}
        self._aad = {d: link_context(job, pipeline, *d).encode() for d in keys}
        self._sent: dict[int, int] = {}  # peer -> the next counter this stage sends it
        self._expected: dict[int, int] = {}  # peer -> the next counter this stage takes from it
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.sealed_bytes = 0

    def slot(self, peer: int) -> str:
        return f"{self.pipeline}/{peer}"

    def buffer(self, name: tuple, nbytes: int) -> torch.Tensor:
        """A byte tensor kept for ``name`` (one per message in flight), large enough for ``nbytes`` sealed."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() != nbytes + OVERHEAD:
            buf = self._buffers[name] = torch.empty(nbytes + OVERHEAD, dtype=torch.uint8)
        return buf

    def seal(self, tensor: torch.Tensor, peer: int, name: tuple) -> torch.Tensor:
        """``tensor`` sealed for ``peer``, in the buffer kept for ``name``; the next counter is used up."""
        plain = tensor.detach()
        if plain.device.type != "cpu":
            plain = plain.cpu()
        plain = plain.contiguous()
        n = plain.numel() * plain.element_size()
        buf = self.buffer(("out", peer, *name), n)
        counter = self._sent.get(peer, 0)
        self._sent[peer] = counter + 1
        view = memoryview(buf.numpy())
        view[:COUNTER] = counter.to_bytes(COUNTER, "big")
        d = (self.stage, peer)
        self._aead[d].encrypt_into(self._nonce(self.stage, counter), _bytes_of(plain), self._aad[d], view[COUNTER:])
        self.sealed_bytes += n
        return buf

    def receive_buffer(self, plain: torch.Tensor, peer: int, name: tuple) -> tuple[torch.Tensor, int]:
        """The byte tensor a sealed message of ``plain``'s size from ``peer`` is received into, and the counter
        it must carry: receives are posted in the order the peer sends (as torch.distributed matches them)."""
        want = self._expected.get(peer, 0)
        self._expected[peer] = want + 1
        return self.buffer(("in", peer, *name), plain.numel() * plain.element_size()), want

    def open(self, buf: torch.Tensor, plain: torch.Tensor, peer: int, want: int) -> None:
        """Check the message in ``buf`` from ``peer`` (it must carry counter ``want``) and decrypt it straight
        into ``plain``'s memory."""
        view = memoryview(buf.numpy())
        counter = int.from_bytes(view[:COUNTER], "big")
        if counter < want:
            raise LinkError(f"a message from {self.slot(peer)} to {self.pipeline}/{self.stage} was replayed "
                            f"(counter {counter}, already received; expected {want}); refusing it")
        if counter > want:
            raise LinkError(f"a message from {self.slot(peer)} to {self.pipeline}/{self.stage} arrived out of order "
                            f"(counter {counter}, expected {want}: reordered or one went missing); refusing it")
        d = (peer, self.stage)
        target = plain if plain.device.type == "cpu" and plain.is_contiguous() else torch.empty_like(plain, device="cpu")
        try:
            self._aead[d].decrypt_into(self._nonce(peer, counter), view[COUNTER:], self._aad[d], _bytes_of(target))
        except InvalidTag:
            raise LinkError(f"a message from {self.slot(peer)} to {self.pipeline}/{self.stage} was tampered with "
                            f"(counter {counter}: its tag does not verify under the link's key); refusing it") from None
        if target is not plain:
            with torch.no_grad():
                plain.copy_(target)

    @staticmethod
    def _nonce(sender: int, counter: int) -> bytes:
        return sender.to_bytes(4, "big") + counter.to_bytes(8, "big")


def neighbour_directions(stage: int, n_stages: int) -> list[tuple[int, int]]:
    """Every (src, dst) a stage sends or receives on: to and from each neighbour."""
    out = []
    for peer in (stage - 1, stage + 1):
        if 0 <= peer < n_stages:
            out += [(stage, peer), (peer, stage)]
    return out


class SealedStage(PipelineStage):
    """A ``PipelineStage`` whose activations and gradients travel sealed by ``links``.

    The schedule asks a stage for its send and receive operations and, once they completed, for what it
    received. Each send is sealed into a kept byte buffer and that buffer is sent; each receive goes into a
    kept byte buffer, opened into the stage's own receive buffer when the schedule retrieves it. The
    pipeline's group has one rank per stage, so a peer's rank is its stage.
    """

    def __init__(self, *args, links: Links, **kwargs):
        super().__init__(*args, **kwargs)
        self.links = links
        self._pending: dict[tuple, list] = {}
        self._on_device: dict[tuple, torch.Tensor] = {}

    def _to_device(self, buf: torch.Tensor, name: tuple) -> torch.Tensor:
        if self.device.type == "cpu":
            return buf
        dev = self._on_device.get(name)
        if dev is None or dev.numel() != buf.numel():
            dev = self._on_device[name] = torch.empty_like(buf, device=self.device)
        return dev.copy_(buf)

    def _sealed_sends(self, ops: list, kind: str, chunk: int) -> list:
        out = []
        for i, op in enumerate(ops):
            buf = self.links.seal(op.tensor, op.peer, (kind, chunk, i))
            buf = tamper_hook(self.links, buf, op.peer, (kind, chunk, i))
            out.append(dist.P2POp(dist.isend, self._to_device(buf, ("out", kind, chunk, i)), op.peer, op.group,
                                  op.tag))
        return out

    def _sealed_receives(self, ops: list, kind: str, chunk: int) -> list:
        out, pending = [], []
        for i, op in enumerate(ops):
            buf, want = self.links.receive_buffer(op.tensor, op.peer, (kind, chunk, i))
            into = self._to_device(buf, ("in", kind, chunk, i)) if self.device.type != "cpu" else buf
            pending.append((into, buf, op.tensor, op.peer, want))
            out.append(dist.P2POp(dist.irecv, into, op.peer, op.group, op.tag))
        self._pending[(kind, chunk)] = pending
        return out

    def _open(self, kind: str, chunk: int) -> None:
        for into, buf, plain, peer, want in self._pending.pop((kind, chunk), ()):
            if into is not buf:
                buf.copy_(into)
            self.links.open(buf, plain, peer, want)

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list:
        return self._sealed_sends(super().get_fwd_send_ops(fwd_chunk_id), "fwd", fwd_chunk_id)

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list:
        return self._sealed_sends(super().get_bwd_send_ops(bwd_chunk_id), "bwd", bwd_chunk_id)

    def get_fwd_recv_ops(self, fwd_chunk_id: int) -> list:
        return self._sealed_receives(super().get_fwd_recv_ops(fwd_chunk_id), "fwd", fwd_chunk_id)

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list:
        return self._sealed_receives(super().get_bwd_recv_ops(bwd_chunk_id), "bwd", bwd_chunk_id)

    def _retrieve_recv_activations(self, fwd_chunk_id: int):
        self._open("fwd", fwd_chunk_id)
        return super()._retrieve_recv_activations(fwd_chunk_id)

    def _retrieve_recv_grads(self, bwd_chunk_id: int):
        self._open("bwd", bwd_chunk_id)
        return super()._retrieve_recv_grads(bwd_chunk_id)


# -- a test hook: the network between two stages misbehaves -----------------------------------------------------
# TDML_TEST_LINK="P/S:how" makes stage S of pipeline P (the sender) put on the wire, on its second message to
# its next stage, a copy whose last byte is flipped (how = tamper), its first message again (replay), or a
# message that carries the counter of the one after it (reorder: as if the third had overtaken the second).
def tamper_hook(links: Links, buf: torch.Tensor, peer: int, name: tuple) -> torch.Tensor:
    import os

    spec = os.environ.get("TDML_TEST_LINK")
    if not spec or peer != links.stage + 1:
        return buf
    slot, how = spec.split(":")
    if slot != f"{links.pipeline}/{links.stage}":
        return buf
    sent = links._sent[peer]  # this message's counter + 1
    if sent == 1:
        links._first = buf.clone()
        return buf
    if sent != 2:
        return buf
    if how == "tamper":
        bad = buf.clone()
        bad[-1] ^= 0xFF
        return bad
    if how == "replay":
        return links._first
    if how == "reorder":
        ahead = buf.clone()
        memoryview(ahead.numpy())[:COUNTER] = (sent).to_bytes(COUNTER, "big")
        return ahead
    raise ValueError(f"TDML_TEST_LINK: unknown {how!r}")
