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
    test_fraction: float = Field(default=0.2, gt=0, lt=1)  # digits and synthetic: the test set every accuracy is
    # reported on; nothing but the final report sees it
    validation_fraction: float = Field(default=0.15, gt=0, lt=1)  # of the training data: scores the local models
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


ATTACK_KINDS = ("gaussian", "zero_gradient", "mean_shift", "sign_flip", "alie", "ipm", "label_flip", "scaled",
                "free_rider", "lazy", "forged_output", "forged_grad")


class AttackSpec(_Strict):
    """A dishonest trainer, simulated inside that trainer's own stage process (see ``tdml_core.attacks``).

    ``scale`` is the attack's one strength parameter; None takes the kind's default:
    gaussian σ (√200), mean_shift and alie z (1.5 and Baruch et al.'s z_max), sign_flip
    and scaled factor (1 and 10), ipm ε (0.5), free_rider's perturbation (0.1 of the
    stale update), forged_output and forged_grad noise (1 × the values' spread);
    zero_gradient and label_flip have none. ``q`` is the share of steps ``lazy`` skips.
    """

    slot: str  # "PIPELINE/STAGE"
    kind: Literal[ATTACK_KINDS]  # type: ignore[valid-type]
    from_epoch: int = Field(default=0, ge=0)
    scale: float | None = Field(default=None, gt=0)
    q: float = Field(default=0.1, gt=0, le=1)  # lazy: the share of its steps it skips
    hidden: bool = False  # forged_output, forged_grad: its records hold the honest values, not what it sent

    @field_validator("slot")
    @classmethod
    def _slot_shape(cls, v: str) -> str:
        p, sep, s = v.partition("/")
        if not (sep and p.isdigit() and s.isdigit()):
            raise ValueError(f"must be PIPELINE/STAGE, like 0/1; got {v!r}")
        return f"{int(p)}/{int(s)}"

    @property
    def pipeline(self) -> int:
        return int(self.slot.split("/")[0])

    @property
    def stage(self) -> int:
        return int(self.slot.split("/")[1])


class DetectionSpec(_Strict):
    """How trainers are judged each epoch (stage 1: scores; stage 2: the trainers' updates)."""

    gradient_stage: Literal["always", "on_flag"] = "always"
    method: Literal["two_means_pca", "two_means_random", "mandera"] = "two_means_pca"
    dims: int | None = Field(default=None, ge=1)  # projection dimensions; None: 2 for PCA, 20 for random
    separation: float | None = Field(default=None, gt=0)  # clear split: centroid distance / within spread;
    #                                                       None: the detector's default (tdml_core.robust.detect)
    mad_threshold: float = Field(default=3.5, gt=0)  # stage 1: this many robust deviations below the median
    min_agreement: float = Field(default=0.2, ge=-1, le=1)  # cosine(−epoch gradient, update) at least this
    min_similarity: float = Field(default=0.05, ge=-1, le=1)  # an update's largest cosine to its stage's others
    max_outside: float = Field(default=8.0, gt=0)  # a score-flagged pipeline's stage this far outside the others' spread
    max_copy_ratio: float = Field(default=0.1, ge=0, le=1)  # an update nearer another's than this × the larger norm: a copy
    evict_after: int = Field(default=3, ge=1)  # flagged in this many ...
    window: int = Field(default=4, ge=1)  # ... of the last this many epochs: evicted

    @model_validator(mode="after")
    def _window(self) -> "DetectionSpec":
        if self.evict_after > self.window:
            raise ValueError(f"evict_after ({self.evict_after}) must not exceed window ({self.window})")
        return self


class VerificationSpec(_Strict):
    """How trainers' work is checked: per-step records, a Merkle root per epoch, random steps recomputed."""

    enabled: bool = True
    checks: int = Field(default=66, ge=0)  # random steps recomputed per trainer per epoch (besides its last),
    #                                        in whole segments: 66 catch a trainer skipping 10% of its steps at
    #                                        random with 1 − 0.9^66 > 99.9%
    checkpoint_every: int = Field(default=4, ge=1)  # a segment: a weights digest every this many steps, and a
    #                                                 check replays from one to the next; 1 digests every step
    tolerance: float = Field(default=1e-4, gt=0)  # largest |recomputed − committed| / max|committed| accepted


