"""The optimizer of the training loop: Adam with scvi-tools' settings, as torch's fused kernel.

``step`` refuses an update that makes a parameter non-finite (a finite gradient times a
huge learning rate can overflow): it puts the parameters and Adam's state back as they
were and returns False, so the training loop keeps the last good step. Given a bound on
the gradients, ``FusedAdam.step`` skips the copies that make this possible while bounds
carried from step to step prove the update finite (``cpu.loop.update_bounds``, the rule
the compiled runner follows too)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..cpu.loop import update_bounds

_GROUP_DEFAULTS = dict(betas=(0.9, 0.999), amsgrad=False, maximize=False, foreach=None, capturable=False,
                       differentiable=False, fused=True, decoupled_weight_decay=False)


class FusedAdam:
    """Adam as torch's fused kernel (``torch._fused_adam_``), without torch.optim's machinery.

    The same update as ``torch.optim.Adam(params, fused=True)`` and the same state dict (so
    checkpoints load into either), without ``torch.optim.Optimizer``'s per-step Python walk
    over the parameters or its import of torch._dynamo.

    ``use_flat``: when the parameters are views of one flat tensor and their gradients the
    same views of another (``fused.TrainStep``), the moment estimates become views of two
    flat tensors too and each step is one kernel over one tensor."""

    def __init__(self, params, lr: float, eps: float = 1e-8, weight_decay: float = 0.0, *,
                 decoupled_weight_decay: bool = False):
        params = list(params)
        self.param_groups = [dict(params=params, lr=lr, eps=eps, weight_decay=weight_decay,
                                  **{**_GROUP_DEFAULTS, "decoupled_weight_decay": decoupled_weight_decay})]
        self.state: dict[Tensor, dict[str, Tensor]] = {}
        self._flat_source = None  # (flat parameters, flat gradients), see use_flat
        self._flat = None  # (flat parameters, gradients, exp_avg, exp_avg_sq, the gradient views)
        self._set_up = False  # states complete and (where possible) flat
        self._spare: list[Tensor] = []  # copies of the state before a step (see _Rollback)
        self._bounds: tuple[float, float, float] | None = None  # of |p|, |exp_avg|, exp_avg_sq; None: unknown

    @property
    def params(self) -> list[Tensor]:
        return self.param_groups[0]["params"]

    def use_flat(self, flat: Tensor, flat_grad: Tensor) -> None:
        self._bounds = None
        self._flat_source = (flat, flat_grad)
        self._flat = None
        self._set_up = False

    def flat_moments(self) -> tuple[Tensor, Tensor] | None:
        """The moment estimates as two flat tensors laid out as the flat parameters (see
        ``use_flat``), for a caller that takes the steps itself (``fused.StepRunner``; it
        then reports them with ``advance``); None when they cannot be flat."""
        if not self._set_up or len(self.state) < len(self.params):
            self._init_state()
            self._set_up = True
        return None if self._flat is None else (self._flat[2], self._flat[3])

    def step_count(self) -> float:
        """Steps taken (equal for every parameter in flat mode)."""
        return float(self.state[self.params[0]]["step"]) if self.params[0] in self.state else 0.0

    def advance(self, steps: int) -> None:
        """Count ``steps`` steps taken outside ``step`` on the flat moments."""
        self._bounds = None  # those steps moved the parameters and moments
        torch._foreach_add_([self.state[p]["step"] for p in self.params], steps)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def _init_state(self) -> None:
        for p in self.params:
            if p not in self.state:
                self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
        self._flatten()

    def _flatten(self) -> None:
        """Move the moments into two flat tensors laid out as the flat parameters."""
        self._flat = None
        if self._flat_source is None:
            return
        flat, flat_grad = self._flat_source
        params = self.params
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
            for p in params:
                view = whole.as_strided(p.shape, p.stride(), p.storage_offset())
                view.copy_(self.state[p][key])
                self.state[p][key] = view
            moments.append(whole)
        self._flat = (flat, flat_grad, *moments, [p.grad for p in params])

    @torch.no_grad()
    def step(self, grad_bound: float | None = None) -> bool:
        """One Adam step; False (nothing changed) when it would make a parameter non-finite.

        ``grad_bound``: an upper bound on every |gradient| (their 2-norm will do). With it, a
        step whose update the carried bounds prove finite runs without copies or check."""
        if not self._set_up or len(self.state) < len(self.params):
            self._init_state()
            self._set_up = True
        if self._flat is not None and all(p.grad is g for p, g in zip(self.params, self._flat[4])):
            # every parameter, gradient and moment a view of one flat tensor; the steps are equal
            steps = [self.state[p]["step"] for p in self.params]
            params, grads, exp_avgs, exp_avg_sqs = ([t] for t in self._flat[:4])
            steps_used = steps[:1]
        else:
            params = [p for p in self.params if p.grad is not None]
            if not params:
                return True
            states = [self.state[p] for p in params]
            steps = steps_used = [s["step"] for s in states]
            grads = [p.grad for p in params]
            exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        if grad_bound is not None and self._update_is_bounded(grad_bound, params, exp_avgs, exp_avg_sqs):
            torch._foreach_add_(steps, 1)
            self._fused(params, grads, exp_avgs, exp_avg_sqs, steps_used)
            return True
        with _Rollback([*params, *exp_avgs, *exp_avg_sqs, *steps], params, self._spare) as update:
            torch._foreach_add_(steps, 1)
            self._fused(params, grads, exp_avgs, exp_avg_sqs, steps_used)
        if update.ok:
            self._bounds = None  # measured again at the next bounded step
        return update.ok

    def _update_is_bounded(self, grad_bound: float, params, exp_avgs, exp_avg_sqs) -> bool:
        """Whether this step's update is sure to stay finite; if so, the bounds after it are kept."""
        if self._bounds is None:
            self._bounds = tuple(max(float(n) for n in torch._foreach_norm(ts, math.inf))
                                 for ts in (params, exp_avgs, exp_avg_sqs))
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        # step 1 has the largest bias correction, so it bounds every later step's
        ok, *after = update_bounds(*self._bounds, grad_bound, 1.0, group["lr"], beta1, beta2, group["eps"],
                                   group["weight_decay"])
        if ok:
            self._bounds = tuple(after)
        return ok

    def _fused(self, params, grads, exp_avgs, exp_avg_sqs, steps) -> None:
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        kernel(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
            beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
            grad_scale=None, found_inf=None,
        )

    def state_dict(self) -> dict:
        """torch.optim.Adam's layout: state by parameter index, and the parameter group."""
        index = {id(p): i for i, p in enumerate(self.params)}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.params)))
        return {"state": {index[id(p)]: dict(s) for p, s in self.state.items()}, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict) -> None:
        """A state dict of this class or of ``torch.optim.Adam`` over the same parameters."""
        check_state_dict(state_dict, self.params)
        saved = state_dict["param_groups"][0]
        position = {i: k for k, i in enumerate(saved["params"])}
        state = {}
        for i, s in state_dict.get("state", {}).items():
            p = self.params[position[i]]
            state[p] = {
                "step": torch.as_tensor(s["step"], dtype=torch.float32, device=p.device).clone(),
                "exp_avg": s["exp_avg"].to(p.device, p.dtype).clone(memory_format=torch.preserve_format),
                "exp_avg_sq": s["exp_avg_sq"].to(p.device, p.dtype).clone(memory_format=torch.preserve_format),
            }
        self.state = state
        self._set_up = False
        group = self.param_groups[0]
        for key in ("lr", "eps", "weight_decay", "betas"):
            if key in saved:
                group[key] = tuple(saved[key]) if key == "betas" else saved[key]
        self._flat = None
        self._bounds = None


