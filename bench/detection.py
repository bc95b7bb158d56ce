"""Byzantine detection: which attackers the two-stage judge finds, how soon, and what it costs in accuracy.

Drives the training engine alone (no chain, no store): one ``PipelineCluster`` per
(P, seed), reset for every run (``PipelineCluster.reset``: the run's attacks, fresh
optimizers), the spec's ``attacks`` running inside the attackers' own stage processes
(``tdml_core.attacks``), and every epoch judged by ``tdml_core.robust.judge.judge_epoch``
as the protocol judges it. The default detector (``two_means_pca``, the first of
``--detectors``) makes the decisions of the run: flagged pipelines stay out of the
global model (``combine("top_k", ..., top_k=P)``: every unflagged one averaged), an
evicted trainer is replaced by an honest one (``PipelineCluster.replace``: a new
optimizer, none of the attacks) that trains from the next epoch's global model, as
the protocol's standby does (``--no-standby`` drops its pipeline instead). Each epoch's
work is also checked, as the flow's verify step does (``--no-verify``: statistics alone):
a failed check convicts its trainer, and the trainers of its pipeline who passed are not
held to their statistics that epoch. The other
detectors judge the SAME epochs post hoc (same updates, same accuracies, same
pipelines still in the run), each with its own flag history, so their rows give
recall, false positives and the epochs at which they would have flagged and evicted,
but no accuracy of their own.

Placements: ``one`` (one attacker at slot 1/1), ``same`` (a quarter of all 2P
trainers, all at stage 1) and ``across`` (a quarter, split over both stages, one
per pipeline). label_flip only exists on the last stage, so it has no ``across``.
A clean run per (P, seed) gives the baseline accuracy and the false positives on
clean data.

    python bench/detection.py [--pipelines 4 8] [--kinds ...] [--placements one same across]
                              [--seeds 5] [--epochs 8] [--lr LR] [--batch-size B] [--detectors two_means_pca two_means_random mandera]

Writes bench/results/detection.md (the table), detection.json (every run, epoch by
epoch, with the separation ratios each detector saw) and detection_projections.png
(the projected updates of one layer group under gaussian, zero_gradient and mean_shift).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tdml_core.attacks import COMPUTE  # noqa: E402
from tdml_core.config import ATTACK_KINDS as ALL_KINDS  # noqa: E402

ATTACK_KINDS = tuple(k for k in ALL_KINDS if k not in COMPUTE)  # the compute attacks are bench/verification.py's

DETECTORS = ("two_means_pca", "two_means_random", "mandera")
PLACEMENTS = ("one", "same", "across")
RESULTS = ROOT / "bench" / "results"
FIGURE_KINDS = ("gaussian", "zero_gradient", "mean_shift")


def slots_for(placement: str, n_pipelines: int) -> list[str]:
    """The malicious trainer slots ("PIPELINE/STAGE") of a placement in P pipelines x 2 stages."""
    m = max(1, round(0.25 * 2 * n_pipelines))  # a quarter of all trainers
    if placement == "one":
        return ["1/1"]
    if placement == "same":  # all at stage 1, pipelines 1..m (m = P/2: half of stage 1)
        return [f"{p}/1" for p in range(1, m + 1)]
    if placement == "across":  # one per pipeline, the first half of them at stage 0
        return [f"{p}/{0 if i < m // 2 else 1}" for i, p in enumerate(range(1, m + 1))]
    raise ValueError(placement)


def job_spec(n_pipelines: int, epochs: int, seed: int, kind: str | None, slots: list[str], verify: bool = True,
             training: dict | None = None):
    from tdml_core.config import parse_spec

    return parse_spec({**(training or {}),
        "verification": {"enabled": verify},
        "name": "detection-bench", "model": "digits_cnn", "dataset": {"name": "digits"},
        "data_parallel": n_pipelines, "stages": 2, "epochs": epochs, "seed": seed,
        "top_k": n_pipelines,  # every unflagged local model is averaged
        "attacks": [{"slot": s, "kind": kind} for s in slots] if kind else [],
    })


def _update(start, end) -> dict:
    """end - start over the floating entries, float64 numpy (what a stage's trainer applied in the epoch)."""
    import torch

    return {k: (v.to(torch.float64) - start[k].to(torch.float64)).numpy()
            for k, v in end.items() if v.is_floating_point()}


def _stage_evidence(doc: dict, active: list[int], n_stages: int, key: str) -> dict:
    """{stage: {layer: evidence[key]}} from the verdicts (the same for all trainers of a stage)."""
    out = {}
    by_slot = {v["slot"]: v for v in doc["verdicts"]}
    for s in range(n_stages):
        if active and by_slot.get(f"{active[0]}/{s}", {}).get("evidence"):
            ev = by_slot[f"{active[0]}/{s}"]["evidence"]
            out[str(s)] = {layer: e[key] for layer, e in ev.items()}
    return out


def _stage_points(doc: dict, active: list[int], n_stages: int) -> dict:
    """{stage: {"slots": [...], layer: {points, labels, flagged, separation_ratio}}} for the figure."""
    out = {}
    by_slot = {v["slot"]: v for v in doc["verdicts"]}
    for s in range(n_stages):
        v = by_slot.get(f"{active[0]}/{s}") if active else None
        if v and v["evidence"]:
            out[str(s)] = {"slots": [f"{p}/{s}" for p in active],
                           **{layer: {k: e[k] for k in ("points", "labels", "flagged", "separation_ratio")}
                              for layer, e in v["evidence"].items()}}
    return out


def inside_ratio(updates: dict, stage: int, attacker: int, honest: list[int]) -> float | None:
    """How far the attacker's update lies from its stage's honest trainers' updates, against their own spread.

    ``tdml_core.robust.judge.outside``: per layer group the distance to the honest mean over the
    largest honest distance to it, the largest over the layer groups. Below 1 the attacker is
    nearer the honest centre than some honest trainer is, in every layer: a rule that flags it
    flags that honest trainer too.
    """
    from tdml_core.robust.judge import outside, spread

    return outside(updates[(attacker, stage)], spread([updates[(p, stage)] for p in honest]))


def run_one(cluster, n_pipelines: int, kind: str | None, placement: str, seed: int, epochs: int,
            detectors: list[str], standbys: bool = True, verify: bool = True, training: dict | None = None) -> dict:
    """Train one spec on ``cluster`` (reset for it), judging every epoch with every detector; detectors[0] decides.

    With ``verify`` (the protocol's default) each epoch's work is also checked, as the flow's step does:
    the referee re-runs every trainer's challenged steps, a failed check convicts its trainer on that
    proof, and its pipeline's trainers who passed are not held to their statistics that epoch
    (``verify.proofs.apply``).

    An evicted trainer is replaced by an honest one (new optimizer, none of the attacks) that trains
    from the next epoch's global model, as the protocol's standby does; ``standbys=False`` drops its
    pipeline instead.
    """
    from tdml_core.robust.combine import combine
    from tdml_core.robust.judge import judge_epoch
    from tdml_core.robust.validate import evaluate
    from tdml_core.runtime.context import load_job
    from tdml_core.verify import proofs
    from tdml_core.verify.referee import Referee, slot_records

    slots = slots_for(placement, n_pipelines) if kind else []
    spec = job_spec(n_pipelines, epochs, seed, kind, slots, verify, training)
    n_stages = 2
    ds, model = load_job(spec)
    referee = Referee(spec, cluster.plan, ds) if verify else None
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = {(p, s): f"{p}/{s}" for p in range(n_pipelines) for s in range(n_stages)}
    bad = set(slots)  # the attackers' trainer names (a slot's first trainer is named by the slot)
    methods = {m: spec.detection.model_copy(update={"method": m}) for m in detectors}
    history = {m: {} for m in detectors}
    active = list(range(n_pipelines))
    evicted: dict[str, int] = {}  # trainer -> epoch, by the deciding detector
    would_evict = {m: {} for m in detectors}  # trainer -> epoch each detector would have evicted at
    replacements: list[str] = []
    fresh: set[int] = set()
    records = []
    t0 = time.perf_counter()
    # a fresh folder: colluders of a later run would otherwise read the honest updates an earlier run
    # left there under the same epoch/stage/pipeline
    collusion = tempfile.mkdtemp(prefix="tdml-bench-collusion-")
    try:
        cluster.reset(spec.attacks, collusion)
        for epoch in range(epochs):
            te = time.perf_counter()
            locals_ = cluster.train_epoch(epoch, global_state)
            # a dropped pipeline still trains in the cluster; its output is ignored
            accuracies: list[float | None] = [None] * n_pipelines
            for p in active:
                model.load_state_dict(locals_[p]["state"])
                accuracies[p] = evaluate(model, ds.val_x, ds.val_y)[0]
            updates = {(p, s): _update(global_state, locals_[p]["stages"][s])
                       for p in active for s in range(n_stages)}
            # Without the store, train_epoch returns no epoch gradient. Passing the negated update makes
            # the gradient-agreement check pass trivially (cosine 1), as it does for an attacker whose
            # forged gradient agrees with its attacked update: only the update stage can catch it here.
            grads = {slot: {k: -v for k, v in u.items()} for slot, u in updates.items()}
            trainers = {slot: names[slot] for slot in updates}
            inside = {}
            for who in sorted(bad):
                p, s = map(int, who.split("/"))
                if p in active and names[(p, s)] == who:
                    honest = [q for q in active if names[(q, s)] not in bad]
                    inside[who] = inside_ratio(updates, s, p, honest)
            # the same measure for each honest trainer against the other honest trainers of its stage: how far
            # out an honest update lies (in a clean run against P - 1 others, as one attacker is measured)
            honest_inside = {}
            for s in range(n_stages):
                ours = [p for p in active if names[(p, s)] not in bad]
                for p in ours:
                    others = [q for q in ours if q != p]
                    if len(others) >= 2:
                        honest_inside[names[(p, s)]] = inside_ratio(updates, s, p, others)
            record = {"epoch": epoch, "active": list(active), "fresh": sorted(fresh), "accuracies": accuracies,
                      "inside": inside, "honest_inside": honest_inside, "detectors": {}, "proven": {}}
            checks: dict[int, dict] = {}
            if referee is not None:
                recs = {slot: r for slot, r in slot_records(locals_, cluster.pipeline_ids).items() if slot[0] in active}
                steps = referee.challenges(hashlib.sha256(repr((seed, kind, placement, epoch)).encode()).digest(), recs)
                for (p, s), v in referee.judge(epoch, recs, steps, cluster.reveal(steps)).items():
                    checks.setdefault(p, {"trainers": []})["trainers"].append({"slot": f"{p}/{s}", **v.as_doc()})
                    if v.failed:
                        record["proven"][names[(p, s)]] = v.first_failure.what
            decision = None
            for m in detectors:
                if not active:
                    break
                doc = judge_epoch(accuracies, updates, grads, trainers, history[m], n_stages=n_stages,
                                  tolerance=spec.protocol.score_tolerance, detection=methods[m], fresh=sorted(fresh))
                doc = proofs.apply(doc, checks)
                for v in doc["verdicts"]:
                    history[m].setdefault(v["trainer"], []).append(v["flagged"])
                    if v["malicious"]:
                        would_evict[m].setdefault(v["trainer"], epoch)
                record["detectors"][m] = {
                    "flagged": sorted(v["trainer"] for v in doc["verdicts"] if v["flagged"]),
                    "malicious": sorted(v["trainer"] for v in doc["verdicts"] if v["malicious"]),
                    "score_flagged": [p for p in active if doc["score_flagged"][p]],
                    "excluded": [p for p in active if doc["flagged"][p]],
                    "stage1": doc["stage1"], "stage2": doc["stage2"],
                    "separation_ratios": _stage_evidence(doc, active, n_stages, "separation_ratio"),
                    "layer_reasons": _stage_evidence(doc, active, n_stages, "reason"),
                    "reasons": {v["trainer"]: v["reason"] for v in doc["verdicts"] if v["flagged"]},
                }
                if m == detectors[0]:
                    decision = doc
                    record["points"] = _stage_points(doc, active, n_stages)
                    record["point_trainers"] = {str(s): [names[(p, s)] for p in active] for s in range(n_stages)}
            eligible = [p for p in active if decision is not None and not decision["flagged"][p]]
            if eligible:
                global_state, chosen, _ = combine("top_k", global_state, [lc["state"] for lc in locals_],
                                                  accuracies, eligible, top_k=spec.top_k)
            else:  # every pipeline flagged: the global model stays as it was
                chosen = []
            record["aggregated"] = chosen
            fresh = set()
            if decision is not None:
                for v in decision["verdicts"]:
                    if not v["malicious"]:
                        continue
                    evicted.setdefault(v["trainer"], epoch)
                    p, s = map(int, v["slot"].split("/"))
                    if standbys:
                        cluster.replace([(p, s)])
                        names[(p, s)] = f"{p}/{s}+{len(replacements) + 1}"
                        replacements.append(names[(p, s)])
                        fresh.add(p)
                    elif p in active:
                        active.remove(p)
            model.load_state_dict(global_state)
            record["global_accuracy"] = evaluate(model, ds.test_x, ds.test_y)[0]
            record["wall_s"] = time.perf_counter() - te
            records.append(record)
    finally:
        shutil.rmtree(collusion, ignore_errors=True)
    return {
        "pipelines": n_pipelines, "kind": kind or "none", "placement": placement if kind else "-", "seed": seed,
        "epochs": epochs, "malicious": slots, "n_trainers": n_pipelines * n_stages + len(replacements),
        "replacements": replacements, "evicted": evicted, "would_evict": would_evict,
        "final_accuracy": records[-1]["global_accuracy"], "wall_s": time.perf_counter() - t0, "records": records,
    }


def detector_summary(run: dict, method: str) -> dict:
    """Per detector of one run: which slots it ever flagged, first flag and eviction epoch per attacker."""
    bad = set(run["malicious"])
    first: dict[str, int] = {}
    for r in run["records"]:
        for slot in r["detectors"].get(method, {}).get("flagged", []):
            first.setdefault(slot, r["epoch"])
    evict = run["evicted"] if method == run["decider"] else run["would_evict"][method]
    honest_total = run["n_trainers"] - len(bad)
    return {
        "recall": (len(bad & set(first)) / len(bad)) if bad else None,
        "false_positives": len(set(first) - bad), "honest": honest_total,
        "honest_evicted": len(set(evict) - bad),
        "first_detection": {s: first.get(s) for s in sorted(bad)},
        "eviction": {s: evict.get(s) for s in sorted(bad)},
    }


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def _fmt(x, digits=2):
    return "—" if x is None else f"{x:.{digits}f}"


def table(runs: list[dict], detectors: list[str]) -> str:
    """One markdown row per (P, kind, placement, detector), the seeds averaged."""
    clean = {}
    for r in runs:
        if r["kind"] == "none":
            clean.setdefault(r["pipelines"], []).append(r["final_accuracy"])
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["pipelines"], r["kind"], r["placement"]), []).append(r)
    head = ("| P | kind | placement | detector | recall | false positives (of honest) | honest evicted "
            "| first detection epoch | eviction epoch (evicted/attackers) | attacker distance / farthest honest "
            "| final test accuracy (clean) |")
    lines = [head, "|" + "---|" * 11]
    order = {k: i for i, k in enumerate(("none",) + ATTACK_KINDS + ("-",) + PLACEMENTS)}
    for (n, kind, placement), rs in sorted(groups.items(),
                                           key=lambda g: (g[0][0], order[g[0][1]], order.get(g[0][2], 99))):
        for m in detectors:
            sums = [detector_summary(r, m) for r in rs]
            recall = _mean([s["recall"] for s in sums])
            fp = _mean([s["false_positives"] for s in sums])
            he = _mean([s["honest_evicted"] for s in sums])
            honest = _mean([s["honest"] for s in sums])
            firsts = [e for s in sums for e in s["first_detection"].values()]
            evs = [e for s in sums for e in s["eviction"].values()]
            n_bad = len(evs)
            first_s = _fmt(_mean(firsts), 1) if kind != "none" else "—"
            evict_s = (f"{_fmt(_mean(evs), 1)} ({sum(e is not None for e in evs)}/{n_bad})"
                       if kind != "none" else "—")
            if m == detectors[0]:
                acc = _mean([r["final_accuracy"] for r in rs])
                acc_s = f"{acc:.3f} ({_fmt(_mean(clean.get(n, [])), 3)})"
                inside = [x for r in rs for rec in r["records"] for x in rec.get("inside", {}).values()
                          if x is not None]
                inside_s = f"{statistics.median(inside):.2f} (max {max(inside):.2f})" if inside else "—"
            else:
                acc_s = inside_s = "post hoc, same runs"
            lines.append(f"| {n} | {kind} | {placement} | {m} | {_fmt(recall)} | {_fmt(fp, 1)}/{_fmt(honest, 1)} "
                         f"| {_fmt(he, 1)} | {first_s} | {evict_s} | {inside_s} | {acc_s} |")
    return "\n".join(lines)


