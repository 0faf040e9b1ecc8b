"""Every bad input of the core gets its own clear message, and the input is left as it was."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import fit_small

import ldvae
from ldvae import LinearSCVI, SetupError


def _assert_same(a, b):
    """Two AnnData objects hold the same data (used to show nothing was modified)."""
    for x, y in ((a.X, b.X), (a.layers["counts"], b.layers["counts"])):
        x = x.toarray() if sp.issparse(x) else np.asarray(x)
        y = y.toarray() if sp.issparse(y) else np.asarray(y)
        np.testing.assert_array_equal(x, y)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert set(a.uns) == set(b.uns)


def _planted(adata, value, cell=5, gene=3, fmt="csr"):
    m = adata.layers["counts"].toarray()
    m[cell, gene] = value
    adata.layers["counts"] = sp.csr_matrix(m) if fmt == "csr" else (sp.csc_matrix(m) if fmt == "csc" else m)
    return adata


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
@pytest.mark.parametrize(
    "value, message",
    [
        (0.693, r"has non-integer values \(first: 0.693 at cell 'cell5', gene 'gene3'\)\. Pass the raw counts layer"),
        (-2.0, r"has negative values \(first: -2 at cell 'cell5', gene 'gene3'\)"),
        (np.nan, r"has a non-finite value \(first: nan at cell 'cell5', gene 'gene3'\)"),
        (np.inf, r"has a non-finite value \(first: inf at cell 'cell5', gene 'gene3'\)"),
    ],
)
def test_bad_values_name_the_first_cell_and_gene(small_adata, value, message, fmt):
    adata = _planted(small_adata, value, fmt=fmt)
    before = adata.copy()
    with pytest.raises(SetupError, match=message):
        LinearSCVI.setup_anndata(adata, layer="counts")
    _assert_same(adata, before)
    assert "ldvae_setup" not in adata.uns


def test_bad_values_name_the_other_layers(small_adata):
    small_adata.layers["umi"] = small_adata.layers["counts"].copy()
    small_adata.X = small_adata.layers["counts"] * 0.5
    with pytest.raises(SetupError, match=r"--layer name on the command line\); this AnnData's other layers: "
                                         r"'counts', 'umi'\.$"):
        LinearSCVI.setup_anndata(small_adata)


def test_first_bad_value_is_the_first_in_cell_order(small_adata):
    m = small_adata.layers["counts"].toarray()
    m[9, 1] = 0.5
    m[4, 30] = 0.25
    small_adata.layers["counts"] = sp.csc_matrix(m)
    with pytest.raises(SetupError, match=r"first: 0.25 at cell 'cell4', gene 'gene30'"):
        LinearSCVI.setup_anndata(small_adata, layer="counts")


def test_missing_layer(small_adata):
    with pytest.raises(SetupError, match=r"layer='raw' is not in adata.layers \(have: 'counts'\)"):
        LinearSCVI.setup_anndata(small_adata, layer="raw")


@pytest.mark.parametrize("arg", ["batch_key", "labels_key"])
def test_missing_obs_key(small_adata, arg):
    with pytest.raises(SetupError, match=rf"{arg}='nope' is not a column of adata.obs \(columns: 'batch'\)"):
        LinearSCVI.setup_anndata(small_adata, layer="counts", **{arg: "nope"})


def test_missing_covariate_key(small_adata):
    with pytest.raises(SetupError, match=r"categorical_covariate_keys='donor' is not a column of adata.obs"):
        LinearSCVI.setup_anndata(small_adata, layer="counts", categorical_covariate_keys=["donor"])
    small_adata.obs["qc"] = ["x"] * 400
    with pytest.raises(SetupError, match=r"adata.obs\['qc'\] must be finite numbers \(400 cells are not\)"):
        LinearSCVI.setup_anndata(small_adata, layer="counts", continuous_covariate_keys=["qc"])


def test_missing_batch_values(small_adata):
    small_adata.obs["batch"] = small_adata.obs["batch"].astype(object)
    small_adata.obs.iloc[[2, 3], 0] = None
    with pytest.raises(SetupError, match=r"batch_key='batch': 2 cells have a missing value"):
        LinearSCVI.setup_anndata(small_adata, layer="counts", batch_key="batch")


@pytest.mark.parametrize("likelihood, observed", [("nb", False), ("nb", True), ("zinb", False), ("poisson", True)])
def test_cells_with_zero_counts_are_kept_with_a_warning_and_stay_finite(small_adata, likelihood, observed):
    m = small_adata.layers["counts"].toarray()
    m[[0, 7]] = 0
    small_adata.layers["counts"] = sp.csr_matrix(m)
    with pytest.warns(UserWarning, match=r"2 of 400 cells have zero total counts\. They are kept .* "
                                         r"sc.pp.filter_cells\(adata, min_counts=1\)"):
        LinearSCVI.setup_anndata(small_adata, layer="counts", batch_key="batch")
    ldvae.settings.seed = 0
    model = LinearSCVI(small_adata, n_latent=2, gene_likelihood=likelihood, use_observed_lib_size=observed)
    assert np.isfinite(model.module.library_log_means.numpy()).all()
    model.train(5, progress_bar=False)
    assert np.isfinite(model.history["elbo_train"].to_numpy()).all()
    assert np.isfinite(model.get_latent_representation()).all()
    assert np.isfinite(model.get_elbo(return_mean=False).numpy()).all()
    assert np.isfinite(model.get_normalized_expression(indices=[0, 7, 8]).to_numpy()).all()


def test_view_is_refused(small_adata):
    view = small_adata[:100]
    with pytest.raises(SetupError, match=r"got a view of an AnnData.*adata = adata.copy\(\)"):
        LinearSCVI.setup_anndata(view, layer="counts")


def test_not_set_up(small_adata):
    with pytest.raises(SetupError, match=r"has not been set up for ldvae. Run ldvae.LinearSCVI.setup_anndata"):
        LinearSCVI(small_adata)


def test_model_used_before_training(small_adata):
    LinearSCVI.setup_anndata(small_adata, layer="counts")
    model = LinearSCVI(small_adata)
    with pytest.raises(ldvae.NotTrainedError, match=r"not trained yet. Call model.train\(\)"):
        model.get_latent_representation()
    with pytest.raises(ldvae.NotTrainedError, match="not trained yet"):
        model.write_results()


def test_too_few_cells(small_adata):
    tiny = small_adata[:2].copy()
    LinearSCVI.setup_anndata(tiny, layer="counts")
    model = LinearSCVI(tiny)
    with pytest.raises(SetupError, match=r"needs at least 2 training cells .* adata has 2 cells and train_size=0.5 leaves 1"):
        model.train(max_epochs=1, train_size=0.5, progress_bar=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_latent": 0}, r"n_latent must be a positive integer, got 0\."),
        ({"n_hidden": 2.5}, r"n_hidden must be a positive integer, got 2.5\."),
        ({"dropout_rate": 1.0}, r"dropout_rate must be in \[0, 1\), got 1.0\."),
        ({"dispersion": "cell"}, r"dispersion must be one of \('gene', 'gene-batch', 'gene-label', 'gene-cell'\), got 'cell'\."),
        ({"gene_likelihood": "normal"}, r"gene_likelihood must be one of \('nb', 'zinb', 'poisson'\), got 'normal'\."),
        ({"latent_distribution": "gamma"}, r"latent_distribution must be one of \('normal', 'ln'\), got 'gamma'\."),
        ({"use_observed_lib_size": "False"}, r"use_observed_lib_size must be True or False, got 'False'\."),
        ({"use_batch_norm": "no"}, r"use_batch_norm must be True or False, got 'no'\."),
    ],
)
def test_bad_model_parameters(small_adata, kwargs, message):
    LinearSCVI.setup_anndata(small_adata, layer="counts")
    with pytest.raises(ValueError, match=message):
        LinearSCVI(small_adata, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"train_size": 1.5}, ValueError, r"train_size must be in \(0, 1\], got 1.5\."),
        ({"batch_size": 0}, ValueError, r"batch_size must be a positive integer, got 0\."),
        ({"max_epochs": -1}, ValueError, r"max_epochs must be a positive integer, got -1\."),
        ({"accelerator": "tpu"}, ValueError, r"accelerator must be 'auto', 'cpu', 'gpu' or 'cuda', got 'tpu'\."),
        ({"plan_kwargs": {"learning_rate": 1}}, TypeError, r"plan_kwargs has unknown keys: \['learning_rate'\]; "),
        ({"max_epochs": 1, "foo": 1}, TypeError, r"train got unknown arguments \['foo'\]; its options are "),
    ],
)
def test_bad_train_arguments(small_adata, kwargs, error, message):
    LinearSCVI.setup_anndata(small_adata, layer="counts")
    model = LinearSCVI(small_adata)
    with pytest.raises(error, match=message):
        model.train(progress_bar=False, **kwargs)


def test_a_one_dimensional_logistic_normal_latent_is_warned_of(small_adata):
    LinearSCVI.setup_anndata(small_adata, layer="counts")
    with pytest.warns(UserWarning, match=r"latent_distribution='ln' with n_latent=1: the softmax of one value"):
        LinearSCVI(small_adata, n_latent=1, latent_distribution="ln")


def test_numpy_booleans_are_model_settings(small_adata):
    LinearSCVI.setup_anndata(small_adata, layer="counts")
    model = LinearSCVI(small_adata, use_observed_lib_size=np.bool_(True), use_batch_norm=np.bool_(False))
    assert model.init_params_["use_observed_lib_size"] is True and model.init_params_["use_batch_norm"] is False


def test_query_on_data_with_other_genes(small_adata):
    model = fit_small(small_adata, epochs=1)
    with pytest.raises(SetupError, match=r"adata's genes differ from the model's \(model has 40 genes, adata has 20\)"):
        model.get_latent_representation(small_adata[:, :20].copy())
