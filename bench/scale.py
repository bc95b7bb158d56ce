"""The control plane alone, for one epoch, at up to 10,000 trainers: chain, store, detection, aggregation, audit.

    python bench/scale.py [--sizes 10x10 100x10 1000x10] [--params 8192] [--attackers 0.05]

For each size (pipelines x stages) a fresh anvil node (infra/anvil.sh, unless
TDML_ANVIL_URL is set) gets the real contracts, and a job is set up as the protocol
does it: the client publishes, one parameter server per pipeline registers and is
hired, every trainer offers to its server and is hired (not timed: the hiring).
Then one epoch of the protocol's control plane runs, on synthetic updates of
``--params`` floats per stage (a shared descent direction plus noise, like the
updates of trainers on disjoint shards; ``--attackers`` of the pipelines have a
sign-flipping last stage and score low):

- trainers: each seals its stage weights and puts them in the local content store
  (their own work, in parallel on their own hosts: reported per trainer);
- chain: the epoch's transactions (the aggregator's attempt and stage slices, every
  trainer's ``commitWork``, every validator's score, the verdicts, the global model),
  from the first send to the last receipt
  (``Chain.send_signed_many``), on a node that makes a block a second; each is
  signed by its own writer first (``Chain.sign_many``: on the writers' own hosts, so
  reported per transaction and not counted in the chain's time);
- fetch: the aggregator fetches and opens every trainer's weights by id, checking
  each digest;
- detect: ``judge_epoch`` over the updates of every stage (two_means_pca, loners,
  copies, agreement), as the flow's detect step calls it;
- aggregate: ``combine("top_k", ...)`` over the unflagged pipelines;
- audit: the auditor's own signer check (``Auditor.check_signers``: every
  commitment's writer against the market's hiring) over the epoch's events, every
  artifact re-fetched against its committed digest, the verdicts and the global
  model re-derived and compared;
- and apart, since it comes once a job and not once an epoch: the credits (each
  server credits its trainers, the client the servers; one transaction each for all
  of a participant's epochs, as the reward step sends them).

Prints one table (seconds per part, transactions and gas of the epoch) and writes
bench/results/scale.md and scale.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from eth_account import Account

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tdml_core.artifacts import get_state, put_state, state_digest  # noqa: E402
from tdml_core.chain import Chain, MarketClient  # noqa: E402
from tdml_core.chain.market import MAX_CREDIT_BATCH, MAX_HIRE_BATCH, Kind, Slot  # noqa: E402
from tdml_core.config import DetectionSpec  # noqa: E402
from tdml_core.crypto import digest, new_data_key  # noqa: E402
from tdml_core.protocol.audit import Auditor  # noqa: E402
from tdml_core.protocol.rewards import validator_of  # noqa: E402
from tdml_core.robust.combine import combine  # noqa: E402
from tdml_core.robust.judge import judge_epoch  # noqa: E402
from tdml_core.robust.vectors import update  # noqa: E402
from tdml_core.storage.store import LocalStore  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ETH = 10**18
BOND = 10**15
JOB = 0
BLOCK_TIME = 1  # seconds between the node's blocks
ANVIL_ARGS = os.environ.get("TDML_SCALE_ANVIL_ARGS", "").split()


def _accounts(tag: str, n: int) -> list:
    return [Account.from_key(hashlib.sha256(f"tdml scale {tag} {i}".encode()).digest()) for i in range(n)]


def _key32(who) -> bytes:
    return hashlib.sha256(who.address.encode()).digest()


class Job:
    """The chain side of one job of P pipelines x S stages, hired as the protocol hires."""

    def __init__(self, chain: Chain, P: int, S: int):
        self.chain, self.P, self.S = chain, P, S
        self.client = _accounts("client", 1)[0]
        self.servers = _accounts("server", P)
        self.trainers = [_accounts(f"trainer {p}", S) for p in range(P)]
        everyone = [self.client, *self.servers, *(t for row in self.trainers for t in row)]
        for i in range(0, len(everyone), 1000):  # the faucet funds every participant
            for who in everyone[i:i + 1000]:
                chain.w3.provider.make_request("anvil_setBalance", [who.address, hex(10 * ETH)])
        blueprint, _ = chain.deploy(self.client, "Ledger", blueprint=True)
        market_addr, _ = chain.deploy(self.client, "Market", blueprint)
        self.m = m = MarketClient(chain, market_addr)
        self.task = m.publish_task(self.client, b"\x01" * 32, "scale", ETH, splits=P, stages=S, epochs=1,
                                   deadline=chain.timestamp() + 86400, pubkey=_key32(self.client),
                                   bond_wei=BOND)[0]
        f = m.c.functions
        chain.send_many([(s, f.register(self.task, 10**9, 4, _key32(s)), BOND) for s in self.servers])
        for i in range(0, P, MAX_HIRE_BATCH):
            m.hire_servers(self.client, self.task, [s.address for s in self.servers[i:i + MAX_HIRE_BATCH]])
        chain.send_many([(s, f.postTrainerHiring(self.task, S, 0)) for s in self.servers])
        chain.send_many([(t, f.offerTrainer(self.task, self.servers[p].address, 10**9, 2, _key32(t)), BOND)
                         for p in range(P) for t in self.trainers[p]])
        chain.send_many([(self.servers[p], f.hireTrainers(self.task, [t.address for t in self.trainers[p]],
                                                          list(range(S)))) for p in range(P)])
        self.ledger, _ = m.open_ledger(self.client, self.task)
        self.ledger_block = m.task(self.task)["ledger_block"]


def synthetic_epoch(P: int, S: int, params: int, attackers: list[int], seed: int = 0):
    """Start state, each pipeline's end state per stage, their epoch gradients and scores."""
    rng = np.random.default_rng(seed)
    w, b = params - params // 64, params // 64
    start = {s: {"weight": torch.from_numpy(rng.normal(0, 0.1, w).astype(np.float32)),
                 "bias": torch.zeros(b)} for s in range(S)}
    direction = {s: rng.normal(0, 1, params).astype(np.float32) for s in range(S)}
    ends, grads, scores = {}, {}, []
    for p in range(P):
        for s in range(S):
            u = 0.01 * (direction[s] + 1.2 * rng.normal(0, 1, params).astype(np.float32))
            g = -u / 0.05 + 0.002 * rng.normal(0, 1, params).astype(np.float32)
            if p in attackers and s == S - 1:
                u = -u  # sign flip: its weights move up the gradient; it commits the honest gradient
            ends[(p, s)] = {"weight": start[s]["weight"] + torch.from_numpy(u[:w]),
                            "bias": start[s]["bias"] + torch.from_numpy(u[w:])}
            grads[(p, s)] = {"weight": g[:w], "bias": g[w:]}
        scores.append(float(0.5 if p in attackers else 0.9 + 0.01 * rng.normal()))
    return start, ends, grads, scores


