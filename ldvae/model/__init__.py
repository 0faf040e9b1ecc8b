"""The scvi-tools-compatible model: :class:`LinearSCVI` (``facade``), its settings and
argument checks (``params``), its files on disk (``files``) and resuming from a
checkpoint (``resume``)."""

from ..nn.module import LDVAEModule
from ..util.settings import Settings, settings
from .facade import LinearSCVI, NotTrainedError
from .files import ADATA_FILE, FORMAT_VERSION, MODEL_JSON, MODEL_WEIGHTS
from .params import resolve_device

__all__ = ["LinearSCVI", "NotTrainedError", "Settings", "settings", "resolve_device", "LDVAEModule",
           "MODEL_JSON", "MODEL_WEIGHTS", "ADATA_FILE", "FORMAT_VERSION"]
