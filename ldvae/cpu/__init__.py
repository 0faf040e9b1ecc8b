"""The compiled CPU training path: numba kernels, the one-step and many-step calls, and the
torch-side callers over them."""
