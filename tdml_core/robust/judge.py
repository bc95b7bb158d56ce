"""One epoch's verdicts: which pipelines stay out of the global model, which trainers are flagged and evicted.

Pure functions over numbers (accuracies, update vectors), so the flow, the audit
and the benchmark judge the same way:

- stage 1, the scores: a local model far below the median of all pipelines'
  (more than ``tolerance``, or, with 5 or more pipelines, more than
  ``mad_threshold`` robust deviations and 0.03) is flagged; it cannot say which
  trainer is to blame.
- stage 2, the updates: for every stage, the updates its trainers applied in the
  epoch (end weights minus the epoch's start weights) are compared across the
  pipelines, layer group by layer group, with 2-means on a projection (or
  MANDERA's ranks); a trainer flagged in at least half of its stage's layer groups
  is flagged, and so is one whose update agrees with no other trainer's of its
  stage (largest cosine below ``min_similarity``: noise, or no update); when
  several stages of one pipeline are, only the last of them is
  blamed (the updates before it are made of the gradients it sent back). Its
  committed epoch gradient must also point against its update (cosine at least
  ``min_agreement``), or it is flagged for that.
- a trainer flagged in ``evict_after`` of its last ``window`` epochs is evicted.
A pipeline with a flagged trainer is left out of the epoch's global model.
"""

from __future__ import annotations

import statistics
from typing import Mapping, Sequence

import numpy as np

from tdml_core.robust import detect

MAD_SCALE = 1.4826  # MAD of a normal sample, in standard deviations
MIN_GAP = 0.03  # a score this close to the median is never an outlier, however tight the others are
MAD_MIN_N = 5  # the robust deviation of fewer scores is too fragile to judge by


def score_outliers(accuracies: Sequence[float], tolerance: float, mad_threshold: float) -> tuple[list[bool], dict]:
    """Stage 1: flags per pipeline and what they were judged against."""
    med = statistics.median(accuracies)
    mad = statistics.median([abs(a - med) for a in accuracies])
    robust = MAD_SCALE * mad
    flags = []
    for a in accuracies:
        gap = med - a
        by_mad = len(accuracies) >= MAD_MIN_N and gap > MIN_GAP and robust > 0 and gap > mad_threshold * robust
        flags.append(bool(gap > tolerance or by_mad))
    return flags, {"median": med, "mad": mad, "tolerance": tolerance, "mad_threshold": mad_threshold,
                   "mad_test": len(accuracies) >= MAD_MIN_N}


def layer_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """Parameter names grouped by their layer (the name without its last part: ``fc1.weight`` -> ``fc1``)."""
    groups: dict[str, list[str]] = {}
    for n in sorted(names):
        groups.setdefault(n.rsplit(".", 1)[0] if "." in n else n, []).append(n)
    return groups


def _vector(update: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(update[n], dtype=np.float64).ravel() for n in names])


PCA_SEPARATION = 4.5  # real updates: clean rounds stayed under 3.4, a lone zero-gradient trainer reached 4.75
RANDOM_SEPARATION = 3.0  # a random projection keeps distances instead of seeking the attack's direction


def split(vectors: np.ndarray, method: str, seed: int, dims: int | None, separation: float | None) -> dict:
    """One layer group's 2-means; a random projection needs more dimensions and a lower bar."""
    projection = "pca" if method == "two_means_pca" else "random"
    if separation is None and method != "mandera":
        separation = PCA_SEPARATION if projection == "pca" else RANDOM_SEPARATION
    kw = {} if separation is None else {"separation": separation}
    if method == "mandera":
        return detect.mandera_evidence(vectors, seed=seed, **kw)
    return detect.two_means_evidence(vectors, projection=projection, dims=dims or (2 if projection == "pca" else 20),
                                     seed=seed, **kw)


def _tie_break(ev: dict, scores: Sequence[float] | None, bar: float) -> dict:
    """Two equal groups, clearly apart: the one whose pipelines score lower (by more than MIN_GAP) is flagged.

    The update stage alone has no majority to trust when half of a stage's trainers
    collude; the scores of their pipelines say which half did the damage.
    """
    ratio, labels = ev.get("separation_ratio"), np.asarray(ev["labels"])
    if scores is None or ratio is None or not ev["reason"].startswith("equal groups") or not ratio > bar:
        return ev
    acc = np.asarray(scores, dtype=float)
    low, high = acc[labels == 1].mean(), acc[labels == 0].mean()
    if abs(low - high) <= MIN_GAP:
        return {**ev, "reason": ev["reason"] + f"; their scores ({low:.4f} vs {high:.4f}) do not tell them apart"}
    worse = 1 if low < high else 0
    flagged = [bool(v) for v in labels == worse]
    return {**ev, "flagged": flagged,
            "reason": f"equal groups clearly apart (ratio {ratio:.3g} > {bar:g}); the group whose pipelines score "
                      f"{min(low, high):.4f} against {max(low, high):.4f} flagged"}


