"""The core model: recovery of known loadings, the API, determinism, save/load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import SCVI_HISTORY_KEYS, fit_small

import ldvae
from ldvae.data.simulate import canonical_correlations
from ldvae.train.loop import HISTORY_KEYS


@pytest.fixture(scope="module")
def recovered():
    """A model fitted on data simulated with known loadings (5 factors, 300 genes)."""
    adata = ldvae.simulate(3000, 300, 5, seed=0)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    model = ldvae.LinearSCVI(adata, n_latent=5)
    model.train(max_epochs=60, plan_kwargs={"lr": 5e-3}, check_val_every_n_epoch=10, progress_bar=False)
    return adata, model


def test_loadings_recover_true_subspace(recovered):
    adata, model = recovered
    cc = canonical_correlations(model.get_loadings().to_numpy(), adata.varm["true_loadings"])
    assert cc.mean() >= 0.9, cc


def test_latent_recovers_true_factors(recovered):
    adata, model = recovered
    cc = canonical_correlations(model.get_latent_representation(), adata.obsm["true_z"])
    assert cc.mean() >= 0.9, cc


def test_history_has_scvi_keys_and_validation_every_10_epochs(recovered):
    _, model = recovered
    hist = model.history
    assert set(HISTORY_KEYS) <= set(hist)
    assert set(hist) == SCVI_HISTORY_KEYS  # code reading scvi-tools' history finds every key
    assert (hist["kl_global_train"].iloc[:, 0] == 0).all() and (hist["kl_global_validation"].iloc[:, 0] == 0).all()
    assert len(hist["elbo_train"]) == 60
    assert list(hist["elbo_validation"].index) == [9, 19, 29, 39, 49, 59]
    assert hist["elbo_train"].index.name == "epoch"
    # the ELBO improves over training
    assert hist["elbo_train"].iloc[-1, 0] < hist["elbo_train"].iloc[0, 0]
    # the KL weight reaches 1 within the planned training
    assert hist["kl_weight"].iloc[-1, 0] == 1.0
    elbo = hist["reconstruction_loss_train"].iloc[:, 0] + hist["kl_local_train"].iloc[:, 0]
    np.testing.assert_allclose(elbo.to_numpy(), hist["elbo_train"].iloc[:, 0].to_numpy(), rtol=1e-6)


def test_loadings_equal_decoder_difference(recovered):
    """Decoding z + e_k minus decoding z (unnormalized log rate, eval mode) is column k."""
    _, model = recovered
    module = model.module.eval()
    loadings = model.get_loadings().to_numpy()
    z = torch.randn(7, 5)
    with torch.no_grad():
        base = module.decode_logits(module.decoder_input(z, None))
        for k in range(5):
            step = module.decode_logits(module.decoder_input(z + torch.eye(5)[k], None))
            np.testing.assert_allclose((step - base).numpy(), np.broadcast_to(loadings[:, k], (7, 300)), atol=1e-4)


def test_gene_intercepts_are_decoding_at_zero(recovered):
    _, model = recovered
    with torch.no_grad():
        at_zero = model.module.decode_logits(torch.zeros(1, 5))[0].numpy()
    np.testing.assert_allclose(model.get_gene_intercepts().to_numpy(), at_zero, atol=1e-5)


def test_loadings_dataframe_layout(recovered):
    adata, model = recovered
    loadings = model.get_loadings()
    assert list(loadings.columns) == [f"Z_{i}" for i in range(5)]
    assert list(loadings.index) == list(adata.var_names)


def test_same_seed_gives_identical_results(small_adata):
    a = fit_small(small_adata.copy(), epochs=3)
    b = fit_small(small_adata.copy(), epochs=3)
    np.testing.assert_array_equal(a.get_latent_representation(), b.get_latent_representation())
    np.testing.assert_array_equal(a.get_loadings().to_numpy(), b.get_loadings().to_numpy())
    ldvae.settings.seed = 5
    try:
        c = fit_small(small_adata.copy(), epochs=3)
    finally:
        ldvae.settings.seed = 0
    assert not np.array_equal(a.get_loadings().to_numpy(), c.get_loadings().to_numpy())


@pytest.mark.parametrize(
    "convert",
    [
        lambda m: m.toarray(),
        lambda m: sp.csc_matrix(m),
        lambda m: m.toarray().astype(np.int32),
        lambda m: sp.csr_matrix(m, dtype=np.float64),
    ],
    ids=["dense", "csc", "dense-int32", "csr-float64"],
)
def test_input_formats_give_the_same_fit(small_adata, convert):
    ref = fit_small(small_adata.copy(), epochs=2)
    other = small_adata.copy()
    other.layers["counts"] = convert(other.layers["counts"])
    got = fit_small(other, epochs=2)
    np.testing.assert_allclose(got.get_loadings().to_numpy(), ref.get_loadings().to_numpy(), atol=1e-5)


def test_train_continues_and_appends_history(small_adata):
    model = fit_small(small_adata, epochs=2)
    model.train(max_epochs=3, progress_bar=False)
    assert list(model.history["elbo_train"].index) == [0, 1, 2, 3, 4]
    assert model.train_state_.epoch == 5


def test_lr_is_honoured(small_adata):
    ldvae.LinearSCVI.setup_anndata(small_adata, layer="counts")
    moved = []
    for kwargs in ({"plan_kwargs": {"lr": 1e-6}}, {"lr": 1e-2}):
        model = ldvae.LinearSCVI(small_adata)
        before = model.module.factor_regressor.weight.detach().clone()
        model.train(max_epochs=1, progress_bar=False, **kwargs)
        moved.append((model.module.factor_regressor.weight - before).abs().max().item())
    assert moved[0] < 1e-4 < moved[1]


def test_fit_threads_one_for_small_steps_and_restored(small_adata, monkeypatch):
    """Small minibatches train on one intra-op thread (``threads=N`` overrides); the
    caller's setting comes back afterwards."""
    from ldvae.nn.module import LDVAEModule

    ldvae.LinearSCVI.setup_anndata(small_adata, layer="counts")
    seen = []
    original = LDVAEModule.loss

    def loss(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LDVAEModule, "loss", loss)
    torch.set_num_threads(2)
    try:
        for threads, expected in ((None, 1), (2, 2)):
            seen.clear()
            ldvae.LinearSCVI(small_adata).train(max_epochs=1, progress_bar=False, threads=threads)
            assert set(seen) == {expected}
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    with pytest.raises(ValueError, match=r"threads must be a positive integer, got 0\."):
        ldvae.LinearSCVI(small_adata).train(max_epochs=1, progress_bar=False, threads=0)


