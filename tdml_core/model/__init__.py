"""Models, their per-layer memory, stage planning and splitting."""

from tdml_core.model.memory import BYTES_PER_VALUE, OPTIMIZER_STATES, LayerInfo
from tdml_core.model.plan import PlanError, StageInfo, StagePlan, TrainerSlot, plan_stages
from tdml_core.model.split import SplitError, run_stages, split_model
from tdml_core.model.zoo import ModelError, build_model

__all__ = [
    "BYTES_PER_VALUE",
    "OPTIMIZER_STATES",
    "LayerInfo",
    "ModelError",
    "PlanError",
    "SplitError",
    "StageInfo",
    "StagePlan",
    "TrainerSlot",
    "build_model",
    "plan_stages",
    "run_stages",
    "split_model",
]
