"""What the protocol costs per epoch: `tdml run` (the tdml-train flow) against `tdml train` (the engine alone).

Runs the same spec in this one script, one after the other on the same machine:
the engine in-process, then the flow as the `tdml run` command (embedded chain, local
store, temporary Prefect server) twice, with verification on (the spec as given) and off
(`verification: {enabled: false}`). Epoch 1 carries process start-up in all, so means are
taken over epochs 2..N. Prints:

- engine against flow (verification on): mean epoch wall time of each, their ratio, and
  the share of each protocol step in the flow's epoch;
- the cost of verification in an honest epoch: the flow's epoch wall time with it on and
  off and their ratio, each step's seconds (summary.json's `steps_s`; "verify work" is the
  referees' challenge, reveal and re-run), the trainers' own training and commit seconds
  (`trainers_s`), the steps re-run per trainer (`checked`), transactions and gas per epoch;
- the chain transactions of each epoch by kind, for both runs: every raw signed transaction
  in the run's journal (RUN/chain.jsonl) decoded against the Ledger/Market ABI and given to
  the epoch its `epoch` argument names (a call without one goes to the phase it falls in:
  set-up, the current epoch, or reward), with its gas from re-executing the journal; and the
  check that an epoch's count is a constant per trainer + per pipeline + per stage + per epoch.

The new figures are printed as markdown and written to bench/results/flow_overhead.md.

    python bench/flow_overhead.py [--spec examples/digits.yaml] [--epochs 6] [--name flow_overhead] [--services]
    python bench/flow_overhead.py --spec examples/resnet18-synthetic.yaml --epochs 3 --name flow_overhead-resnet18
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "flow_overhead.md"
REWARD_FNS = {"credit", "finish", "settle", "claim", "withdraw", "close"}  # the reward step's calls
PER = {"commitWork": "trainer", "commit score": "pipeline", "commit checks": "pipeline", "commit stage": "stage"}


def run_flow(spec_path: Path, out: Path, env: dict) -> dict:
    """`tdml run SPEC --out OUT`; its summary.json."""
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(spec_path), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"tdml run {spec_path.name} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def journal_txs(run: Path, summary: dict) -> list[dict]:
    """Each journaled transaction: its label (contract function, a commit by kind), where it belongs, its gas."""
    from hexbytes import HexBytes
    from eth_account.typed_transactions import TypedTransaction
    from web3 import Web3

    from tdml_core.chain.client import Chain
    from tdml_core.chain.compile import compile_contract
    from tdml_core.chain.market import Kind

    w3 = Web3()
    contracts = {summary["chain"][name].lower(): w3.eth.contract(abi=compile_contract(name.title()).abi)
                 for name in ("ledger", "market")}
    replay = Chain("embedded", journal=run / "chain.jsonl")  # re-executes the journal: the receipts give the gas
    txs, phase = [], "set-up"
    for line in (run / "chain.jsonl").read_text().splitlines():
        entry = json.loads(line)
        tx = TypedTransaction.from_bytes(HexBytes(entry["raw"])).as_dict()
        to, args = "0x" + (tx.get("to") or b"").hex().removeprefix("0x"), {}
        if to == "0x":
            label = "deploy"
        elif to in contracts:
            fn, args = contracts[to].decode_function_input(bytes(tx["data"]))
            label = fn.fn_name if fn.fn_name != "commit" else f"commit {Kind(args['kind']).label}"
        else:
            label = "transfer" if tx["value"] else "empty transfer (mines a block)"
        if "epoch" in args and not (label.startswith("commit ") and args["kind"] < Kind.ATTEMPT):
            at = args["epoch"]  # a per-epoch call names its epoch (a stage input: the epoch it starts)
            phase = max(at, phase) if isinstance(phase, int) else at
        else:  # set-up, or the phase the call falls in
            at = phase = "reward" if label in REWARD_FNS else phase
        gas = replay.w3.eth.get_transaction_receipt(entry["hash"])["gasUsed"]
        txs.append({"label": label, "at": at, "gas": gas})
    return txs


def tx_table(txs: list[dict], summary: dict, title: str) -> list[str]:
    """Markdown: the steady epochs' transactions per label, the gas per transaction, the formula check."""
    spec = summary["job"]
    n_p, n_s, epochs = spec["data_parallel"], spec["stages"], [e["epoch"] for e in summary["epochs"][1:]]
    count: dict = defaultdict(Counter)
    gas: dict = defaultdict(list)
    for t in txs:
        count[t["at"]][t["label"]] += 1
        if t["at"] in epochs:
            gas[t["label"]].append(t["gas"])
    labels = sorted({lab for e in epochs for lab in count[e]}, key=lambda lab: (list(PER).index(lab)
                    if lab in PER else len(PER), lab))
    out = [f"**Chain transactions per epoch, {title}** (set-up {sum(count['set-up'].values())}, "
           f"epoch 1 {sum(count[0].values())}, reward {sum(count['reward'].values())}; "
           f"{len(txs)} in all, summary's tx_count {summary['chain']['tx_count']})", "",
           "| transaction | one per | " + " | ".join(f"epoch {e + 1}" for e in epochs) + " | gas per tx |",
           "|---|---|" + "---|" * len(epochs) + "---|"]
    for lab in labels:
        out.append(f"| {lab} | {PER.get(lab, 'epoch')} | " + " | ".join(str(count[e][lab]) for e in epochs)
                   + f" | {statistics.mean(gas[lab]):,.0f} |")
    totals = [sum(count[e].values()) for e in epochs]
    epoch_gas = sum(sum(gas[lab]) for lab in labels) / len(epochs)
    out.append("| **total** | | " + " | ".join(f"**{n}**" for n in totals) + f" | {epoch_gas:,.0f} per epoch |")
    steady = all(count[e] == count[epochs[0]] for e in epochs)
    by = Counter()
    for lab, n in count[epochs[0]].items():
        by[PER.get(lab, "epoch")] += n
    size = {"trainer": n_p * n_s, "pipeline": n_p, "stage": n_s, "epoch": 1}
    terms = " + ".join(f"{by[k] / size[k]:g} per {k} × {size[k]}" if k != "epoch" else f"{by[k]} per epoch"
                       for k in size if by[k])
    out += ["", f"Formula ({n_p} pipelines × {n_s} stages): {totals[0]} = {terms}; "
                f"the same counts in every epoch 2..{epochs[-1] + 1}: {'yes' if steady else 'NO'}."]
    return out


