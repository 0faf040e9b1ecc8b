"""Reproducible factors: several fits aligned, rotated to simple structure and averaged.

Two planted truths that a fit's own axes hide (the prior N(0, I) is rotation invariant):
sparse loadings with a Gaussian latent (only the loadings have simple structure), and
dense loadings with cells in populations (only the latent has). The default criterion
must find each, the factors must be an exact rotation of every model, and the records
must survive AnnData and the workflow.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

import ldvae
from ldvae.data.simulate import canonical_correlations, simulate
from ldvae.factors.consensus import (
    consensus_factors,
    gene_information,
    marked_groups,
    read_factors,
    write_factors,
)
from ldvae.factors.interpret import factor_deviance
from ldvae.factors.stability import _column_correlations, fit_seeds

TRAIN = {"max_epochs": 200, "lr": 1e-2}
SEEDS = (0, 1, 2)


def _matched(truth: np.ndarray, found: np.ndarray) -> np.ndarray:
    c = np.abs(_column_correlations(truth, found))
    rows, cols = linear_sum_assignment(-c)
    return c[rows, cols]


@pytest.fixture(scope="module")
def sparse_loadings():
    """Five factors, each driving its own block of genes; z ~ N(0, I)."""
    adata = simulate(n_cells=2000, n_genes=200, n_latent=5, seed=3)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    models = fit_seeds(adata, SEEDS, n_jobs=2, train_kwargs=TRAIN, n_latent=5)
    return adata, models, consensus_factors(models)


def _populations(n_cells=1500, n_genes=200, k=4, seed=0):
    """Cells in k populations, each raising its own latent coordinate; every gene loads on
    every factor (no sparse loadings to find)."""
    rng = np.random.default_rng(seed)
    population = rng.integers(0, k, n_cells)
    z = 2.0 * np.eye(k)[population] + rng.normal(0.0, 0.5, (n_cells, k))
    z -= z.mean(axis=0)
    w = rng.normal(0.0, 0.4, (n_genes, k))
    logits = z @ w.T + rng.normal(0.0, 1.0, n_genes)[None, :]
    rho = np.exp(logits - logits.max(axis=1, keepdims=True))
    rho /= rho.sum(axis=1, keepdims=True)
    mu = np.exp(rng.normal(np.log(3000.0), 0.3, (n_cells, 1))) * rho
    x = rng.poisson(rng.gamma(5.0, mu / 5.0)).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(x), obs=pd.DataFrame(
        {"population": pd.Categorical([f"p{i}" for i in population])}, index=[f"c{i}" for i in range(n_cells)]))
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    adata.layers["counts"] = adata.X.copy()
    return adata, z


@pytest.fixture(scope="module")
def populations():
    adata, z = _populations()
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    models = fit_seeds(adata, SEEDS, n_jobs=2, train_kwargs=TRAIN, n_latent=4)
    return adata, z, models, consensus_factors(models)


def test_sparse_loadings_hidden_by_rotation_are_recovered(sparse_loadings):
    adata, models, f = sparse_loadings
    truth = adata.varm["true_loadings"]
    own = [_matched(truth, m.get_loadings().to_numpy()) for m in models]
    assert min(o.min() for o in own) < 0.95  # each fit's own axes hide the planted factors
    assert f.criterion == "loadings" and f.agreement["loadings"] > f.agreement["latent"]
    assert canonical_correlations(truth, f.loadings.to_numpy()).mean() >= 0.95
    assert _matched(truth, f.loadings.to_numpy()).min() >= 0.95
    assert f.table["reproducible"].all() and (f.table["reproducibility"] >= 0.95).all()


def test_populations_get_one_factor_each(populations):
    adata, z, models, f = populations
    assert f.criterion == "latent" and f.agreement["latent"] > f.agreement["loadings"]
    assert canonical_correlations(z, f.latent.to_numpy()).min() >= 0.95
    marks = marked_groups(f, adata.obs["population"])
    assert sorted(marks["group"]) == ["p0", "p1", "p2", "p3"]  # one factor per population, high in it
    assert (marks["auc"] >= 0.95).all() and (marks["mean"] > 0).all()
    skew = (f.latent.to_numpy() ** 3).mean(axis=0)
    assert (skew > 0).all()
    # membership is a 0/1 column: an orthogonal rotation of a white latent gets at most ~0.87 of it here;
    # the fits' own axes mix populations far more
    member = np.eye(4)[adata.obs["population"].cat.codes.to_numpy()]
    found = _matched(member, f.latent.to_numpy())
    own = [_matched(member, m.get_latent_representation()) for m in models]
    assert found.min() >= 0.75 and all(o.min() < found.min() - 0.1 for o in own)


def test_factors_are_an_exact_rotation_of_every_model(sparse_loadings):
    adata, models, f = sparse_loadings
    k = f.loadings.shape[1]
    for m, r in zip(models, f.rotations):
        np.testing.assert_allclose(r.T @ r, np.eye(k), atol=1e-8)
    w = [m.get_loadings().to_numpy() @ r for m, r in zip(models, f.rotations)]
    np.testing.assert_allclose(f.loadings.to_numpy(), np.mean(w, axis=0), rtol=1e-5, atol=1e-6)
    z = [m.get_latent_representation() @ r for m, r in zip(models, f.rotations)]
    np.testing.assert_allclose(f.latent.to_numpy(), np.mean(z, axis=0), rtol=1e-5, atol=1e-5)
    # the log-rate of the main model is unchanged: W z = (W R)(R^T z)
    m, r = models[0], f.rotations[0]
    zm = m.get_latent_representation()
    np.testing.assert_allclose((zm @ r) @ (m.get_loadings().to_numpy() @ r).T,
                               zm @ m.get_loadings().to_numpy().T, rtol=1e-4, atol=1e-4)


def test_models_are_untouched(populations):
    adata, _, models, _ = populations
    m = models[0]
    before_w, before_elbo = m.get_loadings().copy(), float(m.get_elbo(indices=np.arange(200)))
    consensus_factors(models[:2], criterion="latent")
    pd.testing.assert_frame_equal(m.get_loadings(), before_w)
    assert float(m.get_elbo(indices=np.arange(200))) == pytest.approx(before_elbo, rel=1e-6)


def test_order_sign_and_names(sparse_loadings):
    _, models, f = sparse_loadings
    t = f.table
    assert list(t.index) == [f"F_{i}" for i in range(5)]
    assert (np.diff(t["fraction_of_model"].to_numpy()) <= 1e-12).all()  # most deviance first
    # the shares are the mean over the fits, each rotated by its own rotation
    shares = [factor_deviance(m, rotation=r) for m, r in zip(models, f.rotations)]
    mean = np.mean([[d.loc[f"V_{k}", "fraction_of_model"] for k in range(5)] for d in shares], axis=0)
    np.testing.assert_allclose(t["fraction_of_model"], mean, rtol=1e-5)
    assert t.attrs["fraction_explained"] == pytest.approx(np.mean([d.attrs["fraction_explained"] for d in shares]))
    assert ((f.loadings.to_numpy() ** 3).sum(axis=0) > 0).all()  # the long tail of the loadings positive
    assert (t["reproducible"] == (t["reproducibility"] >= t.attrs["threshold"])).all()
    assert t.attrs["n_runs"] == len(SEEDS) == f.n_runs


def test_scores_weigh_loadings_by_information(populations):
    adata, _, models, f = populations
    info = gene_information(models[0])
    np.testing.assert_allclose(f.scores.to_numpy(), f.loadings.to_numpy() * np.sqrt(info.to_numpy())[:, None],
                               rtol=1e-6)
    mu = np.asarray(models[0].get_likelihood_parameters(give_mean=True)["mean"]).mean(axis=0)
    assert (info.to_numpy() < mu).all() and (info.to_numpy() > 0).all()  # NB: below the Poisson's mu
    top = f.top_genes(3)
    assert set(top["direction"]) == {"+", "-"} and (top.groupby(["factor", "direction"]).size() <= 3).all()
    plus = top[top["direction"] == "+"]
    assert (plus["score"] > 0).all()
    first = plus[plus["rank"] == 1].set_index("factor")["gene"]
    assert all(first[c] == f.scores[c].idxmax() for c in first.index)
    by_loading = f.top_genes(3, by="loading")
    assert all(by_loading[(by_loading["direction"] == "+") & (by_loading["rank"] == 1)].set_index("factor")["gene"][c]
               == f.loadings[c].idxmax() for c in f.loadings.columns)


def test_information_of_a_poisson_model_is_its_mean(populations):
    adata = populations[0]
    m = ldvae.LinearSCVI(adata, n_latent=2, gene_likelihood="poisson")
    m.train(max_epochs=2, progress_bar=False)
    info = gene_information(m, n_cells=adata.n_obs)
    mu = np.asarray(m.get_likelihood_parameters(give_mean=True)["mean"]).mean(axis=0)
    np.testing.assert_allclose(info.to_numpy(), mu, rtol=1e-5)


def test_one_model_is_rotated_without_reproducibility(populations):
    _, _, models, _ = populations
    f = consensus_factors(models[:1])
    assert f.criterion == "latent" and f.n_runs == 1 and f.table["reproducibility"].isna().all()
    assert not f.table["reproducible"].any()


def test_factor_table_names_a_marked_group_only_where_the_factor_separates_it(populations):
    from ldvae.workflow.interpret_report import MARK_AUC, factors_table

    adata, _, _, f = populations
    marks = factors_table(f, adata.obs["population"])["marks"]
    assert marks.str.fullmatch(r"p\d \(AUC \d\.\d\d\)").all()
    numbered = adata.obs["population"].cat.rename_categories(lambda c: c[1:]).rename("leiden")
    assert factors_table(f, numbered)["marks"].str.fullmatch(r"leiden \d \(AUC \d\.\d\d\)").all()
    noise = pd.Series(np.random.default_rng(0).choice(["u", "v"], adata.n_obs), index=adata.obs_names, name="coin")
    aucs = marked_groups(f, noise)["auc"]
    assert (aucs < MARK_AUC).all()  # a coin flip per cell is marked by no factor
    assert factors_table(f, noise)["marks"].str.fullmatch(r"none \(best: [uv], AUC 0\.\d\d\)").all()


def test_figure_panels_name_what_each_factor_marks(populations):
    from ldvae.workflow.interpret_report import factor_titles, factors_table

    adata, _, _, f = populations
    table = factors_table(f, adata.obs["population"])
    titles = factor_titles(table)
    for row in table.to_dict("records"):
        group, genes = row["marks"].split(" (AUC")[0], row["top genes (+)"].split(", ")[:3]
        assert titles[row["factor"]] == f"{row['factor']}: {group}\n{', '.join(genes)}"
    noise = pd.Series(np.random.default_rng(0).choice(["u", "v"], adata.n_obs), index=adata.obs_names)
    assert all(t.split("\n")[0] == name for name, t in factor_titles(factors_table(f, noise)).items())


def test_marked_groups_auc(populations):
    adata, _, _, f = populations
    from scipy.stats import mannwhitneyu

    marks = marked_groups(f, adata.obs["population"])
    labels = adata.obs["population"].astype(str).to_numpy()
    for factor, row in marks.iterrows():
        x = f.latent[factor].to_numpy()
        auc = {g: mannwhitneyu(x[labels == g], x[labels != g]).statistic / ((labels == g).sum() * (labels != g).sum())
               for g in np.unique(labels)}
        best, second = sorted(auc, key=auc.get, reverse=True)[:2]  # the group it separates best, and the next
        assert (row["group"], row["next_group"]) == (best, second)
        assert row["auc"] == pytest.approx(auc[best]) and row["next_auc"] == pytest.approx(auc[second])
        assert row["mean"] == pytest.approx(x[labels == best].mean())
    with pytest.raises(ValueError, match="labels for"):
        marked_groups(f, labels[:10])
    shuffled = adata.obs["population"].sample(frac=1, random_state=0)  # matched by cell, not by position
    pd.testing.assert_frame_equal(marked_groups(f, shuffled), marks)
    with pytest.raises(ValueError, match="does not name every cell of the factors once"):
        marked_groups(f, shuffled.iloc[:-1])
    partial = adata.obs["population"].astype(object)
    partial.iloc[::2] = np.nan  # cells without a label are left out, not a group named "nan"
    kept = partial.notna().to_numpy()
    assert "nan" not in set(marked_groups(f, partial)[["group", "next_group"]].to_numpy().ravel())
    pd.testing.assert_frame_equal(marked_groups(f, partial), marked_groups(f.latent[kept], labels[kept]))
    with pytest.raises(ValueError, match="all NaN"):
        marked_groups(f, np.full(adata.n_obs, np.nan))


def test_consensus_refuses_too_few_cells_for_the_rotation(populations):
    _, _, models, _ = populations
    k = models[0].config.n_latent
    with pytest.raises(ValueError, match=rf"n_cells must be an integer of at least n_latent \+ 2 = {k + 2}"):
        consensus_factors(models, n_cells=k + 1)


def test_written_into_anndata_and_read_back(populations, tmp_path):
    adata, _, _, f = populations
    target = adata.copy()
    write_factors(target, f, obs_columns=True)
    assert target.obsm["X_ldvae_factors"].shape == (adata.n_obs, 4)
    assert {f"F_{i}" for i in range(4)} <= set(target.obs.columns)
    target.write_h5ad(tmp_path / "r.h5ad")
    back = read_factors(ad.read_h5ad(tmp_path / "r.h5ad"))
    pd.testing.assert_frame_equal(back.table, f.table, check_dtype=False)
    np.testing.assert_allclose(back.latent.to_numpy(), f.latent.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(back.scores.to_numpy(), f.scores.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(back.rotations[0], f.rotations[0])
    assert back.criterion == f.criterion and back.n_runs == f.n_runs
    pd.testing.assert_frame_equal(back.top_genes(5), f.top_genes(5), check_exact=False, rtol=1e-5)
    with pytest.raises(ValueError, match="same order"):
        write_factors(adata[:10].copy(), f)
    with pytest.raises(KeyError, match="were not written"):
        read_factors(adata)


def test_factors_of_another_key_keep_their_own_obs_columns_and_views_are_refused(populations):
    adata, _, _, f = populations
    target = adata.copy()
    write_factors(target, f, obs_columns=True)
    first = target.obs["F_0"].copy()
    write_factors(target, f, key_added="run2", obs_columns=True)
    assert {f"run2_F_{i}" for i in range(4)} <= set(target.obs.columns) and "run2_factors" in target.uns
    pd.testing.assert_series_equal(target.obs["F_0"], first)
    with pytest.raises(ValueError, match="write_factors got a view of an AnnData"):
        write_factors(target[:, :5], f)
    with pytest.raises(ValueError, match="key_added must be a non-empty name"):
        write_factors(target, f, key_added=" ")


def test_refuses_bad_input(populations, sparse_loadings):
    adata, _, models, _ = populations
    with pytest.raises(TypeError, match="list of trained"):
        consensus_factors([])
    with pytest.raises(TypeError, match="list of trained"):
        consensus_factors([models[0], "model"])
    with pytest.raises(ValueError, match="criterion must be"):
        consensus_factors(models, criterion="quartimax")
    with pytest.raises(ValueError, match="threshold"):
        consensus_factors(models, threshold=1.5)
    with pytest.raises(ValueError, match="other cells or genes"):
        consensus_factors([models[0], sparse_loadings[1][0]])
    with pytest.raises(ValueError, match="by must be"):
        consensus_factors(models[:1]).top_genes(by="weight")


def test_consensus_reproducibility_is_the_correlation_a_rerun_would_give():
    """Runs = skewed factors + independent noise of variance 0.5, each run seen in its own
    rotation: two consensuses of 6 runs correlate 1 / (1 + 0.5 / 6) per factor."""
    from scipy.stats import ortho_group

    from ldvae.factors.consensus import _consensus_of, _split_half

    rng = np.random.default_rng(0)
    signal = rng.exponential(1.0, (4000, 3))
    signal = (signal - signal.mean(0)) / signal.std(0)
    weights = rng.normal(size=(50, 3))

    def runs(n):
        out = []
        for _ in range(n):
            r = ortho_group.rvs(3, random_state=rng)
            out.append(((signal + rng.normal(0.0, np.sqrt(0.5), signal.shape)) @ r, weights @ r))
        return [z for z, _ in out], [w for _, w in out]

    latents, w = runs(6)
    consensus = _consensus_of(latents, w, "latent")
    estimate = _split_half(consensus, latents, w, "latent")
    np.testing.assert_allclose(estimate, 1 / (1 + 0.5 / 6), atol=0.02)
    again = _consensus_of(*runs(6), "latent")  # a re-run: other noise, other rotations
    measured = _matched(consensus, again)
    np.testing.assert_allclose(measured, estimate, atol=0.03)
    assert np.isnan(_split_half(consensus, latents[:1], w[:1], "latent")).all()


def test_identical_runs_are_fully_reproducible(populations):
    adata, z, models, f = populations
    same = consensus_factors([models[0]] * 4)
    np.testing.assert_allclose(same.table["consensus_reproducibility"], 1.0, atol=1e-9)
    assert same.table["reproducible"].all()
    one = consensus_factors(models[:1])
    assert one.table["consensus_reproducibility"].isna().all() and not one.table["reproducible"].any()
    assert (f.table["reproducible"] == (f.table["consensus_reproducibility"] >= 0.9)).all()


def test_split_half_step_up_matches_a_rerun_for_halves_of_any_size():
    from ldvae.factors.consensus import _step_up

    r = np.array([0.0, 0.3, 0.7, 0.95, 1.0])
    np.testing.assert_allclose(_step_up(r, 2, 2), 2 * r / (1 + r))  # Spearman-Brown for equal halves
    rng = np.random.default_rng(0)
    signal = rng.standard_normal(200_000)
    for a, b in ((1, 2), (2, 3)):  # three and five fits: one fit's reliability 0.5
        fits = [np.sqrt(0.5) * signal + np.sqrt(0.5) * rng.standard_normal(signal.size) for _ in range(2 * (a + b))]
        halves = np.corrcoef(np.mean(fits[:a], 0), np.mean(fits[a:a + b], 0))[0, 1]
        rerun = np.corrcoef(np.mean(fits[:a + b], 0), np.mean(fits[a + b:], 0))[0, 1]
        assert abs(_step_up(np.array([halves]), a, b)[0] - rerun) < 0.01
        if a == 1:  # three fits: the equal-halves formula is off
            assert abs(2 * halves / (1 + halves) - rerun) > 0.01
