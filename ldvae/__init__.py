"""ldvae: a fast, interpretable linearly decoded VAE for single-cell RNA-seq counts.

``import ldvae`` then use ``ldvae.LinearSCVI`` exactly as ``scvi.model.LinearSCVI``.
"""

__version__ = "0.1.0"

from .data import SetupError  # noqa: E402
from .model import LinearSCVI, NotTrainedError, settings  # noqa: E402
from .results import result_keys, write_results  # noqa: E402
from .simulate import simulate  # noqa: E402
from .train import NonFiniteLossError  # noqa: E402

__all__ = [
    "LinearSCVI",
    "NonFiniteLossError",
    "NotTrainedError",
    "SetupError",
    "result_keys",
    "settings",
    "simulate",
    "write_results",
    "__version__",
]
