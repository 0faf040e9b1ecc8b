"""The compiled training step (``fused.TrainStep`` over ``ldvae.cpu.step.train_step``) equals
``module.loss(b).backward()`` on the fused module path: the same loss, per-cell terms,
gradients and batch-norm statistics from the same seed (dropout masks included), for
every model it accepts; it declines the others; ``fit`` uses it and trains the same."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ldvae.cpu import fused
from ldvae.cpu import kernels as cpu_kernels
from ldvae.data.contract import CountData, Covariates, to_csr
from ldvae.nn.module import LDVAEModule, ModuleConfig
from ldvae.train.loop import InMemorySource, TrainConfig, fit

N_CELLS, N_GENES = 40, 60


def _data(n_batch: int = 3, cat: bool = False, cont: bool = False, seed: int = 0) -> CountData:
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2, 0.3, size=(N_CELLS, N_GENES)).astype(np.float32)
    x *= rng.random(x.shape) < 0.5
    x[0, 0], x[1, 1], x[2, 2] = 40.0, 300.0, 2000.0  # off the lgamma table
    batch = np.arange(N_CELLS, dtype=np.int64) % n_batch
    cats = np.stack([np.arange(N_CELLS) % 2, np.arange(N_CELLS) % 4], axis=1).astype(np.int64) if cat else None
    conts = rng.normal(size=(N_CELLS, 2)).astype(np.float32) if cont else None
    return CountData(to_csr(sp.csr_matrix(x)), Covariates(batch, np.zeros(N_CELLS, np.int64), cats, conts))


def _module(seed: int = 0, **kwargs) -> LDVAEModule:
    torch.manual_seed(seed)
    config = ModuleConfig(N_GENES, n_latent=4, n_hidden=16, **{"n_batch": 3, **kwargs})
    module = LDVAEModule(config, torch.linspace(4.0, 5.0, config.n_batch), torch.linspace(0.5, 1.5, config.n_batch))
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return module.train()


def _state(module: LDVAEModule):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


CASES = {
    "default": ({}, {}),
    "dropout 0": ({"dropout_rate": 0.0}, {}),
    "observed library": ({"use_observed_lib_size": True}, {}),
    "decoder bias": ({"bias": True}, {}),
    "one batch": ({"n_batch": 1}, {"n_batch": 1}),
    "covariates": ({"n_cats_per_cov": (2, 4), "n_continuous_cov": 2}, {"cat": True, "cont": True}),
    "cumulative bn": ({}, {}),
}


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_equals_module_loss_backward(case, parts, monkeypatch):
    """On one thread, and with the cells in 3 parts (of 13, 13 and 14) over numba's threads."""
    monkeypatch.setattr(fused, "step_threads", lambda: parts)
    module_kwargs, data_kwargs = CASES[case]
    module = _module(**module_kwargs)
    if case == "cumulative bn":
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.momentum = None
    b = _data(**data_kwargs).gather(torch.arange(N_CELLS))
    start = _state(module)

    # reference: the module's loss (fused kernels, autograd between them)
    torch.manual_seed(7)
    ref = module.loss(b, kl_weight=0.6)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    ref_state = _state(module)

    module.load_state_dict(start)
    module.zero_grad(set_to_none=True)
    step = fused.TrainStep.for_module(module)
    assert step is not None
    torch.manual_seed(7)
    out = step(b, 0.6)

    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=1e-5, atol=1e-4)
    for got, want in ((out.reconstruction, ref.reconstruction), (out.kl_z, ref.kl_z), (out.kl_l, ref.kl_l)):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-4)
    for name, p in module.named_parameters():
        want = ref_grads[name]
        if name.endswith(("trunk.0.bias", "factor_regressor.bias")):  # before batch norm: gradient 0 (rounding apart)
            weight_scale = float(ref_grads[name.replace("bias", "weight")].abs().max())
            assert float(p.grad.abs().max()) < 1e-5 * weight_scale, name
            continue
        scale = float(want.abs().max()) + 1e-3
        if name.endswith(".bias") and name.replace("bias", "weight") in ref_grads:
            # a bias gradient sums per-cell terms that can cancel: bound its rounding by their size,
            # which the matching weight gradient shows, not by the (possibly tiny) sum
            scale = max(scale, 0.05 * float(ref_grads[name.replace("bias", "weight")].abs().max()))
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=2e-5 * scale, msg=name)
    for name, value in _state(module).items():  # running statistics, batches tracked, parameters
        torch.testing.assert_close(value, ref_state[name], rtol=1e-5, atol=1e-6, msg=name)


