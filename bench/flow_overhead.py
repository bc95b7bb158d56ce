"""What the protocol costs per epoch: `tdml run` (the tdml-train flow) against `tdml train` (the engine alone).

Both run the same spec in this one script, one after the other on the same machine:
the engine in-process, the flow as the `tdml run` command (embedded chain, local store,
temporary Prefect server). Epoch 1 carries process start-up in both, so the ratio is
taken over epochs 2..N. Prints the mean epoch wall time of each, their ratio, and the
share of each protocol step in the flow's epoch.

    python bench/flow_overhead.py [--spec examples/digits.yaml] [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "examples" / "digits.yaml"))
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tdml-bench-"))
    data = yaml.safe_load(Path(args.spec).read_text())
    data["epochs"] = args.epochs
    spec_path = tmp / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data))

    from tdml_core.config import load_spec
    from tdml_core.model.split import quiet_trace_warnings
    from tdml_core.runtime.engine import train

    quiet_trace_warnings()
    engine = train(load_spec(spec_path))
    engine_epochs = [e["wall_s"] for e in engine.epochs[1:]]

    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(spec_path), "--out", str(tmp / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"tdml run failed:\n{done.stderr[-3000:]}")
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    flow_epochs = [e["wall_s"] for e in summary["epochs"][1:]]

    e_mean, f_mean = statistics.mean(engine_epochs), statistics.mean(flow_epochs)
    print(f"spec {args.spec}, {args.epochs} epochs, epochs 2..{args.epochs} averaged")
    print(f"epoch wall time: tdml train {e_mean:.3f} s, tdml run {f_mean:.3f} s, ratio run/train {f_mean / e_mean:.2f}x")
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
          f"the rest is fetching/committing and the tdml-pipeline-epoch flow runs)")
    print(f"transactions: {summary['chain']['tx_count']} in all, "
          f"{(summary['chain']['tx_count']) / args.epochs:.1f} per epoch including set-up and reward")


if __name__ == "__main__":
    main()
