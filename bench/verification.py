"""Verification of trainers' compute: who is caught, when, blamed on whom, and what checking costs.

Drives the training engine and the referee (``tdml_core.verify``) without chain
and store. Every attack runs inside its trainer's own stage process
(``tdml_core.attacks``); every epoch each trainer commits the Merkle root of its
per-step records, a fresh random seed (in the protocol: a block hash after the
last commitment) draws its challenged steps, the trainer reveals them and the
referee recomputes them. A trainer that fails a check is evicted and an honest
trainer takes its slot from the next epoch (``PipelineCluster.replace``); its
pipeline stays out of that epoch's average.

Three parts:

1. Catch table: digits, P pipelines x 2 stages, every attack kind (the compute
   attacks and the robustness issue's kinds) from ``--from-epoch``, one attacker,
   ``--seeds`` seeds, plus an honest run per seed. Caught or not, the epoch, whom
   the failed checks blamed, honest trainers wrongly blamed, test accuracy
   against the honest run.
2. Lazy catch probability: a lazy trainer skipping a share q of its steps; every
   step of its epoch is checked once (the real recomputation), then many
   challenge draws of ``checks`` steps give the measured probability that a
   draw hits a failing step, beside 1 - (1 - q)^checks.
3. Cost, per workload of ``--cost`` (the digits CNN on synthetic 8x8 images,
   ResNet-18 on synthetic 32x32): an epoch with recording off and on; the
   recording's own CPU time (timed inside each stage process: cloning, hashing,
   signing, the Merkle root) and the referee's CPU time for the default checks,
   as shares of the stages' other CPU time; the epoch length from which both
   together stay under 5%; the bytes a trainer keeps and reveals.

    python bench/verification.py [--pipelines 4] [--seeds 5] [--epochs 3] [--from-epoch 1]
                                 [--kinds ...] [--parts catch lazy cost]

Writes bench/results/verification-PART.md and .json for each part it ran, and
verification.md, which joins the latest of every part.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tdml_core.attacks import COMPUTE  # noqa: E402
from tdml_core.config import ATTACK_KINDS, AttackSpec, parse_spec  # noqa: E402
from tdml_core.robust.aggregate import top_k_average  # noqa: E402
from tdml_core.robust.validate import evaluate  # noqa: E402
from tdml_core.runtime.cluster import PipelineCluster  # noqa: E402
from tdml_core.runtime.context import load_job, make_plan  # noqa: E402
from tdml_core.verify import challenge  # noqa: E402
from tdml_core.verify.records import tensor_bytes  # noqa: E402
from tdml_core.verify.referee import Referee, slot_records  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# where each kind's one attacker sits: a stage that sends what the kind forges
SLOT = {"forged_output": "1/0", "lazy": "1/0", "free_rider": "1/1", "forged_grad": "1/1"}


def slot_of(kind: str) -> str:
    return SLOT.get(kind, "1/1")


def seed_bytes(*parts) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


HIDDEN = ("forged_output:hidden", "forged_grad:hidden")  # forgers whose records hold the honest values


def attack_spec(kind: str, from_epoch: int) -> AttackSpec:
    """``kind``, or ``kind:hidden`` for a forger that keeps honest records and signs what it really sent."""
    base, _, hidden = kind.partition(":")
    return AttackSpec(slot=slot_of(base), kind=base, from_epoch=from_epoch, hidden=hidden == "hidden")


def run_one(cluster, ref: Referee, spec, ds, model, kind: str | None, seed: int, epochs: int, from_epoch: int):
    cluster.reset([] if kind is None else [attack_spec(kind, from_epoch)])
    attacker = None if kind is None else tuple(int(x) for x in slot_of(kind.partition(":")[0]).split("/"))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    replaced: set = set()
    epochs_out = []
    for epoch in range(epochs):
        out = cluster.train_epoch(epoch, state)
        records = slot_records(out, cluster.pipeline_ids)
        steps = ref.challenges(seed_bytes(seed, kind, epoch), records)
        verdicts = ref.judge(epoch, records, steps, cluster.reveal(steps))
        failed = sorted(slot for slot, v in verdicts.items() if v.failed)
        keep = [i for i, p in enumerate(cluster.pipeline_ids) if not any(f[0] == p for f in failed)]
        scores = []
        for i in keep:
            model.load_state_dict(out[i]["state"])
            scores.append(evaluate(model, ds.val_x, ds.val_y)[0])
        if keep:
            state, _ = top_k_average([out[i]["state"] for i in keep], scores, len(keep))
        model.load_state_dict(state)
        acc = evaluate(model, ds.test_x, ds.test_y)[0]
        is_attacker = {slot: slot == attacker and slot not in replaced for slot in verdicts}
        epochs_out.append({
            "epoch": epoch, "accuracy": acc, "failed": [list(f) for f in failed],
            "what": {f"{f[0]}/{f[1]}": verdicts[f].first_failure.what for f in failed},
            "honest_blamed": [list(f) for f in failed if not is_attacker[f]],
            "attacking": attacker is not None and epoch >= from_epoch and attacker not in replaced,
            "checks": {f"{s[0]}/{s[1]}": len(v.steps) for s, v in verdicts.items()},
            "max_honest_diff": max((f.max_diff for s, v in verdicts.items() if not is_attacker[s]
                                    for f in v.findings if f.ok), default=0.0),
        })
        if failed:
            cluster.replace(failed)
            replaced.update(failed)
    caught = [e["epoch"] for e in epochs_out if attacker is not None and list(attacker) in e["failed"]]
    return {"kind": kind or "none", "slot": slot_of(kind.partition(":")[0]) if kind else "-", "seed": seed,
            "caught_epoch": caught[0] if caught else None, "epochs": epochs_out,
            "final_accuracy": epochs_out[-1]["accuracy"],
            "honest_blamed": sum(len(e["honest_blamed"]) for e in epochs_out),
            "what": next((e["what"] for e in epochs_out if e["what"]), {})}


def catch_part(args, kinds: list[str]) -> list[dict]:
    runs = []
    for seed in range(args.seeds):
        spec = parse_spec({"data_parallel": args.pipelines, "stages": 2, "epochs": args.epochs, "seed": seed,
                           "top_k": args.pipelines, "batch_size": 32, "microbatches": 4})
        ds, model = load_job(spec)
        plan = make_plan(spec, model, ds)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        ref = Referee(spec, plan, ds)
        with PipelineCluster(spec, plan) as cluster:
            for kind in [None] + kinds:
                t0 = time.perf_counter()
                model.load_state_dict(init)
                run = run_one(cluster, ref, spec, ds, model, kind, seed, args.epochs, args.from_epoch)
                run["wall_s"] = time.perf_counter() - t0
                runs.append(run)
                print(f"  seed {seed} {run['kind']:>20}: caught at {run['caught_epoch']}, "
                      f"honest blamed {run['honest_blamed']}, test acc {run['final_accuracy']:.3f} "
                      f"({run['wall_s']:.0f} s)", flush=True)
    return runs


def catch_table(runs: list[dict], from_epoch: int) -> str:
    clean = {r["seed"]: r["final_accuracy"] for r in runs if r["kind"] == "none"}
    lines = ["| kind | slot | caught | epoch caught (starts at %d) | failed check | honest blamed | "
             "test acc (vs honest) |" % from_epoch, "|---|---|---|---|---|---|---|"]
    kinds = list(dict.fromkeys(r["kind"] for r in runs))
    for kind in kinds:
        rs = [r for r in runs if r["kind"] == kind]
        acc = statistics.mean(r["final_accuracy"] for r in rs)
        delta = statistics.mean(r["final_accuracy"] - clean[r["seed"]] for r in rs)
        blamed = sum(r["honest_blamed"] for r in rs)
        if kind == "none":
            lines.append(f"| none (honest) | - | - | - | - | {blamed} | {acc:.3f} |")
            continue
        caught = [r for r in rs if r["caught_epoch"] is not None]
        ep = sorted({r["caught_epoch"] for r in caught})
        whats = sorted({w for r in caught for w in r["what"].values()})
        lines.append(f"| {kind} | {rs[0]['slot']} | {len(caught)}/{len(rs)} | {', '.join(map(str, ep)) or '-'} | "
                     f"{', '.join(whats) or '-'} | {blamed} | {acc:.3f} ({delta * 100:+.1f}) |")
    return "\n".join(lines)


def lazy_part(args) -> dict:
    """Every step of a lazy trainer's epochs checked once; then challenge draws over the failing steps."""
    spec = parse_spec({"data_parallel": 2, "stages": 2, "epochs": 1, "seed": 0, "top_k": 2,
                       "batch_size": 8, "microbatches": 4})
    ds, model = load_job(spec)
    plan = make_plan(spec, model, ds)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = Referee(spec, plan, ds)
    seg = spec.verification.checkpoint_every
    out_rows = []
    with PipelineCluster(spec, plan) as cluster:
        for q in args.lazy_qs:
            cluster.reset([AttackSpec(slot="0/0", kind="lazy", q=q)])
            failing_by_epoch, n = [], 0
            for epoch in range(args.lazy_epochs):  # each epoch skips another set of steps
                out = cluster.train_epoch(epoch, state)
                rec = slot_records(out, cluster.pipeline_ids)[(0, 0)]
                n = int(rec["leaves"]) - 1
                every = {(0, 0): list(range(0, n, seg))}  # every segment, checked once
                verdict = ref.judge(epoch, {(0, 0): rec}, every, cluster.reveal(every))[(0, 0)]
                failing_by_epoch.append({f.step for f in verdict.findings if not f.ok})
            for c in args.lazy_checks:
                hits = {True: 0, False: 0}
                for d in range(args.draws):
                    failing = failing_by_epoch[d % len(failing_by_epoch)]
                    for last in (True, False):
                        drawn = challenge.pick(seed_bytes("lazy", q, c, d), "0/0", n, c, last, every=seg)
                        hits[last] += bool(failing & set(drawn))
                k = statistics.mean(len(f) for f in failing_by_epoch)
                out_rows.append({"q": q, "checks": c, "steps": n, "segments": math.ceil(n / seg), "every": seg,
                                 "failing_segments": k,
                                 "measured": hits[True] / args.draws, "measured_random": hits[False] / args.draws,
                                 "formula": 1 - (1 - q) ** c})
                print(f"  lazy q={q} checks={c}: {k:.1f}/{math.ceil(n / seg)} segments fail; random checks caught "
                      f"{hits[False]}/{args.draws} draws, with the last step {hits[True]} "
                      f"(1-(1-q)^c = {1 - (1 - q) ** c:.4f})", flush=True)
    return {"rows": out_rows, "draws": args.draws, "epochs": args.lazy_epochs}


