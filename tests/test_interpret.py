"""Interpretation tools: deviance explained, order and sign, stability across seeds,
choosing K, gene-set enrichment, covariate effects, their report sections and CLI.

The fitted models are shared through module-scoped fixtures; the seeds are fitted in two
worker processes, so this file also exercises the parallel path of ``fit_seeds``. Seed
counts are multiples of the two workers where the assertions allow, so no wave of fits
leaves a core idle.
"""

from __future__ import annotations

import copy
import logging

import matplotlib
import numpy as np
import pandas as pd
import pytest
from conftest import fit_small
from matplotlib.figure import Figure

import ldvae
from ldvae.factors.enrichment import _mann_whitney, factor_enrichment, plot_enrichment, read_gmt, top_sets
from ldvae.factors.interpret import (
    covariate_effects,
    factor_deviance,
    ordered_latent,
    ordered_loadings,
    plot_covariate_effects,
    plot_deviance,
    reorder_factors,
    sign_convention,
)
from ldvae.factors.stability import (
    BackgroundFits,
    _column_correlations,
    factor_stability,
    fit_seeds,
    heldout_elbo,
    heldout_marginal_nll,
    plot_select_k,
    plot_stability,
    rotated_latent,
    select_k,
    varimax,
)

matplotlib.use("Agg")

# Known factors of known, well separated strengths: the order is the truth.
SCALES = np.array([2.4, 1.2, 0.6])
K_TRUE = len(SCALES)
TRAIN = {"max_epochs": 200, "lr": 1e-2, "plan_kwargs": {"n_epochs_kl_warmup": 10}}
# 1500 cells: with 1000, some seeds return the two weaker factors rotated into each other.
N_CELLS = 1500
SEEDS = (0, 1, 2, 3)
# Two true factors fitted with three: the extra one can only fit noise. It must collapse,
# which takes a few more epochs than fitting the true factors.
NOISE_SCALES = np.array([2.0, 0.7])
NOISE_TRAIN = {**TRAIN, "max_epochs": 250}


