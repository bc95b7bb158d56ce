"""The ``tdml-train`` flow: TDML's protocol, top to bottom, one retryable task per step.

    1. publish task            client: task on the market under its salt, budget escrowed, deadline set
    2. hire parameter servers  servers register with their keys, the client hires one per pipeline
    3. hire trainers           servers post hiring, trainers offer, one hired per stage; the ledger opens
    4. key exchange            each participant is sealed only the keys it needs
    5. shard model             plans, data shards, the validation set, the initial model and stage inputs sealed
    per epoch:
    6. train epoch             one task per pipeline, concurrently (on a work pool: a tdml-pipeline-epoch
                               flow run there); each trainer commits
                               its weights, epoch gradient and the Merkle root of its records in one transaction
    7. cross-validate          the next server round the ring scores each local model, commits the score
       verify work             the same server draws each trainer's steps from a later block's hash, the
                               trainers reveal them into the store, the server re-runs them, commits the findings
    8. detect                  fraud proofs, score stage, update stage per layer; verdicts, evictions and
                               convictions (the bond is forfeited) on the ledger
       replace evicted         the evicted trainer's server hires a standby and seals it the keys
    9. aggregate               the spec's rule (top-K average by default) over the unflagged local models
    10. reward                 credit each epoch's verified work, finish, settle, everyone claims its pay

A run that stops resumes from the last global model on the ledger (``resume=True``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Callable

from prefect import flow
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

from flows.pipeline_epoch import dispatch
from tasks.protocol import (
    aggregate, cross_validate, detect, hire_parameter_servers, hire_trainers, key_exchange, open_run, publish_task,
    replace_evicted, reward, shard_model, start_epoch, verify_work,
)
from tdml_core.config import load_spec
from tdml_core.protocol.job import Job, forget_job, remember_job
from tdml_core.protocol.rewards import validator_of
from tdml_core.report import (
    ACCURACY_SETS, epoch_table, markdown_summary, plot_epochs, plot_verdicts, png_data_url, write_summary,
)

# Called with each finished epoch's record (the command's progress display listens here).
EPOCH_LISTENERS: list[Callable[[dict], None]] = []


class RunLog:
    """What the run writes as it goes: summary.json after every epoch, artifacts, listeners."""

    def __init__(self, job: Job, t0: float):
        self.job, self.t0 = job, t0
        self.path = job.out / "summary.json"
        first = job.ledger.global_epochs
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.epochs = [e for e in old.get("epochs", []) if e["epoch"] < first]  # kept from the run that stopped
        self.resumed_from = first
        self.startup_s = time.perf_counter() - t0
        self.data: dict = {}

    def _write(self, status: str, **extra) -> dict:
        job = self.job
        final = self.epochs[-1]["global_accuracy"] if self.epochs else float("nan")
        self.data = {
            "job": job.spec.model_dump(mode="json"),
            "mode": "tdml-run",
            "accuracy_sets": ACCURACY_SETS,
            "status": status,
            "job_id": job.job_id,
            "chain": {"url": job.ref.chain, "chain_id": job.chain.chain_id, "market": job.ref.market,
                      "ledger": job.ref.ledger, "tx_count": job.chain.tx_count},
            "store": job.ref.store_url,
            "plan": job.plan.to_dict(),
            "epochs": self.epochs,
            "final_accuracy": final,
            "resumed_from": self.resumed_from,
            "trained_epochs": [e["epoch"] for e in self.epochs if e["epoch"] >= self.resumed_from],
            "startup_s": self.startup_s,
            "wall_s": time.perf_counter() - self.t0,
            **extra,
        }
        write_summary(job.out, self.data)
        return self.data

    def epoch(self, record: dict) -> None:
        self.epochs.append(record)
        self._write("running")
        create_table_artifact(
            table=epoch_table(record), key=f"tdml-job-{self.job.job_id}-epoch-{record['epoch']}",
            description=f"epoch {record['epoch'] + 1}: global test accuracy {record['global_accuracy']:.4f}, "
                        f"global model {record['global_model_cid']}",
        )
        for listen in EPOCH_LISTENERS:
            listen(record)

    def verdicts(self, doc: dict) -> None:
        """A picture of the updates the detector saw, for an epoch that flagged someone."""
        if not any(v["flagged"] for v in doc["verdicts"]):
            return
        png = plot_verdicts(doc, self.job.out / f"verdicts-epoch-{doc['epoch'] + 1}.png",
                            f"{self.job.spec.name}, epoch {doc['epoch'] + 1}: trainers' updates (red: flagged)")
        if png is not None:
            flagged = ", ".join(v["slot"] + (" (evicted)" if v["malicious"] else "") for v in doc["verdicts"]
                                if v["flagged"])
            create_image_artifact(image_url=png_data_url(png), key=f"tdml-job-{self.job.job_id}-verdicts-{doc['epoch']}",
                                  description=f"epoch {doc['epoch'] + 1}: flagged {flagged}")

    def finish(self, paid: dict) -> dict:
        data = self._write("finished", **paid)
        png = plot_epochs(self.epochs, self.job.out / "accuracy.png", f"{self.job.spec.name} (job {self.job.job_id})")
        key = f"tdml-job-{self.job.job_id}"
        create_image_artifact(image_url=png_data_url(png), key=f"{key}-accuracy",
                              description="global test accuracy and loss per epoch")
        create_markdown_artifact(markdown=markdown_summary(data), key=f"{key}-summary",
                                 description="job, contracts, global model, payments")
        return data


def _kill_hook(epoch: int) -> None:
    """Test hook: ``TDML_TEST_KILL_AFTER_EPOCH=N`` kills the run once N global models are committed."""
    after = os.environ.get("TDML_TEST_KILL_AFTER_EPOCH")
    if after is not None and epoch + 1 == int(after):
        os.killpg(os.getpgrp(), signal.SIGKILL)


def _stage_kill_hook(job: Job, epoch: int) -> None:
    """Test hook: ``TDML_TEST_KILL_STAGE=P/S@E`` kills trainer (P, S)'s stage process as epoch E starts."""
    want = os.environ.get("TDML_TEST_KILL_STAGE")
    if not want:
        return
    from tdml_core.protocol.trainers import stage_pid

    slot, _, at = want.partition("@")
    p, s = (int(v) for v in slot.split("/"))
    pid = stage_pid(job, p, s) if epoch == int(at) else None
    if pid is not None:
        os.kill(pid, signal.SIGKILL)  # the coordinator notices the death when the epoch starts


