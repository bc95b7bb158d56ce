"""The trainers of this process's pipelines, kept running from one epoch to the next.

Starting a pipeline's stage processes costs seconds (spawn, import torch, trace
the model), so a local run starts each pipeline once and reuses it every epoch;
a pipeline epoch dispatched to a remote work pool starts its own and closes it.
"""

from __future__ import annotations

import threading

from tdml_core.chain.market import Kind
from tdml_core.protocol.job import Job
from tdml_core.runtime.cluster import PipelineCluster
from tdml_core.runtime.stage import TrainerSource

_CLUSTERS: dict[tuple[str, int], PipelineCluster] = {}
_LOCK = threading.Lock()


def trainer_sources(job: Job, pipeline: int) -> dict:
    """What each trainer of ``pipeline`` is told: its key file and the ids of what was sealed to it."""
    data = job.must(0, Kind.DATA, pipeline)
    client_public = job.public_key(job.people.client.address).hex()
    server_public = job.public_key(job.server_address(pipeline)).hex()
    out = {}
    for s in range(job.n_stages):
        trainer = job.people.trainers[(pipeline, s)]
        out[(pipeline, s)] = TrainerSource(
            store_url=job.ref.store_url,
            job_id=job.job_id,
            key_file=str(job.people.key_files[trainer.address]),
            passphrase=job.people.passphrase,
            client_public=client_public,
            server_public=server_public,
            data_key_cid=job.must(0, Kind.DATA_KEY, pipeline, s, job.generation(pipeline, s)).cid,
            trainer_keys_cid=job.must(0, Kind.TRAINER_KEYS, pipeline, s, job.generation(pipeline, s)).cid,
            data_cid=data.cid,
            data_digest=data.digest,
            generation=job.generation(pipeline, s),
            peers=tuple(job.people.trainers[(pipeline, t)].address for t in range(job.n_stages)),
            peer_publics=tuple(job.public_key(job.people.trainers[(pipeline, t)].address).hex()
                               for t in range(job.n_stages)),
        )
    return out


def stage_pid(job: Job, pipeline: int, stage: int) -> int | None:
    """The process id of trainer (pipeline, stage)'s stage process, while it runs here."""
    with _LOCK:
        cluster = _CLUSTERS.get((job.ref.out_dir, pipeline))
    return None if cluster is None else cluster.pid(pipeline, stage)


def has_trainers(job: Job, pipeline: int) -> bool:
    """Whether ``pipeline``'s stage processes were up (so that a failure means they start again)."""
    with _LOCK:
        return (job.ref.out_dir, pipeline) in _CLUSTERS


def running_cluster(job: Job, pipeline: int) -> PipelineCluster | None:
    """``pipeline``'s stage processes when they are up in this process (None: they were never started or stopped)."""
    with _LOCK:
        return _CLUSTERS.get((job.ref.out_dir, pipeline))


def trainer_cluster(job: Job, pipeline: int) -> PipelineCluster:
    key = (job.ref.out_dir, pipeline)
    with _LOCK:
        cluster = _CLUSTERS.get(key)
    if cluster is None:
        cluster = PipelineCluster(job.spec, job.plan, [pipeline], trainer_sources(job, pipeline),
                                  collusion_dir=str(job.out / ".collusion")).start()
        with _LOCK:
            _CLUSTERS[key] = cluster
    return cluster


def close_trainers(job: Job | None = None) -> None:
    """Stop the stage processes of ``job`` (or of every job in this process)."""
    with _LOCK:
        keys = [k for k in _CLUSTERS if job is None or k[0] == job.ref.out_dir]
        clusters = [_CLUSTERS.pop(k) for k in keys]
    for cluster in clusters:
        cluster.close()


def drop_trainers(job: Job, pipeline: int) -> None:
    """Forget a pipeline whose processes failed, so that a retry starts them afresh."""
    with _LOCK:
        cluster = _CLUSTERS.pop((job.ref.out_dir, pipeline), None)
    if cluster is not None:
        cluster.close()