def test_batch_norm_momentum_applies_during_the_fit_only(small_adata):
    """With momentum m the running mean after one step is (1 - m) * 0 + m * batch mean:
    m = 1 makes it the last batch's mean exactly; the module's 0.01 comes back afterwards."""
    ldvae.LinearSCVI.setup_anndata(small_adata, layer="counts")
    model = ldvae.LinearSCVI(small_adata, dropout_rate=0.0)
    bn = model.module.factor_bn
    model.train(max_epochs=1, batch_size=small_adata.n_obs, train_size=1.0, progress_bar=False,
                batch_norm_momentum=1.0, lr=1e-12)
    assert bn.momentum == pytest.approx(0.01)
    default = ldvae.LinearSCVI(small_adata, dropout_rate=0.0)
    default.train(max_epochs=1, batch_size=small_adata.n_obs, train_size=1.0, progress_bar=False, lr=1e-12)
    # same single batch: the running means differ by the factor 1 / 0.01
    torch.testing.assert_close(default.module.factor_bn.running_mean, 0.01 * bn.running_mean, rtol=1e-3, atol=1e-6)
    assert bn.running_mean.abs().max() > 0
    with pytest.raises(ValueError, match="batch_norm_momentum must be in"):
        model.train(max_epochs=1, progress_bar=False, batch_norm_momentum=0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gene_likelihood": "zinb"},
        {"gene_likelihood": "poisson"},
        {"dispersion": "gene-batch"},
        {"dispersion": "gene-cell"},
        {"latent_distribution": "ln"},
        {"use_observed_lib_size": True},
        {"use_batch_norm": False, "bias": True},
        {"n_layers": 2},
    ],
)
def test_every_model_option_trains(small_adata, kwargs):
    ldvae.LinearSCVI.setup_anndata(small_adata, layer="counts", batch_key="batch")
    model = fit_small(small_adata, epochs=2, n_latent=3, **kwargs)
    assert np.isfinite(model.history["elbo_train"].to_numpy()).all()
    z = model.get_latent_representation()
    assert z.shape == (400, 3) and np.isfinite(z).all()
    if kwargs.get("latent_distribution") == "ln":
        np.testing.assert_allclose(z.sum(1), 1.0, atol=1e-4)
        np.testing.assert_array_equal(model.get_latent_representation(), z)  # a seeded Monte Carlo mean
        draws = [model.get_latent_representation(give_mean=False) for _ in range(2)]
        assert not np.array_equal(*draws)  # draws differ every call, as in scvi-tools