def short_table(runs: list[dict], detector: str) -> str:
    """The deciding detector only: one row per (P, kind), one column per placement (the README's table)."""
    clean = {}
    for r in runs:
        if r["kind"] == "none":
            clean.setdefault(r["pipelines"], []).append(r["final_accuracy"])
    cells: dict[tuple, dict[str, str]] = {}
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["pipelines"], r["kind"], r["placement"]), []).append(r)
    for (n, kind, placement), rs in groups.items():
        sums = [detector_summary(r, detector) for r in rs]
        evs = [e for s in sums for e in s["eviction"].values()]
        acc = _mean([r["final_accuracy"] for r in rs])
        base = _mean(clean.get(n, []))
        delta = "" if base is None else f" ({100 * (acc - base):+.1f})"
        if kind == "none":
            text = (f"{sum(s['false_positives'] for s in sums)} of {sum(s['honest'] for s in sums)} honest flagged, "
                    f"{sum(s['honest_evicted'] for s in sums)} evicted; {acc:.3f}")
        else:
            caught = sum(e is not None for e in evs)
            text = (f"{_fmt(_mean([s['recall'] for s in sums]))}, {caught}/{len(evs)} evicted"
                    + (f" at {_fmt(_mean(evs), 1)}" if caught else "")
                    + f", {sum(s['honest_evicted'] for s in sums)} honest evicted; {acc:.3f}{delta}")
        cells.setdefault((n, kind), {})[placement] = text
    order = {k: i for i, k in enumerate(("none",) + ATTACK_KINDS)}
    lines = [f"| P | kind | one | same | across |", "|---|---|---|---|---|"]
    for (n, kind), row in sorted(cells.items(), key=lambda c: (c[0][0], order[c[0][1]])):
        if kind == "none":
            lines.append(f"| {n} | clean | {row.get('-', '—')} | | |")
        else:
            lines.append(f"| {n} | {kind} | " + " | ".join(row.get(p, "—") for p in PLACEMENTS) + " |")
    return "\n".join(lines)


