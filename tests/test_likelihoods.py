"""The sparse-aware likelihoods equal the dense formulas, and the speed-ups of the
training step leave the model's outputs unchanged."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ldvae.data.contract import CountData, Covariates, to_csr
from ldvae.nn.likelihoods import dense_log_prob, nb_log_prob, poisson_log_prob, zinb_log_prob
from ldvae.nn.module import LDVAEModule, ModuleConfig
from ldvae.train.optim import adam
from ldvae.train.loop import TrainConfig

N_CELLS, N_GENES = 37, 23


def _batch(seed: int = 0, density: float = 0.3):
    """A minibatch of random counts (some genes and one cell all zero) and its dense copy."""
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2, 0.3, size=(N_CELLS, N_GENES)).astype(np.float32)
    x *= rng.random((N_CELLS, N_GENES)) < density
    x[:, 3] = 0.0
    x[5] = 0.0
    x[6, 7] = 250.0  # a large count
    cov = Covariates(np.zeros(N_CELLS, np.int64), np.zeros(N_CELLS, np.int64), None, None)
    data = CountData(to_csr(sp.csr_matrix(x)), cov)
    return data.gather(torch.arange(N_CELLS)), torch.from_numpy(x)


def _params(shape_theta, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    log_mu = (torch.randn(N_CELLS, N_GENES, generator=g) * 1.5).requires_grad_()
    log_theta = None if shape_theta is None else (torch.randn(shape_theta, generator=g)).requires_grad_()
    zi_logits = (torch.randn(N_CELLS, N_GENES, generator=g) * 2).requires_grad_()
    return log_mu, log_theta, zi_logits


def _grads(value: torch.Tensor, tensors):
    # A per-cell weighting so every row's gradient is checked, not only their sum.
    w = torch.linspace(0.5, 1.5, value.shape[0], dtype=value.dtype)
    return torch.autograd.grad((value * w).sum(), [t for t in tensors if t is not None])


def _check(sparse_value, dense_value, tensors):
    torch.testing.assert_close(sparse_value, dense_value, rtol=2e-5, atol=2e-3)
    for g_sparse, g_dense in zip(_grads(sparse_value, tensors), _grads(dense_value, tensors)):
        torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("theta_shape", [(N_GENES,), (N_CELLS, N_GENES)], ids=["gene", "per-cell"])
def test_nb_sparse_equals_dense(theta_shape):
    b, x = _batch()
    log_mu, log_theta, _ = _params(theta_shape)
    sparse = nb_log_prob(log_mu, log_theta, b.row, b.col, b.flat, b.val) - b.lgamma_x1
    dense = dense_log_prob(x, log_mu, log_theta).sum(-1)
    _check(sparse, dense, [log_mu, log_theta])


@pytest.mark.parametrize("theta_shape", [(N_GENES,), (N_CELLS, N_GENES)], ids=["gene", "per-cell"])
def test_zinb_sparse_equals_dense(theta_shape):
    b, x = _batch(seed=2)
    log_mu, log_theta, zi_logits = _params(theta_shape, seed=3)
    sparse = zinb_log_prob(log_mu, log_theta, zi_logits, b.row, b.col, b.flat, b.val) - b.lgamma_x1
    dense = dense_log_prob(x, log_mu, log_theta, zi_logits).sum(-1)
    _check(sparse, dense, [log_mu, log_theta, zi_logits])


def test_poisson_sparse_equals_dense():
    b, x = _batch(seed=4)
    log_mu, _, _ = _params(None, seed=5)
    sparse = poisson_log_prob(log_mu, b.row, b.flat, b.val) - b.lgamma_x1
    dense = dense_log_prob(x, log_mu).sum(-1)
    _check(sparse, dense, [log_mu])


@pytest.mark.parametrize("dispersion", ["gene", "gene-batch", "gene-label", "gene-cell"])
@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_module_likelihood_equals_dense_for_every_dispersion(dispersion, likelihood):
    """Through the module: (n_batch, n_labels) dispersions are gathered per cell."""
    b, x = _batch(seed=6)
    torch.manual_seed(0)
    config = ModuleConfig(N_GENES, n_latent=3, n_batch=2, n_labels=3, dispersion=dispersion, gene_likelihood=likelihood)
    module = LDVAEModule(config, torch.zeros(2), torch.ones(2)).eval()
    batch = torch.arange(N_CELLS) % 2
    label = torch.arange(N_CELLS) % 3
    z = torch.randn(N_CELLS, 3)
    library = torch.full((N_CELLS,), 3.0)
    gen = module.generative(z, library, torch.nn.functional.one_hot(batch, 2).float(), batch, label)
    sparse = module.log_likelihood(b, gen) - b.lgamma_x1
    dense = dense_log_prob(x, gen.log_mu, gen.log_theta, gen.zi_logits).sum(-1)
    params = [p for p in module.parameters() if p.requires_grad]
    torch.testing.assert_close(sparse, dense, rtol=2e-5, atol=2e-3)
    g_sparse = torch.autograd.grad(sparse.sum(), params, allow_unused=True, retain_graph=True)
    g_dense = torch.autograd.grad(dense.sum(), params, allow_unused=True)
    for gs, gd in zip(g_sparse, g_dense):
        if gs is None:
            assert gd is None or not gd.any()
        else:
            torch.testing.assert_close(gs, gd, rtol=1e-4, atol=1e-4)


def test_sparse_encoder_first_layers_equal_dense_encoders():
    """inference() computes both encoders' first Linear from the nonzeros (a gather-sum
    forward, a per-gene sum backward); values and gradients equal the dense encoders on
    log1p(x), in training mode (batch statistics) and eval mode."""
    b, x = _batch(seed=7)
    torch.manual_seed(0)
    module = LDVAEModule(ModuleConfig(N_GENES, n_latent=4, dropout_rate=0.0), torch.zeros(1), torch.ones(1))
    first = module.z_encoder.trunk[0].weight
    assert first.t().is_contiguous()  # stored gene-major, see GaussianEncoder
    params = [module.z_encoder.trunk[0].weight, module.l_encoder.trunk[0].weight,
              module.z_encoder.trunk[0].bias, module.l_encoder.trunk[0].bias]
    for training in (True, False):
        module.train(training)
        sparse = module.inference(b, use_mean=True)
        h = torch.log1p(x)
        qz_m, qz_v = module.z_encoder(h)
        ql_m, ql_v = module.l_encoder(h)
        dense = (qz_m, qz_v, ql_m.squeeze(-1), ql_v.squeeze(-1))
        for got, want in zip((sparse.qz_m, sparse.qz_v, sparse.ql_m, sparse.ql_v), dense):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        w = torch.linspace(-1.0, 2.0, 4)
        g_sparse = torch.autograd.grad(sum(wi * t.sum() for wi, t in zip(w, (sparse.qz_m, sparse.qz_v, sparse.ql_m, sparse.ql_v))), params)
        g_dense = torch.autograd.grad(sum(wi * t.sum() for wi, t in zip(w, dense)), params)
        for gs, gd in zip(g_sparse, g_dense):
            torch.testing.assert_close(gs, gd, rtol=1e-4, atol=1e-5)
    # the gene-major weight gradient keeps the parameter's layout (no transposing copy)
    module.train()
    module.loss(b).loss.backward()
    assert first.grad.stride() == first.stride()
    keys = set(module.state_dict())
    assert {"z_encoder.trunk.0.weight", "l_encoder.trunk.0.weight", "factor_regressor.weight"} <= keys


@pytest.mark.parametrize(
    "dispersion,use_batch_norm,ln",
    [("gene", True, False), ("gene", False, True), ("gene-batch", True, False), ("gene-label", True, False),
     ("gene-cell", True, False)],
)
def test_fused_softmax_nb_loss_equals_autograd_path(dispersion, use_batch_norm, ln):
    """loss() fuses log_softmax and the NB likelihood into one hand-written backward
    (likelihoods._SoftmaxNB); its value and every parameter's gradient equal the autograd
    path generative() + log_likelihood() on the same draws."""
    b, x = _batch(seed=8)
    # In float64, so that a wrong term shows above rounding (BN backward cancels a lot).
    b = type(b)(**{**b.__dict__, "batch": torch.arange(N_CELLS) % 2, "label": torch.arange(N_CELLS) % 3,
                   "val": b.val.double(), "log1p_values": None, "gene_order": None,
                   "lgamma_x1": b.lgamma_x1.double(), "log_total": b.log_total.double()})
    torch.manual_seed(0)
    config = ModuleConfig(N_GENES, n_latent=3, n_batch=2, n_labels=3, dispersion=dispersion,
                          use_batch_norm=use_batch_norm, latent_distribution="ln" if ln else "normal", dropout_rate=0.0)
    module = LDVAEModule(config, torch.full((2,), 3.0), torch.ones(2)).double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if dispersion == "gene-cell":  # keep theta where lgamma(x + theta) - lgamma(theta) is exact
            module.px_r_regressor.weight.mul_(0.1)
    params = [p for p in module.parameters() if p.requires_grad]
    w = torch.linspace(0.5, 1.5, N_CELLS, dtype=torch.float64)

    def run(fused: bool):
        torch.manual_seed(1)
        inf = module.inference(b)
        cov = module.covariate_columns(b)
        if fused:
            zc = module.decoder_input(inf.z, cov)
            from ldvae.nn.likelihoods import nb_log_prob_softmax

            ll = nb_log_prob_softmax(module.decode_logits(zc), inf.library, module.log_theta(zc, b.batch, b.label),
                                     b.row, b.col, b.flat, b.val)
        else:
            ll = module.log_likelihood(b, module.generative(inf.z, inf.library, cov, b.batch, b.label))
        return ll, torch.autograd.grad((ll * w).sum(), params, allow_unused=True)

    module.train()
    ll_f, g_f = run(True)
    ll_a, g_a = run(False)
    torch.testing.assert_close(ll_f, ll_a, rtol=1e-10, atol=1e-8)
    for p, gf, ga in zip(params, g_f, g_a):
        if ga is None:
            assert gf is None or not gf.any()
        else:
            torch.testing.assert_close(gf, ga, rtol=1e-8, atol=1e-10 * max(1.0, float(ga.abs().max())))
    # and loss() itself is the fused value
    torch.manual_seed(1)
    out = module.loss(b)
    torch.testing.assert_close(b.lgamma_x1 - out.reconstruction, ll_f.detach(), rtol=1e-12, atol=1e-10)


def test_training_adam_matches_reference_adam():
    """The fit's Adam (fused kernel on CPU) takes the same steps as torch's default Adam."""
    torch.manual_seed(0)
    a = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    config = TrainConfig(max_epochs=1, lr=5e-3)
    opt_a = adam(a, config)
    opt_b = torch.optim.Adam(b, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay, foreach=False)
    for step in range(20):
        g = [torch.randn_like(p) for p in a]
        for params, opt in ((a, opt_a), (b, opt_b)):
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
    assert type(opt_a).__name__ == "FusedAdam" and len(opt_a.state) == 2
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # it loads an Adam state dict (checkpoints) and continues like the reference
    opt_a.load_state_dict(copy.deepcopy(opt_b.state_dict()))  # (a copy: torch may share its tensors)
    assert float(opt_a.state[a[0]]["step"]) == 20
    assert opt_a.state_dict()["param_groups"][0]["params"] == [0, 1]
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # and torch's Adam loads ours
    g = [torch.randn_like(p) for p in a]
    for params, opt in ((a, opt_a), (b, opt_b)):
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        opt.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