def _install_tx_kill_hook() -> None:
    """Test hook: ``TDML_TEST_KILL_AFTER_TX=settle`` kills the run right after its first ``settle`` transaction
    (``credit:2``: after the second ``credit``)."""
    from tdml_core.chain.client import AFTER_TRANSACT

    want = os.environ.get("TDML_TEST_KILL_AFTER_TX")
    if not want:
        return
    name, _, nth = want.partition(":")
    seen = [0]

    def hook(fn_name: str) -> None:
        if fn_name == name:
            seen[0] += 1
            if seen[0] == int(nth or 1):
                os.killpg(os.getpgrp(), signal.SIGKILL)

    AFTER_TRANSACT.append(hook)


@flow(name="tdml-train")
def tdml_train(spec_path: str, out_dir: str, resume: bool = False, chain: str | None = None,
               store: str | None = None) -> dict:
    t0 = time.perf_counter()
    spec = load_spec(spec_path)
    out_dir = out_dir.replace("{now}", time.strftime("%Y%m%d-%H%M%S"))  # one folder per scheduled run
    _install_tx_kill_hook()
    job = open_run(spec, out_dir, resume, chain, store)
    remember_job(job)
    try:
        publish_task(job)
        hire_parameter_servers(job)
        hire_trainers(job)
        key_exchange(job)
        shard_model(job)
        log = RunLog(job, t0)
        spec_doc = spec.model_dump(mode="json")
        from tdml_core.protocol.steps import dropped_pipelines
        if job.ledger.global_epochs < spec.rounds:
            replace_evicted(job, None)  # an eviction a crash left without its replacement
        for epoch in range(job.ledger.global_epochs, spec.rounds):  # protocol rounds
            dropped = dropped_pipelines(job)
            pipelines = [p for p in range(spec.data_parallel) if p not in dropped]
            times = {}
            t = time.perf_counter()
            attempt = start_epoch(job, epoch)
            _stage_kill_hook(job, epoch)
            times["start epoch"], t = time.perf_counter() - t, time.perf_counter()
            futures = {p: dispatch.submit(spec_doc, job.ref.out_dir, p, epoch, attempt, spec.protocol.pipeline_pool)
                       for p in pipelines}
            trained = {p: f.result() for p, f in futures.items()}
            times["train epoch"], t = time.perf_counter() - t, time.perf_counter()
            futures = {p: cross_validate.submit(job, p, epoch, attempt) for p in pipelines}
            scores = [futures[p].result() if p in futures else None for p in range(spec.data_parallel)]
            times["cross-validate"], t = time.perf_counter() - t, time.perf_counter()
            futures = {p: verify_work.submit(job, p, epoch, attempt) for p in pipelines}
            checks = {p: f.result() for p, f in futures.items()}
            times["verify work"], t = time.perf_counter() - t, time.perf_counter()
            verdicts = detect(job, epoch, attempt, scores)
            times["detect"], t = time.perf_counter() - t, time.perf_counter()
            replaced = replace_evicted(job, verdicts)
            times["replace evicted"], t = time.perf_counter() - t, time.perf_counter()
            result = aggregate(job, epoch, attempt, scores, verdicts)
            times["aggregate"] = time.perf_counter() - t
            t = time.perf_counter()
            record = _record(job, epoch, attempt, trained, scores, verdicts, result, times, replaced, checks)
            log.epoch(record)
            log.verdicts(verdicts)
            times["report"] = time.perf_counter() - t  # lands in summary.json with the next write
            record["wall_s"] = sum(times.values())
            _kill_hook(epoch)
        return log.finish(reward(job))
    finally:
        from tdml_core.protocol.trainers import close_trainers

        close_trainers(job)
        forget_job(job.ref.out_dir)