def ratio_summary(runs: list[dict], detectors: list[str]) -> str:
    """Largest separation ratio each detector saw on clean runs, smallest on the attacked layer groups of attacks."""
    out = []
    for m in detectors:
        clean = [x for r in runs if r["kind"] == "none" for rec in r["records"]
                 for st in rec["detectors"].get(m, {}).get("separation_ratios", {}).values()
                 for x in st.values() if x is not None]
        attacked = []
        for r in runs:
            if r["kind"] == "none":
                continue
            stages = {s.split("/")[1] for s in r["malicious"]}
            for rec in r["records"]:
                for st, layers in rec["detectors"].get(m, {}).get("separation_ratios", {}).items():
                    if st in stages:
                        attacked += [(x, r["kind"]) for x in layers.values() if x is not None]
        c = f"clean max {max(clean):.2f} (median {statistics.median(clean):.2f}, n={len(clean)})" if clean else "clean: none"
        if attacked:
            per_kind: dict[str, list[float]] = {}
            for x, k in attacked:
                per_kind.setdefault(k, []).append(x)
            a = ", ".join(f"{k} min {min(v):.2f}/median {statistics.median(v):.2f}" for k, v in per_kind.items())
        else:
            a = "none"
        out.append(f"- {m}: {c}; attacked stage's layer groups: {a}")
    return "\n".join(out)