def test_parameters_become_views_of_one_flat_tensor_with_values_kept():
    module = _module()
    before = _state(module)
    first = module.z_encoder.trunk[0].weight
    step = fused.TrainStep.for_module(module)
    assert first.t().is_contiguous()  # gene-major layout kept
    for p in module.parameters():
        assert p.untyped_storage().data_ptr() == step.flat.untyped_storage().data_ptr()
        assert p.grad.untyped_storage().data_ptr() == step.flat_grad.untyped_storage().data_ptr()
    after = _state(module)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    # a state dict round trip still works, and writes through to the flat tensor
    module.load_state_dict({k: v + 1 if v.is_floating_point() else v for k, v in before.items()})
    assert torch.equal(first, before["z_encoder.trunk.0.weight"] + 1)
    assert float(step.grad_norm()) == pytest.approx(float(torch.linalg.vector_norm(step.flat_grad)))


@pytest.mark.parametrize("kwargs", [
    {"gene_likelihood": "zinb"}, {"gene_likelihood": "poisson"}, {"dispersion": "gene-batch"},
    {"dispersion": "gene-cell"}, {"latent_distribution": "ln"}, {"n_layers": 2}, {"use_batch_norm": False},
])
def test_other_models_take_autograd(kwargs):
    module = _module(**kwargs)
    assert fused.TrainStep.for_module(module) is None


def test_declined_when_disabled_or_not_float32_cpu():
    module = _module()
    fused.ENABLED = False
    try:
        assert fused.TrainStep.for_module(module) is None
    finally:
        fused.ENABLED = True
    assert fused.TrainStep.for_module(module.double()) is None
    frozen = _module()
    frozen.px_r.requires_grad_(False)
    assert fused.TrainStep.for_module(frozen) is None


def _fit(module: LDVAEModule, data: CountData, epochs: int = 6):
    source = InMemorySource(data, np.arange(32), np.arange(32, N_CELLS), batch_size=16)
    return fit(module, source, TrainConfig(max_epochs=epochs, batch_size=16, lr=1e-2, progress_bar=False,
                                           check_val_every_n_epoch=2, seed=3))


def test_fit_with_compiled_step_trains_as_the_module_path(monkeypatch):
    """The same seed through fit: compiled step and autograd on the fused module path take
    the same steps (float32 rounding apart), dropout included."""
    data = _data()
    calls = []
    original = fused.TrainStep.__call__

    def spy(self, b, kl_weight):
        calls.append(b.n_cells)
        return original(self, b, kl_weight)

    monkeypatch.setattr(fused.TrainStep, "__call__", spy)
    monkeypatch.setattr(fused.StepRunner, "for_fit", classmethod(lambda cls, *args: None))  # one step a call
    compiled = _module(seed=1)
    state_c = _fit(compiled, data)
    assert len(calls) == 6 * 2  # every training step (2 per epoch) took the compiled path

    monkeypatch.setattr(fused.TrainStep, "for_module", classmethod(lambda cls, m: None))
    autograd = _module(seed=1)
    state_a = _fit(autograd, data)
    assert len(calls) == 12
    for key in ("elbo_train", "elbo_validation"):
        got = np.array([v for _, v in state_c.history[key]])
        want = np.array([v for _, v in state_a.history[key]])
        np.testing.assert_allclose(got, want, rtol=1e-4)
    for (name, p), q in zip(compiled.named_parameters(), autograd.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)


