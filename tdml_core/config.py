"""Job specifications: pydantic models read from YAML. The only place defaults live."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SpecError(ValueError):
    """A job spec that cannot be run; the message names the field and what is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainerSpec(_Strict):
    """One trainer's hardware, as it offers it."""

    name: str
    memory_bytes: int | None = Field(default=None, gt=0)
    cpus: int | None = Field(default=None, gt=0)


class SyntheticSpec(_Strict):
    samples: int = Field(default=2048, gt=0)
    shape: tuple[int, int, int] = (3, 32, 32)
    classes: int = Field(default=10, ge=2)


class DatasetSpec(_Strict):
    name: Literal["digits", "cifar10", "synthetic"] = "digits"
    path: Path | None = None  # CIFAR-10 folder (the python-pickle layout)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)  # digits and synthetic
    limit: int | None = Field(default=None, gt=0)  # use only the first N training samples
    synthetic: SyntheticSpec = SyntheticSpec()

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).expanduser().exists():
            raise ValueError(f"path does not exist: {v}")
        return None if v is None else Path(v).expanduser()

    @model_validator(mode="after")
    def _cifar_needs_path(self) -> "DatasetSpec":
        if self.name == "cifar10" and self.path is None:
            raise ValueError("cifar10 needs `path`: a folder holding data_batch_1..5 and test_batch")
        return self


GENERATE = "generate"


class ParticipantsSpec(_Strict):
    """Whose keys sign: key-file paths, or ``generate`` to make fresh local identities."""

    client: str = GENERATE
    servers: Union[Literal["generate"], list[str]] = GENERATE  # one per pipeline
    trainers: Union[Literal["generate"], list[str]] = GENERATE  # pipeline-major: p0s0, p0s1, ..., p1s0, ...
    passphrase_env: str | None = None  # name of the variable holding the key files' passphrase


class ProtocolSpec(_Strict):
    """What ``tdml run`` adds to the engine's spec: money, chain, store, keys, detection."""

    budget_wei: int = Field(default=10**18, gt=0)  # escrowed at publish, paid out for verified work
    bond_wei: int = Field(default=0, ge=0)  # each server and trainer deposits it with its offer; back at settlement
    deadline_s: int = Field(default=7 * 24 * 3600, gt=0)  # after this, anyone may settle: credited work is paid,
    #                                                     the rest refunded to the client
    chain: str = "embedded"  # or a JSON-RPC URL
    store: str | None = None  # local:DIR, ipfs://HOST:PORT, s3://BUCKET?endpoint=URL; default <out>/store
    participants: ParticipantsSpec = ParticipantsSpec()
    score_tolerance: float = Field(default=0.15, gt=0, lt=1)  # detection stage 1: accuracy this far below the median
    pipeline_pool: str | None = None  # a deployment (flow/name) to dispatch pipeline epochs to; None runs them here


class JobSpec(_Strict):
    """What a client asks to be trained, and how."""

    name: str = "tdml-job"
    model: str = "digits_cnn"  # built-in name or package.module:function
    model_args: dict = Field(default_factory=dict)  # keyword arguments for a user's factory
    dataset: DatasetSpec = DatasetSpec()
    data_parallel: int = Field(default=2, ge=1)
    stages: Union[int, Literal["auto"]] = 2
    trainers: list[TrainerSpec] = Field(default_factory=list)  # each pipeline's trainers, stage order
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=32, ge=1)
    microbatches: int = Field(default=4, ge=1)
    schedule: Literal["gpipe", "1f1b"] = "gpipe"
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    precision: Literal["fp32", "fp16"] = "fp32"  # bytes per value in the memory estimate
    top_k: int = Field(default=2, ge=1)
    seed: int = Field(default=0, ge=0)
    stage_timeout_s: float = Field(default=120.0, gt=0)  # a stage silent this long fails the epoch
    protocol: ProtocolSpec = ProtocolSpec()  # used by ``tdml run`` only

    @field_validator("data_parallel")
    @classmethod
    def _two_pipelines(cls, v):
        if v < 2:
            raise ValueError("must be at least 2: each pipeline's local model is scored by another pipeline's server")
        return v

    @field_validator("stages")
    @classmethod
    def _stages_positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1 or 'auto'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        if self.top_k > self.data_parallel:
            raise ValueError(
                f"top_k ({self.top_k}) must not exceed data_parallel ({self.data_parallel})"
            )
        if self.batch_size % self.microbatches:
            raise ValueError(
                f"batch_size ({self.batch_size}) must divide evenly into microbatches ({self.microbatches})"
            )
        if self.schedule == "1f1b" and isinstance(self.stages, int) and self.microbatches < self.stages:
            raise ValueError(
                f"schedule 1f1b needs microbatches ({self.microbatches}) >= stages ({self.stages})"
            )
        if self.stages == "auto" and not self.trainers:
            raise ValueError("stages 'auto' needs `trainers` with memory_bytes to plan against")
        if isinstance(self.stages, int) and self.trainers and len(self.trainers) < self.stages:
            raise ValueError(f"{self.stages} stages need {self.stages} trainers, {len(self.trainers)} listed")
        n_stages = self.stages if isinstance(self.stages, int) else None
        parts = self.protocol.participants
        if isinstance(parts.servers, list) and len(parts.servers) != self.data_parallel:
            raise ValueError(
                f"protocol.participants.servers lists {len(parts.servers)} key files for {self.data_parallel} pipelines"
            )
        if isinstance(parts.trainers, list) and n_stages and len(parts.trainers) != self.data_parallel * n_stages:
            raise ValueError(
                f"protocol.participants.trainers lists {len(parts.trainers)} key files for "
                f"{self.data_parallel} pipelines × {n_stages} stages"
            )
        names = [t.name for t in self.trainers]
        if len(set(names)) != len(names):
            raise ValueError("trainer names must be unique")
        return self

    @property
    def microbatch_size(self) -> int:
        return self.batch_size // self.microbatches


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "spec"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "literal_error":
            msg = msg.replace("Input should be", "must be")
        lines.append(f"{where}: {msg}" if e["loc"] else msg)
    return f"{source}: invalid job spec\n  " + "\n  ".join(lines)


def parse_spec(data: dict, source: str = "spec") -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a job spec is a mapping of fields, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_describe(err, source)) from None


def load_spec(path: str | Path) -> JobSpec:
    """Read a job spec from YAML; relative dataset paths are taken from the spec's folder."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("dataset"), dict):
        raw = data["dataset"].get("path")
        if isinstance(raw, str) and not Path(raw).expanduser().is_absolute():
            data["dataset"]["path"] = str(path.parent / raw)
    return parse_spec(data, str(path))