def honest_spread(runs: list[dict]) -> str:
    """Per P: how far honest updates lie from the other honest ones of their stage in the clean runs
    (the ``attacker distance / farthest honest`` measure, applied to each honest trainer)."""
    lines = []
    for n in sorted({r["pipelines"] for r in runs}):
        xs = [x for r in runs if r["pipelines"] == n and r["kind"] == "none"
              for rec in r["records"] for x in rec.get("honest_inside", {}).values() if x is not None]
        if xs:
            lines.append(f"- P = {n}: each honest trainer against the others of its stage, clean runs: median "
                         f"{statistics.median(xs):.2f}, max {max(xs):.2f} (n={len(xs)}); an attacker below that max "
                         f"lies no farther out than some honest trainer does")
    return "\n".join(lines)


def proof_summary(runs: list[dict]) -> str:
    """Per kind: attackers convicted by a failed check (and on what), and honest trainers a check convicted."""
    per_kind: dict[str, dict] = {}
    for r in runs:
        k = per_kind.setdefault("clean" if r["kind"] == "none" else r["kind"],
                                {"attackers": 0, "convicted": 0, "what": {}, "epochs": [], "honest": 0})
        k["attackers"] += len(r["malicious"])
        seen = set()
        for rec in r["records"]:
            for who, what in rec.get("proven", {}).items():
                if who in seen:
                    continue
                seen.add(who)
                if who in r["malicious"]:
                    k["convicted"] += 1
                    k["what"][what] = k["what"].get(what, 0) + 1
                    k["epochs"].append(rec["epoch"])
                else:
                    k["honest"] += 1
    lines = []
    for kind, k in per_kind.items():
        what = ", ".join(f"{w} {n}" for w, n in sorted(k["what"].items())) or "-"
        when = f", at epoch {_fmt(_mean(k['epochs']), 1)} on average" if k["epochs"] else ""
        lines.append(f"- {kind}: {k['convicted']} of {k['attackers']} attackers convicted by a failed check "
                     f"(first failing field: {what}){when}; honest trainers convicted: {k['honest']}")
    return "\n".join(lines)


