"""ldvae: a fast, interpretable linearly decoded VAE for single-cell RNA-seq counts.

``import ldvae`` then use ``ldvae.LinearSCVI`` exactly as ``scvi.model.LinearSCVI``.
"""

from ._version import __version__  # noqa: E402

from . import _compat  # noqa: E402

_compat.install()

from .data.contract import SetupError  # noqa: E402
from .model import LinearSCVI, NotTrainedError, settings  # noqa: E402
from .data.results import result_keys, write_results  # noqa: E402
from .data.simulate import simulate  # noqa: E402
from .train.loop import ModelFileError, NonFiniteLossError  # noqa: E402

# The workflow pulls in scanpy; import it on first use so ``import ldvae`` stays light.
_LAZY = {"run_workflow": ("workflow.pipeline", "run_workflow"), "read_counts": ("data.readers", "read_counts"),
         "read_demo": ("data.readers", "read_demo")}


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # a module, or an earlier path: ``ldvae.stream``
    raise AttributeError(f"module 'ldvae' has no attribute {name!r}")


__all__ = [
    "LinearSCVI",
    "read_counts",
    "read_demo",
    "run_workflow",
    "ModelFileError",
    "NonFiniteLossError",
    "NotTrainedError",
    "SetupError",
    "result_keys",
    "settings",
    "simulate",
    "write_results",
    "__version__",
]