def steady_means(summary: dict) -> dict:
    """Means over epochs 2..N: epoch wall, each step, the trainers' train/commit seconds, checked steps, max diff."""
    eps = summary["epochs"][1:]
    out = {"epoch wall time": statistics.mean(e["wall_s"] for e in eps)}
    for name in eps[0]["steps_s"]:
        out[f"step: {name}"] = statistics.mean(e["steps_s"][name] for e in eps)
    for k in ("train_s", "commit_s"):
        out[f"trainers' {k} (mean of pipelines)"] = statistics.mean(
            statistics.mean(t[k] for t in e["trainers_s"].values()) for e in eps)
    cpu = [(t["cpu_s"], t["record_cpu_s"]) for e in eps for t in e["trainers_s"].values() if "cpu_s" in t]
    if cpu:  # the stage processes' CPU, and of it their records' own (cloning, hashing, signing)
        out["trainers' CPU (sum of pipelines)"] = sum(c for c, _ in cpu) / len(eps)
        out["of it, recording (share of the rest)"] = sum(r for _, r in cpu) / max(1e-9, sum(c - r for c, r in cpu))
    checked = [c for e in eps for c in e.get("checked", [])]
    out["steps re-run per trainer"] = statistics.mean(c["steps"] for c in checked) if checked else None
    out["largest honest max_diff"] = max(c["max_diff"] for c in checked) if checked else None
    out["trainers failing a check"] = sum(c["failed"] for c in checked) if checked else None
    return out