def _checked(checks: dict) -> list[dict]:
    """Per trainer: how many of its steps were re-run, whether one failed, and the first failure."""
    out = []
    for p, doc in sorted((checks or {}).items()):
        if doc is None or "skipped" in doc:
            continue
        for t in doc["trainers"]:
            bad = next((f for f in t["findings"] if not f["ok"]), None)
            out.append({"slot": t["slot"], "steps": len(t["steps"]), "failed": t["failed"],
                        "max_diff": max((f["max_diff"] for f in t["findings"] if f["ok"]), default=0.0),
                        "failure": None if bad is None else {k: bad[k] for k in ("step", "what", "detail")}})
    return out


def _record(job: Job, epoch: int, attempt: int, trained: dict, scores: list, verdicts: dict, result: dict,
            times: dict, replaced: list | None = None, checks: dict | None = None) -> dict:
    n = job.spec.data_parallel
    return {
        "epoch": epoch,
        "attempt": attempt,
        "global_accuracy": result["global_accuracy"],
        "global_loss": result["global_loss"],
        "global_val_accuracy": result["global_val_accuracy"],
        "global_val_loss": result["global_val_loss"],
        "global_model_cid": result["global_model_cid"],
        "local": [
            {"pipeline": p, "accuracy": sc["accuracy"], "loss": sc["loss"], "train_loss": trained[p].get("train_loss"),
             "validator": job.people.servers[validator_of(p, n)].address, "flagged": verdicts["flagged"][p],
             "selected": p in result["chosen"]}
            for p, sc in enumerate(scores) if sc is not None
        ],
        "dropped": [p for p, sc in enumerate(scores) if sc is None],
        "aggregation": result["rule"],
        "detection": verdicts.get("stage2", ""),
        "verdicts": [{k: v for k, v in d.items() if k != "evidence"} for d in verdicts["verdicts"]],
        "checked": _checked(checks),
        "replaced": replaced or [],
        "restarted": [slot for tr in trained.values() for slot in tr.get("restarted", [])],  # trainers started afresh
        "failures": [f for tr in trained.values() for f in tr.get("failures", [])],
        "steps_s": times,
        "trainers_s": {str(p): {k: tr[k] for k in ("startup_s", "train_s", "commit_s", "cpu_s", "record_cpu_s")
                                if k in tr}
                       for p, tr in trained.items()},
        "wall_s": sum(times.values()),
    }
