"""The training step behind one seam: ``step(minibatches, kl_weights) -> StepResult``.

``OneAtATime`` takes one optimizer step per minibatch (``CountBatch``): loss and gradients by
autograd, or by the compiled ``fused.TrainStep`` when it accepts the module; gradients and
buffers shared over ranks for a distributed source. ``CompiledRuns`` hands a run of
minibatches (cell indices) to one compiled call (``fused.StepRunner``: gather, step, check,
Adam). Both take the same steps from the same seed (the random stream of
``fused.draw_step_noise``); ``choose_step`` picks one per fit and ``fit`` loops over it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from ..cpu import fused
from ..nn.module import LDVAEModule
from .batches import InMemorySource
from .config import TrainConfig, TrainState
from .optim import FusedAdam

# per-cell reconstruction, kl_z and kl_l of the completed steps, and their loss summed over cells
Terms = tuple[Tensor, Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class StepResult:
    done: int  # minibatches whose optimizer step completed, from the first
    terms: Terms | None  # over the completed steps; None when none completed
    failed: str | None  # what became non-finite in the next step: "loss", "gradient", "update"


class _Step:
    """What both steps share: the module's buffers (batch-norm statistics and counters) and
    a copy of them from before the current call, restored when a step fails or is interrupted;
    and ``mark``/``rewind``, which keep and put back the whole state at an epoch's start."""

    def __init__(self, module: LDVAEModule):
        self.buffers = list(module.buffers())
        self.last_good = [b.clone() for b in self.buffers]
        self.marked: list[Tensor] | None = None

    def snapshot(self) -> None:
        torch._foreach_copy_(self.last_good, self.buffers)

    def restore(self) -> None:
        torch._foreach_copy_(self.buffers, self.last_good)


class OneAtATime(_Step):
    """One call of the loss and its gradients, then one optimizer step, per minibatch."""

    def __init__(self, module: LDVAEModule, optimizer, compiled: fused.TrainStep | None, comm,
                 frozen: "_Frozen | None" = None):
        super().__init__(module)
        self.module, self.optimizer, self.compiled, self.comm, self.frozen = module, optimizer, compiled, comm, frozen
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.marked_optimizer: dict | None = None

    def mark(self) -> None:
        """Keep the parameters, buffers and optimizer state, for ``rewind``."""
        with torch.no_grad():
            self.marked = _kept(self.marked, [*self.module.parameters(), *self.buffers])
        self.marked_optimizer = copy.deepcopy(self.optimizer.state_dict())

    @torch.no_grad()
    def rewind(self) -> None:
        torch._foreach_copy_([*self.module.parameters(), *self.buffers], self.marked)
        self.optimizer.load_state_dict(copy.deepcopy(self.marked_optimizer))

    def epoch(self, source, generator: torch.Generator) -> Iterator[list]:
        """The epoch's minibatches, one per call (a step boundary between any two)."""
        for batch in source.train_batches(generator):
            yield [batch]

    def __call__(self, minibatches: list, kl_weights: list[float]) -> StepResult:
        per_step = []
        for batch, kl_weight in zip(minibatches, kl_weights):
            failed = self._one(batch, kl_weight, per_step)
            if failed is not None:
                self.restore()
                return StepResult(len(per_step), _joined(per_step), failed)
        return StepResult(len(per_step), _joined(per_step), None)

    def _one(self, batch, kl_weight: float, per_step: list) -> str | None:
        if self.compiled is not None:  # the same loss and gradients, one compiled call
            out = self.compiled(batch, kl_weight)
        else:
            out = self.module.loss(batch, kl_weight)
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
        if self.comm is not None:
            self.comm.sync(self.params, self.buffers)
        norm = _grad_norm(self.params) if self.compiled is None else self.compiled.grad_norm()
        if not bool(torch.isfinite(out.loss + norm)):
            return "loss" if not bool(torch.isfinite(out.loss)) else "gradient"
        if not self.optimizer.step(float(norm)):  # refused: parameters and Adam's state as before it
            return "update"
        if self.frozen is not None:
            self.frozen.put_back()
        per_step.append((out.reconstruction.detach(), out.kl_z.detach(), out.kl_l.detach(),
                         out.loss.detach().double() * out.reconstruction.shape[0]))
        return None


class _Frozen:
    """Entries of parameters held fixed (``TrainConfig.frozen``), put back after each step.
    Adam is elementwise, so the other entries take exactly the steps they would take if the
    fixed ones were constants; whole tensors held fixed are left out of the optimizer."""

    def __init__(self, module: LDVAEModule, frozen: dict):
        params = dict(module.named_parameters())
        unknown = sorted(set(frozen) - set(params))
        if unknown:
            raise ValueError(f"frozen names parameters the module does not have: {unknown}.")
        self.parts = []
        for name, mask in frozen.items():
            if mask is not None:
                mask = torch.as_tensor(mask, dtype=torch.bool, device=params[name].device)
                self.parts.append((params[name], mask, params[name].detach()[mask].clone()))

    @torch.no_grad()
    def put_back(self) -> None:
        for param, mask, values in self.parts:
            param[mask] = values


