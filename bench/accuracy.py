"""Does TDML learn as well as one node? Test accuracy at 2, 4 and 8 pipelines, with and without the outer optimizer.

For each number of pipelines P (× 2 stages) and each seed, on examples/digits.yaml with
top-K = all, the same epochs, the same split and shards:

- single node: the whole training set in one process (the same for every P);
- FedAvg: P clients averaged every epoch, in one process;
- `tdml train` (the engine: P pipelines × 2 stage processes through torch.distributed),
  with plain averaging and with the outer optimizer (`aggregation.outer_lr`,
  `outer_momentum`, Nesterov) given on the command line.

Every accuracy is on the test set, which neither cross-validation nor selection sees.
Prints one table (mean and spread over seeds of the final test accuracy, and the gap to
single node in points) and writes it to bench/results/accuracy.md, with a plot of mean
test accuracy per epoch for each P (bench/results/accuracy.png, like the paper's Figure 8).

``--sweep`` first tries outer settings on FedAvg alone (one process, seconds a run) at
every P and prints the grid. FedAvg is the engine's algorithm without the pipeline (its
batches are not cut into microbatches, so the two part by float rounding and then by
chance: a point either way on one seed), a quick guide to the settings the engine is run with.

    python bench/accuracy.py [--pipelines 2 4 8] [--seeds 3] [--epochs 15]
                             [--outer-lr 1.0 --outer-momentum 0.5] [--sweep] [--no-engine]
                             [--lr 0.1 --batch-size 16 --name accuracy-lr0.1-b16]
                             [--rounds 2 --name accuracy-r2]

``--rounds R`` has FedAvg and `tdml train` synchronise R times an epoch
(``rounds_per_epoch``: each round a full protocol round over 1/R of the epoch's
batches); the final accuracies are still compared after the same epochs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"


INNER: dict = {}  # --lr, --batch-size, --rounds: the same for every method (single node has no rounds)


def spec_for(pipelines: int, seed: int, epochs: int, outer: tuple[float, float] | None):
    from tdml_core.config import JobSpec

    data = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    data.update(name=f"accuracy-p{pipelines}", data_parallel=pipelines, top_k=pipelines, seed=seed, epochs=epochs,
                **INNER)
    if outer is not None:
        data["aggregation"] = {"rule": "top_k", "outer_lr": outer[0], "outer_momentum": outer[1]}
    return JobSpec.model_validate(data)


def curve(result) -> list[float]:
    return [e["global_accuracy"] for e in result.epochs]


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def sweep(args) -> list[dict]:
    """FedAvg's final test accuracy (mean over seeds) for each outer setting at every P."""
    from tdml_core.runtime.baselines import fedavg

    grid = [(1.0, 0.0)] + [(lr, m) for lr in args.sweep_lr for m in args.sweep_momentum]
    rows = []
    for p in args.pipelines:
        for lr, m in grid:
            finals = [fedavg(spec_for(p, s, args.epochs, (lr, m))).final_accuracy for s in range(args.seeds)]
            mu, sd = mean_sd(finals)
            rows.append({"pipelines": p, "outer_lr": lr, "outer_momentum": m, "mean": mu, "sd": sd})
            print(f"  sweep P={p} outer lr {lr:g} momentum {m:g}: {100 * mu:.2f} ± {100 * sd:.2f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipelines", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--outer-lr", type=float, default=1.0)
    ap.add_argument("--outer-momentum", type=float, default=0.5)
    ap.add_argument("--sweep", action="store_true", help="try outer settings on FedAvg first")
    ap.add_argument("--sweep-lr", type=float, nargs="+", default=[0.5, 0.7, 1.0, 1.5])
    ap.add_argument("--sweep-momentum", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--no-engine", action="store_true", help="single node and FedAvg only (no stage processes)")
    ap.add_argument("--lr", type=float, help="the inner learning rate for every method (the example's: 0.05)")
    ap.add_argument("--batch-size", type=int, help="the batch size for every method (the example's: 32)")
    ap.add_argument("--rounds", type=int, help="rounds_per_epoch of FedAvg and tdml train (default 1)")
    ap.add_argument("--name", default="accuracy", help="results file name under bench/results/")
    args = ap.parse_args()
    if args.lr is not None:
        INNER["lr"] = args.lr
    if args.batch_size is not None:
        INNER["batch_size"] = args.batch_size
    if args.rounds is not None:
        INNER["rounds_per_epoch"] = args.rounds

    from tdml_core.runtime.baselines import fedavg, single_node
    from tdml_core.runtime.engine import train

    t0 = time.perf_counter()
    RESULTS.mkdir(parents=True, exist_ok=True)
    swept = sweep(args) if args.sweep else []
    outer = (args.outer_lr, args.outer_momentum)
    methods = ["single node", "FedAvg", "FedAvg + outer"] + ([] if args.no_engine else ["tdml train", "tdml train + outer"])
    curves: dict[tuple[int, str], list[list[float]]] = {}
    for s in range(args.seeds):
        single = curve(single_node(spec_for(2, s, args.epochs, None)))
        for p in args.pipelines:
            runs = {"single node": lambda: single,
                    "FedAvg": lambda: curve(fedavg(spec_for(p, s, args.epochs, None))),
                    "FedAvg + outer": lambda: curve(fedavg(spec_for(p, s, args.epochs, outer))),
                    "tdml train": lambda: curve(train(spec_for(p, s, args.epochs, None))),
                    "tdml train + outer": lambda: curve(train(spec_for(p, s, args.epochs, outer)))}
            for m in methods:
                tm = time.perf_counter()
                c = runs[m]()
                curves.setdefault((p, m), []).append(c)
                print(f"P={p} seed {s} {m}: {100 * c[-1]:.2f} ({time.perf_counter() - tm:.0f} s)", flush=True)

    lines = [f"| P | {' | '.join(methods)} |", "|---|" + "---|" * len(methods)]
    table = []
    for p in args.pipelines:
        single_mu = mean_sd([c[-1] for c in curves[(p, "single node")]])[0]
        cells = []
        for m in methods:
            mu, sd = mean_sd([c[-1] for c in curves[(p, m)]])
            table.append({"pipelines": p, "method": m, "mean": mu, "sd": sd, "gap_points": 100 * (mu - single_mu)})
            cells.append(f"{100 * mu:.2f} ± {100 * sd:.2f}" + ("" if m == "single node" else
                                                               f" ({100 * (mu - single_mu):+.2f})"))
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    wall = time.perf_counter() - t0
    head = (f"Final test accuracy (%) after {args.epochs} epochs on digits (P pipelines × 2 stages, top-K = all), "
            f"mean ± spread over seeds 0–{args.seeds - 1}; in brackets the difference to single node in points. "
            f"Outer optimizer: Nesterov SGD on the averaged update, lr {outer[0]:g}, momentum {outer[1]:g}. "
            f"Inner: SGD lr {INNER.get('lr', 0.05):g}, momentum 0.9, batch {INNER.get('batch_size', 32)}. "
            + (f"FedAvg and tdml train synchronise {INNER['rounds_per_epoch']} times an epoch. "
               if INNER.get("rounds_per_epoch", 1) > 1 else "") +
            f"{wall:.0f} s.\n\n")
    md = head + "\n".join(lines) + "\n"
    if swept:
        md += ("\nOuter settings on FedAvg (final test accuracy, mean ± spread over seeds):\n\n"
               "| P | outer lr | momentum | accuracy |\n|---|---|---|---|\n"
               + "\n".join(f"| {r['pipelines']} | {r['outer_lr']:g} | {r['outer_momentum']:g} | "
                           f"{100 * r['mean']:.2f} ± {100 * r['sd']:.2f} |" for r in swept) + "\n")
    print("\n" + md)
    (RESULTS / f"{args.name}.md").write_text("`python bench/accuracy.py " + " ".join(sys.argv[1:]) + "`\n\n" + md)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"table": table, "sweep": swept, "curves": {
        f"{p}/{m}": c for (p, m), c in curves.items()}}, indent=1))
    plot(curves, args.pipelines, methods, RESULTS / f"{args.name}.png", args.epochs)
    print(f"wrote {RESULTS / (args.name + '.md')} and {RESULTS / (args.name + '.png')}")


def plot(curves, pipelines, methods, path: Path, epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pipelines), figsize=(4.5 * len(pipelines), 3.6), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], pipelines):
        for m in methods:
            runs = curves[(p, m)]
            mean = [statistics.fmean(c[i] for c in runs) for i in range(len(runs[0]))]
            ax.plot([epochs * (i + 1) / len(mean) for i in range(len(mean))], mean, marker="o" if m.startswith("tdml") else ".", ms=3, label=m,
                    ls="--" if m == "single node" else ":" if m.startswith("FedAvg") else "-",
                    lw=2 if m.startswith("tdml") else 1.2)
        ax.set(title=f"{p} pipelines × 2 stages", xlabel="epoch", ylim=(0.3, 1.0))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (mean over seeds)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