def figure(runs: list[dict], layer: str, epoch: int, path: Path) -> str | None:
    """Projected update points of one layer group's trainers in ``epoch``, one panel per kind of FIGURE_KINDS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for kind in FIGURE_KINDS:
        cands = [r for r in runs if r["kind"] == kind and len(r["records"]) > epoch
                 and r["records"][epoch].get("points")]
        if not cands:
            continue
        # the largest P, the "one" placement if it ran, the first seed
        cands.sort(key=lambda r: (-r["pipelines"], r["placement"] != "one", r["seed"]))
        r = cands[0]
        stage = r["malicious"][0].split("/")[1] if r["placement"] == "one" else "1"
        pts = r["records"][epoch]["points"].get(stage)
        if pts is None or layer not in pts:
            layers = [k for k in (pts or {}) if k != "slots"]
            if not layers:
                continue
            lay = layers[0]
        else:
            lay = layer
        panels.append((kind, r, stage, lay, pts))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (kind, r, stage, lay, pts) in zip(axes[0], panels):
        ev = pts[lay]
        bad = set(r["malicious"])
        who = r["records"][epoch].get("point_trainers", {}).get(stage, pts["slots"])
        for (x, *rest), slot, flag in zip(ev["points"], who, ev["flagged"]):
            y = rest[0] if rest else 0.0
            mal = slot in bad
            ax.scatter([x], [y], marker="X" if mal else "o", s=110 if mal else 60,
                       c="tab:red" if mal else "tab:blue", edgecolors="black" if flag else "none", linewidths=1.5)
            ax.annotate(slot, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ratio = ev["separation_ratio"]
        ax.set_title(f"{kind}: P={r['pipelines']}, {r['placement']}, stage {stage} {lay}\n"
                     f"epoch {epoch}, seed {r['seed']}, separation ratio {_fmt(ratio)}", fontsize=9)
        ax.set_xlabel("projection 1")
        ax.set_ylabel("projection 2")
    from matplotlib.lines import Line2D

    fig.legend(handles=[Line2D([], [], marker="o", ls="", c="tab:blue", label="honest"),
                        Line2D([], [], marker="X", ls="", c="tab:red", label="malicious"),
                        Line2D([], [], marker="o", ls="", mfc="none", mec="black", label="flagged (black edge)")],
               loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return str(path)


def plan_runs(args) -> tuple[list[tuple[int, str | None, str, int]], list[str]]:
    """The runs the arguments ask for, and the notes that explain the table's gaps."""
    jobs: list[tuple[int, str | None, str, int]] = []
    skipped = []
    for n in args.pipelines:
        for seed in range(args.seeds):
            if not args.no_clean:
                jobs.append((n, None, "-", seed))
            for kind in args.kinds:
                for placement in args.placements:
                    if kind == "label_flip" and placement == "across":
                        if (kind, placement) not in skipped:
                            skipped.append((kind, placement))
                        continue
                    jobs.append((n, kind, placement, seed))
    notes = [f"skipped {k} x {p}: label_flip needs the labels, which only the last stage sees" for k, p in skipped]
    if "same" in args.placements and args.kinds:
        notes.append("same: P/2 attackers at stage 1 are half of that stage's trainers; the two-means split has no "
                     "majority to trust there: colluders who share one update are near copies of each other, and "
                     "otherwise the scores say which half to trust (a scored-down pipeline's stage far outside the "
                     "well-scoring ones' spread is blamed)")
    return jobs, notes