def _match_truth(loadings: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """For each column of loadings, the true factor it correlates with most (absolute)."""
    return np.abs(_column_correlations(truth, loadings)).argmax(axis=0)


@pytest.fixture(scope="module")
def strengths_adata():
    adata = ldvae.simulate(N_CELLS, 200, K_TRUE, factor_scales=SCALES, seed=0)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    return adata


@pytest.fixture(scope="module")
def seed_models(strengths_adata):
    return fit_seeds(strengths_adata, SEEDS, n_jobs=2, train_kwargs=TRAIN, n_latent=K_TRUE)


@pytest.fixture(scope="module")
def stability(seed_models):
    return factor_stability(seed_models)


@pytest.fixture(scope="module")
def reference(seed_models, stability):
    return seed_models[stability.reference]


@pytest.fixture(scope="module")
def noise_adata():
    adata = ldvae.simulate(N_CELLS, 200, len(NOISE_SCALES), factor_scales=NOISE_SCALES, seed=4)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    return adata


@pytest.fixture(scope="module")
def noise_models(noise_adata):
    return fit_seeds(noise_adata, (0, 1, 2), n_jobs=2, train_kwargs=NOISE_TRAIN, n_latent=len(NOISE_SCALES) + 1)


@pytest.fixture(scope="module")
def small_model():
    adata = ldvae.simulate(400, 40, 3, n_batches=2, seed=1)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    return fit_small(adata, epochs=5, n_latent=3)


# --- deviance explained, order and sign ---------------------------------------------------------


def test_deviance_order_matches_true_strengths(seed_models, strengths_adata):
    truth = strengths_adata.varm["true_loadings"]
    for model in seed_models:
        table = factor_deviance(model)
        assert list(table["rank"]) == list(range(1, K_TRUE + 1))
        matched = _match_truth(model.get_loadings()[table.index].to_numpy(), truth)
        assert list(matched) == list(range(K_TRUE)), table
        assert table["fraction_of_model"].is_monotonic_decreasing
        assert 0.0 < table.attrs["fraction_explained"] < 1.0


def test_noise_factor_ranked_last_and_unstable(noise_models, noise_adata):
    truth = noise_adata.varm["true_loadings"]
    last = []
    for model in noise_models:
        table = factor_deviance(model)
        matched = _match_truth(model.get_loadings()[table.index[:2]].to_numpy(), truth)
        assert list(matched) == [0, 1], table
        assert table["fraction_of_model"].iloc[-1] < 0.01 < table["fraction_of_model"].iloc[1], table
        last.append(table.index[-1])
    result = factor_stability(noise_models)
    f = result.factors
    noise = last[result.reference]
    assert noise == f.index[-1], f
    assert not f.loc[noise, "stable"] and f.loc[noise, "stability"] < 0.5, f
    assert (f.drop(index=noise)["stability"] > 0.8).all(), f


def test_deviance_on_held_out_cells(reference):
    held_out = reference.get_factor_deviance(indices=reference.validation_indices_)
    assert held_out.attrs["n_cells"] == len(reference.validation_indices_)
    assert list(held_out.index[:K_TRUE]) == list(factor_deviance(reference).index[:K_TRUE])


def test_sign_convention_makes_largest_loading_positive():
    frame = pd.DataFrame({"a": [0.1, -3.0, 2.0], "b": [0.5, 0.2, -0.1], "c": [np.nan, -1.0, 1.0]})
    assert list(sign_convention(frame)) == [-1, 1, -1]  # tie in "c": the first gene decides


def test_ordered_views_leave_the_model_alone(reference):
    raw = reference.get_loadings()
    table = factor_deviance(reference)
    view = ordered_loadings(reference, table)
    assert list(view.columns) == list(table.index)
    top = view.abs().idxmax()
    assert all(view.loc[top[c], c] > 0 for c in view.columns)
    pd.testing.assert_frame_equal(reference.get_loadings(), raw)
    z = ordered_latent(reference, deviance=table)
    raw_z = reference.get_latent_representation()
    first = table.index[0]
    np.testing.assert_allclose(z[first], raw_z[:, int(first[2:])] * table.loc[first, "sign"], rtol=1e-6)


def test_reorder_factors_is_an_exact_reparameterization(reference):
    model = copy.deepcopy(reference)
    table = factor_deviance(model)
    expected_loadings = ordered_loadings(model, table).to_numpy()
    expected_latent = ordered_latent(model, deviance=table).to_numpy()
    renamed = reorder_factors(model, table)
    assert list(renamed["was"]) == list(table.index)
    np.testing.assert_allclose(model.get_loadings().to_numpy(), expected_loadings, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_latent_representation(), expected_latent, rtol=1e-4, atol=1e-5)
    after = factor_deviance(model)
    assert list(after.index) == [f"Z_{i}" for i in range(K_TRUE)]
    assert (after["sign"] == 1).all()
    np.testing.assert_allclose(after["deviance_drop"].to_numpy(), table["deviance_drop"].to_numpy(), rtol=1e-4)


def test_deviance_needs_a_trained_model(strengths_adata):
    with pytest.raises(ldvae.NotTrainedError, match="not trained yet"):
        factor_deviance(ldvae.LinearSCVI(strengths_adata, n_latent=2))
    with pytest.raises(TypeError, match="needs a trained ldvae.LinearSCVI, got DataFrame"):
        factor_deviance(pd.DataFrame())


def test_reorder_refuses_sign_flips_for_logistic_normal():
    adata = ldvae.simulate(200, 30, 2, seed=3)
    model = fit_small(adata, epochs=2, n_latent=2, latent_distribution="ln")
    with pytest.raises(ValueError, match="cannot flip signs of a latent_distribution='ln' model"):
        reorder_factors(model)
    reorder_factors(model, flip_signs=False)


# --- stability ---------------------------------------------------------------------------------------


def test_true_factors_stable_across_seeds(stability):
    f = stability.factors
    assert f.attrs["n_runs"] == len(SEEDS)
    assert (f["stability"] >= 0.9).all() and f["stable"].all(), f
    assert (stability.correlations.to_numpy() >= 0.8).all(), stability.correlations


def test_consensus_loadings_recover_the_truth(stability, strengths_adata):
    truth = strengths_adata.varm["true_loadings"]
    r = np.abs(_column_correlations(truth, stability.consensus.to_numpy()))
    assert (r.max(axis=1) >= 0.9).all(), r
    top = stability.consensus.abs().idxmax()
    assert all(stability.consensus.loc[top[c], c] > 0 for c in stability.consensus.columns)


def test_varimax_matching_keeps_the_planted_factors(seed_models, strengths_adata):
    result = factor_stability(seed_models, rotation="varimax")
    f = result.factors
    assert list(result.consensus.columns) == [f"V_{k}" for k in range(K_TRUE)]
    assert f.attrs["rotation"] == "varimax"
    assert (f["stability"] >= 0.9).all() and f["stable"].all(), f
    truth = strengths_adata.varm["true_loadings"]
    r = np.abs(_column_correlations(truth, result.consensus.to_numpy()))
    assert (r.max(axis=1) >= 0.9).all(), r
    # the rotated latent decodes to the same log-rates: (z R)(W R)^T = z W^T
    model, rot = seed_models[0], result.rotations[0]
    np.testing.assert_allclose(rot.T @ rot, np.eye(K_TRUE), atol=1e-10)
    w = model.get_loadings().to_numpy()
    z = model.get_latent_representation()
    zr = rotated_latent(model, rot)
    assert list(zr.columns) == [f"V_{k}" for k in range(K_TRUE)] and zr.index.equals(model.adata.obs_names)
    np.testing.assert_allclose(zr.to_numpy() @ (w @ rot).T, z @ w.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"rotation must be 3 x 3 for this model's 3 factors, got shape \(2, 2\)"):
        rotated_latent(model, np.eye(2))
    with pytest.raises(ValueError, match=r"rotation must be orthogonal"):
        factor_deviance(model, rotation=2 * np.eye(K_TRUE))


def test_deviance_of_rotated_factors(reference):
    plain = factor_deviance(reference)
    same = factor_deviance(reference, rotation=np.eye(K_TRUE))  # the identity gives the model's own factors
    np.testing.assert_allclose(same.loc[[f"V_{c[2:]}" for c in plain.index], "deviance_drop"],
                               plain["deviance_drop"], rtol=1e-6)
    rot = factor_stability([reference, reference], rotation="varimax").rotations[0]
    rotated = factor_deviance(reference, rotation=rot)
    # full and null models do not depend on the basis; the planted factors are near-varimax already
    assert rotated.attrs["fraction_explained"] == pytest.approx(plain.attrs["fraction_explained"], rel=1e-6)
    np.testing.assert_allclose(rotated["fraction_of_model"], plain["fraction_of_model"], atol=0.05)
    with pytest.raises(ValueError, match="rotation must be None or 'varimax', got 'promax'"):
        factor_stability(seed_models, rotation="promax")


def test_varimax_undoes_rotations_that_plain_matching_cannot():
    rng = np.random.default_rng(3)
    genes, k = 120, 4
    simple = np.zeros((genes, k))
    for j in range(k):  # each factor loads on its own block of genes
        simple[j * 30 : (j + 1) * 30, j] = rng.choice([-1.0, 1.0], 30) * rng.uniform(0.5, 1.0, 30)
    runs = []
    for _ in range(4):  # the same factor space, each run in another orthogonal basis
        q, _ = np.linalg.qr(rng.normal(size=(k, k)))
        noisy = simple + rng.normal(0.0, 0.02, simple.shape)
        runs.append(pd.DataFrame(noisy @ q, columns=[f"Z_{j}" for j in range(k)]))
    plain = factor_stability(runs).factors
    rotated = factor_stability(runs, rotation="varimax")
    assert plain["stability"].min() < 0.9, plain
    assert (rotated.factors["stability"] > 0.99).all(), rotated.factors
    r = np.abs(_column_correlations(simple, rotated.consensus.to_numpy()))
    assert (r.max(axis=0) > 0.99).all(), r
    rotated_simple, rot = varimax(runs[0])
    np.testing.assert_allclose(rotated_simple, runs[0].to_numpy() @ rot)
    np.testing.assert_allclose(rot @ rot.T, np.eye(k), atol=1e-10)


def test_stability_matches_permuted_and_flipped_copies():
    rng = np.random.default_rng(0)
    base = pd.DataFrame(rng.normal(size=(100, 4)), columns=[f"Z_{i}" for i in range(4)])
    shuffled = base[["Z_2", "Z_0", "Z_3", "Z_1"]] * np.array([1, -1, 1, -1])
    shuffled.columns = base.columns
    result = factor_stability([base, shuffled, base], reference=0)
    np.testing.assert_allclose(result.factors["stability"], 1.0)
    assert result.matches.loc["Z_0", "run_1"] == "-Z_1"
    assert result.matches.loc["Z_2", "run_1"] == "Z_0"


def test_parallel_and_sequential_fits_agree():
    adata = ldvae.simulate(300, 30, 2, seed=5)
    ldvae.data.setup.setup_anndata(adata, layer="counts")  # no code columns, as the workflow sets up
    adata.obs["donor"] = np.where(np.arange(300) % 3, "d1", "d2")  # a string column the user may extend
    obs = adata.obs.copy()
    train = {"max_epochs": 3}
    with BackgroundFits(adata, [7], train_kwargs=train, n_latent=2) as background:  # beside this process
        sequential = fit_seeds(adata, [7, 9], n_jobs=1, train_kwargs=train, n_latent=2)
        in_background = background.result()[0]
    pool = fit_seeds(adata, [7, 8, 9], n_jobs=2, train_kwargs=train, n_latent=2)  # worker 0 fits 7, then 9
    for got, want in ((in_background, sequential[0]), (pool[0], sequential[0]), (pool[2], sequential[1])):
        np.testing.assert_allclose(got.get_loadings(), want.get_loadings(), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got.validation_indices_, want.validation_indices_)
        assert got.history["elbo_train"].shape == want.history["elbo_train"].shape
    assert not np.allclose(pool[1].get_loadings(), sequential[0].get_loadings())
    pd.testing.assert_frame_equal(adata.obs, obs)  # the fits in other processes leave the user's obs as it was
    assert pool[0].registry_ == sequential[0].registry_
    # every seed holds out the same cells unless asked otherwise
    np.testing.assert_array_equal(pool[1].validation_indices_, pool[0].validation_indices_)
    from ldvae.train.batches import split_cells

    own = fit_seeds(adata, [7, 8], n_jobs=1, train_kwargs={**train, "split_seed": None}, n_latent=2)
    np.testing.assert_array_equal(own[0].validation_indices_, split_cells(adata.n_obs, None, None, 7, 128)[1])
    assert not np.array_equal(own[0].validation_indices_, own[1].validation_indices_)
    with pytest.raises(RuntimeError, match=r"The fit of seed 1 \(\{'n_latent': -1\}\) failed in its worker process"):
        with BackgroundFits(adata, [1], train_kwargs=train, n_latent=-1) as failing:
            failing.result()


def test_stability_input_errors(small_model):
    with pytest.raises(ValueError, match="needs at least 2 runs to compare, got 1"):
        factor_stability([small_model])
    with pytest.raises(TypeError, match="run 1 is a str"):
        factor_stability([small_model, "model"])
    with pytest.raises(ValueError, match="reference must index one of the 2 runs"):
        factor_stability([small_model, small_model], reference=5)
    other = small_model.get_loadings().iloc[::-1]
    with pytest.raises(ValueError, match="run 1 has different genes from run 0"):
        factor_stability([small_model, other])
    with pytest.raises(ValueError, match="seeds must be distinct"):
        fit_seeds(small_model.adata, [1, 1])
    with pytest.raises(ValueError, match="n_jobs must be a positive integer or None"):
        fit_seeds(small_model.adata, [1], n_jobs=0)
    with pytest.raises(ValueError, match="needs at least 2 seeds"):
        select_k(small_model.adata, [2, 3], seeds=[0])
    with pytest.raises(TypeError, match="select_k sets n_latent itself"):
        select_k(small_model.adata, [2, 3], n_latent=4)
    with pytest.raises(ValueError, match="n_mc_samples must be a positive integer, got 0"):
        select_k(small_model.adata, [2, 3], n_mc_samples=0)
    # nine cells leave no validation cells at the default split: refused before any fit
    with pytest.raises(ValueError, match="leaves none of the 9 cells to validate on"):
        select_k(small_model.adata[:9], [2, 3], n_jobs=1, train_kwargs={"max_epochs": 1})


# --- choosing K --------------------------------------------------------------------------------------


def test_select_k_is_best_at_or_near_the_true_k():
    adata = ldvae.simulate(N_CELLS, 200, 6, factor_scales=np.array([2.0, 1.7, 1.4, 1.2, 1.0, 0.8]), seed=2)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    train = {**TRAIN, "max_epochs": 120}
    table = select_k(adata, [4, 5, 6, 7], seeds=(0, 1), n_jobs=2, train_kwargs=train, n_mc_samples=20)
    assert list(table.columns) == [
        "elbo_validation", "elbo_se", "nll_validation", "nll_se", "median_stability", "min_stability", "n_stable",
        "selected",
    ]
    assert table.attrs["best_k"] in (5, 6, 7), table
    assert table.attrs["lowest_elbo_k"] >= 6 and table.attrs["lowest_nll_k"] >= 6, table
    # too few factors cost far more than the standard error, by either measure
    assert table.loc[4, "elbo_validation"] - table.loc[6, "elbo_validation"] > 5 * table.loc[4, "elbo_se"], table
    assert table.loc[4, "nll_validation"] - table.loc[6, "nll_validation"] > 5 * table.loc[4, "nll_se"], table
    # importance sampling tightens the bound: -log p(x) estimates lie below the negative ELBO
    assert (table["nll_validation"] < table["elbo_validation"]).all(), table
    assert table["selected"].sum() == 1
    assert isinstance(plot_select_k(table), Figure)


def test_select_k_fits_as_fit_seeds_fits(monkeypatch):
    """Its stability columns mean what factor_stability of fit_seeds means: the same start and
    held-out cells, unless train_kwargs say otherwise."""
    from ldvae.factors import seeds

    adata = ldvae.simulate(200, 30, 2, seed=3)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    given = []
    monkeypatch.setattr(seeds, "_fit_one", lambda a, model_kwargs, train_kwargs, seed: given.append(train_kwargs)
                        or fit_small(a, epochs=1, **model_kwargs))
    select_k(adata, [2], seeds=(0, 1), n_jobs=1, train_kwargs={"max_epochs": 1})
    select_k(adata, [2], seeds=(0, 1), n_jobs=1, train_kwargs={"max_epochs": 1, "init": "random"})
    assert [(t["init"], t["split_seed"]) for t in given] == [("pca", seeds.SPLIT_SEED)] * 2 + [("random", 0)] * 2


def test_heldout_elbo_needs_validation_cells():
    adata = ldvae.simulate(200, 30, 2, seed=3)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    model = ldvae.LinearSCVI(adata, n_latent=2)
    model.train(max_epochs=2, train_size=1.0, progress_bar=False)
    with pytest.raises(ValueError, match="has no validation cells, so no held-out ELBO"):
        heldout_elbo(model)
    with pytest.raises(ValueError, match="has no validation cells, so no held-out marginal log-likelihood"):
        heldout_marginal_nll(model)


def test_heldout_marginal_nll_tightens_the_elbo(reference):
    elbo = heldout_elbo(reference, n_samples=20)
    few = heldout_marginal_nll(reference, n_mc_samples=1)
    many = heldout_marginal_nll(reference, n_mc_samples=100)
    assert elbo.shape == few.shape == many.shape == (len(reference.validation_indices_),)
    # one importance sample is an ELBO draw; more samples give a tighter (lower) bound on -log p(x)
    assert abs(few.mean() - elbo.mean()) < 0.02 * abs(elbo.mean())
    assert many.mean() < elbo.mean()
    np.testing.assert_allclose(many, -reference.get_marginal_ll(indices=reference.validation_indices_,
                                                                 n_mc_samples=100, return_mean=False))


# --- enrichment ---------------------------------------------------------------------------------------


def _gmt(tmp_path, sets: dict[str, list[str]]) -> str:
    path = tmp_path / "sets.gmt"
    path.write_text("".join(f"{name}\tdescription\t" + "\t".join(genes) + "\n" for name, genes in sets.items()))
    return str(path)


def test_planted_gene_set_is_the_top_hit(reference, strengths_adata, tmp_path):
    truth = strengths_adata.varm["true_loadings"]
    genes = strengths_adata.var_names
    rng = np.random.default_rng(0)
    sets = {f"random_{i}": list(rng.choice(genes, 20, replace=False)) for i in range(60)}
    planted = list(genes[np.argsort(truth[:, 1])[::-1][:20]])  # top genes of true factor 1
    sets["PLANTED_FACTOR_1"] = planted
    table = factor_enrichment(reference, _gmt(tmp_path, sets))
    loadings = reference.get_loadings()
    r = _column_correlations(truth[:, [1]], loadings.to_numpy())[0]
    factor = loadings.columns[np.abs(r).argmax()]
    direction = "positive" if r[np.abs(r).argmax()] > 0 else "negative"
    hits = table[(table["factor"] == factor) & (table["direction"] == direction)]
    assert hits.iloc[0]["gene_set"] == "PLANTED_FACTOR_1", hits.head()
    assert hits.iloc[0]["p_adj"] < 1e-6
    best = top_sets(table, 1, max_p_adj=0.01)
    assert "PLANTED_FACTOR_1" in set(best["gene_set"])
    assert isinstance(plot_enrichment(table), Figure)


def test_mann_whitney_matches_scipy():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(1)
    values = np.round(rng.normal(size=(300, 3)), 1)  # with ties
    member = np.zeros((2, 300))
    member[0, :15] = 1
    member[1, rng.choice(300, 40, replace=False)] = 1
    auc, p_pos, p_neg = _mann_whitney(values, member)
    for i in range(2):
        a, b = values[member[i] > 0], values[member[i] == 0]
        greater = mannwhitneyu(a, b, alternative="greater", method="asymptotic", axis=0)
        less = mannwhitneyu(a, b, alternative="less", method="asymptotic", axis=0)
        np.testing.assert_allclose(p_pos[i], greater.pvalue, rtol=1e-10)
        np.testing.assert_allclose(p_neg[i], less.pvalue, rtol=1e-10)
        np.testing.assert_allclose(auc[i] * len(a) * len(b), greater.statistic)


def test_read_gmt_and_its_errors(tmp_path):
    path = _gmt(tmp_path, {"A": ["g1", "g2", "g2"], "B": ["g3"]})
    assert read_gmt(path) == {"A": ["g1", "g2"], "B": ["g3"]}
    bad = tmp_path / "bad.gmt"
    bad.write_text("A\tdesc\tg1\nonly_a_name\n")
    with pytest.raises(ValueError, match=r"Line 2 of .*bad.gmt is not a GMT record \(got 1 tab-separated field"):
        read_gmt(bad)
    dup = tmp_path / "dup.gmt"
    dup.write_text("A\td\tg1\nA\td\tg2\n")
    with pytest.raises(ValueError, match="Gene set 'A' appears twice .* at line 2"):
        read_gmt(dup)
    with pytest.raises(FileNotFoundError, match="Gene-set file .*missing.gmt does not exist"):
        read_gmt(tmp_path / "missing.gmt")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_gmt(tmp_path)
    bom = tmp_path / "bom.gmt"
    bom.write_bytes("A\td\tg1\r\nB\td\tg2\r\n".encode("utf-8-sig"))  # as some editors on Windows save it
    assert read_gmt(bom) == {"A": ["g1"], "B": ["g2"]}
    latin = tmp_path / "latin.gmt"
    latin.write_bytes("A\tdésc\tg1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.gmt is not UTF-8 text \(byte 3\); save it as UTF-8"):
        read_gmt(latin)


def test_enrichment_input_errors(small_model):
    with pytest.raises(ValueError, match="No gene set has between 5 and 500 genes among the 40 modelled genes"):
        factor_enrichment(small_model, {"S": ["ENSG1", "ENSG2"]})
    with pytest.raises(ValueError, match="min_size must be a positive integer, got 0"):
        factor_enrichment(small_model, {"S": ["gene1"]}, min_size=0)
    with pytest.raises(TypeError, match="takes a trained LinearSCVI or a loadings DataFrame"):
        factor_enrichment("model", {"S": ["gene1"]})
    with pytest.raises(TypeError, match=r"gene set 'S' is a string; give each set as a list of genes, e.g. "
                                        r"\{'S': \['gene1'\]\}"):
        factor_enrichment(small_model, {"S": "gene1"})
    with pytest.raises(ValueError, match="1 gene set\\(s\\) hold all 40 modelled genes, which leaves no gene outside"):
        factor_enrichment(small_model, {"all": list(small_model.var_names_)})
    lower = {"S": [f"GENE{i}" for i in range(10)]}
    assert factor_enrichment(small_model, lower, ignore_case=True)["n_genes"].iloc[0] == 10


# --- covariate effects ----------------------------------------------------------------------------


def test_covariate_effects_tidy_table(small_model):
    table = covariate_effects(small_model)
    assert list(table.columns) == ["gene", "covariate", "level", "kind", "coefficient", "effect"]
    assert len(table) == 40 * 2
    assert set(table["level"]) == {"b0", "b1"} and set(table["kind"]) == {"batch"}
    per_gene = table.groupby("gene")["effect"].sum()
    np.testing.assert_allclose(per_gene.to_numpy(), 0.0, atol=1e-6)
    coef = small_model.get_covariate_coefficients()
    row = table[(table["gene"] == "gene3") & (table["level"] == "b1")].iloc[0]
    assert row["coefficient"] == pytest.approx(coef.loc["gene3", "batch:b1"])
    assert isinstance(plot_covariate_effects(table), Figure)


def test_covariate_effects_without_covariates(reference):
    table = covariate_effects(reference)
    assert table.empty and "effect" in table.columns
    assert isinstance(plot_covariate_effects(table), Figure)


# --- figures, report sections and CLI --------------------------------------------------------------


def test_figures_are_returned_not_shown(reference, stability):
    assert isinstance(plot_deviance(factor_deviance(reference)), Figure)
    assert isinstance(plot_stability(stability), Figure)


def test_report_sections(small_model, stability, tmp_path):
    from ldvae.workflow.interpret_report import interpretation_sections, stability_section

    gmt = _gmt(tmp_path, {"S": [f"gene{i}" for i in range(10)]})
    sections = [s(small_model, small_model.adata) for s in interpretation_sections(gmt=gmt)]
    assert [t for t, _ in sections] == [
        "Deviance explained per factor", "Covariate effects", "Gene-set enrichment of factors",
    ]
    assert all("<table" in body and "data:image/png;base64," in body for _, body in sections)
    title, body = stability_section(stability)
    assert title == "Factor stability across seeds" and "stable across seeds" in body


def test_cli_factors(small_model, tmp_path, capsys):
    from ldvae.cli.app import main

    small_model.save(tmp_path / "model", save_anndata=True)
    gmt = _gmt(tmp_path, {"S": [f"gene{i}" for i in range(10)]})
    out = tmp_path / "out"
    assert main(["factors", str(tmp_path / "model"), "--out-dir", str(out), "--gmt", gmt]) == 0
    for name in ("deviance.csv", "ordered_loadings.csv", "covariate_effects.csv", "enrichment.csv",
                 "deviance.png", "report.html", "factors.csv", "factor_genes.csv"):
        assert (out / name).exists(), name
    printed = capsys.readouterr().out
    assert "null deviance" in printed and "Factors (1 fit(s); reproducibility not assessed" in printed  # one model: rotated, no reproducibility
    k = small_model.config.n_latent
    assert list(pd.read_csv(out / "factors.csv")["factor"]) == [f"F_{i}" for i in range(k)]
    html = (out / "report.html").read_text()
    assert "<h2>Factors, rotated (one fit)</h2>" in html  # one model: no consensus
    assert "Top loadings by magnitude" not in html  # a section this report does not have is not pointed to
    assert main(["factors", str(tmp_path / "model"), "--out-dir", str(out)]) == 1
    assert "already exists. Pass --overwrite" in capsys.readouterr().err
    assert main(["factors", str(tmp_path / "model"), "--out-dir", str(out), "--overwrite"]) == 0  # its own outputs
    assert not (out / "enrichment.csv").exists()  # replaced as a whole


def test_cli_factors_leaves_nothing_on_error_and_keeps_the_users_files(small_model, tmp_path, capsys):
    from ldvae.cli.app import main

    small_model.save(tmp_path / "model", save_anndata=True)
    out = tmp_path / "out"
    assert main(["factors", str(tmp_path / "model"), "--out-dir", str(out), "--gmt", str(tmp_path / "no.gmt")]) == 1
    assert "no.gmt" in capsys.readouterr().err and not out.exists()  # the gene sets are read before any work
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging directory left either
    cut = tmp_path / "model" / "adata.h5ad"
    (tmp_path / "cut.h5ad").write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert main(["factors", str(tmp_path / "model"), "--adata", str(tmp_path / "cut.h5ad"), "--out-dir", str(out)]) == 1
    assert "cut.h5ad' as h5ad" in capsys.readouterr().err and not out.exists()
    (tmp_path / "cut.h5ad").unlink()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(["factors", str(tmp_path / "model"), "--out-dir", str(mine), "--overwrite"]) == 1
    assert "was not written by ldvae" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert main(["factors", str(tmp_path / "model"), "--out-dir", str(tmp_path / "model"), "--overwrite"]) == 1
    assert "it holds the input" in capsys.readouterr().err


def test_cli_lists_the_interpretation_subcommands():
    from ldvae.cli.app import build_parser

    text = build_parser().format_help()
    assert all(name in text for name in ("factors", "stability", "select-k"))


def test_cli_stability_with_varimax(tmp_path, capsys, caplog):
    from ldvae.cli.app import main

    path = tmp_path / "counts.h5ad"
    ldvae.simulate(200, 40, 2, seed=3).write_h5ad(path)
    out = tmp_path / "stab"
    args = ["stability", str(path), "--out-dir", str(out), "--layer", "counts", "--n-top-genes", "30", "--hvg-flavor",
            "seurat", "--seeds", "0", "1", "--n-jobs", "1", "--max-epochs", "2", "--n-latent", "2", "--rotation",
            "varimax"]
    with caplog.at_level(logging.INFO, logger="ldvae"):
        assert main(args) == 0, capsys.readouterr().err
    assert "highly variable genes (seurat)" in caplog.text  # the flavor asked for, as `ldvae run` takes it
    consensus = pd.read_csv(out / "consensus_loadings.csv", index_col="gene")
    assert list(consensus.columns) == ["V_0", "V_1"] and 30 <= len(consensus) < 40
    assert sorted(pd.read_csv(out / "stability.csv", index_col="factor").index) == ["V_0", "V_1"]
    assert "after a varimax rotation of each run&#x27;s loadings" in (out / "report.html").read_text()


@pytest.mark.parametrize("seeds, message", [(["0"], "at least 2 seeds"), (["1", "1"], "must be distinct")])
def test_cli_stability_checks_its_seeds_before_reading(tmp_path, capsys, seeds, message):
    from ldvae.cli.app import main

    out = tmp_path / "stab"
    assert main(["stability", str(tmp_path / "missing.h5ad"), "--out-dir", str(out), "--seeds", *seeds]) == 1
    assert message in capsys.readouterr().err and not out.exists()


def test_kernels_are_compiled_once_before_workers_start(monkeypatch):
    from ldvae.cpu import fused
    from ldvae.factors import seeds

    calls = []
    monkeypatch.setattr(fused, "ensure_compiled", calls.append)
    seeds.compile_once()
    assert calls == [1]  # the cache filled (where empty) before the one-thread workers start


def test_a_seed_worker_whose_launcher_is_gone_stops(tmp_path):
    """A worker told of a launcher that has already died (killed as the workers started)
    stops within seconds instead of fitting for nobody."""
    import subprocess
    import sys
    import time

    from ldvae.factors import seeds

    adata = ldvae.simulate(60, 12, 2, seed=0)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    seeds._write_jobs(tmp_path, adata, [({"n_latent": 2}, 0)], {"max_epochs": 100000, "progress_bar": False}, 1)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    code = f"from ldvae.factors.seeds import _worker_main; _worker_main({str(tmp_path)!r}, [0], {int(gone.stdout)})"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=seeds._worker_env(1), capture_output=True, timeout=120)
    assert proc.returncode == 1 and time.monotonic() - start < 60
    assert not (tmp_path / "result0.pt").exists()


def test_compiling_fit_leaves_no_note_about_its_own_settings(caplog):
    """The tiny fit that compiles the step is not the user's: its settings are not reported."""
    import logging

    from ldvae.factors import seeds

    with caplog.at_level(logging.INFO, logger="ldvae"):
        seeds.warm_up(1)
    assert "warm-up" not in caplog.text and "warm_up" not in caplog.text


def test_a_model_worse_than_its_null_says_by_how_much(small_model, caplog):
    import copy

    import torch

    worse = copy.deepcopy(small_model)
    with torch.no_grad():  # loadings scrambled far from the data: the factors now cost deviance
        worse.module.factor_regressor.weight.mul_(-25.0)
    with caplog.at_level("WARNING"):
        table = factor_deviance(worse)
    fraction = table.attrs["fraction_explained"]
    assert fraction < 0
    assert f"no better than its null (intercepts only): it explains {100 * fraction:.1f}% of the null" in caplog.text