def test_flat_adam_takes_torch_adams_steps():
    """With the compiled step's flat parameters, Adam runs as one kernel over one tensor
    (moments re-homed as views): the same updates as torch's plain Adam, and a state dict
    that loads back."""
    from ldvae.train.optim import FusedAdam

    module = _module(dropout_rate=0.0)
    reference = [p.detach().clone().requires_grad_() for p in module.parameters()]
    step = fused.TrainStep.for_module(module)
    params = list(module.parameters())
    opt = FusedAdam(params, lr=1e-2, eps=0.01)
    opt.use_flat(step.flat, step.flat_grad)
    ref_opt = torch.optim.Adam(reference, lr=1e-2, eps=0.01)
    b = _data().gather(torch.arange(N_CELLS))
    for i in range(5):
        torch.manual_seed(i)
        step(b, 1.0)
        for r, p in zip(reference, params):
            r.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
        for r, p in zip(reference, params):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)
    assert opt._flat is not None  # steps 2-5 took the flat kernel
    assert opt.state[params[0]]["exp_avg"].untyped_storage().data_ptr() == opt._flat[2].untyped_storage().data_ptr()
    for p, r in zip(params, reference):
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref_opt.state[r]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    saved = opt.state_dict()
    again = FusedAdam(params, lr=1e-2, eps=0.01)
    again.load_state_dict(saved)
    for p in params:
        assert torch.equal(again.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_first_compile_is_announced_and_fills_the_cache_from_a_child(monkeypatch, tmp_path, caplog):
    """Without numba's cache (first use after an install) the compile is logged and run in a
    child process that fills the cache, once per build (one thread, several); not when the
    cache holds it."""
    import logging
    import subprocess

    caplog.set_level(logging.INFO, logger="ldvae.cpu.fused")
    children = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, env, **kw: children.append((cmd[-1], env["LDVAE_COMPILING"])))
    b = _data().gather(torch.arange(N_CELLS))
    monkeypatch.setattr(fused, "_ready", set())
    monkeypatch.setattr(fused, "_cache_index", lambda threads=1: str(tmp_path / f"absent{threads > 1}.nbi"))
    step = fused.TrainStep.for_module(_module())
    for threads in (1, 1, 2):
        monkeypatch.setattr(fused, "step_threads", lambda: threads)
        step(b, 1.0)
    notes = [r.getMessage() for r in caplog.records if "Compiling ldvae's CPU training step" in r.getMessage()]
    assert len(notes) == 2 and "for one thread" in notes[0] and "for several threads" in notes[1]
    assert children == [("from ldvae.factors.seeds import warm_up; warm_up(1)", "1"),
                        ("from ldvae.factors.seeds import warm_up; warm_up(2)", "1")]
    caplog.clear()
    monkeypatch.setattr(fused, "_ready", set())
    monkeypatch.setattr(fused, "_cache_index", lambda threads=1: __file__)  # an index that exists
    step(b, 1.0)
    assert not caplog.records and len(children) == 2


