"""Parameter averaging (``TrainConfig.ema_decay``): after each epoch an exponential moving
average of the module's parameters and batch-norm statistics, ``mean += (1 - decay) *
(live - mean)``, starting at the first epoch's (not at the starting point, which would
weigh on a short fit). Validation reads the average and the finished fit keeps it; the
steps go on from the live parameters. With a large learning rate the live parameters
wander around the optimum from step to step; their average sits nearer to it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def averaged_tensors(module: torch.nn.Module) -> dict[str, Tensor]:
    """The tensors that are averaged, by name: every parameter and floating-point buffer
    (batch-norm running statistics, not its integer counter)."""
    return {name: t for name, t in module.state_dict(keep_vars=True).items() if t.is_floating_point()}


class ParameterAverage:
    """The running average of ``module``'s tensors; ``average`` continues one saved by
    ``state()`` (a checkpoint's), otherwise the first ``update`` starts it."""

    def __init__(self, module: torch.nn.Module, decay: float, average: dict[str, Tensor] | None = None):
        named = averaged_tensors(module)
        self.names = list(named)
        self.live = [t.detach() for t in named.values()]
        self.mean = None if average is None else [  # a checkpoint's, read onto the CPU
            average[name].to(t.device, copy=True) for name, t in zip(self.names, self.live)]
        self.weight = 1.0 - decay

    @torch.no_grad()
    def update(self) -> None:
        if self.mean is None:
            self.mean = [t.clone() for t in self.live]
        else:
            torch._foreach_lerp_(self.mean, self.live, self.weight)

    @contextlib.contextmanager
    def applied(self):
        """The module holds the average inside the block and its live values again after it."""
        if self.mean is None:  # no epoch completed yet
            yield
            return
        kept = [t.clone() for t in self.live]
        torch._foreach_copy_(self.live, self.mean)
        try:
            yield
        finally:
            torch._foreach_copy_(self.live, kept)

    def apply(self) -> None:
        """The module keeps the average (the end of a fit; the live values if no epoch completed)."""
        if self.mean is not None:
            torch._foreach_copy_(self.live, self.mean)

    def state(self) -> dict[str, Tensor] | None:
        return None if self.mean is None else {name: t.clone() for name, t in zip(self.names, self.mean)}
