"""The compiled CPU path of the training step (``ldvae.cpu.fused`` over ``ldvae.cpu.kernels``:
the decoder's batch norm + softmax + NB likelihood, and the encoders' first block) equals
the torch path it replaces: its float32 exp/log and float64 lgamma/digamma are accurate, and
the module's loss, every parameter gradient, the batch norms' running statistics and a short
fit agree with ``fused.ENABLED = False`` (the reference)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import special

from conftest import fit_small
from ldvae.cpu import kernels as cpu_kernels
from ldvae.cpu import fused
from ldvae.data.contract import CountData, Covariates, to_csr
from ldvae.nn.module import LDVAEModule, ModuleConfig

N_CELLS, N_GENES, N_BATCH = 48, 200, 3


@pytest.fixture(autouse=True)
def _fused_enabled():
    """Every test starts, and leaves, with the fused path on."""
    fused.ENABLED = True
    yield
    fused.ENABLED = True


# --- the float32 exp/log and float64 lgamma/digamma -------------------------------------

# Measured maxima (an exhaustive scan of every float32 in the ranges): exp 2.99e-7 relative
# (near x = 87.34), log 1.22e-7 relative to |log x|. The tolerances sit just above.
EXP_RTOL = 3.1e-7
LOG_RTOL = 1.5e-7


def _rel_err(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.abs(got.astype(np.float64) - want) / np.abs(want)


def test_vexp_matches_float64_exp():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        np.linspace(-87.0, 88.0, 1_000_001, dtype=np.float32),
        rng.uniform(-87.0, 88.0, 1_000_000).astype(np.float32),
        # around the range reduction's switch points k * ln2 +- ln2 / 2, and the ends
        (np.arange(-126, 128)[:, None] * np.log(2) + np.array([-0.35, -1e-4, 0.0, 1e-4, 0.3466, 0.35])).ravel(),
        [-87.0, -86.99999, 0.0, -0.0, 1e-7, -1e-7, 87.99999, 88.0],
    ]).astype(np.float32)
    x = x[(x >= -87.0) & (x <= 88.0)]
    got = cpu_kernels.vexp(x)
    assert got.dtype == np.float32
    err = _rel_err(got, np.exp(x.astype(np.float64)))
    assert err.max() < EXP_RTOL, (err.max(), x[err.argmax()])
    assert cpu_kernels.vexp(np.zeros(3, np.float32)).tolist() == [1.0, 1.0, 1.0]


def test_vlog_matches_float64_log():
    rng = np.random.default_rng(1)
    wide = np.exp(rng.uniform(math.log(1e-30), math.log(1e30), 2_000_000))
    one = np.float32(1.0)
    near_one = np.concatenate([
        one + np.arange(-3000, 3001, dtype=np.float32) * np.float32(2.0**-24),  # ulps below and above 1
        np.linspace(0.5, 2.0, 300_001),
        [0.70710677, 0.70710678, 0.7071068, 1.4142135, 1.4142137],  # the mantissa fold at sqrt(1/2)
    ]).astype(np.float32)
    x = np.concatenate([wide.astype(np.float32), near_one, np.float32([1e-30, 1e30, 2.0**-100, 2.0**99])])
    x = x[x != 1.0]
    got = cpu_kernels.vlog(x)
    assert got.dtype == np.float32
    err = _rel_err(got, np.log(x.astype(np.float64)))
    assert err.max() < LOG_RTOL, (err.max(), x[err.argmax()])
    assert cpu_kernels.vlog(np.ones(2, np.float32)).tolist() == [0.0, 0.0]
    powers = np.float32(2.0) ** np.arange(-99, 100, dtype=np.float32)
    np.testing.assert_allclose(cpu_kernels.vlog(powers), np.arange(-99, 100) * math.log(2), rtol=LOG_RTOL)


def test_lgamma64_digamma64_match_scipy():
    # The Stirling series is truncated after its 1/y^7 term (lgamma) or 1/y^8 (digamma):
    # at y = 6, where they are used from, that leaves 7.9e-11 and 1.17e-10 absolute.
    y = np.concatenate([np.geomspace(1.0001e-3, 9999.0, 200_001), np.arange(1, 40) * 1.0,
                        6.0 + np.array([-1e-9, 0.0, 1e-9])])
    lg, dg = cpu_kernels.lgamma64(y), cpu_kernels.digamma64(y)
    assert lg.dtype == dg.dtype == np.float64
    np.testing.assert_allclose(lg, special.gammaln(y), rtol=1e-12, atol=2e-10)
    np.testing.assert_allclose(dg, special.digamma(y), rtol=1e-12, atol=2e-10)
    # large arguments: relative accuracy
    big = np.geomspace(100.0, 1e4, 1001)
    np.testing.assert_allclose(cpu_kernels.lgamma64(big), special.gammaln(big), rtol=1e-14, atol=0)


# --- the module's loss and gradients ------------------------------------------------------

SPECIAL_COUNTS = {(0, 5): 40.0, (1, 10): 150.0, (2, 20): 600.0, (3, 7): 31.0, (3, 8): 32.0, (4, 11): 1000.0,
                  (6, 12): 2.5, (7, 13): 0.25}  # 31: the table's last row; 32, 2.5 and 0.25: off it


def _batch(seed: int = 0, n_cells: int = N_CELLS, n_genes: int = N_GENES, non_integer: bool = True):
    """A minibatch of random counts over N_BATCH batches: zeros (one all-zero cell, one
    all-zero gene), small counts, counts above the table (40 ... 1000), non-integer counts."""
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2, 0.2, size=(n_cells, n_genes)).astype(np.float32)
    x *= rng.random((n_cells, n_genes)) < 0.4
    x[:, 3] = 0.0
    x[5] = 0.0
    for (i, g), v in SPECIAL_COUNTS.items():
        if non_integer or v == int(v):
            x[i, g] = v
    batch = np.arange(n_cells, dtype=np.int64) % N_BATCH
    cov = Covariates(batch, np.zeros(n_cells, np.int64), None, None)
    return CountData(to_csr(sp.csr_matrix(x)), cov).gather(torch.arange(n_cells), by_gene=True), x


def _module(config: ModuleConfig, seed: int = 0, calibrate_on=None) -> LDVAEModule:
    """A module with every parameter moved off its init. With ``calibrate_on`` (a batch),
    the running statistics are set to that batch's (one torch-path step at momentum 1),
    then moved a little, so that eval mode sees sensible but not batch-exact statistics
    (left at their init, eval-mode encoders give log libraries of -250 ... 600)."""
    torch.manual_seed(seed)
    module = LDVAEModule(config, torch.full((config.n_batch,), 6.0), torch.full((config.n_batch,), 0.5))
    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if calibrate_on is not None:
            momenta = [bn.momentum for bn in norms]
            for bn in norms:
                bn.momentum = 1.0
            fused.ENABLED = False
            try:
                module.train().loss(calibrate_on)
            finally:
                fused.ENABLED = True
            for bn, momentum in zip(norms, momenta):
                bn.momentum = momentum
                bn.running_mean.add_(0.1 * bn.running_var.sqrt() * torch.randn_like(bn.running_mean))
                bn.running_var.mul_(torch.exp(0.2 * torch.randn_like(bn.running_var)))
                bn.num_batches_tracked.zero_()
    return module


def _default_module(seed: int = 0) -> LDVAEModule:
    config = ModuleConfig(N_GENES, n_latent=5, n_hidden=32, n_batch=N_BATCH, dropout_rate=0.0)
    return _module(config, seed, calibrate_on=_batch(seed=100)[0])


def _loss_and_grads(module: LDVAEModule, b, enabled: bool, seed: int = 1):
    fused.ENABLED = enabled
    try:
        module.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # the same z and library draws on both paths
        out = module.loss(b)
        out.loss.backward()
    finally:
        fused.ENABLED = True
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_loss_and_gradients_equal_torch_path(training, monkeypatch):
    b, x = _batch()
    assert (x > 31).sum() >= 5 and (x != np.round(x)).sum() == 2 and (x == 0).mean() > 0.5
    module = _default_module().train(training)
    calls = []
    original = fused.bn_softmax_nb
    monkeypatch.setattr(fused, "bn_softmax_nb", lambda *a: calls.append(1) or original(*a))
    out_f, g_f = _loss_and_grads(module, b, True)
    assert len(calls) == 1  # the compiled path did run
    out_t, g_t = _loss_and_grads(module, b, False)
    assert len(calls) == 1  # and the reference did not

    rec_f, rec_t = out_f.reconstruction.detach(), out_t.reconstruction.detach()
    assert torch.isfinite(rec_f).all()
    scale = float(rec_t.abs().max())
    torch.testing.assert_close(rec_f, rec_t, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(out_f.loss.detach(), out_t.loss.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out_f.kl_z.detach(), out_t.kl_z.detach(), rtol=1e-5, atol=1e-5)  # (encoders fused too)
    torch.testing.assert_close(out_f.kl_l.detach(), out_t.kl_l.detach(), rtol=1e-5, atol=1e-5)

    assert g_f.keys() == g_t.keys()
    assert set(g_t) == {n for n, _ in module.named_parameters()}  # every parameter (encoders via z and l)
    largest = max(float(g.abs().max()) for g in g_t.values())
    # In training mode the encoders' first biases feed a batch norm: their gradient is zero
    # up to rounding (~1e-6 here, against ~1e2 for the rest), on both paths.
    before_bn = {"z_encoder.trunk.0.bias", "l_encoder.trunk.0.bias"} if training else set()
    for name in g_t:
        gf, gt = g_f[name], g_t[name]
        if name in before_bn:
            assert float(gf.abs().max()) < 1e-6 * largest and float(gt.abs().max()) < 1e-6 * largest, name
            continue
        assert float(gt.abs().max()) > 1e-3 * largest, name
        torch.testing.assert_close(gf, gt, rtol=1e-4, atol=1e-4 * float(gt.abs().max()), msg=lambda m: f"{name}: {m}")


def test_fused_per_cell_gradient_of_reconstruction():
    """Gradients of a per-cell weighted reconstruction (not only the mean) with respect to
    the kernel's direct inputs: decoder weights, batch-norm affine, dispersion."""
    b, _ = _batch(seed=3)
    module = _default_module(seed=2).train()
    params = [module.factor_regressor.weight, module.factor_bn.weight, module.factor_bn.bias, module.px_r]
    w = torch.linspace(-1.0, 2.0, N_CELLS)
    results = []
    for enabled in (True, False):
        fused.ENABLED = enabled
        torch.manual_seed(5)
        rec = module.loss(b).reconstruction
        results.append((rec.detach(), torch.autograd.grad((rec * w).sum(), params)))
    fused.ENABLED = True
    (rec_f, g_f), (rec_t, g_t) = results
    torch.testing.assert_close(rec_f, rec_t, rtol=1e-5, atol=1e-5 * float(rec_t.abs().max()))
    for gf, gt in zip(g_f, g_t):
        torch.testing.assert_close(gf, gt, rtol=1e-4, atol=1e-4 * float(gt.abs().max()))


