"""The errors that mean "the user asked for something that cannot be done"."""

from tdml_core.config import SpecError
from tdml_core.crypto import CryptoError
from tdml_core.data import DatasetError
from tdml_core.model import ModelError, PlanError
from tdml_core.protocol.job import ProtocolError

USER_ERRORS = (SpecError, DatasetError, ModelError, PlanError, ProtocolError, CryptoError)
