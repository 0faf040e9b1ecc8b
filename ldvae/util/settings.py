"""Package-wide defaults, as ``scvi.settings``."""

from __future__ import annotations

import contextlib
import os


class Settings:
    """Package-wide defaults, as ``scvi.settings``: ``ldvae.settings.seed = 0``."""

    seed: int = 0


settings = Settings()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def float32_default():
    """torch's default dtype float32 inside, where ldvae makes its tensors; the user's default
    (another library may have set float64) put back afterwards."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