def _csr(x: np.ndarray):
    xs = sp.csr_matrix(x)
    indptr, col = torch.from_numpy(xs.indptr.astype(np.int64)), torch.from_numpy(xs.indices.astype(np.int64))
    row = torch.repeat_interleave(torch.arange(x.shape[0]), indptr[1:] - indptr[:-1])
    return indptr, row, col, row * x.shape[1] + col, torch.from_numpy(xs.data.astype(np.float32))


@pytest.mark.parametrize("log_theta_center,lib_center", [(-4.0, 2.0), (0.0, 8.0), (3.0, 12.0)])
def test_bn_softmax_nb_accuracy_against_float64(log_theta_center, lib_center):
    """bn_softmax_nb in float32 against the torch formulas in float64 (the truth here): value
    and gradients to ~1e-6 of their scale (measured up to 6e-7; torch's own float32 path is
    no better), across small and large dispersions and library sizes."""
    n, G = 32, 100
    rng = np.random.default_rng(int(lib_center))
    x = (rng.negative_binomial(1.0, 0.05, size=(n, G)) * (rng.random((n, G)) < 0.5)).astype(np.float32)
    x[0, :6] = [40, 150, 600, 2000, 31, 32]
    x[1, :2] = [0.5, 7.25]
    indptr, row, col, flat, val = _csr(x)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, G, generator=g).requires_grad_()
    log_theta = (log_theta_center + 0.5 * torch.randn(G, generator=g)).requires_grad_()
    lib = (lib_center + 0.3 * torch.randn(n, generator=g)).requires_grad_()
    bn = torch.nn.BatchNorm1d(G, momentum=0.1, eps=1e-3)
    with torch.no_grad():
        bn.weight.copy_(1.0 + 0.5 * torch.randn(G, generator=g))
        bn.bias.copy_(torch.randn(G, generator=g))
    w = torch.linspace(0.5, 1.5, n)
    inputs = [h, bn.weight, bn.bias, lib, log_theta]
    bn64 = copy.deepcopy(bn).double()
    ll = fused.bn_softmax_nb(h, bn, lib, log_theta, indptr, col, val)
    grads = torch.autograd.grad((ll * w).sum(), inputs)
    ins64 = [t.detach().double().requires_grad_() for t in (h, lib, log_theta)]
    from ldvae.nn.likelihoods import nb_log_prob_softmax

    ll64 = nb_log_prob_softmax(bn64(ins64[0]), ins64[1], ins64[2], row, col, flat, val.double())
    grads64 = torch.autograd.grad((ll64 * w.double()).sum(), [ins64[0], bn64.weight, bn64.bias, ins64[1], ins64[2]])
    torch.testing.assert_close(ll.detach().double(), ll64.detach(), rtol=2e-6, atol=2e-6 * float(ll64.detach().abs().max()))
    for name, got, want in zip(["h", "gamma", "beta", "library", "log_theta"], grads, grads64):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6 * float(want.abs().max()),
                                   msg=lambda m: f"{name}: {m}")
    # the running statistics moved as nn.BatchNorm1d's (unbiased variance, momentum 0.1)
    torch.testing.assert_close(bn.running_mean, bn64.running_mean.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, bn64.running_var.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("library", [70.0, 80.0, 88.0, 89.0, 200.0])
def test_bn_softmax_nb_huge_mean_over_theta(library):
    """Cells whose mean over theta passes float32's range (e^88.7) take the float64 path from
    d = log(mu / theta): value and library gradient equal the torch path, which works in logs."""
    n, G = 4, 6
    bn = torch.nn.BatchNorm1d(G).eval()
    h = torch.randn(n, G, generator=torch.Generator().manual_seed(0))
    log_theta = torch.zeros(G)
    x = np.zeros((n, G), np.float32)
    x[0, 0], x[1, 1] = 3.0, 5.0
    indptr, row, col, flat, val = _csr(x)
    lib = torch.full((n,), library, requires_grad=True)
    ll = fused.bn_softmax_nb(h, bn, lib, log_theta, indptr, col, val)
    (g,) = torch.autograd.grad(ll.sum(), lib)
    from ldvae.nn.likelihoods import nb_log_prob_softmax

    lib_t = lib.detach().clone().requires_grad_()
    ll_t = nb_log_prob_softmax(bn(h), lib_t, log_theta, row, col, flat, val)
    (g_t,) = torch.autograd.grad(ll_t.sum(), lib_t)
    assert torch.isfinite(g_t).all() and torch.isfinite(g).all()
    torch.testing.assert_close(ll.detach(), ll_t.detach(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(g, g_t, rtol=1e-5, atol=1e-5)


# --- batch-norm running statistics --------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.01, 0.3, None], ids=["0.01", "0.3", "cumulative"])
def test_running_statistics_equal_torch_batch_norm(momentum):
    """Three training-mode loss() calls on different minibatches: every batch norm's running
    mean, variance (unbiased) and count equal nn.BatchNorm1d's after each step; that is the
    decoder's (bn_softmax_nb) and the encoders' first (encoder_block)."""
    module = _default_module().train()
    norms = {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.BatchNorm1d)}
    assert {"factor_bn", "z_encoder.trunk.1", "l_encoder.trunk.1"} <= set(norms)
    for bn in norms.values():
        bn.momentum = momentum
    start = copy.deepcopy(module.state_dict())
    batches = [_batch(seed=s)[0] for s in (0, 1, 2)]

    def run(enabled: bool):
        module.load_state_dict(start)
        fused.ENABLED = enabled
        states = []
        try:
            with torch.no_grad():
                for i, b in enumerate(batches):
                    torch.manual_seed(10 + i)
                    module.loss(b)
                    states.append({name: {k: v.clone() for k, v in bn.state_dict().items()} for name, bn in norms.items()})
        finally:
            fused.ENABLED = True
        return states

    fused_states, torch_states = run(True), run(False)
    for step, (sf_all, st_all) in enumerate(zip(fused_states, torch_states)):
        for name in norms:
            sf, st, s0 = sf_all[name], st_all[name], start[f"{name}.num_batches_tracked"]
            assert int(sf["num_batches_tracked"]) == int(st["num_batches_tracked"]) == int(s0) + step + 1, name
            for key in ("running_mean", "running_var"):
                assert not torch.equal(st[key], start[f"{name}.{key}"])  # the step did move it
                torch.testing.assert_close(sf[key], st[key], rtol=1e-5, atol=1e-6 * float(st[key].abs().max()),
                                           msg=lambda m: f"step {step} {name}.{key}: {m}")


def test_cumulative_running_statistics_from_zero_batches_tracked():
    """momentum=None with num_batches_tracked starting at 0: the first step's factor is 1
    (running stats become the batch's), then 1/2: the mean of the two batches' statistics."""
    module = _default_module().train()
    bn = module.factor_bn
    bn.momentum = None
    bn.num_batches_tracked.zero_()
    b0, b1 = _batch(seed=0)[0], _batch(seed=1)[0]
    hs = []
    hook = module.factor_regressor.register_forward_hook(lambda m, i, o: hs.append(o.detach().clone()))
    with torch.no_grad():
        torch.manual_seed(3)
        module.loss(b0)
        torch.manual_seed(4)
        module.loss(b1)
    hook.remove()
    assert int(bn.num_batches_tracked) == 2
    mean = (hs[0].mean(0) + hs[1].mean(0)) / 2
    var = (hs[0].var(0, unbiased=True) + hs[1].var(0, unbiased=True)) / 2
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)


def test_eval_mode_leaves_running_statistics_alone():
    module = _default_module().eval()
    before = copy.deepcopy(module.state_dict())
    with torch.no_grad():
        module.loss(_batch()[0])
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_encoder_block_dropout_matches_torch_with_its_mask():
    """With dropout the fused encoder block draws its own mask (a hash seeded from torch's
    generator), so it cannot equal nn.Dropout's draws; given its mask, value and gradients
    equal the torch block, the mask keeps ~1 - rate of units and repeats under the same seed."""
    b, _ = _batch(seed=7)
    rate = 0.3
    module = _module(ModuleConfig(N_GENES, n_latent=5, n_hidden=64, n_batch=N_BATCH, dropout_rate=rate)).train()
    enc = module.z_encoder
    first, bn, relu, dropout = enc.trunk[:4]
    params = [first.weight, first.bias, bn.weight, bn.bias]
    buffers = [bn.running_mean, bn.running_var, bn.num_batches_tracked]
    start = [t.clone() for t in buffers]

    def restore():  # the buffers only: the affine parameters are saved for the backward
        for t, t0 in zip(buffers, start):
            t.copy_(t0)

    torch.manual_seed(3)
    out = fused.encoder_block(first, bn, dropout, b.indptr, b.col, b.log1p_val)
    after = [t.clone() for t in buffers]
    restore()
    torch.manual_seed(3)
    again = fused.encoder_block(first, bn, dropout, b.indptr, b.col, b.log1p_val)
    assert torch.equal(out, again)  # the same seed, the same mask
    other = fused.encoder_block(first, bn, dropout, b.indptr, b.col, b.log1p_val)
    assert not torch.equal(out, other)

    restore()
    pre = relu(bn(torch.nn.functional.linear(torch.log1p(b.x), first.weight, first.bias)))
    for got, want in zip(after, buffers):  # the running statistics moved as nn.BatchNorm1d's
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    positive = pre > 0
    kept = (out != 0) & positive
    keep_rate = float(kept.sum() / positive.sum())
    n_units = int(positive.sum())  # ~1500: the keep rate is within ~4 standard errors of 0.7
    assert abs(keep_rate - (1 - rate)) < 4 * math.sqrt(rate * (1 - rate) / n_units), keep_rate
    assert not ((out != 0) & ~positive).any()
    mask = kept.float() / (1 - rate)
    ref = pre * mask
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.detach().abs().max()))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    g_f = torch.autograd.grad((out * w).sum(), params)
    g_t = torch.autograd.grad((ref * w).sum(), params)
    largest = float(g_t[0].abs().max())
    for name, gf, gt in zip(["weight", "bias", "gamma", "beta"], g_f, g_t):
        if name == "bias":  # feeds batch norm in training mode: zero up to rounding, on both
            assert float(gf.abs().max()) < 1e-6 * largest and float(gt.abs().max()) < 1e-6 * largest
            continue
        torch.testing.assert_close(gf, gt, rtol=1e-4, atol=1e-4 * float(gt.abs().max()), msg=lambda m: f"{name}: {m}")


