"""The optimizer of the training loop: torch's Adam with scvi-tools' settings, fused."""

from __future__ import annotations

import torch
from torch import Tensor


class CachedFusedAdam(torch.optim.Adam):
    """torch's fused Adam, with the per-step bookkeeping done once.

    ``Adam.step`` walks every parameter in Python on every call (state checks, list
    building: ~0.3 ms per step for this model's 20 tensors, as much as the update itself).
    After the first step the state tensors are fixed objects, so this keeps their lists and
    calls the same two kernels Adam's fused path calls (step counters += 1, then
    ``_fused_adam_``). The state dict, and so checkpoints, are Adam's."""

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self._lists = None
        self._flat_source = None  # (flat parameters, flat gradients): see use_flat
        self._flat = None

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._lists = None
        self._flat = None

    def use_flat(self, flat: Tensor, flat_grad: Tensor) -> None:
        """The parameters are views of ``flat`` and their gradients the same views of
        ``flat_grad`` (``fused.TrainStep``): the moment estimates become views of two flat
        tensors too, and each step is one fused kernel over one tensor (~2.5x less time than
        over 20 tensors: 0.19 against 0.51 ms per step for this model on CPU)."""
        self._flat_source = (flat, flat_grad)
        self._lists = None
        self._flat = None

    def _cache(self) -> None:
        (group,) = self.param_groups
        params = group["params"]
        states = [self.state.get(p) for p in params]
        if group["amsgrad"] or group["maximize"] or any(not s for s in states):
            self._lists = None
            return
        self._lists = (params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                       [s["step"] for s in states])
        self._flatten(params, states)

    def _flatten(self, params, states) -> None:
        if self._flat_source is None:
            return
        flat, flat_grad = self._flat_source
        storage = flat.untyped_storage().data_ptr()
        if sum(p.numel() for p in params) != flat.numel() or any(
            p.untyped_storage().data_ptr() != storage or p.grad is None
            or p.grad.untyped_storage().data_ptr() != flat_grad.untyped_storage().data_ptr()
            or p.grad.storage_offset() != p.storage_offset() or p.grad.stride() != p.stride()
            for p in params
        ):
            return
        moments = []
        for key in ("exp_avg", "exp_avg_sq"):
            whole = torch.zeros_like(flat)
            for p, s in zip(params, states):
                view = whole.as_strided(p.shape, p.stride(), p.storage_offset())
                view.copy_(s[key])
                s[key] = view
            moments.append(whole)
        self._lists = (params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                       [s["step"] for s in states])
        self._flat = (flat, flat_grad, *moments, [p.grad for p in params])

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none or self._lists is None:
            super().zero_grad(set_to_none)
            return
        for p in self._lists[0]:  # Optimizer.zero_grad's profiling and hook checks: ~0.08 ms a step
            p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        if self._lists is None and closure is None:
            # State loaded from a state dict: take even the first step on the cached (and
            # flat) path, so a resumed fit rounds exactly as an uninterrupted one.
            self._cache()
        grads = None if self._lists is None else [p.grad for p in self._lists[0]]
        if closure is not None or grads is None or any(g is None for g in grads):
            loss = super().step(closure)
            self._cache()
            return loss
        params, exp_avgs, exp_avg_sqs, steps = self._lists
        (group,) = self.param_groups
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1)
        if self._flat is not None and all(g is v for g, v in zip(grads, self._flat[4])):
            # every parameter, gradient and moment is a view of one flat tensor; the steps are equal
            params, grads, exp_avgs, exp_avg_sqs = ([t] for t in self._flat[:4])
            steps = steps[:1]
        torch._fused_adam_(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
            beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
            grad_scale=None, found_inf=None,
        )
        return None


def adam(params: list[Tensor], config) -> torch.optim.Adam:
    """Adam with scvi-tools' settings (``config``: a ``train.TrainConfig``). The fused kernel (one pass over all parameters, CPU
    and CUDA) when every parameter is float32 on one device: the same update, a few times
    less per-step overhead than the per-tensor loop for this model's ~20 small tensors."""
    kwargs = dict(lr=config.lr, eps=config.eps, weight_decay=config.weight_decay)
    if len({p.device for p in params}) == 1 and all(p.dtype == torch.float32 for p in params):
        return CachedFusedAdam(params, **kwargs)
    return torch.optim.Adam(params, **kwargs)