def update_outliers(updates: Sequence[Mapping[str, np.ndarray]], method: str, seed: int = 0,
                    dims: int | None = None, separation: float | None = None,
                    scores: Sequence[float] | None = None) -> tuple[list[bool], dict]:
    """Stage 2 for one stage: ``updates`` are its trainers' updates, one per pipeline judged.

    ``scores`` (the pipelines' accuracies) break a tie between two equal groups.
    Returns flags per trainer and the evidence of every layer group.
    """
    n = len(updates)
    groups = layer_groups(list(updates[0]))
    votes = np.zeros(n, dtype=int)
    evidence = {}
    for layer, names in groups.items():
        ev = split(np.stack([_vector(u, names) for u in updates]), method, seed, dims, separation)
        ev = _tie_break(ev, scores, ev["separation"])
        votes += np.asarray(ev["flagged"], dtype=int)
        evidence[layer] = {k: ev[k] for k in ("points", "labels", "separation_ratio", "flagged", "reason")}
    flags = [bool(2 * v >= len(groups)) and v > 0 for v in votes]
    return flags, evidence


def gram(updates: Sequence[Mapping[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The (n, n) inner products of a stage's whole updates, and their norms: what ``loners`` and ``copies`` read."""
    names = sorted(updates[0])
    x = np.stack([_vector(u, names) for u in updates])
    g = x @ x.T
    return g, np.sqrt(np.maximum(np.diag(g), 0.0))


def loners(updates: Sequence[Mapping[str, np.ndarray]], min_similarity: float,
           g: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[list[bool], list[float]]:
    """Trainers whose update agrees with no other trainer's of the stage (largest cosine below ``min_similarity``).

    Honest updates from the same start on shards of one dataset point the same way;
    noise, or no update at all, agrees with nobody, however many send it. ``g`` is
    the stage's ``gram`` when the caller has it.
    """
    gm, norms = g if g is not None else gram(updates)
    safe = np.where(norms > 0, norms, 1.0)
    cos = gm / np.outer(safe, safe)
    cos[norms == 0, :] = 0.0
    cos[:, norms == 0] = 0.0
    np.fill_diagonal(cos, -np.inf)
    best = cos.max(axis=1)
    return [bool(b < min_similarity) for b in best], [float(b) for b in best]


def copies(updates: Sequence[Mapping[str, np.ndarray]], max_ratio: float,
           g: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[list[int | None], list[float | None]]:
    """Trainers whose update is a near copy of another's: their distance under ``max_ratio`` × the larger norm.

    Honest trainers train on disjoint shards, so no two of them commit the same update
    (on real updates the nearest pair stayed above 0.3 of the larger norm). Colluders who
    commit one shared attacked update (mean-shift, a-little-is-enough, inner-product)
    do. Returns, per trainer, the index of its nearest copy (None: none) and that
    relative distance. ``g`` is the stage's ``gram`` when the caller has it.
    """
    n = len(updates)
    if n < 3:
        return [None] * n, [None] * n
    gm, norms = g if g is not None else gram(updates)
    sq = norms ** 2  # |a - b|² = |a|² + |b|² - 2 a·b: an (n, n) Gram matrix, not an (n, n, d) difference
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * gm, 0.0))
    scale = np.maximum(norms[:, None], norms[None, :])
    rel = np.where(scale > 0, d / np.where(scale > 0, scale, 1.0), 0.0)
    np.fill_diagonal(rel, np.inf)
    nearest = rel.argmin(axis=1)
    ratio = [float(rel[i, j]) for i, j in enumerate(nearest)]
    return [int(j) if r < max_ratio else None for j, r in zip(nearest, ratio)], ratio


def spread(reference: Sequence[Mapping[str, np.ndarray]]) -> dict[str, tuple[np.ndarray, float]] | None:
    """Per layer group, the ``reference`` updates' mean and the largest distance of one of them to it.

    None with fewer than 2 references. Built once for all the updates ``outside`` measures against it.
    """
    if len(reference) < 2:
        return None
    out = {}
    for layer, names in layer_groups(list(reference[0])).items():
        refs = np.stack([_vector(r, names) for r in reference])
        centre = refs.mean(axis=0)
        out[layer] = (centre, float(np.linalg.norm(refs - centre, axis=1).max()))
    return out


def outside(update: Mapping[str, np.ndarray], stats: dict[str, tuple[np.ndarray, float]] | None) -> float | None:
    """How far ``update`` lies from the reference updates, against their own spread (``stats``: their ``spread``).

    Per layer group: its distance to the references' mean over the largest distance of a
    reference to that mean; the largest over the layer groups. Below 1 it is nearer the
    centre than some reference is, in every layer group. None with fewer than 2 references.
    """
    if stats is None:
        return None
    worst = 0.0
    for layer, names in layer_groups(list(update)).items():
        centre, far = stats[layer]
        if far > 0:
            worst = max(worst, float(np.linalg.norm(_vector(update, names) - centre)) / far)
    return worst


def agreement(update: Mapping[str, np.ndarray], grad: Mapping[str, np.ndarray]) -> float:
    """Cosine between the committed epoch gradient's descent direction and the applied update."""
    names = sorted(set(update) & set(grad))
    u, g = _vector(update, names), -_vector(grad, names)
    nu, ng = float(np.linalg.norm(u)), float(np.linalg.norm(g))
    if nu == 0 and ng == 0:
        return 1.0
    if nu == 0 or ng == 0:
        return 0.0
    return float(u @ g / (nu * ng))


def judge_epoch(accuracies: Sequence[float | None], updates: Mapping[tuple[int, int], Mapping[str, np.ndarray]],
                grads: Mapping[tuple[int, int], Mapping[str, np.ndarray]], trainers: Mapping[tuple[int, int], str],
                history: Mapping[str, Sequence[bool]], *, n_stages: int, tolerance: float, detection,
                fresh: Sequence[int] = ()) -> dict:
    """The epoch's verdicts document (without epoch and attempt).

    ``accuracies[p]`` is None for a pipeline that no longer trains; ``updates``,
    ``grads`` and ``trainers`` are keyed by (pipeline, stage) of the pipelines that
    trained; ``history[address]`` holds the trainer's flags of earlier epochs, oldest
    first. ``detection`` is the spec's ``DetectionSpec``. ``fresh`` pipelines started the epoch with
    a new trainer (a replacement): their optimizer state is new, so their updates differ in size from
    the others' and the two-means split does not judge them that epoch (the other tests still do).
    """
    active = [p for p, a in enumerate(accuracies) if a is not None]
    s1, s1_info = score_outliers([accuracies[p] for p in active], tolerance, detection.mad_threshold)
    stage1 = {p: f for p, f in zip(active, s1)}
    run_stage2 = len(active) >= 3 and (detection.gradient_stage == "always" or any(s1))
    if len(active) < 3:
        stage2_note = f"{len(active)} pipelines: too few for the update stage to separate; scores alone judge"
    elif not run_stage2:
        stage2_note = "no score flagged: the update stage runs on a flag only"
    else:
        stage2_note = f"{detection.method} over the updates of each stage's {len(active)} trainers"
    flagged_by_update: dict[tuple[int, int], bool] = {}
    similarity: dict[tuple[int, int], float] = {}
    alone: dict[tuple[int, int], bool] = {}
    copied: dict[tuple[int, int], tuple[int, float]] = {}  # (pipeline, stage) -> (pipeline of its copy, distance ratio)
    evidence: dict[tuple[int, int], dict] = {}
    if run_stage2:
        for s in range(n_stages):
            stage_updates = [updates[(p, s)] for p in active]
            flags, ev = update_outliers(stage_updates, detection.method, dims=detection.dims,
                                        separation=detection.separation, scores=[accuracies[p] for p in active])
            g = gram(stage_updates)  # once for both tests
            lone, best = loners(stage_updates, detection.min_similarity, g)
            twin, twin_ratio = copies(stage_updates, detection.max_copy_ratio, g)
            for i, p in enumerate(active):
                flagged_by_update[(p, s)] = (flags[i] and p not in fresh) or lone[i] or twin[i] is not None
                alone[(p, s)], similarity[(p, s)] = lone[i], best[i]
                if twin[i] is not None:
                    copied[(p, s)] = (active[twin[i]], twin_ratio[i])
                evidence[(p, s)] = {layer: {**e, "index": i} for layer, e in ev.items()}
    # A pipeline the scores flagged with no stage flagged yet: when the well-scoring pipelines agree among
    # themselves, the stage whose update lies far outside their spread is the one that did it (half a stage
    # of attackers leaves the two-means split no majority; the scores say which half to trust).
    far: dict[tuple[int, int], float] = {}
    if run_stage2:
        trusted = [p for p in active if not stage1[p] and p not in fresh
                   and not any(flagged_by_update.get((p, s)) for s in range(n_stages))]
        spreads: dict[int, dict | None] = {}  # per stage, built on first need: the trusted are the same for all
        for p in active:
            if not stage1[p] or p in fresh or any(flagged_by_update.get((p, s)) for s in range(n_stages)):
                continue
            for s in range(n_stages):
                if s not in spreads:
                    spreads[s] = spread([updates[(q, s)] for q in trusted])
            ratios = {s: outside(updates[(p, s)], spreads[s]) for s in range(n_stages)}
            ratios = {s: r for s, r in ratios.items() if r is not None}
            if ratios:
                s = max(ratios, key=ratios.get)
                if ratios[s] > detection.max_outside:
                    flagged_by_update[(p, s)] = True
                    far[(p, s)] = ratios[s]
    # Within a pipeline a stage's update is made of the gradients the stages after it send back: a stage
    # that poisons them (label_flip) moves the updates before it too. Only the last flagged stage is blamed.
    upstream: dict[tuple[int, int], int] = {}
    for p in active:
        hit = [s for s in range(n_stages) if flagged_by_update.get((p, s))]
        for s in hit[:-1]:
            flagged_by_update[(p, s)] = False
            upstream[(p, s)] = hit[-1]
    verdicts = []
    for p in active:
        for s in range(n_stages):
            who = trainers[(p, s)]
            agree = agreement(updates[(p, s)], grads[(p, s)])
            reasons = []
            if p in fresh and not flagged_by_update.get((p, s)):
                reasons.append("first epoch with a new trainer in its pipeline (new optimizer state): "
                               "the two-means split does not judge it")
            if (p, s) in upstream:
                reasons.append(f"its update stands apart too, but it is made of the gradients of stage "
                               f"{upstream[(p, s)]}, which is blamed")
            if flagged_by_update.get((p, s)) and alone.get((p, s)):
                reasons.append(f"its update agrees with no other trainer's of stage {s} (largest cosine "
                               f"{similarity[(p, s)]:.3f} < {detection.min_similarity:g})")
            elif flagged_by_update.get((p, s)) and (p, s) in far:
                reasons.append(f"pipeline {p} scored below the others and its stage {s} update lies "
                               f"{far[(p, s)]:.3g}× the well-scoring pipelines' spread from their mean "
                               f"(> {detection.max_outside:g})")
            elif flagged_by_update.get((p, s)) and (p, s) in copied:
                q, r = copied[(p, s)]
                reasons.append(f"its update is a near copy of trainer {q}/{s}'s (distance {r:.3g} of the larger norm "
                               f"< {detection.max_copy_ratio:g}): trainers on disjoint shards never agree so closely")
            elif flagged_by_update.get((p, s)):
                reasons.append(f"its update stands apart from stage {s}'s other trainers ({detection.method})")
            if agree < detection.min_agreement:
                reasons.append(f"its epoch gradient disagrees with its update (cosine {agree:.3f} "
                               f"< {detection.min_agreement:g})")
            flagged = bool(flagged_by_update.get((p, s)) or agree < detection.min_agreement)
            past = list(history.get(who, []))[-(detection.window - 1):] if detection.window > 1 else []
            count = sum(past) + flagged
            malicious = flagged and count >= detection.evict_after
            if malicious:
                reasons.append(f"flagged in {count} of its last {len(past) + 1} epochs: evicted")
            elif stage1.get(p) and not flagged:
                reasons.append(f"pipeline {p} scored {accuracies[p]:.4f}, below the median {s1_info['median']:.4f}; "
                               f"its update is not the outlier")
            verdicts.append({"trainer": who, "slot": f"{p}/{s}", "flagged": flagged, "malicious": malicious,
                             "agreement": agree, "similarity": similarity.get((p, s)),
                             "copy_of": (f"{copied[(p, s)][0]}/{s}" if (p, s) in copied else None), "reason": "; ".join(reasons) or "clean",
                             "evidence": evidence.get((p, s), {})})
    excluded = [accuracies[p] is None or stage1.get(p, False)
                or any(flagged_by_update.get((p, s)) or False for s in range(n_stages)) for p in range(len(accuracies))]
    # (a pipeline with a flagged stage is excluded whichever of its stages is blamed)
    for v in verdicts:
        if v["flagged"]:
            excluded[int(v["slot"].split("/")[0])] = True
    return {"flagged": excluded, "score_flagged": [stage1.get(p, False) for p in range(len(accuracies))],
            "stage1": s1_info, "stage2": stage2_note, "verdicts": verdicts}
