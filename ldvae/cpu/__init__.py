"""The compiled CPU training path: numba kernels, the one-step and many-step calls, and the
torch-side callers over them.

Importing this package hands ``ldvae.nn.module`` its compiled kernels (``use_compiled``):
the lower layer never imports this one; this one chooses to serve it."""

from ..nn import module as _module
from . import fused

_module.use_compiled(fused)
