"""Fraud proofs in the verdicts: a trainer whose checked work failed is evicted on that proof alone.

Pure functions over committed documents, so the detect step and the audit reach
the same verdicts. A pipeline's checks document (committed by its referee) lists,
per trainer, the challenged steps, the id of what it revealed and each step's
finding. A failed finding convicts its trainer; the trainers of the same
pipeline who passed every check are not evicted on their statistics that epoch,
since a forgery moves the updates of the honest neighbours who received it.
"""

from __future__ import annotations


def failures(checks: dict | None) -> dict[str, dict]:
    """slot ("p/s") → the first failed finding, of one pipeline's checks document."""
    out = {}
    for t in (checks or {}).get("trainers", []):
        bad = next((f for f in t.get("findings", []) if not f["ok"]), None)
        if bad is not None:
            out[t["slot"]] = bad
    return out


def proof_reason(finding: dict) -> str:
    diff = finding.get("max_diff", 0.0)
    diff = f"; largest difference {diff:.3g}" if isinstance(diff, (int, float)) and diff else \
        ("; largest difference inf" if diff == "inf" else "")
    return f"fraud proof: step {finding['step']} failed its check ({finding['what']}{diff}): {finding['detail']}"


def apply(verdicts: dict, checks: dict[int, dict | None]) -> dict:
    """``verdicts`` (judge_epoch's document) with the fraud proofs of ``checks`` (pipeline → its checks doc)."""
    proven = {slot: f for doc in checks.values() for slot, f in failures(doc).items()}
    guilty_pipelines = {int(slot.split("/")[0]) for slot in proven}
    for v in verdicts["verdicts"]:
        p = int(v["slot"].split("/")[0])
        if v["slot"] in proven:
            v.update(flagged=True, malicious=True, proven=True, reason=proof_reason(proven[v["slot"]]))
        elif p in guilty_pipelines:
            if v["flagged"] or v["malicious"]:
                v["reason"] = (v["reason"] + "; " if v["reason"] != "clean" else "") + \
                    "not held against it: its checks passed and a trainer of its pipeline failed one"
            v.update(flagged=False, malicious=False)
    for p in guilty_pipelines:
        verdicts["flagged"][p] = True  # the forger's pipeline stays out of the average
    return verdicts


__all__ = ["apply", "failures", "proof_reason"]
