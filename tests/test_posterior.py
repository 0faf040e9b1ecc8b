"""Posterior queries: planted DE is found, bounds are ordered, normalized expression
and samples agree with the likelihood, counterfactual batches move by the batch coefficients,
and every bad input gets its message."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import ldvae
from ldvae.data.simulate import make_truth

from conftest import fit_small

try:  # posterior predictive samples are sparse.GCXS with the sparse package (as scvi-tools), else SciPy
    import sparse

    _SAMPLE_TYPE = sparse.GCXS
except ImportError:
    _SAMPLE_TYPE = (sp.csr_matrix, sp.coo_array)


def _dense(x) -> np.ndarray:
    return x.todense() if not sp.issparse(x) else x.toarray()

PBMC3K = Path(__file__).resolve().parents[2] / "shared" / "data" / "pbmc3k_10x_raw_seurat_labels.h5ad"


def planted_de(
    n_cells: int = 600, n_genes: int = 100, n_de: int = 10, fold: float = 3.0, library: float = 5000.0,
    factor_scale: float = 0.1, seed: int = 0,
):
    """Counts from the LDVAE generative model with two groups: in group "B" genes ``up`` have
    ``fold`` times and genes ``down`` 1/``fold`` times their rate in group "A".

    Each down gene is ``fold`` times as abundant as its paired up gene and neither loads on
    the factors, so the change leaves the total mass, and hence rho of every other gene,
    exactly as it was: null genes have no fold change at all."""
    rng = np.random.default_rng(seed)
    truth = make_truth(n_genes, 3, factor_scales=np.full(3, factor_scale), seed=seed)
    genes = rng.permutation(n_genes)
    up, down = genes[:n_de], genes[n_de : 2 * n_de]
    w = truth.loadings.copy()
    b = np.clip(truth.intercepts, -1.5, None)  # no barely detected genes, as after HVG selection
    w[np.r_[up, down]] = 0.0
    b[up] = 0.0
    b[down] = np.log(fold)
    group = np.repeat([0, 1], n_cells // 2)
    logits = rng.normal(size=(n_cells, 3)) @ w.T + b
    logits[np.ix_(group == 1, up)] += np.log(fold)
    logits[np.ix_(group == 1, down)] -= np.log(fold)
    rho = np.exp(logits - logits.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    mu = np.exp(rng.normal(np.log(library), 0.3, size=(n_cells, 1))) * rho
    theta = 2.0 * truth.theta[None, :]  # inverse dispersion around 10, as in UMI data
    x = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
    adata = ad.AnnData(
        X=sp.csr_matrix(x),
        obs=pd.DataFrame({"group": pd.Categorical(np.where(group == 1, "B", "A"))},
                         index=[f"c{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
    )
    adata.layers["counts"] = adata.X.copy()
    adata.var["planted"] = "null"
    adata.var.iloc[up, 0] = "up"
    adata.var.iloc[down, 0] = "down"
    return adata


@pytest.fixture(scope="module")
def de_model():
    adata = planted_de()
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    model = ldvae.LinearSCVI(adata, n_latent=4)
    model.train(max_epochs=150, progress_bar=False, plan_kwargs={"lr": 5e-3})
    return model


@pytest.fixture(scope="module")
def batch_model():
    """A quickly fitted NB model on 2 batches (batch in the decoder)."""
    adata = ldvae.simulate(300, 40, 3, n_batches=2, seed=1)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ldvae.LinearSCVI(adata, n_latent=3)
    model.train(max_epochs=100, progress_bar=False, plan_kwargs={"lr": 5e-3})
    return model


def precision_recall(called: pd.Index, truth: pd.Index) -> tuple[float, float]:
    hits = len(called.intersection(truth))
    return hits / max(len(called), 1), hits / len(truth)


# --- differential expression -------------------------------------------------------------------


def test_change_mode_finds_planted_genes(de_model):
    de = de_model.differential_expression(groupby="group", group1="B", group2="A", mode="change")
    planted = de_model.adata.var["planted"]
    truth = planted.index[planted != "null"]
    called = de.index[de["is_de_fdr_0.05"]]
    precision, recall = precision_recall(called, truth)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall, list(called))
    # Fold changes: log2(3) = 1.58 up for "up" genes (B over A), down for "down" genes; none for nulls.
    lfc = de["lfc_mean"]
    up, down = planted.index[planted == "up"], planted.index[planted == "down"]
    assert (lfc[up] > 1.0).all() and (lfc[down] < -1.0).all()
    assert abs(lfc[up].mean() - np.log2(3.0)) < 0.45 and abs(lfc[down].mean() + np.log2(3.0)) < 0.45
    assert lfc[planted.index[planted == "null"]].abs().max() < 0.4
    assert (de["lfc_median"] - de["lfc_mean"]).abs().max() < 0.3 and (de["lfc_std"] > 0).all()
    assert set(de["comparison"]) == {"B vs A"} and list(de["proba_de"]) == sorted(de["proba_de"], reverse=True)
    assert np.allclose(de["proba_de"] + de["proba_not_de"], 1.0)
    # scvi-tools 1.5's Bayes factor is the log odds of proba_de, whichever the direction:
    # planted genes down in B rank as DE as those up in B
    odds = np.log(de["proba_de"] + 1e-8) - np.log(1 - de["proba_de"] + 1e-8)
    np.testing.assert_allclose(de["bayes_factor"], odds, rtol=1e-6)
    assert (de.loc[down, "bayes_factor"] > 3).all() and (de.loc[up, "bayes_factor"] > 3).all()


def test_change_mode_pseudocount_is_scvi_tools_estimate(de_model):
    from ldvae.query.de import _pseudocounts

    rng = np.random.default_rng(0)
    s1, s2 = rng.uniform(0, 1e-3, (50, 200)), rng.uniform(0, 1e-3, (60, 200))
    zero1, zero2 = np.arange(200) < 20, np.zeros(200, dtype=bool)
    # the 0.9 quantile of group 1's largest draws over its unexpressed genes, over 200 genes
    assert _pseudocounts(s1, s2, zero1, zero2) == pytest.approx(np.quantile(s1.max(0)[:20], 0.9) / 200)
    assert _pseudocounts(s1, s2, zero2, zero2) == 1e-10  # no unexpressed gene in either group
    de = de_model.differential_expression(groupby="group", group1="B", group2="A", mode="change")
    assert de["pseudocounts"].iloc[0] <= 1e-3 / de_model.adata.n_vars


def test_vanilla_mode_bayes_factors_and_stats(de_model):
    # Vanilla mode tests rho_B > rho_A with no effect-size threshold, so it has no FDR call;
    # planted genes get the extreme Bayes factors, with the planted sign.
    de = de_model.differential_expression(groupby="group", group1="B")
    planted = de_model.adata.var["planted"]
    bf = de["bayes_factor"]
    assert (bf[planted.index[planted == "up"]] > 3).all() and (bf[planted.index[planted == "down"]] < -3).all()
    assert bf[planted.index[planted == "null"]].abs().median() < 3
    assert list(de.columns[:5]) == ["proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2"]
    assert set(de["comparison"]) == {"B vs Rest"} and set(de["group2"]) == {"Rest"}
    # Per-group raw statistics, against a direct computation.
    x = de_model.adata.layers["counts"].toarray()
    in_b = (de_model.adata.obs["group"] == "B").to_numpy()
    assert np.allclose(de.loc[de_model.var_names_, "raw_mean1"], x[in_b].mean(0), rtol=1e-5)
    assert np.allclose(de.loc[de_model.var_names_, "non_zeros_proportion2"], (x[~in_b] > 0).mean(0))
    normalized = x[in_b] / x[in_b].sum(1, keepdims=True) * 1e4
    assert np.allclose(de.loc[de_model.var_names_, "raw_normalized_mean1"], normalized.mean(0), rtol=1e-4)
    # scale1/scale2 are mean normalized expressions: each sums to about 1 over genes.
    assert abs(de["scale1"].sum() - 1) < 1e-3 and abs(de["scale2"].sum() - 1) < 1e-3


def test_one_vs_rest_for_every_group_and_index_queries(de_model):
    de = de_model.differential_expression(groupby="group", n_samples_overall=500, all_stats=False, silent=True)
    assert sorted(set(de["comparison"])) == ["A vs Rest", "B vs Rest"] and len(de) == 2 * 100
    assert "raw_mean1" not in de.columns
    by_query = de_model.differential_expression(idx1="group == 'B'", idx2="group == 'A'", mode="change",
                                                n_samples_overall=500)
    in_b = (de_model.adata.obs["group"] == "B").to_numpy()
    by_mask = de_model.differential_expression(idx1=in_b, idx2=np.flatnonzero(~in_b), mode="change",
                                               n_samples_overall=500)
    assert "comparison" not in by_query.columns
    pd.testing.assert_frame_equal(by_query, by_mask)


def test_change_mode_options(de_model):
    de = de_model.differential_expression(
        groupby="group", group1="B", mode="change", delta=None, n_samples_overall=1000, pseudocounts=1e-4,
        cred_interval_lvls=[0.5, 0.9], test_mode="two", fdr_target=0.1,
    )
    assert "is_de_fdr_0.1" in de.columns and (de["pseudocounts"] == 1e-4).all()
    assert de["delta"].iloc[0] >= 0.1  # estimated from the LFC distribution
    lo, hi = de["lfc_confidence_interval_0.9_min"], de["lfc_confidence_interval_0.9_max"]
    assert (lo <= de["lfc_confidence_interval_0.5_min"]).all() and (hi >= de["lfc_confidence_interval_0.5_max"]).all()


def test_batch_corrected_de(batch_model):
    obs = batch_model.adata.obs
    obs["half"] = np.where(np.arange(len(obs)) % 2 == 0, "even", "odd")
    de = batch_model.differential_expression(groupby="half", group1="even", mode="change", batch_correction=True,
                                             n_samples_overall=400)
    assert len(de) == 40 and de["proba_de"].between(0, 1).all()
    one = batch_model.differential_expression(groupby="half", group1="even", batch_correction=True,
                                              batchid1=["b0"], batchid2=["b0"], n_samples_overall=400)
    assert one["bayes_factor"].notna().all()
    with pytest.warns(UserWarning, match="differ but overlap"):
        batch_model.differential_expression(groupby="half", group1="even", batch_correction=True,
                                            batchid1=["b0", "b1"], batchid2=["b0"], n_samples_overall=400)


def test_fdr_calls_are_the_largest_set_under_target():
    from ldvae.query.de import fdr_calls

    p = pd.Series([0.99, 0.5, 0.97, 0.2, 0.95], index=list("abcde"))
    called = fdr_calls(p, 0.05)
    # sorted: a .99, c .97, e .95, b .5 -> cumulative mean of 1 - p: .01, .02, .03, .1375
    assert list(called[called].index) == ["a", "c", "e"] and list(called.index) == list("abcde")


# --- normalized expression -------------------------------------------------------------------------

LIKELIHOODS = [("nb", "gene"), ("nb", "gene-batch"), ("zinb", "gene-cell"), ("poisson", "gene")]


@pytest.mark.parametrize(("gene_likelihood", "dispersion"), LIKELIHOODS)
def test_normalized_expression_sums_to_one_and_matches_mean(small_adata, gene_likelihood, dispersion):
    ldvae.LinearSCVI.setup_anndata(small_adata, layer="counts", batch_key="batch")
    model = fit_small(small_adata, epochs=3, n_latent=3, gene_likelihood=gene_likelihood, dispersion=dispersion)
    ne = model.get_normalized_expression()
    assert isinstance(ne, pd.DataFrame) and ne.shape == (400, 40)
    assert list(ne.index) == list(small_adata.obs_names) and list(ne.columns) == list(model.var_names_)
    assert np.allclose(ne.to_numpy().sum(1), 1.0, atol=1e-5)
    # library_size="latent" is the likelihood mean (same seed, same posterior draws).
    latent = model.get_normalized_expression(library_size="latent", return_numpy=True)
    params = model.get_likelihood_parameters()
    assert np.allclose(latent, params["mean"], rtol=1e-5)
    expected = {"nb": {"mean", "dispersions"}, "zinb": {"mean", "dispersions", "dropout"}, "poisson": {"mean"}}
    assert set(params) == expected[gene_likelihood]
    assert all(v.shape == (400, 40) for v in params.values())
    if gene_likelihood == "zinb":
        assert ((params["dropout"] > 0) & (params["dropout"] < 1)).all()


def test_normalized_expression_options(batch_model):
    m = batch_model
    scaled = m.get_normalized_expression(indices=[5, 0, 7], library_size=1e4, gene_list=["gene3", "gene1"])
    assert list(scaled.index) == ["cell5", "cell0", "cell7"] and list(scaled.columns) == ["gene1", "gene3"]
    full = m.get_normalized_expression(indices=[5, 0, 7], library_size=1e4)
    assert np.allclose(scaled.to_numpy(), full[["gene1", "gene3"]].to_numpy(), rtol=1e-5)
    draws = m.get_normalized_expression(n_samples=4, return_mean=False)
    assert isinstance(draws, np.ndarray) and draws.shape == (4, 300, 40)
    mean = m.get_normalized_expression(n_samples=4, return_numpy=True)
    assert np.allclose(mean, draws.mean(0), atol=1e-6)
    overall = m.get_normalized_expression(n_samples_overall=50)
    assert overall.shape == (50, 40) and set(overall.index) <= set(m.adata.obs_names)
    assert np.array_equal(m.get_normalized_expression().to_numpy(), m.get_normalized_expression().to_numpy())


def test_transform_batch_moves_by_batch_coefficients(batch_model):
    m = batch_model
    coef = m.get_covariate_coefficients()
    step = (coef["batch:b1"] - coef["batch:b0"]).to_numpy()  # log-rate effect of b1 over b0
    for library_size in (1, "latent"):
        e0 = m.get_normalized_expression(transform_batch="b0", library_size=library_size, return_numpy=True)
        e1 = m.get_normalized_expression(transform_batch="b1", library_size=library_size, return_numpy=True)
        d = np.log(e1) - np.log(e0)  # (n_cells, G): the step minus a per-cell normalizer
        assert np.allclose(d - d.mean(1, keepdims=True), step - step.mean(), atol=2e-4)
    both = m.get_normalized_expression(transform_batch=["b0", "b1"], return_numpy=True)
    e0 = m.get_normalized_expression(transform_batch="b0", return_numpy=True)
    e1 = m.get_normalized_expression(transform_batch="b1", return_numpy=True)
    assert np.allclose(both, (e0 + e1) / 2, rtol=1e-5)


# --- ELBO, reconstruction error, marginal likelihood ---------------------------------------------


def test_marginal_ll_bounds_elbo_and_converges(batch_model):
    m = batch_model
    cells = np.arange(60)
    elbo = m.get_elbo(indices=cells)
    rec = m.get_reconstruction_error(indices=cells)
    assert set(rec) == {"reconstruction_loss"}
    loss = rec["reconstruction_loss"]  # -log p(x | z, l): a loss, as scvi-tools >= 1.2
    assert isinstance(elbo, torch.Tensor) and elbo.dim() == 0 and isinstance(loss, torch.Tensor) and loss.dim() == 0
    assert loss > 0 and -loss >= elbo  # ELBO = log p(x | z, l) - KL
    lls = {s: m.get_marginal_ll(indices=cells, n_mc_samples=s) for s in (10, 100, 1000)}
    assert all(ll >= elbo for ll in lls.values()), (elbo, lls)
    # The importance-sampled bound rises with the samples, by less and less.
    assert lls[10] < lls[100] < lls[1000] and lls[1000] - lls[100] < 0.8 * (lls[100] - lls[10]), (elbo, lls)
    assert all(isinstance(ll, float) for ll in lls.values())
    per_cell = m.get_marginal_ll(indices=cells, n_mc_samples=100, return_mean=False)
    assert isinstance(per_cell, torch.Tensor) and per_cell.shape == (60,) and np.isclose(float(per_cell.mean()), lls[100])
    assert m.get_elbo(indices=cells, return_mean=False).shape == (60,)
    # Same draws as training's loss: the ELBO is minus the module's mean loss at kl_weight 1.
    assert elbo < 0 and m.get_elbo() == m.get_elbo()


# --- samples, library, correlations -------------------------------------------------------------


@pytest.mark.parametrize("gene_likelihood", ["nb", "zinb", "poisson"])
def test_posterior_predictive_mean_matches_likelihood_mean(small_adata, gene_likelihood):
    ldvae.LinearSCVI.setup_anndata(small_adata, layer="counts", batch_key="batch")
    model = fit_small(small_adata, epochs=5, n_latent=3, gene_likelihood=gene_likelihood)
    n = 200
    draws = model.posterior_predictive_sample(indices=np.arange(100), n_samples=n)
    assert isinstance(draws, _SAMPLE_TYPE) and draws.shape == (100, 40, n)
    dense = _dense(draws)  # (cells, genes, samples)
    assert np.array_equal(dense, np.round(dense)) and dense.min() >= 0
    params = model.get_likelihood_parameters(indices=np.arange(100), n_samples=n)  # each (n, cells, genes)
    # "mean" is mu, the mean of the NB part (as in scvi-tools); ZINB's mean is (1 - pi) mu.
    mean = (params["mean"] * (1 - params.get("dropout", 0.0))).mean(0)
    # Per gene, totals over cells: predictive mean vs likelihood mean, in standard errors.
    se = np.sqrt(dense.var(axis=2, ddof=1).sum(0) / n) * np.sqrt(2)
    z = (dense.mean(2).sum(0) - mean.sum(0)) / se
    assert np.abs(z).max() < 4.5, np.abs(z).max()


@pytest.mark.parametrize("gene_likelihood", ["nb", "poisson"])
def test_posterior_predictive_draws_of_a_diverged_library_are_refused(small_adata, gene_likelihood):
    ldvae.LinearSCVI.setup_anndata(small_adata, layer="counts")
    model = fit_small(small_adata, epochs=1, n_latent=2, gene_likelihood=gene_likelihood)
    with torch.no_grad():
        model.module.l_encoder.mean.bias.fill_(60.0)  # a learned library of e^60 ~ 1e26 counts
    with pytest.raises(ValueError, match=r"needs a Poisson rate of .*e\+2\d, beyond any count"):
        model.posterior_predictive_sample(indices=np.arange(10))


@pytest.mark.skipif(tuple(int(v) for v in __import__("scipy").__version__.split(".")[:2]) < (1, 15),
                    reason="scipy's 3-D sparse arrays (n_samples > 1 without pydata sparse) need scipy 1.15")
def test_posterior_predictive_samples_are_the_same_with_or_without_pydata_sparse(batch_model, monkeypatch):
    from ldvae.query import posterior

    cells = np.arange(0, 300, 7)
    given = [_dense(batch_model.posterior_predictive_sample(indices=cells, n_samples=n, batch_size=9)) for n in (1, 3)]
    monkeypatch.setattr(posterior, "_has_sparse", lambda: False)
    scipy_types = [batch_model.posterior_predictive_sample(indices=cells, n_samples=n, batch_size=9) for n in (1, 3)]
    assert isinstance(scipy_types[0], sp.csr_matrix) and isinstance(scipy_types[1], sp.coo_array)
    for a, b in zip(given, scipy_types):
        np.testing.assert_array_equal(a, b.toarray())
    assert given[1].shape == (len(cells), 40, 3) and given[1].sum() > 0


def test_posterior_predictive_single_sample_and_gene_list(batch_model):
    one = batch_model.posterior_predictive_sample(indices=[3, 1], gene_list=["gene2", "gene0"])
    assert isinstance(one, _SAMPLE_TYPE) and one.shape == (2, 2)
    full = batch_model.posterior_predictive_sample()
    assert full.shape == (300, 40) and full.nnz > 0


def test_latent_library_size(batch_model, small_adata):
    lib = batch_model.get_latent_library_size()
    totals = np.asarray(batch_model.adata.layers["counts"].sum(1)).ravel()
    assert lib.shape == (300, 1) and (lib > 0).all()
    assert np.corrcoef(np.log(lib[:, 0]), np.log(totals))[0, 1] > 0.8
    assert batch_model.get_latent_library_size(give_mean=False).shape == (300, 1)
    observed = fit_small(small_adata, epochs=1, n_latent=2, use_observed_lib_size=True)
    sizes = observed.get_latent_library_size(give_mean=False)
    assert np.allclose(sizes[:, 0], np.asarray(small_adata.layers["counts"].sum(1)).ravel(), rtol=1e-5)
    with pytest.raises(RuntimeError, match="uses the observed library size.*Pass give_mean=False"):
        observed.get_latent_library_size()


def test_feature_correlation_recovers_co_regulated_genes(de_model):
    planted = de_model.adata.var["planted"]
    up, down = planted.index[planted == "up"], planted.index[planted == "down"]
    corr = de_model.get_feature_correlation_matrix(correlation_type="pearson", n_samples=3)
    assert corr.shape == (100, 100) and np.allclose(np.diag(corr), 1.0) and np.allclose(corr, corr.T)
    inner = corr.loc[up, up].to_numpy()[~np.eye(len(up), dtype=bool)]
    assert inner.mean() > 0.3 and corr.loc[up, down].to_numpy().mean() < -0.3
    spearman = de_model.get_feature_correlation_matrix(indices=np.arange(0, 600, 3), n_samples=2)
    assert spearman.shape == (100, 100) and spearman.loc[up, down].to_numpy().mean() < -0.3


def test_queries_accept_another_adata_with_the_same_genes(batch_model):
    other = batch_model.adata[:50].copy()
    ne = batch_model.get_normalized_expression(other)
    assert list(ne.index) == list(other.obs_names)
    assert np.allclose(ne.to_numpy(), batch_model.get_normalized_expression(indices=np.arange(50)).to_numpy())


# --- every error message -------------------------------------------------------------------------


def test_untrained_model_refuses_queries(small_adata):
    ldvae.LinearSCVI.setup_anndata(small_adata, layer="counts")
    model = ldvae.LinearSCVI(small_adata, n_latent=2)
    with pytest.raises(ldvae.NotTrainedError, match="not trained yet. Call model.train()"):
        model.get_normalized_expression()
    with pytest.raises(ldvae.NotTrainedError, match="not trained yet"):
        model.differential_expression(groupby="batch")


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: m.get_normalized_expression(n_samples=0), ValueError, "n_samples must be a positive integer, got 0"),
        (lambda m: m.get_normalized_expression(library_size=-1), ValueError,
         "library_size must be a positive number or 'latent', got -1"),
        (lambda m: m.get_normalized_expression(library_size="observed"), ValueError, "got 'observed'"),
        (lambda m: m.get_normalized_expression(n_samples_overall=10, n_samples=2), ValueError,
         "it needs n_samples=1, got n_samples=2"),
        (lambda m: m.get_normalized_expression(gene_list=["gene1", "CD3E"]), ValueError,
         "gene_list has 1 gene.*first: 'CD3E'.*model.var_names_"),
        (lambda m: m.get_normalized_expression(transform_batch="b7"), ValueError,
         r"transform_batch='b7' is not a batch category of the model \(categories: \['b0', 'b1'\]\)"),
        (lambda m: m.get_marginal_ll(n_mc_samples=0), ValueError, "n_mc_samples must be a positive integer"),
        (lambda m: m.get_likelihood_parameters(n_samples=1.5), ValueError, "n_samples must be a positive integer"),
        (lambda m: m.posterior_predictive_sample(n_samples=-2), ValueError, "n_samples must be a positive integer"),
        (lambda m: m.get_feature_correlation_matrix(correlation_type="kendall"), ValueError,
         "correlation_type must be 'spearman' or 'pearson', got 'kendall'"),
        (lambda m: m.get_feature_correlation_matrix(rna_size_factor=0), ValueError,
         "rna_size_factor must be positive, got 0"),
        (lambda m: m.get_normalized_expression(indices=[0, 300]), IndexError, "indices out of range for 300 cells"),
        (lambda m: m.get_latent_representation(indices=np.ones(297, bool)), IndexError,
         r"boolean mask of shape \(297,\); it needs one entry per cell \(300\)"),
        (lambda m: m.get_normalized_expression(indices=np.ones(5, bool)), IndexError, "boolean mask of shape"),
        (lambda m: m.get_latent_representation(indices=[0.9, 1.7]), IndexError,
         "integer cell positions or a boolean mask, got float64 values"),
        (lambda m: m.get_elbo(indices=["cell1"]), IndexError, r"use adata.obs_names.get_indexer\(names\)"),
        (lambda m: m.get_elbo(indices=[]), IndexError, "indices selects no cells"),
        (lambda m: m.get_marginal_ll(indices=np.zeros(300, bool)), IndexError, "indices selects no cells"),
        (lambda m: m.posterior_predictive_sample(indices=[]), IndexError, "indices selects no cells"),
    ],
)
def test_query_errors(batch_model, call, error, match):
    with pytest.raises(error, match=match):
        call(batch_model)


def test_3d_samples_need_recent_scipy(batch_model, monkeypatch):
    import ldvae.query.posterior

    monkeypatch.setattr(ldvae.query.posterior, "_has_sparse", lambda: False)  # scipy's arrays, not sparse.GCXS
    monkeypatch.setattr(ldvae.query.posterior, "_scipy_version", lambda: (1, 14))
    with pytest.raises(RuntimeError, match=r"needs scipy >= 1.15 \(this is \(1, 14\)\).*n_samples=1"):
        batch_model.posterior_predictive_sample(n_samples=2)
    assert batch_model.posterior_predictive_sample(indices=[0]).shape == (1, 40)


def test_return_numpy_false_with_draws_warns(batch_model):
    with pytest.warns(UserWarning, match="return_numpy=False cannot hold n_samples > 1"):
        out = batch_model.get_normalized_expression(n_samples=2, return_mean=False, return_numpy=False)
    assert out.shape == (2, 300, 40)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(groupby="batch", n_samples=10), TypeError, r"unknown keyword arguments \['n_samples'\]"),
        (dict(groupby="batch", mode="fast"), ValueError, "mode must be 'vanilla' or 'change', got 'fast'"),
        (dict(groupby="batch", fdr_target=1.5), ValueError, r"fdr_target must be in \(0, 1\), got 1.5"),
        (dict(groupby="batch", delta=0), ValueError, r"delta must be positive \(or None to estimate it\), got 0"),
        (dict(groupby="batch", test_mode="four"), ValueError, "test_mode must be 'two' or 'three', got 'four'"),
        (dict(groupby="batch", batchid1=["b0"]), ValueError, "they need batch_correction=True"),
        (dict(), ValueError, r"needs groupby= \(an adata.obs column\) or idx1="),
        (dict(groupby="celltype"), ValueError, "groupby='celltype' is not a column of adata.obs"),
        (dict(groupby="batch", group1="b9"), ValueError, r"group 'b9' has no cells in adata.obs\['batch'\]"),
        (dict(groupby="batch", group1="b0", group2="b9"), ValueError, "group 'b9' has no cells"),
        (dict(groupby="one"), ValueError, r"adata.obs\['one'\] has a single group \(\['x'\]\); DE needs two"),
        (dict(idx1=np.ones(5, dtype=bool)), ValueError, "idx1 is a boolean mask of length 5; adata has 300 cells"),
        (dict(idx1=[]), ValueError, "idx1 selects no cells"),
        (dict(idx1=[0, 1], idx2=[400]), ValueError, r"idx2 must hold cell positions in \[0, 300\)"),
        (dict(idx1=np.ones(300, dtype=bool)), ValueError, r"group2/idx2 \(or the rest\) selects no cells"),
        (dict(groupby="batch", batch_correction=True, batchid1=["b5"]), ValueError, "transform_batch='b5'"),
        (dict(groupby="batch", mode="change", cred_interval_lvls=[1.0], n_samples_overall=50), ValueError,
         r"cred_interval_lvls must be in \(0, 1\)"),
    ],
)
def test_de_errors(batch_model, kwargs, error, match):
    batch_model.adata.obs["one"] = "x"
    with pytest.raises(error, match=match):
        batch_model.differential_expression(**kwargs)


# --- pbmc3k: B-cell markers ----------------------------------------------------------------------


@pytest.mark.skipif(not PBMC3K.exists(), reason=f"{PBMC3K} not present")
def test_pbmc3k_b_cell_markers_rank_top10():
    import importlib.util

    spec = importlib.util.spec_from_file_location("de_pbmc3k", Path(__file__).parents[1] / "examples" / "de_pbmc3k.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    adata = example.prepare(PBMC3K)
    _, de = example.b_cell_de(adata, max_epochs=25)
    up = de[de["lfc_mean"] > 0]
    top = list(up.index[:10])
    print("B cells vs rest, top 10 up-regulated:", top)
    assert "MS4A1" in top and "CD79A" in top, top