def lazy_table(lazy: dict) -> str:
    lines = ["| q | checks (segments) | failing segments / segments | caught: random checks alone | "
             "1 − (1 − q)^checks | caught: random checks and the last segment |", "|---|---|---|---|---|---|"]
    for r in lazy["rows"]:
        drawn = math.ceil(r["checks"] / r["every"])
        lines.append(f"| {r['q']} | {r['checks']} ({drawn}) | {r['failing_segments']:.1f}/{r['segments']} | "
                     f"{r['measured_random']:.4f} | {r['formula']:.4f} | {r['measured']:.4f} |")
    return "\n".join(lines)


WORKLOADS = {  # name → (model, image shape, pipelines): the digits CNN on 8x8, ResNet-18 on 32x32
    "digits_cnn": ("digits_cnn", [1, 8, 8], 2),
    "resnet18": ("resnet18", [3, 32, 32], 2),
}


def cost_part(args, workload: str, n_steps: int) -> dict:
    model_name, shape, pipelines = WORKLOADS[workload]
    samples = int(n_steps * 32 * pipelines / 0.8) + 64
    base = {"data_parallel": pipelines, "stages": 2, "epochs": 1, "seed": 0, "top_k": pipelines, "batch_size": 32,
            "microbatches": 4, "model": model_name,
            "dataset": {"name": "synthetic", "synthetic": {"samples": samples, "shape": shape, "classes": 10}}}
    rows = {}
    for enabled in (False, True):
        every = {"checkpoint_every": args.checkpoint_every} if args.checkpoint_every else {}
        spec = parse_spec({**base, "verification": {"enabled": enabled, **every}})
        ds, model = load_job(spec)
        plan = make_plan(spec, model, ds)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with PipelineCluster(spec, plan) as cluster:
            cluster.train_epoch(0, state)  # warm-up
            t0 = time.perf_counter()
            out = cluster.train_epoch(1, state)
            wall = time.perf_counter() - t0
            row = {"wall_s": wall, "stage_cpu_s": sum(sum(o["cpu_s"]) for o in out),
                   "record_cpu_s": sum(sum(o["record_cpu_s"]) for o in out), "steps": out[0]["batches"],
                   "trainers": sum(len(o["cpu_s"]) for o in out)}
            if enabled:
                ref = Referee(spec, plan, ds)
                records = slot_records(out, cluster.pipeline_ids)
                steps = ref.challenges(seed_bytes("cost"), records)
                t0 = time.perf_counter()
                reveals = cluster.reveal(steps)
                row["reveal_s"] = time.perf_counter() - t0
                c0, t0 = time.process_time(), time.perf_counter()
                verdicts = ref.judge(1, records, steps, reveals)
                row["referee_cpu_s"] = time.process_time() - c0
                row["referee_wall_s"] = time.perf_counter() - t0
                row["failed"] = sum(v.failed for v in verdicts.values())
                row["replayed_per_trainer"] = max(sum(f.segment[1] - f.segment[0] for f in v.findings)
                                                  for v in verdicts.values())
                row["kept_bytes"] = max(b for o in out for b in o["record_bytes"])
                row["revealed_bytes"] = max(tensor_bytes(r) for r in reveals.values())
                row["stage_bytes"] = max(sum(v.numel() * v.element_size() for v in st.values())
                                         for o in out for st in o["stages"])
            rows["on" if enabled else "off"] = row
        print(f"  cost {workload}, recording {'on' if enabled else 'off'}: {row}", flush=True)
    on, off = rows["on"], rows["off"]
    work = on["stage_cpu_s"] - on["record_cpu_s"]  # the stages' CPU without their records' own
    per_step = on["referee_cpu_s"] / (on["replayed_per_trainer"] * on["trainers"])  # referee CPU per replayed step
    train_step = work / (on["steps"] * on["trainers"])  # a stage's CPU per trained step
    return {"workload": workload, "steps": n_steps, **rows,
            "recording_share": on["record_cpu_s"] / work,
            "stage_cpu_ratio": on["stage_cpu_s"] / off["stage_cpu_s"] - 1,
            "referee_share": on["referee_cpu_s"] / work,
            "replay_vs_train_step": per_step / train_step,
            "wall_overhead": (on["wall_s"] + on["reveal_s"] + on["referee_wall_s"]) / off["wall_s"] - 1}