def test_the_run_that_compiles_trains_as_every_later_run(tmp_path):
    """Code numba compiles in a process differs from the same code loaded from its cache in the
    last bits; the first run after an install (an empty cache) loads what a child compiled, so
    it gives what later runs give, bit for bit."""
    import hashlib
    import os
    import subprocess
    import sys

    script = (
        "import hashlib, ldvae\n"
        "a = ldvae.simulate(200, 40, 3, seed=0)\n"
        "ldvae.LinearSCVI.setup_anndata(a, layer='counts')\n"
        "m = ldvae.LinearSCVI(a, n_latent=3)\n"
        "m.train(3, threads=1, progress_bar=False)\n"
        "print(hashlib.sha256(m.get_latent_representation().tobytes()).hexdigest())\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout.strip()) == len(hashlib.sha256().hexdigest())


def test_fit_on_threads_trains_as_on_one(monkeypatch):
    """A fit whose compiled runs split each step's cells over threads takes the steps of a
    one-thread fit (float sums in another order apart), and numba's thread count is put back."""
    import numba

    seen = []
    original = fused.step_threads
    monkeypatch.setattr(fused, "step_threads", lambda: seen.append(original()) or seen[-1])
    before = numba.get_num_threads()
    states = {}
    for threads in (1, 2):
        module = _module(seed=2)
        source = InMemorySource(_data(), np.arange(32), np.arange(32, N_CELLS), batch_size=16)
        fit(module, source, TrainConfig(max_epochs=4, batch_size=16, lr=1e-2, progress_bar=False, seed=3,
                                        threads=threads))
        states[threads] = _state(module)
        assert seen[-1] == min(threads, numba.config.NUMBA_NUM_THREADS)
    assert numba.get_num_threads() == before
    for name, value in states[2].items():
        if name.endswith(("trunk.0.bias", "factor_regressor.bias")):
            continue  # before a batch norm: gradient 0 but for rounding, which Adam scales up to steps
        torch.testing.assert_close(value, states[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_default_threads_use_every_cpu_with_64_cells_each():
    import numba

    from ldvae.util.settings import usable_cpus

    every = min(usable_cpus(), numba.config.NUMBA_NUM_THREADS)
    assert fused.default_threads(16) == 1
    assert fused.default_threads(128) == min(every, 2)
    assert fused.default_threads(1_000_000) == every
    # a CPU left to a background reader, one thread at least
    assert fused.default_threads(1_000_000, reserved=1) == max(1, min(usable_cpus() - 1, every))
    assert fused.default_threads(1_000_000, reserved=10**6) == 1


def test_a_source_reading_in_the_background_keeps_its_cpu(monkeypatch):
    from types import SimpleNamespace

    from ldvae.train import loop as train_loop

    chosen = []
    monkeypatch.setattr(train_loop.fused, "use_threads", lambda n: chosen.append(n) or contextlib.nullcontext())
    monkeypatch.setattr(train_loop.fused, "default_threads", lambda batch, reserved=0: 100 * reserved + batch)
    config = TrainConfig(max_epochs=1, batch_size=128, progress_bar=False)
    for source in (SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(device=torch.device("cpu"), reader_cpus=1)):
        with train_loop._fit_settings(_module(), config, source):
            pass
    config.threads = 3  # a count the user names holds either way
    with train_loop._fit_settings(_module(), config, SimpleNamespace(device=torch.device("cpu"), reader_cpus=1)):
        pass
    assert chosen == [128, 228, 3]
    from ldvae.train.streaming import StreamingSource

    assert StreamingSource.reader_cpus == 1


def test_gather_in_parts_equals_gather():
    data = _data()
    rows = np.array([5, 0, 39, 5, 17, 2, 8], np.int64)
    args = (data.indptr.numpy(), data.indices.numpy(), data.values.numpy(), rows)
    one = cpu_kernels.gather_nonzeros(*args)
    for parts in (2, 3):
        for got, want in zip(cpu_kernels.gather_nonzeros_threaded(*args, parts), one):
            np.testing.assert_array_equal(got, want)


def test_compiled_gather_equals_torch_gather():
    """CountData.gather on CPU (compiled) gives the torch gather's minibatch: the same
    nonzeros in CSR order, row pointer and per-cell fields; log1p to float32 rounding."""
    data = _data(cat=True, cont=True)
    rows = torch.tensor([5, 0, 39, 5, 17, 2])  # any order, repeats allowed
    compiled = data.gather(rows)
    fused.ENABLED = False
    try:
        reference = data.gather(rows)
    finally:
        fused.ENABLED = True
    for name in ("row", "col", "flat", "val", "indptr", "starts", "batch", "label", "cat_covs", "cont_covs",
                 "log_total", "lgamma_x1"):
        assert torch.equal(getattr(compiled, name), getattr(reference, name)), name
    torch.testing.assert_close(compiled.log1p_val, reference.log1p_val, rtol=2e-7, atol=0)
    assert torch.equal(compiled.x, reference.x)


def test_diverged_parameters_give_a_nonfinite_loss_not_a_hang():
    """A NaN dispersion (a diverged fit) makes the compiled step return a non-finite loss
    for fit to report; under fastmath an unbounded digamma recurrence used to spin forever."""
    import threading

    module = _module()
    data = _data()
    step = fused.TrainStep.for_module(module)
    with torch.no_grad():
        module.px_r.fill_(float("nan"))
    batch = data.gather(torch.arange(N_CELLS))
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("out", step(batch, 1.0)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the compiled step did not return"
    out = result["out"]
    assert not torch.isfinite(out.loss + step.grad_norm())


@pytest.mark.parametrize("huge_library", [False, True])
def test_decoder_train_kernel_equals_forward_then_backward(huge_library):
    """cpu_kernels.bn_softmax_nb_train (the step's one-pass decoder) gives the outputs of
    bn_softmax_nb_forward followed by bn_softmax_nb_backward: log-likelihoods, running
    statistics and every gradient, off-table counts and the float64 path for huge libraries
    included."""
    from ldvae.cpu import kernels as ck

    rng = np.random.default_rng(4)
    n, G = 12, 50
    h = rng.normal(size=(n, G)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, G).astype(np.float32), rng.normal(size=G).astype(np.float32)
    log_theta = rng.normal(size=G).astype(np.float32)
    library = rng.uniform(5, 9, n).astype(np.float32)
    if huge_library:
        library[3] = 120.0  # mu / theta beyond float32
    dense = rng.negative_binomial(1, 0.3, size=(n, G)).astype(np.float32)
    dense[0, 1], dense[2, 3] = 45.0, 900.0  # off the tables
    x = sp.csr_matrix(dense)
    ptr, col, val = x.indptr.astype(np.int64), x.indices.astype(np.int64), x.data.astype(np.float32)
    grad = rng.normal(size=n).astype(np.float32)

    def outputs(G=G):
        return dict(ll=np.empty(n, np.float32), grad_h=np.empty((n, G), np.float32),
                    grad_gamma=np.empty(G, np.float32), grad_beta=np.empty(G, np.float32),
                    grad_library=np.empty(n, np.float32), grad_log_theta=np.empty(G, np.float32),
                    mean=np.zeros(G, np.float32), var=np.ones(G, np.float32))

    ref, got = outputs(), outputs()
    xhat, p, s_p = (np.empty((n, G), np.float32) for _ in range(3))
    inv_std = np.empty(G, np.float32)
    ck.bn_softmax_nb_forward(h, gamma, beta, ref["mean"], ref["var"], True, 0.1, 1e-3, library, log_theta, ptr,
                             col, val, ref["ll"], xhat, p, s_p, inv_std)
    ck.bn_softmax_nb_backward(grad, gamma, True, library, log_theta, ptr, col, val, xhat, p, s_p, inv_std,
                              ref["grad_h"], ref["grad_gamma"], ref["grad_beta"], ref["grad_library"],
                              ref["grad_log_theta"])
    sums = h.astype(np.float64).sum(0), (h.astype(np.float64) ** 2).sum(0)
    ck.bn_softmax_nb_train(h.copy(), *sums, gamma, beta, got["mean"], got["var"], 0.1, 1e-3, library, log_theta, ptr,
                           col, val, grad, got["ll"], got["grad_h"], got["grad_gamma"], got["grad_beta"],
                           got["grad_library"], got["grad_log_theta"])
    assert np.isfinite(ref["ll"]).all() and np.isfinite(ref["grad_h"]).all()
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)  # float32 rounding
