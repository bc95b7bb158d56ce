"""What sealing the links between pipeline neighbours costs: one 2 MiB send, and whole pipeline epochs.

1. A 2 MiB float32 tensor sent back and forth between two processes over gloo on loopback, three ways,
   side by side in one run: in the clear; sealed the direct way (AES-256-GCM from the tensor's memory into
   a kept byte tensor and back, `tdml_core.runtime.link.Links`); sealed the naive way (the tensor to
   `bytes`, `AESGCM.encrypt` to new `bytes`, a new tensor from them, and the reverse). Prints the time of
   one send (half a round trip) for each and the ratios to the clear send.
2. `tdml train` epochs (the engine: real stage processes over torch.distributed) with `protocol.links`
   sealed and plain, one after the other, on examples/digits.yaml and on ResNet-18 over synthetic images,
   epochs 2..N averaged; prints each epoch time and the ratio sealed/plain.

    python bench/links.py [--rounds 200] [--epochs 3] [--skip-resnet]

Writes bench/results/links.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "links.md"
MIB = 2


def _naive(aead, nonce: bytes, x: torch.Tensor, aad: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(aead.encrypt(nonce, x.numpy().tobytes(), aad)), dtype=torch.uint8)


def _naive_open(aead, nonce: bytes, buf: torch.Tensor, aad: bytes, like: torch.Tensor) -> torch.Tensor:
    plain = aead.decrypt(nonce, buf.numpy().tobytes(), aad)
    return torch.frombuffer(bytearray(plain), dtype=like.dtype).reshape(like.shape)


def _pingpong(rank: int, port: int, rounds: int, out) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from tdml_core.runtime.link import OVERHEAD, Links, seed_link_key

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    peer = 1 - rank
    x = torch.randn(MIB * 2**20 // 4, generator=torch.Generator().manual_seed(0))  # the same on both sides
    n = x.numel() * 4
    keys = {(s, d): seed_link_key(0, "bench", 0, s, d) for s, d in ((0, 1), (1, 0))}
    links = Links("bench", 0, rank, keys)
    aead, aad = AESGCM(keys[(0, 1)]), b"bench"
    got = torch.empty_like(x)
    recv_plain = torch.empty_like(x)
    times: dict[str, list[float]] = {"clear": [], "sealed, direct": [], "sealed, naive": []}

    def clear():
        if rank == 0:
            dist.send(x, peer)
            dist.recv(recv_plain, peer)
        else:
            dist.recv(recv_plain, peer)
            dist.send(recv_plain, peer)

    def direct():
        if rank == 0:
            dist.send(links.seal(x, peer, ("b",)), peer)
            buf, want = links.receive_buffer(got, peer, ("b",))
            dist.recv(buf, peer)
            links.open(buf, got, peer, want)
        else:
            buf, want = links.receive_buffer(got, peer, ("b",))
            dist.recv(buf, peer)
            links.open(buf, got, peer, want)
            dist.send(links.seal(got, peer, ("b",)), peer)

    counter = [0]

    def naive():
        nonce = counter[0].to_bytes(12, "big")
        counter[0] += 1
        inbox = torch.empty(n + 16, dtype=torch.uint8)
        if rank == 0:
            dist.send(_naive(aead, nonce, x, aad), peer)
            dist.recv(inbox, peer)
            _naive_open(aead, nonce, inbox, aad, x)
        else:
            dist.recv(inbox, peer)
            back = _naive_open(aead, nonce, inbox, aad, x)
            dist.send(_naive(aead, nonce, back, aad), peer)

    for _ in range(2):  # warm up, then interleave the three so that drift hits all alike
        for fn in (clear, direct, naive):
            fn()
    for _ in range(rounds):
        for name, fn in (("clear", clear), ("sealed, direct", direct), ("sealed, naive", naive)):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / 2)  # one send of a round trip
    assert torch.equal(got, x) and links.sealed_bytes > 0 and OVERHEAD == 24
    if rank == 0:
        out.put({k: statistics.median(v) for k, v in times.items()})
    dist.destroy_process_group()


def one_send(rounds: int) -> dict[str, float]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_pingpong, args=(r, port, rounds, q)) for r in range(2)]
    for p in procs:
        p.start()
    result = q.get(timeout=600)
    for p in procs:
        p.join(60)
    return result


def epochs(spec_path: Path, n_epochs: int, links: str) -> tuple[float, float]:
    from tdml_core.config import parse_spec
    from tdml_core.runtime.engine import train

    data = yaml.safe_load(spec_path.read_text())
    data["epochs"] = n_epochs
    data.setdefault("protocol", {})["links"] = links
    result = train(parse_spec(data))
    return statistics.mean(e["wall_s"] for e in result.epochs[1:]), result.final_accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    from tdml_core.model.split import quiet_trace_warnings

    quiet_trace_warnings()
    sends = one_send(args.rounds)
    md = [f"Printed by `python bench/links.py` ({os.cpu_count()} CPUs, gloo on loopback).", "",
          f"**One {MIB} MiB send between two processes** (median of {args.rounds}, half a round trip):", "",
          "| way | one send | against the clear send |", "|---|---|---|"]
    for name, t in sends.items():
        md.append(f"| {name} | {t * 1e3:.2f} ms | {t / sends['clear']:.2f}× |")
    specs = [ROOT / "examples" / "digits.yaml"] + ([] if args.skip_resnet else [ROOT / "examples" / "resnet18-synthetic.yaml"])
    md += ["", f"**`tdml train` epochs, links sealed and plain** (epochs 2..{args.epochs} averaged):", "",
           "| spec | plain | sealed | sealed/plain | test accuracy plain / sealed |", "|---|---|---|---|---|"]
    for spec in specs:
        plain, acc_p = epochs(spec, args.epochs, "plain")
        sealed, acc_s = epochs(spec, args.epochs, "sealed")
        md.append(f"| {spec.name} | {plain:.3f} s | {sealed:.3f} s | {sealed / plain:.3f}× | {acc_p:.4f} / {acc_s:.4f} |")
    text = "\n".join(md)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("# Sealed links: what AES-256-GCM between pipeline neighbours costs\n\n" + text + "\n")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
