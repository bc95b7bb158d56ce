"""What a run leaves behind: ``summary.json``, and a plot of accuracy and loss per epoch."""

from __future__ import annotations

import json
from pathlib import Path

from tdml_core.config import JobSpec


def summary(spec: JobSpec, result, **extra) -> dict:
    out = {
        "job": spec.model_dump(mode="json"),
        "mode": result.mode,
        "epochs": result.epochs,
        "final_accuracy": result.final_accuracy,
        "wall_s": result.wall_s,
    }
    if result.plan is not None:
        out["plan"] = result.plan.to_dict()
        out["startup_s"] = result.startup_s
    out.update(extra)
    return out


def write_summary(out_dir: str | Path, data: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)  # never leave a half-written summary behind
    return path


def plot_epochs(epochs: list[dict], path: str | Path, title: str = "") -> Path:
    """Global test accuracy and loss per epoch, each pipeline's local accuracy faint behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [e["epoch"] + 1 for e in epochs]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.5))
    n_local = max((len(e["local"]) for e in epochs), default=0)
    for p in range(n_local):
        ys = [e["local"][p]["accuracy"] for e in epochs if len(e["local"]) > p]
        ax_acc.plot(xs[: len(ys)], ys, color="grey", alpha=0.35, lw=1, label="local models" if p == 0 else None)
    ax_acc.plot(xs, [e["global_accuracy"] for e in epochs], marker="o", label="global model")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="accuracy")
    ax_acc.legend(loc="lower right")
    ax_loss.plot(xs, [e["global_loss"] for e in epochs], marker="o", color="tab:red")
    ax_loss.set(xlabel="epoch", ylabel="test cross-entropy", title="loss")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
