"""The errors that mean "the user asked for something that cannot be done"."""

from tdml_core.config import SpecError
from tdml_core.data import DatasetError
from tdml_core.model import ModelError, PlanError

USER_ERRORS = (SpecError, DatasetError, ModelError, PlanError)
