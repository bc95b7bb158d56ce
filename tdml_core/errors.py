"""The errors that mean "the user asked for something that cannot be done"."""

from tdml_core.chain.client import ChainConfigError
from tdml_core.config import SpecError
from tdml_core.crypto import CryptoError
from tdml_core.data import DatasetError
from tdml_core.model import ModelError, PlanError
from tdml_core.paths import FolderError
from tdml_core.protocol.job import ProtocolError
from tdml_core.services import ServicesError
from tdml_core.storage.store import StoreConfigError

# A StoreError about configuration (unknown scheme, no answer at the endpoint, credentials refused) is the
# user's to fix; a blob that does not match its id (IntegrityError) or went missing (NotFound) is not.
USER_ERRORS = (SpecError, DatasetError, ModelError, PlanError, ProtocolError, CryptoError, FolderError,
               StoreConfigError, ChainConfigError, ServicesError)