class CompiledRuns(_Step):
    """Runs of up to ``fused.StepRunner.chunk`` minibatches per compiled call; on failure the
    runner itself leaves the state of the last good step. An exception raised as a run returns
    (a second Ctrl-C, a user's signal handler) finds the parameters and Adam's moments moved
    and not yet counted: ``restore`` puts them back with the buffers and the step count."""

    def __init__(self, module: LDVAEModule, runner: fused.StepRunner):
        super().__init__(module)
        self.runner = runner
        self.saved: list[Tensor] | None = None  # the flat parameters and Adam's two moments
        self.saved_steps = 0.0

    def _live(self) -> list[Tensor]:
        return [self.runner.step.flat, *self.runner.optimizer.flat_moments()]

    def snapshot(self) -> None:
        super().snapshot()
        self.saved = _kept(self.saved, self._live())
        self.saved_steps = self.runner.optimizer.step_count()

    def restore(self) -> None:
        super().restore()
        if self.saved is not None:
            self._put_back(self.saved, self._live(), self.saved_steps)

    def mark(self) -> None:
        """Keep the flat parameters, Adam's moments and count and the buffers, for ``rewind``."""
        self.marked = _kept(self.marked, [*self._live(), *self.buffers])
        self.marked_steps = self.runner.optimizer.step_count()

    def rewind(self) -> None:
        self._put_back(self.marked, [*self._live(), *self.buffers], self.marked_steps)

    def _put_back(self, copies: list[Tensor], live: list[Tensor], steps: float) -> None:
        torch._foreach_copy_(live, copies)
        self.runner.optimizer.advance(steps - self.runner.optimizer.step_count())

    def epoch(self, source: InMemorySource, generator: torch.Generator) -> Iterator[list[Tensor]]:
        parts = source.epoch_rows(generator)
        chunk = self.runner.chunk
        for start in range(0, len(parts), chunk):
            yield parts[start : start + chunk]

    def __call__(self, minibatches: list[Tensor], kl_weights: list[float]) -> StepResult:
        done, terms, failed = self.runner(minibatches, kl_weights)
        return StepResult(done, terms, failed)


def choose_step(module: LDVAEModule, optimizer, source, state: TrainState, config: TrainConfig) -> Step:
    """The step for this fit: compiled runs for in-memory CPU data in one process, else one
    step at a time (compiled where ``fused.TrainStep`` accepts the module, autograd otherwise).
    Loads the optimizer state of ``state`` once the optimizer's layout is settled, with the
    learning rate, weight decay and eps of ``config``."""
    if config.frozen:  # autograd, one step at a time, putting back the fixed entries after each
        return OneAtATime(module, optimizer, None, source.comm, _Frozen(module, config.frozen))
    compiled = fused.TrainStep.for_module(module)  # None: autograd
    if compiled is not None and isinstance(optimizer, FusedAdam):
        optimizer.use_flat(compiled.flat, compiled.flat_grad)
    source.by_gene = module.needs_gene_order
    if state.optimizer_state is not None:
        optimizer.load_state_dict(state.optimizer_state)
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"], group["eps"] = config.lr, config.weight_decay, config.eps
            group["decoupled_weight_decay"] = config.optimizer == "AdamW"
    # the compiled runs implement Adam's L2 weight decay; AdamW steps one at a time
    if isinstance(source, InMemorySource) and source.comm is None and config.optimizer == "Adam":
        runner = fused.StepRunner.for_fit(compiled, optimizer, source)
        if runner is not None:
            return CompiledRuns(module, runner)
    return OneAtATime(module, optimizer, compiled, source.comm)


Step = OneAtATime | CompiledRuns


def _kept(copies: list[Tensor] | None, live: list[Tensor]) -> list[Tensor]:
    """``live``'s values in ``copies``, made on first use (None)."""
    if copies is None:
        return [t.detach().clone() for t in live]
    torch._foreach_copy_(copies, live)
    return copies


def _joined(per_step: list[Terms]) -> Terms | None:
    if len(per_step) <= 1:
        return per_step[0] if per_step else None
    rec, kl_z, kl_l, loss = zip(*per_step)
    return torch.cat(rec), torch.cat(kl_z), torch.cat(kl_l), torch.stack(loss).sum()


def _grad_norm(params: list[Tensor]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if hasattr(torch, "_foreach_norm") and len({(g.device, g.dtype) for g in grads}) == 1:
        return torch.stack(torch._foreach_norm(grads)).norm()  # one kernel for all tensors
    return torch.stack([g.norm() for g in grads]).norm()
