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


def epoch_table(record: dict) -> list[dict]:
    """One row per pipeline of an epoch: score, selection, verdicts (the flow's table artifact)."""
    rows = []
    for lc in record["local"]:
        p = lc["pipeline"]
        verdicts = [v for v in record["verdicts"] if v["slot"].split("/")[0] == str(p)]
        rows.append({
            "pipeline": p,
            "accuracy": round(lc["accuracy"], 4),
            "loss": round(lc["loss"], 4),
            "validator": lc["validator"],
            "flagged": lc["flagged"],
            "selected": lc["selected"],
            "verdicts": "; ".join(
                f"{v['slot']} {v['trainer'][:10]}… {'MALICIOUS' if v['malicious'] else 'ok'}" for v in verdicts
            ),
        })
    return rows


def png_data_url(path: str | Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def markdown_summary(data: dict) -> str:
    """The run's summary as markdown: job, contracts, global model, accuracy, payments."""
    chain = data["chain"]
    last = data["epochs"][-1] if data["epochs"] else {}
    lines = [
        f"# TDML job {data['job_id']}: {data['job']['name']}",
        "",
        "| | |",
        "|---|---|",
        f"| chain | {chain['url']} (chain id {chain['chain_id']}, {chain['tx_count']} transactions) |",
        f"| market | `{chain['market']}` |",
        f"| ledger | `{chain['ledger']}` |",
        f"| store | `{data['store']}` |",
        f"| global model | `{last.get('global_model_cid', '-')}` |",
        f"| final accuracy | {data['final_accuracy']:.4f} after {len(data['epochs'])} epochs |",
        f"| evicted | {', '.join(data['evicted']) or 'nobody'} |",
        f"| refund | {data['refund_wei']} wei |",
        "",
        "| participant | paid (wei) |",
        "|---|---|",
    ]
    lines += [f"| `{who}` | {wei} |" for who, wei in data["rewards"].items()]
    return "\n".join(lines)
