"""Who holds which key: the job's keys, derived from two roots, handed out by least privilege.

The client makes two random roots. Every key is HKDF-SHA256 of one root and a
label, so holding a derived key tells nothing of the root or of other labels.

    label          root    sealed artifacts                           held by
    spec           model   the job spec                               client, servers, every trainer
    model          model   initial model, plans, scores, verdicts,   client, servers
                           global models
    stage/S        model   stage S's slice of each global model       client, servers, the trainers of stage S
    weights/P/S    model   trainer (P, S)'s weights and gradient,    client, servers, trainer (P, S)
                           and its answers to challenges
    data/P         data    pipeline P's shard                         client, the trainers of pipeline P,
                                                                      P's referee (the server of P + 1)
    eval           data    the set that scores local models           client, servers

The client seals both roots to itself (to resume and audit), the model root
and the eval key to every server (and to each the data key of the pipeline
whose trainers' work it re-checks: their first stage's inputs and last stage's
targets are that shard's batches), each trainer's data key to that trainer, and
each server seals ``spec``, ``stage/S`` and ``weights/P/S`` to trainer (P, S).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tdml_core.chain.market import Kind
from tdml_core.crypto import CryptoError, new_data_key

MODEL_ROOT, DATA_ROOT = "model_root", "data_root"


def _derive(root: bytes, label: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"tdml key {label}".encode()).derive(root)


def label_for(kind: Kind, pipeline: int = 0, stage: int = 0) -> str:
    """The key an artifact of ``kind`` is sealed with."""
    if kind == Kind.SPEC:
        return "spec"
    if kind == Kind.DATA:
        return f"data/{pipeline}"
    if kind == Kind.EVAL:
        return "eval"
    if kind == Kind.STAGE:
        return f"stage/{stage}"
    if kind in (Kind.WEIGHTS, Kind.GRAD):
        return f"weights/{pipeline}/{stage}"
    if kind in (Kind.INIT, Kind.PLAN, Kind.SCORE, Kind.CHECKS, Kind.VERDICTS, Kind.GLOBAL):
        return "model"
    raise ValueError(f"{kind.label} is sealed to one participant, not with a job key")


def role_of(kind: Kind, pipeline: int = 0, stage: int = 0) -> str:
    """The associated data an artifact is sealed under: its kind and slot ('weights/0/1')."""
    return f"{kind.label}/{pipeline}/{stage}"


def reveal_role(pipeline: int, stage: int) -> str:
    """The associated data of trainer (pipeline, stage)'s answer to a challenge (sealed with its weights' key)."""
    return f"reveal/{pipeline}/{stage}"


def _root_of(label: str) -> str:
    return DATA_ROOT if label == "eval" or label.startswith("data/") else MODEL_ROOT


class JobKeys:
    """The keys one participant holds: roots it may derive from, and single keys it was given."""

    def __init__(self, held: dict[str, bytes]):
        self.held = dict(held)

    @classmethod
    def new(cls) -> "JobKeys":
        return cls({MODEL_ROOT: new_data_key(), DATA_ROOT: new_data_key()})

    def get(self, label: str) -> bytes:
        if label in self.held:
            return self.held[label]
        root = _root_of(label)
        if root in self.held:
            return _derive(self.held[root], label)
        raise CryptoError(f"this participant holds no key for {label}")

    def for_kind(self, kind: Kind, pipeline: int = 0, stage: int = 0) -> bytes:
        return self.get(label_for(kind, pipeline, stage))

    # -- what each participant is given -----------------------------------------------------
    def for_client(self) -> dict[str, bytes]:
        return {MODEL_ROOT: self.held[MODEL_ROOT], DATA_ROOT: self.held[DATA_ROOT]}

    def for_server(self, refereed: int | None = None) -> dict[str, bytes]:
        """What the client seals to a server; ``refereed``: the pipeline whose trainers' work it re-checks."""
        out = {MODEL_ROOT: self.get(MODEL_ROOT), "eval": self.get("eval")}
        if refereed is not None:
            out[f"data/{refereed}"] = self.get(f"data/{refereed}")
        return out

    def for_trainer_data(self, pipeline: int) -> dict[str, bytes]:
        """What the client seals to each trainer of ``pipeline``."""
        return {f"data/{pipeline}": self.get(f"data/{pipeline}")}

    def for_trainer(self, pipeline: int, stage: int) -> dict[str, bytes]:
        """What a server seals to its trainer (``pipeline``, ``stage``)."""
        return {label: self.get(label) for label in ("spec", f"stage/{stage}", f"weights/{pipeline}/{stage}")}

    @staticmethod
    def from_doc(doc: dict) -> "JobKeys":
        return JobKeys({k: bytes.fromhex(v) for k, v in doc.items()})
