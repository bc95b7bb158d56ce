"""One pipeline's epoch: the ``train epoch`` task, and the ``tdml-pipeline-epoch`` flow for a work pool.

In a local run the ``tdml-train`` flow submits one ``train epoch`` task per
pipeline, concurrently; each runs its pipeline's ``train stages`` task nested
inside it (the UI draws it there), and the pipeline's stage processes stay up
between epochs. No flow run is started for it: a subflow run per pipeline and
epoch cost about 3 s of API calls, SQLite lock retries and heartbeat joins.

With a Prefect server the ``tdml-pipeline-epoch`` flow can be deployed on a GPU
work pool (``tdml-pipeline-epoch/gpu`` in prefect.yaml) and the task starts it
with ``run_deployment``; the run folder's keys and the job's chain and store
must then be reachable from the worker, and the worker starts and stops its own
stage processes.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks.protocol import train_stages
from tdml_core.config import parse_spec
from tdml_core.protocol.job import opened_job


@flow(name="tdml-pipeline-epoch")
def pipeline_epoch(spec: dict, out_dir: str, pipeline: int, epoch: int, attempt: int) -> dict:
    job = opened_job(out_dir)
    local = job is not None
    if not local:  # dispatched to a worker: open the job from its folder, as its servers and trainers
        from tdml_core.protocol.steps import prepare

        job = prepare(parse_spec(spec, "dispatched spec"), out_dir, resume=True)
    try:
        return train_stages(job, pipeline, epoch, attempt)
    finally:
        if not local:
            from tdml_core.protocol.trainers import close_trainers

            close_trainers(job)


@task(name="train epoch", cache_policy=NO_CACHE, persist_result=False)
def dispatch(spec: dict, out_dir: str, pipeline: int, epoch: int, attempt: int, pool: str | None) -> dict:
    """Step 5 for one pipeline: run its epoch here, or on the work pool behind deployment ``pool``."""
    params = {"spec": spec, "out_dir": out_dir, "pipeline": pipeline, "epoch": epoch, "attempt": attempt}
    if pool is None:
        job = opened_job(out_dir)
        if job is None:
            raise RuntimeError(f"pipeline {pipeline} epoch {epoch}: the job in {out_dir} is not open in this process")
        return train_stages(job, pipeline, epoch, attempt)
    from prefect.deployments import run_deployment

    run = run_deployment(name=pool, parameters=params, timeout=None)
    if not run.state or not run.state.is_completed():
        raise RuntimeError(f"pipeline {pipeline} epoch {epoch}: flow run {run.name} on {pool} ended {run.state}")
    return {"pipeline": pipeline, "train_loss": None, "flow_run": str(run.id)}
