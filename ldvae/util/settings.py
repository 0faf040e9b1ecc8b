"""Package-wide defaults, as ``scvi.settings``."""

from __future__ import annotations

import contextlib
import os
import threading


class Settings:
    """Package-wide defaults, as ``scvi.settings``: ``ldvae.settings.seed = 0``."""

    seed: int = 0


settings = Settings()


def child_env(**variables: str) -> dict:
    """The environment of a Python child process that imports this package (the package's
    folder first on PYTHONPATH, wherever it is installed), with ``variables`` set."""
    from pathlib import Path

    env = dict(os.environ, **variables)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# torch's global generator and default dtype belong to the whole process: ldvae's work that
# seeds, draws from or sets them (a fit, a query, building or loading a model) holds this lock,
# so calls from several threads run one after another instead of drawing from each other's
# stream (a query of a model that another thread is training waits for the fit to end).
_GLOBAL_TORCH_STATE = threading.RLock()


@contextlib.contextmanager
def own_rng(seed: int | None = None, devices=()):
    """torch's global generator to this thread alone, seeded with ``seed`` (unless None), and
    put back as it was afterwards (``torch.random.fork_rng``)."""
    import torch

    with _GLOBAL_TORCH_STATE, torch.random.fork_rng(devices=list(devices)):
        if seed is not None:
            torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def float32_default():
    """torch's default dtype float32 inside, where ldvae makes its tensors; the user's default
    (another library may have set float64) put back afterwards."""
    import torch

    with _GLOBAL_TORCH_STATE:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)
