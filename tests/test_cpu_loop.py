"""Many training steps per compiled call: ``ldvae.cpu.fused.StepRunner`` over
``ldvae.cpu.loop.train_steps``.

It must train exactly as fit's one-step-per-call loop does (same randomness, same steps,
same optimizer and batch-norm state), and handle the same faults: a non-finite loss or
gradient stops before the parameters change, Ctrl-C stops at a boundary between calls and
leaves the state of the last completed step.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from ldvae.cpu import loop as cpu_loop
from ldvae.cpu import fused
from ldvae.train.optim import FusedAdam
from ldvae.train.loop import InMemorySource, NonFiniteLossError, TrainConfig, TrainState, fit

from test_cpu_step import N_CELLS, _data, _module

N_TRAIN = 32  # 4 steps per epoch at batch size 8


def _source(data):
    return InMemorySource(data, np.arange(N_TRAIN), np.arange(N_TRAIN, N_CELLS), batch_size=8)


def _config(**kwargs):
    base = dict(max_epochs=4, batch_size=8, lr=1e-2, progress_bar=False, check_val_every_n_epoch=2, seed=5,
                n_epochs_kl_warmup=2)
    return TrainConfig(**{**base, **kwargs})


def _fit(module, data, monkeypatch, runner: bool, **config):
    """fit through the runner or one step per call; returns (state, runner calls, error)."""
    calls = []
    original = cpu_loop.train_steps

    def spy(*args):
        calls.append(len(args[12]) - 1)  # steps asked of this call (argument 12: bounds)
        return original(*args)

    with monkeypatch.context() as m:
        m.setattr(cpu_loop, "train_steps", spy)
        if not runner:
            m.setattr(fused.StepRunner, "for_fit", classmethod(lambda cls, *args: None))
        try:
            return fit(module, _source(data), _config(**config)), calls, None
        except NonFiniteLossError as err:
            return None, calls, err


def _assert_same_module(a, b, rtol=1e-4, atol=1e-5):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if name.endswith("trunk.0.bias"):
            # batch norm cancels this bias: its gradient is rounding noise, which Adam scales
            # up to steps of size lr, so its value differs between any two float orders
            continue
        if x.dtype.is_floating_point:
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=name)
        else:
            assert torch.equal(x, y), name


CASES = {
    "default": ({}, {}, {}),
    "observed library, covariates": (
        {"use_observed_lib_size": True, "n_cats_per_cov": (2, 4), "n_continuous_cov": 2},
        {"cat": True, "cont": True}, {},
    ),
    "cumulative bn, no dropout, bias": ({"dropout_rate": 0.0, "bias": True}, {}, {}),
    "several runs per epoch": ({}, {}, {"chunk": 3}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_runner_trains_as_one_step_per_call(monkeypatch, case):
    module_kwargs, data_kwargs, runner_kwargs = CASES[case]
    data = _data(**data_kwargs)
    if "chunk" in runner_kwargs:
        monkeypatch.setattr(fused.StepRunner, "chunk", runner_kwargs["chunk"])
    cumulative = case.startswith("cumulative")
    modules = []
    for runner in (True, False):
        module = _module(seed=2, **module_kwargs)
        if cumulative:
            for bn in module.modules():
                if isinstance(bn, torch.nn.BatchNorm1d):
                    bn.momentum = None
        state, calls, err = _fit(module, data, monkeypatch, runner)
        assert err is None
        modules.append((module, state, calls))
    (mr, sr, calls_r), (ms, ss, calls_s) = modules
    steps = 4 * 4
    assert sum(calls_r) == steps and not calls_s  # every step through the runner, or none
    assert len(calls_r) == (4 * 2 if "chunk" in runner_kwargs else 4)  # a call per run of steps
    assert sr.step == ss.step == steps
    for key in ss.history:
        got = np.array([v for _, v in sr.history[key]])
        want = np.array([v for _, v in ss.history[key]])
        np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=key)
    _assert_same_module(mr, ms)
    for (i, a), b in zip(sr.optimizer_state["state"].items(), ss.optimizer_state["state"].values()):
        assert float(a["step"]) == float(b["step"]) == steps
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-3, atol=1e-9)


def test_compiled_adam_takes_torchs_steps():
    """cpu_loop._adam (weight decay included) against the flat FusedAdam (torch's kernel)."""
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(1000, generator=gen)
    grad = torch.zeros(1000)
    param = flat.as_strided((1000,), (1,), 0)
    param.grad = grad
    ref = FusedAdam([param], lr=1e-2, eps=0.01, weight_decay=1e-3)
    ref.use_flat(flat, grad)
    mine = flat.clone()
    m, v = torch.zeros(1000), torch.zeros(1000)
    for step in range(1, 6):
        grad.copy_(torch.randn(1000, generator=gen) * 10 ** (step - 3))
        scratch = [np.empty(1000, np.float32) for _ in range(3)]
        assert cpu_loop._adam(mine.numpy(), grad.numpy(), m.numpy(), v.numpy(), float(step), 1e-2, 0.9, 0.999,
                              0.01, 1e-3, *scratch)
        ref.step()
        torch.testing.assert_close(mine, flat, rtol=1e-5, atol=1e-6)  # float32 rounding apart
    state = ref.state[param]
    torch.testing.assert_close(m, state["exp_avg"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(v, state["exp_avg_sq"], rtol=1e-5, atol=1e-10)


def test_huge_learning_rate_stops_where_one_step_per_call_stops(monkeypatch):
    """A diverging fit stops inside a run at the step that became non-finite (the message
    names it), and goes back to the parameters, running statistics, optimizer counts and
    history of that epoch's start, as one step per call does."""
    data = _data()
    results = []
    for runner in (True, False):
        module = _module(seed=2)
        source = _source(data)
        config = _config(lr=1e30, max_epochs=10)
        if not runner:
            monkeypatch.setattr(fused.StepRunner, "for_fit", classmethod(lambda cls, *args: None))
        state = TrainState()  # fit keeps its progress here even when it raises
        with pytest.raises(NonFiniteLossError) as err:
            fit(module, source, config, state)
        results.append((module, state, str(err.value)))
    (mr, sr, er), (ms, ss, es) = results
    assert "non-finite at epoch" in er and er == es
    assert sr.step == ss.step and len(sr.history.get("elbo_train", [])) == sr.epoch
    _assert_same_module(mr, ms, rtol=1e-3, atol=1e-4)
    assert sr.history.keys() == ss.history.keys()


def test_nan_in_the_counts_stops_before_the_step_that_reads_it(monkeypatch):
    runner_steps = []
    for runner in (True, False):
        poisoned = _data()
        poisoned.values[int(poisoned.indptr[7])] = float("nan")  # a nonzero of training cell 7
        module = _module(seed=2)
        if not runner:
            monkeypatch.setattr(fused.StepRunner, "for_fit", classmethod(lambda cls, *args: None))
        state = TrainState()
        with pytest.raises(NonFiniteLossError, match="loss became non-finite at epoch 1"):
            fit(module, _source(poisoned), _config(), state)
        runner_steps.append((state.step, module))
    (step_r, mr), (step_s, ms) = runner_steps
    assert step_r == step_s < 4
    _assert_same_module(mr, ms)


class RunHook:
    """Wraps cpu_loop.train_steps (one step per call with StepRunner.chunk = 1): before the
    ``at``-th call, record the module's state and run ``fault``."""

    def __init__(self, monkeypatch, module, at: int, fault):
        self.module, self.at, self.fault, self.calls, self.before = module, at, fault, 0, None
        original = cpu_loop.train_steps

        def train_steps(*args):
            self.calls += 1
            if self.calls == self.at:
                self.before = {k: v.detach().clone() for k, v in module.state_dict().items()}
                self.fault()
            return original(*args)

        monkeypatch.setattr(fused.StepRunner, "chunk", 1)
        monkeypatch.setattr(cpu_loop, "train_steps", train_steps)


def _assert_state_is(module, expected):
    for key, value in module.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_ctrl_c_inside_a_run_restores_the_last_completed_step(monkeypatch):
    """A second Ctrl-C (KeyboardInterrupt) after a run's counters advanced but before its
    compiled call: every buffer goes back, and fit returns with the steps done so far."""
    module = _module(seed=2)

    def interrupt():
        for bn in module.modules():
            if isinstance(bn, torch.nn.BatchNorm1d):
                bn.num_batches_tracked.add_(1)  # as the run's bookkeeping may have done
        raise KeyboardInterrupt

    hook = RunHook(monkeypatch, module, at=6, fault=interrupt)
    state = fit(module, _source(_data()), _config())
    assert state.interrupted and state.step == 5 and state.epoch == 1
    _assert_state_is(module, hook.before)


def test_a_failed_compiled_fit_goes_back_to_its_epochs_start(monkeypatch):
    """A parameter made infinite before the 3rd epoch's 2nd run: the fit stops there and puts
    back the parameters, Adam's state and counts and the buffers of the epoch's start."""
    from ldvae.train.steps import CompiledRuns

    module = _module(seed=2)
    marks, optimizer = [], []
    original = CompiledRuns.mark

    def mark(step):
        original(step)
        optimizer.append(step.runner.optimizer)
        marks.append(({k: v.detach().clone() for k, v in module.state_dict().items()},
                      step.runner.optimizer.step_count(), [m.clone() for m in step.runner.optimizer.flat_moments()]))

    monkeypatch.setattr(CompiledRuns, "mark", mark)
    weight = module.factor_regressor.weight

    def corrupt():
        with torch.no_grad():
            weight[0, 0] = float("inf")

    RunHook(monkeypatch, module, at=10, fault=corrupt)  # 4 steps per epoch, one per run
    state = TrainState()
    with pytest.raises(NonFiniteLossError, match="at epoch 3, step 2 of that epoch.* back at the end of epoch 2"):
        fit(module, _source(_data()), _config(), state)
    assert len(marks) == 3 and state.step == 8 and state.epoch == 2 and len(state.history["elbo_train"]) == 2
    params, count, moments = marks[-1]
    _assert_state_is(module, params)
    assert optimizer[0].step_count() == count == 8
    for now, then in zip(optimizer[0].flat_moments(), moments):
        assert torch.equal(now, then)


def test_sigint_stops_at_the_next_run_boundary(monkeypatch):
    module = _module(seed=2)
    hook = RunHook(monkeypatch, module, at=3, fault=lambda: os.kill(os.getpid(), signal.SIGINT))
    state = fit(module, _source(_data()), _config())
    assert state.interrupted and state.step == 3 and hook.calls == 3  # the 3rd run completes, no 4th
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_runner_is_not_used_where_it_does_not_apply():
    module = _module()
    step = fused.TrainStep.for_module(module)
    optimizer = FusedAdam(list(module.parameters()), lr=1e-3)
    optimizer.use_flat(step.flat, step.flat_grad)
    assert fused.StepRunner.for_fit(step, optimizer, _source(_data())) is not None
    assert fused.StepRunner.for_fit(None, optimizer, _source(_data())) is None  # autograd models
    assert fused.StepRunner.for_fit(step, torch.optim.Adam(module.parameters()), _source(_data())) is None

    class Streamed:  # an out-of-core source: batches, no in-memory data
        def train_batches(self, generator):
            return iter(())

    assert fused.StepRunner.for_fit(step, optimizer, Streamed()) is None


def test_interrupted_then_resumed_fit_equals_uninterrupted_fit(monkeypatch, tmp_path):
    """Bit for bit, through the runner: the checkpoint at an epoch boundary holds all it needs."""
    import ldvae

    adata = ldvae.simulate(200, 30, 2, seed=3)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")

    def new_model():
        ldvae.settings.seed = 0
        return ldvae.LinearSCVI(adata, n_latent=2, n_hidden=16)

    train_kwargs = dict(max_epochs=6, check_val_every_n_epoch=1, progress_bar=False, seed=7, batch_size=64)
    reference = new_model()
    reference.train(**train_kwargs)
    interrupted = new_model()

    def interrupt():
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        RunHook(patch, interrupted.module, at=14, fault=interrupt)  # 3 steps an epoch: inside epoch 5
        interrupted.train(checkpoint_dir=tmp_path, checkpoint_every_n_epochs=2, **train_kwargs)
    assert interrupted.train_state_.interrupted and interrupted.train_state_.epoch == 4
    resumed = new_model()
    resumed.train(resume_from=tmp_path, **{k: v for k, v in train_kwargs.items() if k != "seed"})
    assert resumed.train_state_.step == reference.train_state_.step == 18
    _assert_state_is(resumed.module, reference.module.state_dict())
    for key, frame in reference.history.items():
        assert frame.equals(resumed.history[key]), key


def test_cached_compiled_code_is_keyed_on_every_kernel_file():
    """A kernel edited in any compiled file must not leave a stale cached training step behind
    (numba alone keys each function on its own file)."""
    import hashlib
    from pathlib import Path

    from ldvae.cpu import dense, encoder, kernels, layout, special
    from ldvae.cpu import step as cpu_step

    modules = (special, kernels, encoder, dense, layout, cpu_step, cpu_loop)
    digest = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in modules)).hexdigest()
    for function in (cpu_step.train_step_flat, cpu_step.train_step_threaded, cpu_loop.train_steps,
                     kernels.bn_softmax_nb_forward, kernels.gather_nonzeros_threaded, encoder.encoder_block_forward):
        assert function._cache._cache_file._source_stamp[1] == digest