def verification_table(on: dict, off: dict, tx_on: list, tx_off: list) -> list[str]:
    a, b = steady_means(on), steady_means(off)
    n = len(on["epochs"]) - 1
    for m, txs in ((a, tx_on), (b, tx_off)):
        steady = [t for t in txs if isinstance(t["at"], int) and t["at"] >= 1]
        m["transactions per epoch"] = len(steady) / n
        m["gas per epoch"] = sum(t["gas"] for t in steady) / n
    fmt = lambda v, k: "–" if v is None else (f"{v:,.0f}" if "gas" in k else f"{v * 100:.1f} %" if "share" in k
                                              else f"{v:.3f} s" if k.startswith(("epoch", "step:", "trainers'"))
                                              else f"{v:g}")
    out = [f"**Verification on vs off, epochs 2..{n + 1}** (wall-time ratio on/off "
           f"{a['epoch wall time'] / b['epoch wall time']:.2f}x)", "",
           "| per epoch | verification on | verification off | on − off |", "|---|---|---|---|"]
    for k in a:
        diff = "" if a[k] is None or b.get(k) is None else fmt(a[k] - b[k], k)
        out.append(f"| {k} | {fmt(a[k], k)} | {fmt(b.get(k), k)} | {diff} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "examples" / "digits.yaml"))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--name", default="flow_overhead", help="results file name under bench/results/")
    ap.add_argument("--services", action="store_true",
                    help="run the flows on the Prefect server of `make services-up` (PostgreSQL) instead of a "
                         "temporary one (SQLite)")
    args = ap.parse_args()
    if args.services:
        from tdml_core.services import load

        os.environ["PREFECT_API_URL"] = load("--services")["prefect_api"]
    server = (f"the Prefect server at {os.environ['PREFECT_API_URL']}" + (" (PostgreSQL, make services-up)"
              if args.services else "") if os.environ.get("PREFECT_API_URL")
              else "a temporary Prefect server (SQLite) per run")
    results = RESULTS.with_name(f"{args.name}.md")
    tmp = Path(tempfile.mkdtemp(prefix="tdml-bench-"))
    data = yaml.safe_load(Path(args.spec).read_text())
    data["epochs"] = args.epochs
    spec_path, off_path = tmp / "spec.yaml", tmp / "spec-noverify.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    off_path.write_text(yaml.safe_dump({**data, "verification": {**data.get("verification", {}), "enabled": False}}))

    from tdml_core.config import load_spec
    from tdml_core.model.split import quiet_trace_warnings
    from tdml_core.runtime.engine import train

    quiet_trace_warnings()
    engine = train(load_spec(spec_path))
    engine_epochs = [e["wall_s"] for e in engine.epochs[1:]]

    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    summary = run_flow(spec_path, tmp / "run", env)
    summary_off = run_flow(off_path, tmp / "run-noverify", env)
    flow_epochs = [e["wall_s"] for e in summary["epochs"][1:]]

    e_mean, f_mean = statistics.mean(engine_epochs), statistics.mean(flow_epochs)
    print(f"spec {args.spec}, {args.epochs} epochs, epochs 2..{args.epochs} averaged")
    print(f"epoch wall time: tdml train {e_mean:.3f} s, tdml run {f_mean:.3f} s, "
          f"ratio run/train {f_mean / e_mean:.2f}x")
    print(f"start-up (before epoch 1): tdml train {engine.startup_s:.1f} s, tdml run {summary['startup_s']:.1f} s "
          f"(publish, hire, key exchange, shard model)")
    print(f"final accuracy: tdml train {engine.final_accuracy:.4f}, tdml run {summary['final_accuracy']:.4f}")
    steps: dict[str, list[float]] = {}
    trainer_train = []
    for e in summary["epochs"][1:]:
        for name, s in e["steps_s"].items():
            steps.setdefault(name, []).append(s)
        trainer_train.append(statistics.mean(t["train_s"] for t in e["trainers_s"].values()))
    print("share of each step in a tdml run epoch:")
    for name, values in steps.items():
        v = statistics.mean(values)
        print(f"  {name:<16} {v:7.3f} s  {100 * v / f_mean:5.1f} %")
    t = statistics.mean(trainer_train)
    print(f"  (inside train epoch: the trainers' own training {t:.3f} s = {100 * t / f_mean:.1f} % of the epoch; "
          f"the rest is fetching and committing)")
    print(f"transactions: {summary['chain']['tx_count']} in all, "
          f"{(summary['chain']['tx_count']) / args.epochs:.1f} per epoch including set-up and reward")

    tx_on, tx_off = journal_txs(tmp / "run", summary), journal_txs(tmp / "run-noverify", summary_off)
    off_mean = statistics.mean(e["wall_s"] for e in summary_off["epochs"][1:])
    md = [f"Spec {Path(args.spec).name}, {args.epochs} epochs, {os.cpu_count()} CPUs, {server}; "
          f"final test accuracy: verification on {summary['final_accuracy']:.4f}, off {summary_off['final_accuracy']:.4f}, "
          f"tdml train {engine.final_accuracy:.4f}.", "",
          f"Epoch wall time (epochs 2..{args.epochs}): tdml train {e_mean:.3f} s; tdml run {f_mean:.3f} s "
          f"(**{f_mean / e_mean:.2f}×**), verification off {off_mean:.3f} s ({off_mean / e_mean:.2f}×).",
          "", *verification_table(summary, summary_off, tx_on, tx_off),
          "", *tx_table(tx_on, summary, "verification on"), "", *tx_table(tx_off, summary_off, "verification off")]
    print("\n" + "\n".join(md))
    results.write_text("# tdml run: the cost of verification, and chain transactions per epoch\n\n"
                       "Printed by `python bench/flow_overhead.py` (its markdown block).\n\n" + "\n".join(md) + "\n")
    print(f"\nwrote {results.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