def test_gene_label_dispersion_needs_labels(small_adata):
    ldvae.LinearSCVI.setup_anndata(small_adata, layer="counts")
    with pytest.raises(ValueError, match="dispersion='gene-label' needs labels"):
        ldvae.LinearSCVI(small_adata, dispersion="gene-label")
    ldvae.LinearSCVI.setup_anndata(small_adata, layer="counts", labels_key="batch")
    model = fit_small(small_adata, epochs=1, dispersion="gene-label")
    assert model.module.px_r.shape == (40, 2)


def test_covariates_are_exposed(small_adata):
    small_adata.obs["donor"] = pd.Categorical(np.where(np.arange(400) % 3 == 0, "d1", "d2"))
    small_adata.obs["pct_mito"] = np.linspace(0, 1, 400)
    ldvae.LinearSCVI.setup_anndata(
        small_adata,
        layer="counts",
        batch_key="batch",
        categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["pct_mito"],
    )
    setup = small_adata.uns["ldvae_setup"]
    assert setup["batch_categories"] == ["b0", "b1"] and setup["categorical_covariate_keys"] == ["donor"]
    model = fit_small(small_adata, epochs=2, n_latent=3)
    coef = model.get_covariate_coefficients()
    assert list(coef.columns) == ["batch:b0", "batch:b1", "donor:d1", "donor:d2", "pct_mito"]
    assert coef.shape == (40, 5) and np.isfinite(coef.to_numpy()).all()
    assert model.get_loadings().shape == (40, 3)  # batch columns removed


def test_last_minibatch_of_one_cell_does_not_crash(small_adata):
    ldvae.LinearSCVI.setup_anndata(small_adata, layer="counts")
    model = ldvae.LinearSCVI(small_adata)
    # 400 * 0.9 = 360 training cells = 7 * 51 + 3; batch_size 359 leaves one cell
    model.train(max_epochs=1, batch_size=359, progress_bar=False)
    assert np.isfinite(model.history["elbo_train"].iloc[0, 0])


def test_fewer_cells_than_one_minibatch_warns_and_trains(small_adata, caplog):
    ldvae.LinearSCVI.setup_anndata(small_adata, layer="counts")
    model = ldvae.LinearSCVI(small_adata)
    model.train(max_epochs=1, batch_size=1000, progress_bar=False)
    assert "batch_size=1000 is larger than the 360 training cells" in caplog.text
    assert model.is_trained_


def test_get_latent_representation_options(small_adata):
    model = fit_small(small_adata, epochs=2)
    z = model.get_latent_representation()
    np.testing.assert_allclose(model.get_latent_representation(indices=[3, 1]), z[[3, 1]], atol=1e-6)
    np.testing.assert_allclose(model.get_latent_representation(batch_size=17), z, atol=1e-5)
    mean, var = model.get_latent_representation(return_dist=True)
    np.testing.assert_allclose(mean, z, atol=1e-6)
    assert (var > 0).all()
    sample = model.get_latent_representation(give_mean=False)
    assert sample.shape == z.shape and not np.allclose(sample, z)
    other = small_adata[:50].copy()
    np.testing.assert_allclose(model.get_latent_representation(other), z[:50], atol=1e-5)