def training_args(args) -> dict:
    """The spec's training settings the command line overrides (--lr, --batch-size)."""
    return {k: v for k in ("lr", "batch_size") if (v := args.__dict__.get(k)) is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipelines", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--kinds", nargs="+", default=list(ATTACK_KINDS), choices=ATTACK_KINDS)
    ap.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=PLACEMENTS)
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="the trainers' learning rate (default: the spec's)")
    ap.add_argument("--batch-size", type=int, default=None, help="the trainers' batch size (default: the spec's)")
    ap.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=DETECTORS,
                    help="the first decides (flags, evictions); the others judge the same epochs post hoc")
    ap.add_argument("--no-clean", action="store_true", help="skip the clean baseline runs")
    ap.add_argument("--no-standby", action="store_true",
                    help="drop an evicted trainer's pipeline instead of replacing the trainer")
    ap.add_argument("--no-verify", action="store_true",
                    help="statistics alone: no records, no re-run of the trainers' steps, no fraud proofs")
    ap.add_argument("--figure-layer", default="fc1", help="layer group drawn in the projection figure")
    ap.add_argument("--figure-epoch", type=int, default=0, help="epoch drawn in the projection figure")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--from-json", metavar="PATH",
                    help="train nothing: redo the table and the figure from an earlier run's detection.json")
    args = ap.parse_args()
    for n in args.pipelines:
        if n < 2:
            ap.error("--pipelines: at least 2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs, notes = plan_runs(args)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        args.__dict__.update({k: v for k, v in saved["args"].items()
                              if k not in ("out", "from_json", "figure_layer", "figure_epoch")})
        report(args, out, saved["runs"], plan_runs(args)[1], saved["failures"], saved["total_s"])
        return

    for line in notes:
        print(line)
    print(f"{len(jobs)} runs: P in {args.pipelines}, {args.epochs} epochs, seeds 0..{args.seeds - 1}, "
          f"deciding detector {args.detectors[0]}", flush=True)

    from tdml_core.model.split import quiet_trace_warnings
    from tdml_core.runtime.cluster import PipelineCluster
    from tdml_core.runtime.context import load_job, make_plan

    quiet_trace_warnings()
    runs, failures = [], []
    t_all = time.perf_counter()
    cluster, key = None, None
    try:
        for i, (n, kind, placement, seed) in enumerate(jobs, 1):
            label = f"P={n} {kind or 'clean'} {placement} seed {seed}"
            try:
                if cluster is None or key != (n, seed):
                    # one set of stage processes per (P, seed), reset for every run (attacks, optimizers)
                    if cluster is not None:
                        cluster.close()
                        cluster = None
                    t = time.perf_counter()
                    base = job_spec(n, args.epochs, seed, None, [], not args.no_verify, training_args(args))
                    ds, model = load_job(base)
                    cluster, key = PipelineCluster(base, make_plan(base, model, ds)).start(), (n, seed)
                    print(f"P={n} seed {seed}: {2 * n} stage processes started in {time.perf_counter() - t:.1f} s",
                          flush=True)
                r = run_one(cluster, n, kind, placement, seed, args.epochs, args.detectors,
                            standbys=not args.no_standby, verify=not args.no_verify,
                            training=training_args(args))
            except Exception as exc:  # one failed run does not lose the others
                failures.append({"run": label, "error": f"{type(exc).__name__}: {exc}"})
                print(f"[{i}/{len(jobs)}] {label}: FAILED {type(exc).__name__}: {exc}", flush=True)
                if cluster is not None:
                    cluster.close()
                cluster = None
                continue
            r["decider"] = args.detectors[0]
            runs.append(r)
            s = detector_summary(r, args.detectors[0])
            print(f"[{i}/{len(jobs)}] {label}: {r['wall_s']:.1f} s, attackers {r['malicious'] or '-'}, "
                  f"flagged first {s['first_detection'] or '-'}, evicted {r['evicted'] or '-'}, "
                  f"FP {s['false_positives']}, acc {r['final_accuracy']:.3f}", flush=True)
            save_json(args, out, runs, notes, failures, time.perf_counter() - t_all)  # nothing lost if stopped
    finally:
        if cluster is not None:
            cluster.close()
    total_s = time.perf_counter() - t_all
    report(args, out, runs, notes, failures, total_s)