def _model(stage_states: dict[int, dict]) -> dict[str, torch.Tensor]:
    return {f"stage{s}.{k}": v for s, st in stage_states.items() for k, v in st.items()}


def run_size(url: str, P: int, S: int, params: int, attack_share: float) -> dict:
    chain = Chain(url)
    t0 = time.perf_counter()
    job = Job(chain, P, S)
    hire_s = time.perf_counter() - t0
    hire_tx = chain.tx_count
    attackers = list(range(0, P, max(1, round(1 / attack_share)))) if attack_share > 0 else []
    start, ends, grads, scores = synthetic_epoch(P, S, params, attackers)
    keys = {s: new_data_key() for s in range(S)}
    row: dict = {"pipelines": P, "stages": S, "trainers": P * S, "params_per_stage": params,
                 "attackers": len(attackers), "hire_s": hire_s, "hire_tx": hire_tx}
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "store")
        # trainers: seal and put their weights (each on its own host)
        t = time.perf_counter()
        put = {(p, s): put_state(store, keys[s], JOB, f"weights {p}/{s}", ends[(p, s)]) for p in range(P) for s in range(S)}
        row["trainer_put_ms"] = 1000 * (time.perf_counter() - t) / (P * S)
        # chain: the epoch's transactions, each signed by its writer
        led, f, agg = job.ledger, job.ledger.c.functions, job.servers[0]
        gas: dict[str, int] = {}
        txs: dict[str, int] = {}
        secs: dict[str, float] = {}

        signing = [0.0]

        def phase(name, calls):
            """Each writer signs its own transaction (on its own host: not counted as chain time), then the node."""
            t_sign = time.perf_counter()
            raws = chain.sign_many([(c[0], c[1], 0) for c in calls])
            signing[0] += time.perf_counter() - t_sign
            t_chain = time.perf_counter()
            sent = chain.send_signed_many(raws)
            secs[name] = secs.get(name, 0.0) + time.perf_counter() - t_chain
            gas[name] = gas.get(name, 0) + sum(x.gas_used for x in sent)
            txs[name] = txs.get(name, 0) + len(sent)

        cid0, dig0 = put[(0, 0)]
        t = time.perf_counter()
        phase("attempt, stages", [(agg, f.commit(*Slot(0, Kind.ATTEMPT).args, "", bytes(32)))])
        phase("attempt, stages", [(agg, f.commit(*Slot(0, Kind.STAGE, 0, s).args, cid0, bytes.fromhex(dig0)))
                                  for s in range(S)])
        phase("commitWork", [(job.trainers[p][s], f.commitWork(0, p, s, 0, put[(p, s)][0], bytes.fromhex(put[(p, s)][1]),
                                                                put[(p, s)][0], bytes.fromhex(put[(p, s)][1]),
                                                                "leaves:40", bytes(32)))
                             for p in range(P) for s in range(S)])
        phase("scores", [(job.servers[validator_of(p, P)], f.commit(*Slot(0, Kind.SCORE, p).args, cid0,
                                                                    bytes.fromhex(dig0))) for p in range(P)])
        row["chain_commit_s"] = time.perf_counter() - t - signing[0]
        # fetch: the aggregator opens every trainer's weights by id, against its committed digest
        t = time.perf_counter()
        got = {(p, s): get_state(store, keys[s], JOB, f"weights {p}/{s}", *put[(p, s)]) for p in range(P) for s in range(S)}
        row["fetch_s"] = time.perf_counter() - t
        # detect
        trainers = {(p, s): job.trainers[p][s].address for p in range(P) for s in range(S)}
        t = time.perf_counter()
        updates = {k: update(start[k[1]], v) for k, v in got.items()}
        verdicts = judge_epoch(scores, updates, grads, trainers, {}, n_stages=S, tolerance=0.15,
                               detection=DetectionSpec())
        row["detect_s"] = time.perf_counter() - t
        flagged = {v["slot"] for v in verdicts["verdicts"] if v["flagged"]}
        truth = {f"{p}/{S - 1}" for p in attackers}
        row["caught"] = len(flagged & truth)
        row["false_flags"] = len(flagged - truth)
        # aggregate
        t = time.perf_counter()
        eligible = [p for p in range(P) if not verdicts["flagged"][p]]
        states = {p: _model({s: got[(p, s)] for s in range(S)}) for p in eligible}
        global_state, chosen, applied = combine("top_k", _model(start), states, scores, eligible, top_k=len(eligible))
        g_digest = state_digest(global_state)
        row["aggregate_s"] = time.perf_counter() - t
        t, signed_before = time.perf_counter(), signing[0]
        v_digest = digest(json.dumps(verdicts["flagged"]).encode())
        phase("verdicts, global", [(agg, f.commit(*Slot(0, Kind.VERDICTS).args, cid0, bytes.fromhex(v_digest)))])
        phase("verdicts, global", [(agg, f.commit(*Slot(0, Kind.GLOBAL).args, cid0, bytes.fromhex(g_digest)))])
        row["chain_close_s"] = time.perf_counter() - t - (signing[0] - signed_before)
        row["chain_s"] = row["chain_commit_s"] + row["chain_close_s"]
        # audit: the signer check over the epoch's events, every artifact again, verdicts and global re-derived
        t = time.perf_counter()
        auditor = Auditor.__new__(Auditor)
        auditor.say = lambda _msg: None
        auditor._hired, auditor._servers = {}, {}
        auditor.job = SimpleNamespace(chain=chain, ledger=led, market=job.m, job_id=job.task)
        auditor.task = job.m.task(job.task)
        auditor.check_signers()
        row["audit_signers_s"] = time.perf_counter() - t
        row["events"] = len(auditor.events)
        t2 = time.perf_counter()
        work = {(ev["pipeline"], ev["stage"]): ev for ev in auditor.events if ev["slot"].kind == Kind.WEIGHTS}
        again = {k: get_state(store, keys[k[1]], JOB, f"weights {k[0]}/{k[1]}", ev["cid"], ev["digest"].hex())
                 for k, ev in work.items()}
        re_verdicts = judge_epoch(scores, {k: update(start[k[1]], v) for k, v in again.items()}, grads, trainers, {},
                                  n_stages=S, tolerance=0.15, detection=DetectionSpec())
        re_global, _, _ = combine("top_k", _model(start), {p: _model({s: again[(p, s)] for s in range(S)})
                                                           for p in eligible}, scores, eligible, top_k=len(eligible))
        if re_verdicts["flagged"] != verdicts["flagged"] or state_digest(re_global) != g_digest:
            raise SystemExit("the audit did not re-derive the epoch's verdicts and global model")
        row["audit_rederive_s"] = time.perf_counter() - t2
        row["audit_s"] = time.perf_counter() - t
        # the job's end, once a job and not an epoch: each server credits its trainers' work, the client the
        # servers' (one transaction per participant for all its epochs, as the protocol's reward step does)
        phase("credit", [(job.servers[p], f.credit(t_.address, [0])) for p in range(P) for t_ in job.trainers[p]
                         if not any(v["malicious"] and v["trainer"] == t_.address for v in verdicts["verdicts"])])
        phase("credit", [(job.client, f.credit(s.address, [0])) for s in job.servers])
        row["credit_s"], row["credit_tx"], row["credit_gas"] = secs["credit"], txs.pop("credit"), gas.pop("credit")
    row["epoch_tx"] = sum(txs.values())
    row["sign_ms"] = 1000 * signing[0] / (row["epoch_tx"] + row["credit_tx"])  # each signed on its writer's host
    row["epoch_gas"] = sum(gas.values())
    row["tx"] = txs
    row["gas"] = gas
    row["chain_parts_s"] = secs
    row["control_plane_s"] = row["chain_s"] + row["fetch_s"] + row["detect_s"] + row["aggregate_s"] + row["audit_s"]
    return row


