"""The protocol's steps as Prefect tasks: thin calls into ``tdml_core.protocol.steps``."""

from __future__ import annotations

from tdml_core.protocol import steps
from tasks.step import step


@step("open run", retries=0)
def open_run(spec, out_dir: str, resume: bool, chain: str | None, store: str | None):
    return steps.prepare(spec, out_dir, resume, chain, store)


@step("publish task")
def publish_task(job) -> int:
    return steps.publish_task(job)


@step("hire parameter servers")
def hire_parameter_servers(job) -> list[str]:
    return steps.hire_parameter_servers(job)


@step("hire trainers")
def hire_trainers(job) -> str:
    return steps.hire_trainers(job)


@step("key exchange")
def key_exchange(job) -> None:
    steps.exchange_keys(job)


@step("shard model")
def shard_model(job) -> dict:
    return steps.shard_model(job)


@step("start epoch")
def start_epoch(job, epoch: int) -> int:
    return steps.start_epoch(job, epoch)


@step("train stages", retries=1)
def train_stages(job, pipeline: int, epoch: int, attempt: int) -> dict:
    return steps.train_pipeline(job, pipeline, epoch, attempt)


@step("cross-validate")
def cross_validate(job, pipeline: int, epoch: int, attempt: int) -> dict:
    return steps.cross_validate(job, pipeline, epoch, attempt)


@step("verify work")
def verify_work(job, pipeline: int, epoch: int, attempt: int) -> dict | None:
    return steps.verify_work(job, pipeline, epoch, attempt)


@step("detect")
def detect(job, epoch: int, attempt: int, scores: list[dict]) -> dict:
    return steps.detect(job, epoch, attempt, scores)


@step("replace evicted")
def replace_evicted(job, verdicts: dict | None = None) -> list[dict]:
    return steps.replace_evicted(job, verdicts)


@step("aggregate")
def aggregate(job, epoch: int, attempt: int, scores: list[dict], verdicts: dict) -> dict:
    return steps.aggregate(job, epoch, attempt, scores, verdicts)


@step("reward")
def reward(job) -> dict:
    return steps.reward(job)