def save_json(args, out: Path, runs: list[dict], notes: list[str], failures: list[dict], total_s: float) -> None:
    tmp = out / ".detection.json.tmp"
    tmp.write_text(json.dumps({"args": vars(args), "notes": notes, "failures": failures,
                               "total_s": total_s, "runs": runs}, indent=1))
    tmp.replace(out / "detection.json")


def report(args, out: Path, runs: list[dict], notes: list[str], failures: list[dict], total_s: float) -> None:
    md = table(runs, args.detectors)
    short = short_table(runs, args.detectors[0])
    ratios = ratio_summary(runs, args.detectors)
    proven = proof_summary(runs)
    honest = honest_spread(runs)
    print()
    print(md)
    print()
    print(short)
    print()
    print("separation ratios (centroid distance / within RMS; flags need > the detector's separation):")
    print(ratios)
    if honest:
        print("honest spread:")
        print(honest)
    print("re-computation (the checks) alone:")
    print(proven)
    for line in notes:
        print(line)
    header = (f"# Byzantine detection\n\n`python bench/detection.py --pipelines {' '.join(map(str, args.pipelines))} "
              f"--kinds {' '.join(args.kinds)} --placements {' '.join(args.placements)} --seeds {args.seeds} "
              f"--epochs {args.epochs} --detectors {' '.join(args.detectors)}"
              + "".join(f" --{k.replace('_', '-')} {v}" for k, v in training_args(args).items())
              + (" --no-verify" if args.__dict__.get("no_verify") else "") + f"` ({len(runs)} runs, {total_s:.0f} s)\n\n"
              + ("statistics alone (no re-run of the trainers' work). " if args.__dict__.get("no_verify") else
                 "Every epoch's work is checked as the flow checks it: a failed check convicts its trainer (a flag "
                 "and an eviction in that epoch), and the trainers of its pipeline who passed are not held to "
                 "their statistics that epoch. ")
              + f"digits, P pipelines x 2 stages; {args.detectors[0]} decides (flagged pipelines out of the global "
              f"model, evicted trainers " + ("' pipelines dropped" if args.__dict__.get("no_standby") else
                                             "replaced by honest standbys from the next epoch") +
              f"), the other detectors judge the same epochs post hoc. "
              f"Recall: attackers ever flagged; false positives: honest trainers (replacements included) ever "
              f"flagged; means over seeds; epochs from 0. Attacker distance / farthest honest: per epoch and "
              f"attacker, in the layer group where it stands out most, its update's distance to the mean of its "
              f"stage's honest updates over the largest honest distance to that mean (median and max over "
              f"epochs and seeds; below 1 it lies inside the honest cloud in every layer group). Accuracy: the "
              f"global model on the test set, which neither scoring nor detection sees (the pipelines are scored on the validation set).\n\n")
    (out / "detection.md").write_text(header + md + f"\n\n{args.detectors[0]} in short (per placement: recall, "
                                      f"attackers evicted and the mean epoch, honest trainers evicted; final "
                                      f"accuracy and its difference to the clean run in points):\n\n" + short
                                      + "\n\nSeparation ratios:\n\n" + ratios + "\n"
                                      + ("\nHonest spread:\n\n" + honest + "\n" if honest else "")
                                      + "\nRe-computation (the checks) alone:\n\n" + proven + "\n"
                                      + "".join(f"\n{line}\n" for line in notes + [f"FAILED {f}" for f in failures]))
    save_json(args, out, runs, notes, failures, total_s)
    fig = figure(runs, args.figure_layer, args.figure_epoch, out / "detection_projections.png")
    print(f"\nwrote {out / 'detection.md'}, {out / 'detection.json'}" + (f", {fig}" if fig else "")
          + f" in {total_s:.0f} s" + (f"; {len(failures)} runs failed" if failures else ""))


if __name__ == "__main__":
    main()
