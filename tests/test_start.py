"""Where a fit starts: ``train(init="pca")``.

The start must be the principal components of the counts (checked against a dense SVD),
the same for every seed, reproduced by the encoder, and it must leave trained,
resumed and mapped models alone.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import ldvae
from ldvae.data.simulate import canonical_correlations, simulate
from ldvae.model.start import log_normalized, pca_start, principal_components, start_cells, start_from_counts
from ldvae.util.checks import SetupError


@pytest.fixture(scope="module")
def planted():
    adata = simulate(n_cells=1200, n_genes=150, n_latent=4, n_batches=2, seed=5)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    return adata


def _model(adata, seed: int, **kwargs):
    previous = ldvae.settings.seed
    ldvae.settings.seed = seed  # the weights as built follow it
    try:
        return ldvae.LinearSCVI(adata, n_latent=4, **kwargs)
    finally:
        ldvae.settings.seed = previous


def test_principal_components_match_a_dense_svd_centred_within_batches():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 40))  # five components above the noise
    x = sp.csr_matrix(rng.poisson(np.exp(0.5 * signal - 1.0)).astype(float))
    batch = rng.integers(0, 3, 300)
    dense = x.toarray()
    for b in range(3):
        dense[batch == b] -= dense[batch == b].mean(axis=0)
    u_ref, s_ref, vt_ref = np.linalg.svd(dense, full_matrices=False)
    u, s, v = principal_components(x, batch, 5)
    np.testing.assert_allclose(s, s_ref[:5], rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(v * vt_ref[:5].T, axis=0)), 1.0, atol=1e-6)
    np.testing.assert_allclose(u * s, dense @ v, atol=1e-3)


def test_log_normalized_and_start_cells():
    x = sp.csr_matrix(np.array([[1.0, 3.0], [0.0, 0.0], [2.0, 0.0]]))
    out = log_normalized(x).toarray()
    np.testing.assert_allclose(out, np.log1p(np.array([[2500.0, 7500.0], [0.0, 0.0], [1e4, 0.0]])))
    np.testing.assert_array_equal(start_cells(50, 100), np.arange(50))
    few = start_cells(50, 10)
    assert few.size == 10 and np.all(np.diff(few) > 0) and few.max() < 50
    np.testing.assert_array_equal(few, start_cells(50, 10))


def test_start_is_the_same_for_every_seed_and_reproduces_the_components(planted):
    counts = planted.layers["counts"].tocsr()
    batch = planted.obs["batch"].cat.codes.to_numpy()
    states = []
    for seed in (0, 7):
        model = _model(planted, seed)
        pca_start(model.module, counts, batch)
        states.append(model.module.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    module = model.module
    x = log_normalized(counts)
    u, s, v = principal_components(x, batch, 64)  # the start's components: n_hidden / 2
    u, s, v = u[:, :4], s[:4], v[:, :4]
    loadings = module.factor_regressor.weight.detach().numpy()[:, :4]
    np.testing.assert_allclose(loadings, v * (s / np.sqrt(counts.shape[0])), rtol=1e-5, atol=1e-7)
    # the encoder in training mode, without dropout, gives the component scores
    module.train()
    module.z_encoder.trunk[3].p = 0.0
    with torch.no_grad():
        mean, _ = module.z_encoder(torch.as_tensor(np.log1p(counts.toarray()), dtype=torch.float32))
    r2 = 1 - ((mean.numpy() - u * np.sqrt(counts.shape[0])) ** 2).sum() / (counts.shape[0] * 4)
    assert r2 > 0.8


def test_start_runs_its_dense_algebra_on_one_blas_thread(planted, monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    import ldvae.model.start as start

    seen = []
    real_qr = np.linalg.qr

    def qr(a, *args, **kwargs):
        seen.append(max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"))
        return real_qr(a, *args, **kwargs)

    monkeypatch.setattr(start.np.linalg, "qr", qr)
    with threadpool_limits(limits=2, user_api="blas"):  # as a process beside busy cores may have it
        pca_start(_model(planted, 0).module, planted.layers["counts"].tocsr(),
                  planted.obs["batch"].cat.codes.to_numpy())
        after = max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
    assert seen and set(seen) == {1}
    assert after == 2  # the caller's setting comes back


def test_fits_from_the_start_agree_and_find_the_planted_factors(planted):
    latents = []
    for seed in (1, 2):
        model = _model(planted, seed)
        model.train(max_epochs=60, lr=1e-2, seed=seed, init="pca", progress_bar=False)
        latents.append(model.get_latent_representation())
    assert canonical_correlations(latents[0], latents[1]).min() > 0.95
    assert canonical_correlations(planted.obsm["true_z"], latents[0]).min() > 0.9


def test_start_logs_and_leaves_a_trained_model_alone(planted, caplog, monkeypatch):
    model = _model(planted, 0)
    with caplog.at_level(logging.INFO, logger="ldvae"):
        model.train(max_epochs=2, init="pca", progress_bar=False)
    assert "Started from the top 4 principal components of 1200 cells" in caplog.text
    caplog.clear()

    def restarted(*args, **kwargs):
        raise AssertionError("a trained model was started again")

    monkeypatch.setattr("ldvae.model.start.pca_start", restarted)
    with caplog.at_level(logging.INFO, logger="ldvae"):
        model.train(max_epochs=3, init="pca", progress_bar=False)
    assert "continues from its weights" in caplog.text
    assert model.train_state_.epoch == 5  # two epochs, then three more


def test_start_refuses_what_it_cannot_start(planted):
    model = _model(planted, 0)
    with pytest.raises(SetupError, match=r"init must be one of \['random', 'pca'\], got 'svd'"):
        model.train(max_epochs=1, init="svd", progress_bar=False)
    assert not model.is_trained_
    ln = _model(planted, 0, latent_distribution="ln")
    with pytest.raises(SetupError, match="init='pca' needs latent_distribution='normal'"):
        ln.train(max_epochs=1, init="pca", progress_bar=False)
    assert not ln.is_trained_


@pytest.mark.parametrize("kwargs", [
    {"gene_likelihood": "poisson"},
    {"gene_likelihood": "zinb", "n_layers": 2},
    {"n_latent": 70, "use_observed_lib_size": True},
    {"dispersion": "gene-cell", "use_batch_norm": False, "bias": True},
])
def test_every_model_starts_and_trains(planted, kwargs):
    kwargs = {"n_latent": 4, **kwargs}
    k = kwargs["n_latent"]
    model = ldvae.LinearSCVI(planted, **kwargs)
    model.train(max_epochs=2, init="pca", progress_bar=False)
    assert np.isfinite(float(model.get_elbo()))
    assert np.isfinite(model.get_latent_representation()).all()
    assert model.get_loadings().shape == (150, k)


def test_dense_counts_and_a_continuous_covariate_start_as_sparse_ones(planted):
    dense = planted.copy()
    dense.layers["counts"] = planted.layers["counts"].toarray()
    dense.obs["depth"] = np.log(planted.layers["counts"].sum(axis=1).A1)
    ldvae.LinearSCVI.setup_anndata(dense, layer="counts", batch_key="batch", continuous_covariate_keys=["depth"])
    weights = []
    for adata in (planted, dense):
        model = _model(adata, 3)
        start_from_counts("pca", model.module, adata, model.setup_, frozen=None, fresh=True)
        weights.append(model.module.factor_regressor.weight.detach().numpy())
        model.train(max_epochs=1, progress_bar=False)
        assert np.isfinite(float(model.get_elbo()))
    assert weights[1].shape[1] == weights[0].shape[1] + 1  # the covariate's decoder column
    np.testing.assert_allclose(weights[1][:, :4], weights[0][:, :4], rtol=1e-5, atol=1e-7)


def test_a_mapped_query_keeps_its_reference_weights(planted):
    model = _model(planted, 0)
    with pytest.raises(SetupError, match="init='pca' starts a new model; a query mapped onto a reference keeps"):
        start_from_counts("pca", model.module, planted, model.setup_, frozen={"factor_regressor.weight": None},
                          fresh=True)
    before = model.module.factor_regressor.weight.detach().clone()
    start_from_counts("random", model.module, planted, model.setup_, frozen=None, fresh=True)
    assert torch.equal(model.module.factor_regressor.weight, before)


def test_too_few_cells_keep_the_random_start(caplog):
    adata = simulate(n_cells=6, n_genes=30, n_latent=2, seed=1)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    model = ldvae.LinearSCVI(adata, n_latent=5)
    before = model.module.factor_regressor.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="ldvae"):
        start_from_counts("pca", model.module, adata, model.setup_, frozen=None, fresh=True)
    assert "needs more cells and genes than factors (6 cells, 30 genes, n_latent=5)" in caplog.text
    assert torch.equal(model.module.factor_regressor.weight, before)