class AggregationSpec(_Strict):
    """How the chosen pipelines' updates (relative to the global model) become the next global model."""

    rule: Literal["top_k", "mean", "median", "trimmed_mean", "multi_krum", "centered_clip"] = "top_k"
    f: int = Field(default=1, ge=0)  # trimmed_mean, multi_krum: how many may be Byzantine
    tau: float = Field(default=1.0, gt=0)  # centered_clip: the clipping radius
    iters: int = Field(default=1, ge=1)  # centered_clip
    # the outer optimizer (tdml_core.robust.outer): the global model moves by lr × the combined update, with
    # (Nesterov) momentum; lr 1 and momentum 0 is plain averaging
    outer_lr: float = Field(default=1.0, gt=0, le=10)
    outer_momentum: float = Field(default=0.0, ge=0, lt=1)
    nesterov: bool = True


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
    standby_trainers: int = Field(default=0, ge=0)  # extra trainers that offer at the start and replace the evicted
    # activations and gradients between pipeline neighbours: AES-256-GCM with keys from the neighbours' X25519
    # exchange (a run without identities, `tdml train`, derives them from the seed), or in the clear
    links: Literal["sealed", "plain"] = "sealed"


class JobSpec(_Strict):
    """What a client asks to be trained, and how."""

    name: str = "tdml-job"
    model: str = "digits_cnn"  # built-in name or package.module:function
    model_args: dict = Field(default_factory=dict)  # keyword arguments for a user's factory
    dataset: DatasetSpec = DatasetSpec()
    data_parallel: int = Field(default=2, ge=1)
    stages: Union[int, Literal["auto"]] = 2
    trainers: list[TrainerSpec] = Field(default_factory=list)  # each pipeline's trainers, stage order
    epochs: int = Field(default=5, ge=1)  # passes over each pipeline's shard
    # protocol rounds per epoch: each round trains 1/R of the epoch's batches and is a full protocol round
    # (commitments, checks, validation, detection, aggregation); every epoch index the protocol keeps (the
    # ledger's, the records', attacks' from_epoch, detection's window) counts rounds
    rounds_per_epoch: int = Field(default=1, ge=1, le=64)
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
    attacks: list[AttackSpec] = Field(default_factory=list)  # simulated dishonest trainers
    detection: DetectionSpec = DetectionSpec()
    aggregation: AggregationSpec = AggregationSpec()
    verification: VerificationSpec = VerificationSpec()

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
        slots = [a.slot for a in self.attacks]
        if len(set(slots)) != len(slots):
            raise ValueError("attacks: one attack per trainer slot")
        for a in self.attacks:
            if a.pipeline >= self.data_parallel or (n_stages and a.stage >= n_stages):
                raise ValueError(f"attacks: slot {a.slot} is not in {self.data_parallel} pipelines x {self.stages} stages")
            if a.kind == "label_flip" and n_stages and a.stage != n_stages - 1:
                raise ValueError(f"attacks: label_flip at {a.slot}: only the last stage sees the labels")
            if a.from_epoch >= self.rounds:
                raise ValueError(f"attacks: {a.slot} starts at epoch {a.from_epoch}, after the job's last"
                                 + (f" ({self.rounds} rounds: from_epoch counts rounds)" if self.rounds_per_epoch > 1 else ""))
        agg = self.aggregation
        if agg.rule == "trimmed_mean" and self.data_parallel <= 2 * agg.f:
            raise ValueError(f"aggregation: trimmed_mean with f={agg.f} needs more than {2 * agg.f} pipelines")
        if agg.rule == "multi_krum" and self.data_parallel < agg.f + 3:
            raise ValueError(f"aggregation: multi_krum with f={agg.f} needs at least {agg.f + 3} pipelines")
        names = [t.name for t in self.trainers]
        if len(set(names)) != len(names):
            raise ValueError("trainer names must be unique")
        return self

    @property
    def rounds(self) -> int:
        """Protocol rounds in the job: what the ledger, the records and the loops count as epochs."""
        return self.epochs * self.rounds_per_epoch

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
