"""The workflow as Python: preparation as the tutorial, outputs, refusal to overwrite,
nothing partial on failure, figures and report read back from results."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import ldvae
from ldvae.workflow import pipeline as workflow
from ldvae.workflow.plotting import (
    category_palette,
    history_from_adata,
    latent_pairs,
    loadings_frame,
    loadings_heatmap,
    top_genes,
    top_genes_bars,
    training_curves,
    umap,
)
from ldvae.workflow.report import build_report

FAST = dict(n_top_genes=40, n_latent=4, max_epochs=3, check_val_every_n_epoch=1, n_neighbors=10, progress_bar=False,
            stability_seeds=0)


@pytest.fixture
def counts_adata():
    """300 cells x 60 genes of simulated counts in X (as a user's file would have them)."""
    sim = ldvae.simulate(300, 60, 3, seed=2)
    import anndata

    adata = anndata.AnnData(X=sp.csr_matrix(sim.layers["counts"], dtype=np.float32),
                            obs=pd.DataFrame({"group": pd.Categorical(np.arange(300) % 3)}, index=sim.obs_names),
                            var=pd.DataFrame(index=sim.var_names))
    return adata


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One workflow run, shared by the tests that only read its outputs."""
    sim = ldvae.simulate(300, 60, 3, seed=2)
    import anndata

    adata = anndata.AnnData(X=sp.csr_matrix(sim.layers["counts"]), obs=pd.DataFrame(index=sim.obs_names),
                            var=pd.DataFrame(index=sim.var_names))
    before = adata.copy()
    out = tmp_path_factory.mktemp("wf") / "out"
    result = workflow.run_workflow(adata, out_dir=out, figure_formats=("png", "svg"), **{**FAST, "stability_seeds": 2})
    return result, adata, before


def test_prepare_is_the_tutorial(counts_adata):
    import scanpy as sc

    prepared = workflow.prepare(counts_adata, n_top_genes=40)
    ref = counts_adata.copy()
    ref.layers["counts"] = ref.X.copy()
    sc.pp.normalize_total(ref, target_sum=1e5)
    sc.pp.log1p(ref)
    ref.raw = ref
    sc.pp.highly_variable_genes(ref, flavor="seurat_v3", layer="counts", n_top_genes=40, subset=True)
    assert list(prepared.var_names) == list(ref.var_names)
    np.testing.assert_allclose(prepared.X.toarray(), ref.X.toarray(), rtol=1e-6)
    np.testing.assert_array_equal(prepared.layers["counts"].toarray(), ref.layers["counts"].toarray())
    assert prepared.raw.shape == counts_adata.shape
    assert "counts" not in counts_adata.layers  # the input is untouched


def test_prepare_from_a_counts_layer(counts_adata):
    counts_adata.layers["raw"] = counts_adata.X.copy()
    counts_adata.X = counts_adata.X.multiply(0.5).tocsr()  # not counts, but not used
    prepared = workflow.prepare(counts_adata, layer="raw", n_top_genes=30)
    assert prepared.n_vars == 30
    assert np.all(prepared.layers["counts"].data == np.round(prepared.layers["counts"].data))


@pytest.mark.parametrize(
    ("change", "kwargs", "match"),
    [
        (None, dict(n_top_genes=100), r"n_top_genes=100 but only 60 of the 60 genes have any counts"),
        ("half", {}, r"non-integer values \(first: \d+\.5 at cell 'cell0'"),
        (None, dict(layer="counts"), r"layer='counts' is not in adata.layers"),
        (None, dict(batch_key="donor"), r"batch_key='donor' is not a column of adata.obs"),
        (None, dict(n_top_genes=0), r"n_top_genes must be a positive integer, got 0"),
    ],
)
def test_prepare_rejects_bad_input(counts_adata, change, kwargs, match):
    if change == "half":
        counts_adata.X = counts_adata.X.multiply(0.5).tocsr()
    with pytest.raises(ldvae.SetupError, match=match):
        workflow.prepare(counts_adata, **kwargs)


def test_run_workflow_writes_every_output(finished):
    result, adata, before = finished
    out = result.out_dir
    for name in ("results.h5ad", "loadings.csv", "top_genes.csv", "report.html", "model/ldvae_model.json",
                 "model/model_state.pt"):
        assert (out / name).is_file(), name
    for name in ("training_curves", "latent_pairs", "loadings_heatmap", "top_genes", "umap_clusters",
                 "umap_factors", "factor_stability"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 5000
        assert (out / "figures" / f"{name}.svg").read_text().lstrip().startswith("<?xml")
    assert all(p.exists() for p in result.files.values())
    assert result.report == out / "report.html"
    assert not list(out.parent.glob(".out.*"))  # no staging directory left behind
    # the input AnnData is not modified
    assert adata.n_vars == before.n_vars and not adata.layers and not adata.obsm


def test_results_read_back(finished):
    import anndata

    result, *_ = finished
    res = anndata.read_h5ad(result.out_dir / "results.h5ad")
    assert res.shape == (300, 40)
    assert res.obsm["X_ldvae"].shape == (300, 4) and res.obsm["X_umap"].shape == (300, 2)
    assert res.varm["ldvae_loadings"].shape == (40, 4)
    assert [f"Z_{i}" for i in range(4)] == [c for c in res.obs.columns if c.startswith("Z_")]
    np.testing.assert_allclose(res.obs["Z_1"], res.obsm["X_ldvae"][:, 1])
    assert res.obs["leiden"].nunique() >= 1
    assert res.raw.shape == (300, 60)
    assert {"counts"} <= set(res.layers)
    assert {"ldvae", "ldvae_setup", "ldvae_workflow", "neighbors", "umap", "leiden"} <= set(res.uns)
    assert res.uns["ldvae_workflow"]["settings"]["max_epochs"] == 3
    loadings = pd.read_csv(result.out_dir / "loadings.csv", index_col=0)
    np.testing.assert_allclose(loadings.to_numpy(), res.varm["ldvae_loadings"], rtol=1e-5)
    table = pd.read_csv(result.out_dir / "top_genes.csv")
    assert len(table) == 4 * 2 * 5 and set(table["direction"]) == {"negative", "positive"}
    # the saved model loads on the results and gives the same latent space
    model = ldvae.LinearSCVI.load(result.out_dir / "model", adata=res, accelerator="cpu")
    np.testing.assert_allclose(model.get_latent_representation(), res.obsm["X_ldvae"], rtol=1e-4, atol=1e-5)


def test_stability_of_the_workflow_factors(finished):
    import anndata

    result, *_ = finished
    table = pd.read_csv(result.out_dir / "factor_stability.csv", index_col="factor")
    # the report's own model is the reference: its factors, each matched to itself
    assert sorted(table.index) == [f"Z_{i}" for i in range(4)]
    assert (table["match_run_0"] == table.index).all() and (table["correlation_run_0"] == 1.0).all()
    others = table[["correlation_run_1", "correlation_run_2"]]
    np.testing.assert_allclose(table["stability"], others.median(axis=1))
    assert ((others >= 0) & (others <= 1)).all().all()
    assert (table["stable"] == (table["stability"] >= 0.9)).all()
    res = anndata.read_h5ad(result.out_dir / "results.h5ad")
    stored = res.uns["ldvae_workflow"]["stability"]
    seeds = list(stored["seeds"])
    assert seeds[0] == 0 and len(set(seeds)) == 3 and res.uns["ldvae_workflow"]["settings"]["stability_seeds"] == 2
    assert seeds[1:] == workflow.refit_seeds(0, 2)
    assert res.uns["ldvae_workflow"]["settings"]["init"] == "pca"  # every fit starts from the components
    assert res.uns["ldvae_workflow"]["settings"]["split_seed"] == 0
    settings = res.uns["ldvae_workflow"]["settings"]
    # scanpy's plots of the results take the report's colours
    assert list(res.uns["leiden_colors"]) == category_palette(res.obs["leiden"])
    assert len(res.uns["leiden_colors"]) == res.obs["leiden"].nunique()
    assert settings["analysis time, reading to clusters (s)"] > 0  # the tiny fit itself may round to 0.0 s
    assert settings["analysis time, reading to clusters (s)"] >= settings["training time (s)"] >= 0
    np.testing.assert_allclose(pd.Series(stored["stability"], index=stored["factor"])[table.index], table["stability"])
    html = (result.out_dir / "report.html").read_text()
    assert "<h2>Factor stability across seeds</h2>" in html and "<th>stable across seeds</th>" in html
    start = html.index("<h2>Top loadings by magnitude</h2>")
    top = html[start:html.index("<h2>", start + 1)]
    n_yes = top.count("<td>yes</td>")
    assert n_yes == int(table["stable"].sum()) and n_yes + top.count("<td>no</td>") == 4


def test_reproducible_factors_of_the_workflow(finished, tmp_path, capsys):
    import anndata

    from ldvae.cli.app import main
    from ldvae.factors.consensus import read_factors

    result, *_ = finished
    f = result.factors
    assert f.n_runs == 3 and list(f.table.index) == [f"F_{i}" for i in range(4)]
    res = anndata.read_h5ad(result.out_dir / "results.h5ad")
    back = read_factors(res)
    np.testing.assert_allclose(back.latent.to_numpy(), f.latent.to_numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.obs[list(f.table.index)].to_numpy(), f.latent.to_numpy(), rtol=1e-5, atol=1e-6)
    assert set(res.obs[list(f.table.index)].dtypes) == {np.dtype(np.float32)} == set(res.obs[["Z_0", "Z_1"]].dtypes)
    table = pd.read_csv(result.out_dir / "factors.csv")
    assert list(table["factor"]) == list(f.table.index)
    np.testing.assert_allclose(table["reproducibility"], f.table["reproducibility"], rtol=1e-6)
    assert table["marks"].str.contains(r"AUC \d\.\d\d\)$").all()
    genes = pd.read_csv(result.out_dir / "factor_genes.csv")
    assert set(genes["factor"]) <= set(f.table.index) and (genes["rank"] <= 10).all()
    html = (result.out_dir / "report.html").read_text()
    assert "<h2>Reproducible factors</h2>" in html and "3 fits that differ only by their seed" in html
    # the report opens with where to start: the factors that come back, what each marks
    assert html.index("<h2>Summary</h2>") < html.index("<h2>Data</h2>")
    summary = html[html.index("<h2>Summary</h2>"):html.index("<h2>Data</h2>")]
    assert f"{int(f.table['reproducible'].sum())} of {len(f.table)} factors F_k are reproducible" in summary
    assert all(f"<td>{name}</td>" in summary for name in f.table.index)
    assert (result.out_dir / "figures" / "umap_reproducible_factors.png").is_file()
    # `ldvae factors` shows the workflow's factors, not the saved model's own rotated alone
    out = tmp_path / "f"
    assert main(["factors", str(result.out_dir / "model"), "--adata", str(result.out_dir / "results.h5ad"),
                 "--out-dir", str(out)]) == 0
    assert "Factors (3 fit(s);" in capsys.readouterr().out
    again = pd.read_csv(out / "factors.csv")
    np.testing.assert_allclose(again["reproducibility"], table["reproducibility"], rtol=1e-6)


def test_refit_seeds_are_distinct_and_not_shared_between_seeds():
    a, b = workflow.refit_seeds(0, 3), workflow.refit_seeds(1, 3)
    assert len(set(a)) == 3 and 0 not in a and a == workflow.refit_seeds(0, 3)
    assert not set(a) & set(b) and not {0, 1} & set(a + b)  # another seed: no fit in common
    assert all(0 <= s <= workflow.MAX_SEED for s in a + b) and workflow.refit_seeds(5, 0) == []


def test_analyses_with_other_seeds_hold_out_the_same_cells():
    from ldvae.train.batches import split_cells

    sim = ldvae.simulate(200, 30, 2, seed=4)
    fits = {(seed, split): workflow.fit(sim.copy(), n_latent=2, max_epochs=1, seed=seed, progress_bar=False,
                                        **({} if split is None else {"split_seed": split}))
            for seed, split in ((1, None), (2, None), (1, 5))}
    held_out = {key: m.validation_indices_ for key, m in fits.items()}
    np.testing.assert_array_equal(held_out[1, None], held_out[2, None])
    np.testing.assert_array_equal(held_out[1, None], split_cells(200, None, None, 0, 128)[1])
    np.testing.assert_array_equal(held_out[1, 5], split_cells(200, None, None, 5, 128)[1])
    assert not np.array_equal(held_out[1, 5], held_out[1, None])
    # the seed still moves the fit: its minibatches and samples are its own
    assert not np.allclose(fits[1, None].get_loadings(), fits[2, None].get_loadings())


def test_split_seed_must_be_a_count(counts_adata, tmp_path):
    with pytest.raises(ldvae.SetupError, match=r"split_seed must be an integer in \[0, 4294967295\], got -2 \(--split-seed\)"):
        workflow.run_workflow(counts_adata, out_dir=tmp_path / "o", **{**FAST, "split_seed": -2})
    assert list(tmp_path.iterdir()) == []


def test_stability_seeds_must_be_a_count(counts_adata, tmp_path):
    match = r"stability_seeds must be an integer >= 0, got -1 \(--stability-seeds\)"
    with pytest.raises(ldvae.SetupError, match=match):
        workflow.run_workflow(counts_adata, out_dir=tmp_path / "o", **{**FAST, "stability_seeds": -1})
    assert list(tmp_path.iterdir()) == []


def test_figures_from_results_on_disk(finished):
    import anndata
    from matplotlib.figure import Figure

    result, *_ = finished
    res = anndata.read_h5ad(result.out_dir / "results.h5ad")
    history = history_from_adata(res)
    assert set(history) >= {"elbo_train", "elbo_validation"}
    pd.testing.assert_frame_equal(history["elbo_train"], result.model.history["elbo_train"], check_dtype=False)
    figs = [training_curves(history), latent_pairs(res), latent_pairs(res, color="Z_0"),
            loadings_heatmap(res, n_genes=3), top_genes_bars(res, n_genes=2), umap(res, color=["leiden", "Z_2"])]
    assert all(isinstance(f, Figure) for f in figs)
    assert len(latent_pairs(res).axes) >= 2  # Z_0/Z_1 and Z_2/Z_3
    # the AnnData itself, and one column by name, as scanpy's plots take them
    from_adata = training_curves(res).axes[0].lines
    assert [list(a.get_ydata()) for a in from_adata] == [list(a.get_ydata()) for a in figs[0].axes[0].lines]
    assert len(umap(res, color="leiden").axes) == 1


def test_cells_without_a_label_are_drawn_grey_and_counted(finished):
    import anndata
    from matplotlib.colors import to_rgba

    result, *_ = finished
    res = anndata.read_h5ad(result.out_dir / "results.h5ad")
    labels = np.where(np.arange(res.n_obs) % 2 == 0, "a", "b").astype(object)
    labels[:7] = np.nan
    res.obs["label"] = pd.Categorical(labels)
    ax = umap(res, color=["label"]).axes[0]
    grey, drawn = ax.collections[0], ax.collections[1]
    assert len(grey.get_offsets()) == 7 and len(drawn.get_offsets()) == res.n_obs - 7
    assert {tuple(c) for c in grey.get_facecolors()} == {to_rgba("#d3d3d3")}
    assert to_rgba("#d3d3d3") not in {tuple(c) for c in drawn.get_facecolors()}  # no labelled cell is grey
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "no label (7)"]


def test_top_genes_table_and_printout():
    loadings = pd.DataFrame({"Z_0": [3.0, -2.0, 0.5, -0.1], "Z_1": [0.0, 1.0, -1.0, 2.0]},
                            index=["A", "B", "C", "D"])
    table = top_genes(loadings, 1)
    assert table.to_dict("records") == [
        {"factor": "Z_0", "direction": "negative", "rank": 1, "gene": "B", "loading": -2.0},
        {"factor": "Z_0", "direction": "positive", "rank": 1, "gene": "A", "loading": 3.0},
        {"factor": "Z_1", "direction": "negative", "rank": 1, "gene": "C", "loading": -1.0},
        {"factor": "Z_1", "direction": "positive", "rank": 1, "gene": "D", "loading": 2.0},
    ]
    text = workflow.format_top_genes(top_genes(loadings, 2))
    assert text.startswith("Top loadings by magnitude")
    assert "Z_0:\tB, -2.0\tD, -0.1" in text and "\tC, 0.5\tA, 3.0" in text
    with pytest.raises(ValueError, match="n_genes must be a positive integer, got 0"):
        top_genes(loadings, 0)


def test_loadings_frame_needs_results(counts_adata):
    with pytest.raises(KeyError, match=r"Run model.write_results\(adata, key_added='ldvae'\) first"):
        loadings_frame(counts_adata)


def test_refuses_to_overwrite_and_replaces_when_asked(counts_adata, tmp_path):
    out = tmp_path / "out"
    workflow.run_workflow(counts_adata, out_dir=out, **FAST)
    (out / "report.html").write_text("old report")
    with pytest.raises(FileExistsError, match="already exists. Pass --overwrite"):
        workflow.run_workflow(counts_adata, out_dir=out, **FAST)
    assert (out / "report.html").read_text() == "old report"
    workflow.run_workflow(counts_adata, out_dir=out, overwrite=True, report_sections=[
        ("Extra pair", "<p>pair-section</p>"),
        lambda model, adata: ("From a function", f"<p>{model.init_params_['n_latent']} factors</p>"),
    ], **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    html = (out / "report.html").read_text()
    assert "<h2>Extra pair</h2><p>pair-section</p>" in html
    assert "<h2>From a function</h2><p>4 factors</p>" in html
    assert html.index("Top loadings by magnitude") < html.index("Extra pair")


def test_failure_while_writing_leaves_nothing(counts_adata, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(workflow, "build_report", broken)
    with pytest.raises(OSError, match="disk full"):
        workflow.run_workflow(counts_adata, out_dir=tmp_path / "out", **FAST)
    assert list(tmp_path.iterdir()) == []


def test_bad_options_fail_before_any_work(counts_adata, tmp_path):
    with pytest.raises(ldvae.SetupError, match=r"figure_formats: 'jpg' is not one of"):
        workflow.run_workflow(counts_adata, out_dir=tmp_path / "o", figure_formats=("jpg",), **FAST)
    with pytest.raises(ldvae.SetupError, match=r"color_by='cell_type' is not a column of adata.obs"):
        workflow.run_workflow(counts_adata, out_dir=tmp_path / "o", color_by=["cell_type"], **FAST)
    with pytest.raises(ldvae.SetupError, match=r"lr must be a positive finite number, got -1 \(--lr\)"):
        workflow.run_workflow(counts_adata, out_dir=tmp_path / "o", **{**FAST, "lr": -1})
    assert list(tmp_path.iterdir()) == []


def test_build_report_embeds_figures_and_escapes(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure()
    fig.subplots().plot([0, 1])
    fig.savefig(tmp_path / "f.png")
    table = pd.DataFrame({"factor": ["Z_0", "Z_0"], "direction": ["negative", "positive"], "rank": [1, 1],
                          "gene": ["<B>", "A"], "loading": [-1.0, 2.0]})
    html = build_report(title="t<1>", data_summary={"cells": 3}, settings={"lr": 0.1},
                        figures=[("cap", tmp_path / "f.png")], top_genes=table, footer="Data: x")
    assert "data:image/png;base64," in html and "t&lt;1&gt;" in html and "&lt;B&gt; (-1.00)" in html
    with pytest.raises(ValueError, match="only"):
        build_report(title="t", data_summary={}, settings={}, figures=[("cap", tmp_path / "f.gif")])


def test_one_fit_leaves_reproducibility_unassessed_and_a_measurement_marks_nothing(counts_adata, tmp_path):
    counts_adata.obs["score"] = np.linspace(0.0, 1.0, counts_adata.n_obs)  # one value per cell: not a grouping
    result = workflow.run_workflow(counts_adata, out_dir=tmp_path / "o", color_by=["score", "group"], **FAST)
    table = pd.read_csv(result.out_dir / "factors.csv")
    assert (table["reproducible"] == "not assessed (one fit)").all()
    groups = {re.fullmatch(r"(?:none \(best: )?(.+?)(?: \(|, )AUC .*", m).group(1) for m in table["marks"]}
    assert groups <= {"group 0", "group 1", "group 2"}  # the groups of 'group', the first column that sorts cells into groups
    html = (result.out_dir / "report.html").read_text()
    assert "not assessed (one fit)" in html and ">NaN<" not in html and ">nan<" not in html
    assert "<h2>Factors, rotated (one fit)</h2>" in html and "<h2>Reproducible factors</h2>" not in html
