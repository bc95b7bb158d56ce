"""What a run leaves behind: ``summary.json``, and a plot of accuracy and loss per epoch."""

from __future__ import annotations

import json
from pathlib import Path

from tdml_core.config import JobSpec

# which set each accuracy of a summary comes from
ACCURACY_SETS = {
    "final_accuracy, global_accuracy, global_loss": "test set: the client's own, never seen by training, "
                                                    "cross-validation, selection, detection or aggregation",
    "global_val_accuracy, global_val_loss, local accuracy and loss": "validation set, carved from the client's "
                                                                     "training data: it scores and selects the "
                                                                     "local models",
}


def summary(spec: JobSpec, result, **extra) -> dict:
    out = {
        "job": spec.model_dump(mode="json"),
        "mode": result.mode,
        "accuracy_sets": ACCURACY_SETS,
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
    """Global test accuracy and loss per epoch, each pipeline's local (validation) accuracy faint behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [e["epoch"] + 1 for e in epochs]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.5))
    n_local = max((len(e["local"]) for e in epochs), default=0)
    for p in range(n_local):
        ys = [e["local"][p]["accuracy"] for e in epochs if len(e["local"]) > p]
        ax_acc.plot(xs[: len(ys)], ys, color="grey", alpha=0.35, lw=1, label="local models (validation)" if p == 0 else None)
    ax_acc.plot(xs, [e["global_accuracy"] for e in epochs], marker="o", label="global model (test)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
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


def plot_verdicts(doc: dict, path: str | Path, title: str = "") -> Path | None:
    """Each stage's trainers' updates of one layer group, projected to 2-D; flagged ones marked. None: no evidence."""
    panels = []
    for s in sorted({int(v["slot"].split("/")[1]) for v in doc["verdicts"]}):
        mine = [v for v in doc["verdicts"] if v["slot"].endswith(f"/{s}") and v.get("evidence")]
        if not mine:
            continue
        ev = mine[0]["evidence"]
        layer = max(ev, key=lambda k: ev[k].get("separation_ratio") or 0)  # the layer that tells most apart
        panels.append((s, layer, ev[layer], {v["evidence"][layer]["index"]: v for v in mine}))
    if not panels or not any(len(e["points"]) for _, _, e, _ in panels):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (s, layer, ev, by_index) in zip(axes[0], panels):
        for i, pt in enumerate(ev["points"]):
            v = by_index.get(i)
            x, y = pt[0], pt[1] if len(pt) > 1 else 0.0
            bad = bool(v and v["flagged"])
            ax.scatter([x], [y], marker="X" if bad else "o", s=110 if bad else 60, c="tab:red" if bad else "tab:blue")
            if v:
                ax.annotate(v["slot"] + (" evicted" if v["malicious"] else ""), (x, y), textcoords="offset points",
                            xytext=(5, 5), fontsize=8)
        ratio = ev.get("separation_ratio")
        ax.set_title(f"stage {s}, layer {layer}: separation {ratio if ratio is None else f'{ratio:.3g}'}", fontsize=9)
        ax.set_xlabel("projection 1")
        ax.set_ylabel("projection 2")
    fig.suptitle(title or f"epoch {doc.get('epoch', 0) + 1}: trainers' updates (red: flagged)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
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
                f"{v['slot']} {v['trainer'][:10]}… "
                f"{'FRAUD PROOF' if v.get('proven') else 'MALICIOUS' if v['malicious'] else 'ok'}" for v in verdicts
            ),
            "checks": "; ".join(
                f"{c['slot']} {c['steps']} steps " + (f"FAILED step {c['failure']['step']} ({c['failure']['what']})"
                                                     if c["failed"] else "passed")
                for c in record.get("checked", []) if c["slot"].split("/")[0] == str(p)
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
        f"| final accuracy | {data['final_accuracy']:.4f} (test set) after {len(data['epochs'])} epochs |",
        f"| evicted | {', '.join(data['evicted']) or 'nobody'} |",
        f"| refund | {data['refund_wei']} wei |",
        "",
        "| participant | paid (wei) |",
        "|---|---|",
    ]
    lines += [f"| `{who}` | {wei} |" for who, wei in data["rewards"].items()]
    return "\n".join(lines)