def test_save_load_gives_the_same_latent(small_adata, tmp_path):
    ldvae.LinearSCVI.setup_anndata(small_adata, layer="counts", batch_key="batch")
    model = fit_small(small_adata, epochs=2)
    model.save(tmp_path / "run", save_anndata=True)
    loaded = ldvae.LinearSCVI.load(tmp_path / "run", adata=small_adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    assert loaded.history["elbo_train"].equals(model.history["elbo_train"])
    from_file = ldvae.LinearSCVI.load(tmp_path / "run")
    np.testing.assert_allclose(from_file.get_loadings().to_numpy(), model.get_loadings().to_numpy())
    with pytest.raises(FileExistsError, match="Pass overwrite=True"):
        model.save(tmp_path / "run")
    with pytest.raises(ValueError, match="Pass overwrite=True"):  # what scvi-tools raises there
        model.save(tmp_path / "run")
    model.save(tmp_path / "run", overwrite=True)


def test_load_rejects_other_genes_and_unknown_batches(small_adata, tmp_path):
    ldvae.LinearSCVI.setup_anndata(small_adata, layer="counts", batch_key="batch")
    model = fit_small(small_adata, epochs=1)
    model.save(tmp_path / "run")
    renamed = small_adata.copy()
    renamed.var_names = [f"g{i}" if i == 7 else n for i, n in enumerate(renamed.var_names)]
    with pytest.raises(ldvae.SetupError, match="first mismatch at position 7: model has 'gene7', adata has 'g7'"):
        ldvae.LinearSCVI.load(tmp_path / "run", adata=renamed)
    fewer = small_adata[:, :30].copy()
    with pytest.raises(ldvae.SetupError, match="model has 40 genes, adata has 30"):
        ldvae.LinearSCVI.load(tmp_path / "run", adata=fewer)
    new_batch = small_adata.copy()
    new_batch.obs["batch"] = pd.Categorical(["b9"] * 400)
    with pytest.raises(ldvae.SetupError, match="categories the model was not set up with \\(first: 'b9'"):
        ldvae.LinearSCVI.load(tmp_path / "run", adata=new_batch)
    layerless = small_adata.copy()
    del layerless.layers["counts"]
    del layerless.uns["ldvae_setup"]
    with pytest.raises(ldvae.SetupError, match="layer='counts' is not in adata.layers"):  # at load, not at a query
        ldvae.LinearSCVI.load(tmp_path / "run", adata=layerless)
    assert "ldvae_setup" not in layerless.uns  # a failed load writes nothing


def test_write_results_scanpy_style(small_adata):
    model = fit_small(small_adata, epochs=2)
    model.write_results(obs_columns=True)
    assert small_adata.obsm["X_ldvae"].shape == (400, 10)
    assert small_adata.obsm["X_ldvae"].dtype == np.float32
    assert small_adata.varm["ldvae_loadings"].shape == (40, 10)
    assert small_adata.uns["ldvae"]["params"]["n_latent"] == 10
    np.testing.assert_allclose(small_adata.obs["Z_3"].to_numpy(), small_adata.obsm["X_ldvae"][:, 3])
    # more genes than the model: NaN loadings for the genes not modelled
    wide = small_adata.copy()
    sub_model = fit_small(small_adata[:, :30].copy(), epochs=1)
    out = ldvae.write_results(sub_model, wide, key_added="run2", copy=True)
    assert "X_run2" in out.obsm and "run2_loadings" in out.varm and "run2" in out.uns
    assert np.isnan(out.varm["run2_loadings"][30:]).all()
    assert not np.isnan(out.varm["run2_loadings"][:30]).any()
    assert "X_run2" not in wide.obsm  # copy=True leaves the input alone
    with pytest.raises(ldvae.SetupError, match="write_results got a view"):
        model.write_results(small_adata[:10])
    with pytest.raises(ldvae.SetupError, match="key_added must be a non-empty name, got ''"):
        model.write_results(key_added="")


def test_many_factor_columns_go_into_obs_without_fragmenting_it():
    import warnings

    adata = ldvae.simulate(100, 70, 2, seed=0)
    adata.obs_names = ["c0"] * 2 + [f"c{i}" for i in range(1, adata.n_obs - 1)]  # repeated cell names too
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    model = ldvae.LinearSCVI(adata, n_latent=60)
    model.train(1, progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.PerformanceWarning)
        model.write_results(obs_columns=True)
        model.write_results(obs_columns=True)  # again: replaced, not added
    z = model.get_latent_representation()
    assert list(adata.obs.columns[-60:]) == [f"Z_{i}" for i in range(60)] and adata.obs.shape[1] == 60 + 3
    np.testing.assert_array_equal(adata.obs[[f"Z_{i}" for i in range(60)]].to_numpy(), z.astype(np.float32))
    assert list(adata.obs_names[:2]) == ["c0", "c0"]


def test_more_factors_than_genes_is_warned(caplog):
    adata = ldvae.simulate(50, 8, 2, seed=0)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    with caplog.at_level("WARNING"):
        ldvae.LinearSCVI(adata, n_latent=7)
    assert "factors for" not in caplog.text
    with caplog.at_level("WARNING"):
        ldvae.LinearSCVI(adata, n_latent=10)
    assert "n_latent=10 factors for 8 genes: the loadings cannot tell that many factors apart" in caplog.text