def cost_text(cost: dict, checks: int, every: int) -> str:
    on, off = cost["on"], cost["off"]
    rec, r = cost["recording_share"], cost["replay_vs_train_step"]
    replayed = on["replayed_per_trainer"]
    full = (math.ceil(checks / every) + 1) * every  # what the default checks replay in an epoch long enough
    # the epoch length at which recording + the referee's replay of `replayed` steps come to 5 %
    need = math.ceil(full * r / (0.05 - rec)) if rec < 0.05 else None
    name = {"digits_cnn": "digits CNN on synthetic 8x8 images", "resnet18": "ResNet-18 on synthetic 32x32 images"}
    return "\n".join([
        f"- **{name[cost['workload']]}**, batch 32, {on['trainers']} trainers, an epoch of {on['steps']} steps, "
        f"checks {checks}, checkpoint_every {every}:",
        f"  - recording (cloning, hashing, signing and the Merkle root), timed inside each stage process: "
        f"{on['record_cpu_s']:.2f} s CPU = **{rec * 100:.1f}%** of the stages' other CPU "
        f"({on['stage_cpu_s'] - on['record_cpu_s']:.1f} s); stages' CPU against the same epoch unrecorded "
        f"({off['stage_cpu_s']:.1f} s): {cost['stage_cpu_ratio'] * 100:+.1f}% (includes waiting on gloo, "
        f"{on['trainers']} stage processes on 2 cores)",
        f"  - the referee replayed {replayed} steps per trainer: {on['referee_cpu_s']:.2f} s CPU = "
        f"**{cost['referee_share'] * 100:.1f}%** of the stages' CPU; a replayed step costs {r:.2f} of a trained "
        f"one; revealing took {on['reveal_s']:.2f} s; failed checks {on['failed']}",
        f"  - together: **{(rec + cost['referee_share']) * 100:.1f}%** of this epoch's compute; "
        + (f"at most 5% from an epoch of {need} steps (recording {rec * 100:.1f}% + {full} replayed steps "
           f"× {r:.2f} of a trained step)" if need else "recording alone is above 5% on this workload"),
        f"  - wall time of the epoch with recording, revealing and checking against the epoch without: "
        f"{cost['wall_overhead'] * 100:+.1f}%",
        f"  - a trainer keeps {on['kept_bytes'] / 2**20:.1f} MiB of records for the epoch "
        f"(its stage's weights: {on['stage_bytes'] / 2**20:.2f} MiB) and reveals "
        f"{on['revealed_bytes'] / 2**20:.2f} MiB for its challenges",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipelines", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--from-epoch", type=int, default=1)
    ap.add_argument("--kinds", nargs="+", default=list(COMPUTE) + list(HIDDEN)
                    + [k for k in ATTACK_KINDS if k not in COMPUTE], choices=list(ATTACK_KINDS) + list(HIDDEN))
    ap.add_argument("--parts", nargs="+", default=["catch", "lazy", "cost"], choices=["catch", "lazy", "cost"])
    ap.add_argument("--lazy-qs", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--lazy-checks", type=int, nargs="+", default=[1, 5, 10, 30, 66])
    ap.add_argument("--draws", type=int, default=4000)
    ap.add_argument("--lazy-epochs", type=int, default=5, help="lazy epochs (skip sets) the draws spread over")
    ap.add_argument("--cost", nargs="+", default=["digits_cnn:1400", "resnet18:24"],
                    help="the cost part's workloads and epoch lengths, WORKLOAD:STEPS (" + ", ".join(WORKLOADS) + ")")
    ap.add_argument("--checkpoint-every", type=int, default=None,
                    help="the cost part's verification.checkpoint_every (default: the spec's)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict = {"args": vars(args)}
    command = f"`python bench/verification.py {' '.join(sys.argv[1:])}`".replace("  ", " ").replace(" `", "`")
    sections: dict[str, list[str]] = {}
    if "catch" in args.parts:
        print("catch table:", flush=True)
        result["runs"] = catch_part(args, args.kinds)
        md = sections["catch"] = []
        md += [f"## Caught, by whom, when ({args.pipelines} pipelines x 2 stages, digits, {args.seeds} seeds, "
               f"{args.epochs} epochs, default checks)", "", catch_table(result["runs"], args.from_epoch), ""]
        diffs = [e["max_honest_diff"] for r in result["runs"] for e in r["epochs"]]
        md += [f"Largest relative difference of an honest trainer's recomputed values: {max(diffs):.2e} "
               f"(tolerance {parse_spec({}).verification.tolerance:g}).", ""]
    if "lazy" in args.parts:
        print("lazy catch probability:", flush=True)
        result["lazy"] = lazy_part(args)
        md = sections["lazy"] = []
        md += ["## Lazy trainer: probability that one epoch's challenges catch it", "",
               f"Digits, 2 pipelines, batch 8; the lazy trainer at 0/0, {args.lazy_epochs} epochs (each skips "
               f"its own steps at random). Every segment recomputed once, then {args.draws} challenge draws "
               f"spread over the epochs; a draw of `checks` steps takes ceil(checks / checkpoint_every) "
               f"segments.", "", lazy_table(result["lazy"]), ""]
    if "cost" in args.parts:
        print("cost:", flush=True)
        every = args.checkpoint_every or parse_spec({}).verification.checkpoint_every
        checks = parse_spec({}).verification.checks
        result["cost"] = [cost_part(args, w, int(n)) for w, n in (c.split(":") for c in args.cost)]
        md = sections["cost"] = ["## What verification costs", ""]
        md += [cost_text(c, checks, every) for c in result["cost"]] + [""]
    result["total_s"] = time.perf_counter() - t0
    for part, lines in sections.items():  # each part keeps its own file, so one part can be re-run alone
        (out / f"verification-{part}.md").write_text("\n".join(
            lines + [f"Printed by {command} in {result['total_s']:.0f} s.", ""]))
        (out / f"verification-{part}.json").write_text(json.dumps(
            {"args": result["args"], part: result.get({"catch": "runs"}.get(part, part))}, indent=1, default=str))
    md = ["# Verification of trainers' compute", "", "Accuracies are on the digits test split.", ""]
    for part in ("catch", "lazy", "cost"):
        f = out / f"verification-{part}.md"
        if f.exists():
            md += [f.read_text()]
    (out / "verification.md").write_text("\n".join(md))
    print("\n".join(sum(sections.values(), [])))


if __name__ == "__main__":
    main()