def _anvil():
    url = os.environ.get("TDML_ANVIL_URL")
    if url:
        return url, None
    pidfile = Path(tempfile.mkdtemp()) / "anvil.pid"
    # A block every BLOCK_TIME s taking every pending transaction (anvil's mine-per-transaction mode left
    # batched transactions pending), no old states kept, and blocks big enough for an epoch: on a 30 M gas
    # limit the base fee climbs 1/8 per full block and thousands of commitments price themselves out (the gas
    # used is what the table reports). anvil's time for a block grows with its state (0.25 s an empty block
    # at 10,000 trainers): at a 0.25 s block time it fell behind and stalled.
    url = subprocess.run([str(ROOT / "infra/anvil.sh"), "start", str(pidfile), "--block-time", str(BLOCK_TIME),
                          "--prune-history", "16", "--gas-limit", str(10**12), *ANVIL_ARGS], check=True, capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    return url, pidfile


def _size(text: str) -> tuple[int, int]:
    try:
        p, s = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a size is PIPELINESxSTAGES, for example 1000x10") from None
    if p < 3 or s < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 3 pipelines and 1 stage")
    return p, s


def table(rows: list[dict]) -> str:
    head = ("| trainers (P × S) | chain | fetch | detect | aggregate | audit | **epoch's control plane** | "
            "epoch tx | epoch gas | gas / trainer | caught | false flags | credit at the job's end |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['trainers']:,} ({r['pipelines']} × {r['stages']}) | {r['chain_s']:.1f} s | {r['fetch_s']:.1f} s"
                     f" | {r['detect_s']:.1f} s | {r['aggregate_s']:.1f} s | {r['audit_s']:.1f} s"
                     f" | **{r['control_plane_s']:.1f} s** | {r['epoch_tx']:,} | {r['epoch_gas']:,}"
                     f" | {r['epoch_gas'] // r['trainers']:,} | {r['caught']}/{r['attackers']} | {r['false_flags']}"
                     f" | {r['credit_s']:.1f} s, {r['credit_tx']:,} tx, {r['credit_gas']:,} gas |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=_size, default=[(10, 10), (100, 10), (1000, 10)])
    ap.add_argument("--params", type=int, default=8192, help="floats per stage update (default 8192)")
    ap.add_argument("--attackers", type=float, default=0.05, help="share of pipelines with an attacking last stage")
    ap.add_argument("--name", default="scale")
    a = ap.parse_args(argv)
    if a.params < 128:
        ap.error("--params: at least 128 floats per stage")
    rows = []
    for P, S in a.sizes:
        url, pidfile = _anvil()
        try:
            print(f"{P} x {S} = {P * S:,} trainers ...", flush=True)
            r = run_size(url, P, S, a.params, a.attackers)
        finally:
            if pidfile is not None:
                subprocess.run([str(ROOT / "infra/anvil.sh"), "stop", str(pidfile)], check=False)
        rows.append(r)
        print(f"  hiring {r['hire_s']:.1f} s ({r['hire_tx']:,} tx, not counted); on each writer's host: put "
              f"{r['trainer_put_ms']:.1f} ms, sign {r['sign_ms']:.2f} ms a transaction; chain {r['chain_s']:.1f} s, "
              f"fetch {r['fetch_s']:.1f} s, detect {r['detect_s']:.1f} s, aggregate {r['aggregate_s']:.1f} s, "
              f"audit {r['audit_s']:.1f} s (signers {r['audit_signers_s']:.1f} s over {r['events']:,} events): "
              f"{r['control_plane_s']:.1f} s; {r['epoch_tx']:,} tx, {r['epoch_gas']:,} gas; credit at the job's end "
              f"{r['credit_s']:.1f} s ({r['credit_tx']:,} tx)", flush=True)
        print("  chain by part: " + ", ".join(f"{k} {v:.1f} s ({r['tx'].get(k, r['credit_tx']):,} tx)"
                                              for k, v in r["chain_parts_s"].items()),
              flush=True)
    out = table(rows)
    print(out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / f"{a.name}.md").write_text(f"`python bench/scale.py {' '.join(sys.argv[1:])}`, "
                                          f"{a.params:,} floats per stage update\n\n{out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