# --- which models take the fused path -----------------------------------------------------

def _spy(monkeypatch):
    calls = []
    original = fused.bn_softmax_nb
    monkeypatch.setattr(fused, "bn_softmax_nb", lambda *a: calls.append(1) or original(*a))
    return calls


def _decoder_tensors(module: LDVAEModule, b):
    """What LDVAEModule.loss hands to fused.applies."""
    with torch.no_grad():
        inf = module.inference(b)
        zc = module.decoder_input(inf.z, module.covariate_columns(b))
        return module.factor_regressor(zc), module.factor_bn, module.log_theta(zc, b.batch, b.label)


def _to_double(b):
    return type(b)(**{**b.__dict__, "val": b.val.double(), "log1p_values": None, "gene_order": None,
                      "lgamma_x1": b.lgamma_x1.double(), "log_total": b.log_total.double()})


@pytest.mark.parametrize(
    "kwargs,double,expected",
    [
        ({}, False, True),
        ({"latent_distribution": "ln"}, False, True),
        ({"use_observed_lib_size": True, "n_layers": 2}, False, True),
        ({"gene_likelihood": "zinb"}, False, False),
        ({"gene_likelihood": "poisson"}, False, False),
        ({"dispersion": "gene-batch"}, False, False),
        ({"dispersion": "gene-cell"}, False, False),
        ({"use_batch_norm": False}, False, False),
        ({}, True, False),
    ],
    ids=["default", "ln", "observed-lib-2-layers", "zinb", "poisson", "gene-batch", "gene-cell", "no-batch-norm", "float64"],
)
def test_fused_path_only_for_supported_models(kwargs, double, expected, monkeypatch):
    b, _ = _batch(seed=4, n_genes=30, non_integer=False)
    module = _module(ModuleConfig(30, n_latent=4, n_hidden=16, n_batch=N_BATCH, **kwargs)).train()
    if double:
        module, b = module.double(), _to_double(b)
    h, bn, log_theta = _decoder_tensors(module, b)
    if kwargs.get("gene_likelihood") not in ("zinb",):  # loss() never asks for zinb (its own gate)
        assert fused.applies(h, bn, log_theta) is expected
    calls = _spy(monkeypatch)
    out = module.loss(b)
    out.loss.backward()
    assert len(calls) == int(expected)
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in module.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert module.factor_regressor.weight.grad.abs().max() > 0
    # a step of Adam on it stays finite
    torch.optim.Adam(module.parameters(), lr=1e-3).step()
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_applies_respects_enabled_and_shape(monkeypatch):
    b, _ = _batch(seed=5, n_genes=30)
    module = _module(ModuleConfig(30, n_latent=4, n_hidden=16, n_batch=N_BATCH)).train()
    h, bn, log_theta = _decoder_tensors(module, b)
    assert fused.applies(h, bn, log_theta)
    assert not fused.applies(h[:1], bn, log_theta)  # one cell: batch norm's own error/behaviour
    assert not fused.applies(h, None, log_theta)
    assert not fused.applies(h, bn, None)
    assert not fused.applies(h, bn, log_theta.expand(h.shape[0], -1))
    fused.ENABLED = False
    assert not fused.applies(h, bn, log_theta)
    calls = _spy(monkeypatch)
    module.loss(b).loss.backward()
    assert calls == []