def check_state_dict(state_dict, params: list[Tensor]) -> None:
    """That ``state_dict`` is an Adam state over ``params`` (one group, moments of the
    parameters' shapes, finite); a ValueError saying what is wrong otherwise."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise ValueError("the optimizer state has no list of parameter groups")
    indices = groups[0].get("params") if len(groups) == 1 else None
    if not isinstance(indices, list) or len(indices) != len(params):
        n = sum(len(g.get("params", ())) for g in groups if isinstance(g.get("params", ()), (list, tuple)))
        raise ValueError(f"the optimizer state has {n} parameters in {len(groups)} groups; "
                         f"this model has {len(params)} in one group")
    if sorted(i for i in indices if isinstance(i, int)) != sorted(range(len(params))):
        raise ValueError(f"the optimizer state's parameter indices {indices[:10]} are not 0 to {len(params) - 1}")
    betas = groups[0].get("betas", (0.9, 0.999))
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"the optimizer state's betas are {betas!r}, expected two numbers in [0, 1)")
    state = state_dict.get("state", {})
    if not isinstance(state, dict):
        raise ValueError("the optimizer state's 'state' is not a dict")
    position = {i: k for k, i in enumerate(indices)}
    for i, s in state.items():
        if i not in position or not isinstance(s, dict):
            raise ValueError(f"the optimizer state has an entry for unknown parameter {i!r}")
        p = params[position[i]]
        step = s.get("step")
        if not isinstance(step, (Tensor, int, float)) or not math.isfinite(float(step)) or float(step) < 0:
            raise ValueError(f"the optimizer state's step of parameter {i} is {step!r}")
        for key in ("exp_avg", "exp_avg_sq"):
            t = s.get(key)
            if not isinstance(t, Tensor):
                raise ValueError(f"optimizer state {key} of parameter {i} is missing or not a tensor")
            if t.shape != p.shape:
                raise ValueError(f"optimizer state {key} of parameter {i} has shape "
                                 f"{tuple(t.shape)}; the parameter has {tuple(p.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"optimizer state {key} of parameter {i} holds non-finite values")


class _Rollback:
    """Copies of ``tensors`` taken on entry (into ``spare``, a list reused from step to
    step) and put back on exit when ``watched`` (some of them) hold a non-finite value;
    ``ok`` says which happened."""

    def __init__(self, tensors: list[Tensor], watched: list[Tensor], spare: list[Tensor]):
        self.tensors, self.watched, self.saved = tensors, watched, spare
        self.ok = True

    def __enter__(self):
        if len(self.saved) == len(self.tensors) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            for a, b in zip(self.saved, self.tensors)
        ):
            torch._foreach_copy_(self.saved, self.tensors)
        else:
            self.saved[:] = [t.clone() for t in self.tensors]
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.ok = _all_finite(self.watched)
            if not self.ok:
                torch._foreach_copy_(self.tensors, self.saved)
        return False


def _all_finite(tensors: list[Tensor]) -> bool:
    # the largest magnitude of each tensor: NaN and inf propagate, and it cannot overflow
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf")))).all())


class _CheckedAdam(torch.optim.Adam):
    """torch's Adam (parameters that are not all float32 on one device) with
    ``FusedAdam.step``'s refusal of a non-finite update."""

    @torch.no_grad()
    def step(self, grad_bound: float | None = None) -> bool:  # type: ignore[override]
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        saved_params = [p.clone() for p in params]
        saved_state = {p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()}
                       for p, s in self.state.items()}
        super().step()
        if not params or _all_finite(params):
            return True
        torch._foreach_copy_(params, saved_params)
        self.state.clear()
        self.state.update(saved_state)
        return False


def optimized_parameters(module, frozen: dict | None) -> list[Tensor]:
    """The parameters a fit's optimizer steps: all but those held fixed whole
    (``TrainConfig.frozen`` maps their names to None)."""
    frozen = frozen or {}
    return [p for n, p in module.named_parameters() if p.requires_grad and frozen.get(n, 0) is not None]


def adam(params: list[Tensor], config):
    """Adam (``config.optimizer == "AdamW"``: with decoupled weight decay) with scvi-tools' settings (``config``: a ``train.TrainConfig``): ``FusedAdam``
    when every parameter is float32 on one device (CPU or CUDA), torch's Adam otherwise.
    Both ``step`` methods return False, changing nothing, for an update that would make a
    parameter non-finite."""
    kwargs = dict(lr=config.lr, eps=config.eps, weight_decay=config.weight_decay)
    decoupled = config.optimizer == "AdamW"
    if len({p.device for p in params}) == 1 and all(p.dtype == torch.float32 for p in params):
        return FusedAdam(params, **kwargs, decoupled_weight_decay=decoupled)
    return _CheckedAdam(params, **kwargs, decoupled_weight_decay=decoupled)