# --- a short fit --------------------------------------------------------------------------

def test_short_fit_same_elbo_as_torch_path(small_adata):
    """8 epochs (24 Adam steps) from the same seed, fused vs torch path: the same training
    ELBO every epoch (measured: within 5e-7 relative) and nearly the same loadings. Without
    dropout: with it the fused encoder draws other masks than nn.Dropout (see
    test_encoder_block_dropout_matches_torch_with_its_mask), and the fits differ by ~1 %."""
    histories, loadings = [], []
    for enabled in (True, False):
        fused.ENABLED = enabled
        try:
            model = fit_small(small_adata.copy(), epochs=8, n_latent=3, dropout_rate=0.0)
        finally:
            fused.ENABLED = True
        histories.append(model.history["elbo_train"]["elbo_train"].to_numpy())
        loadings.append(model.module.factor_regressor.weight.detach().clone())
    (elbo_f, elbo_t), (w_f, w_t) = histories, loadings
    assert len(elbo_f) == len(elbo_t) == 8
    assert elbo_t[-1] < 0.9 * elbo_t[0]  # it did train
    rel = np.abs(elbo_f - elbo_t) / np.abs(elbo_t)
    assert rel[-1] < 5e-3, rel
    assert rel.max() < 1e-4, rel  # float32 rounding only, not a different objective
    torch.testing.assert_close(w_f, w_t, rtol=0, atol=1e-3 * float(w_t.abs().max()))
