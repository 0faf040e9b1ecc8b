"""Mapping new cells onto a trained model: genes aligned to the reference's, new batches added,
only their decoder columns (and the encoders) fitted, the factors unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import ldvae
from ldvae import LinearSCVI
from ldvae.data.simulate import canonical_correlations


@pytest.fixture(scope="module")
def data():
    full = ldvae.simulate(1200, 60, 3, n_batches=3, seed=11)
    full.obs["batch"] = full.obs["batch"].astype(str)
    ref = full[full.obs["batch"] != "b2"].copy()
    query = full[full.obs["batch"] == "b2"].copy()
    LinearSCVI.setup_anndata(ref, "batch", layer="counts")
    ldvae.settings.seed = 0
    model = LinearSCVI(ref, n_latent=3, n_hidden=32)
    model.train(60, lr=1e-2, progress_bar=False)
    return model, query


def _state(model):
    return {k: v.clone() for k, v in model.module.state_dict().items()}


def test_prepare_reorders_pads_and_drops_genes(data):
    reference, query = data
    shuffled = query[:, np.r_[50:60, 0:40]].copy()  # genes 40..49 missing, order changed
    shuffled.layers["counts"] = shuffled.layers["counts"].tocsr()
    extra = shuffled.copy()
    extra.var_names = [f"x{i}" if i < 3 else g for i, g in enumerate(extra.var_names)]  # 3 unknown genes
    out = LinearSCVI.prepare_query_anndata(shuffled, reference)
    assert list(out.var_names) == list(reference.var_names_) and out is not shuffled
    counts = out.layers["counts"].toarray()
    want = query.layers["counts"].toarray()
    np.testing.assert_array_equal(counts[:, :40], want[:, :40])
    np.testing.assert_array_equal(counts[:, 50:], want[:, 50:])
    assert (counts[:, 40:50] == 0).all()
    assert list(LinearSCVI.prepare_query_anndata(extra, reference).var_names) == list(reference.var_names_)
    assert LinearSCVI.prepare_query_anndata(query, reference, return_reference_var_names=True).equals(
        reference.var_names_)
    none = query.copy()
    none.var_names = [f"y{i}" for i in range(none.n_vars)]
    with pytest.raises(ValueError, match="The query shares no gene with the reference model"):
        LinearSCVI.prepare_query_anndata(none, reference)
    with pytest.raises(ValueError, match=r"inplace=True\) is not supported"):
        LinearSCVI.prepare_query_anndata(query, reference, inplace=True)


def test_mapping_fits_only_the_new_batch_and_keeps_the_factors(data):
    reference, query = data
    before = _state(reference)
    q = LinearSCVI.prepare_query_anndata(query, reference)
    ldvae.settings.seed = 0
    mapped = LinearSCVI.load_query_data(q, reference, train_encoder=False)
    assert mapped.setup_["batch_categories"] == ["b0", "b1", "b2"]
    z_before = mapped.get_latent_representation()
    start = _state(mapped)
    mapped.train(20, lr=1e-2, progress_bar=False)
    after = _state(mapped)
    changed = sorted(k for k in after if not torch.equal(after[k], start[k]))
    assert changed == ["factor_regressor.weight"]
    w0, w1 = start["factor_regressor.weight"], after["factor_regressor.weight"]
    new = 3 + 2  # columns: z (3), batch b0, b1, then b2
    assert torch.equal(w0[:, :new], w1[:, :new]) and not torch.equal(w0[:, new], w1[:, new])
    np.testing.assert_array_equal(mapped.get_loadings().to_numpy(), reference.get_loadings().to_numpy())
    np.testing.assert_array_equal(mapped.get_gene_intercepts().to_numpy(), reference.get_gene_intercepts().to_numpy())
    np.testing.assert_array_equal(mapped.get_latent_representation(), z_before)  # the reference's encoder
    assert all(torch.equal(v, before[k]) for k, v in _state(reference).items())  # the reference is untouched


def test_mapped_query_lands_in_the_reference_factor_space(data):
    reference, query = data
    q = LinearSCVI.prepare_query_anndata(query, reference)
    ldvae.settings.seed = 0
    mapped = LinearSCVI.load_query_data(q, reference)
    mapped.train(30, lr=1e-2, progress_bar=False)
    np.testing.assert_array_equal(mapped.get_loadings().to_numpy(), reference.get_loadings().to_numpy())
    z = mapped.get_latent_representation()
    assert canonical_correlations(z, query.obsm["true_z"]).min() > 0.9
    ref_z, ref_true = reference.get_latent_representation(), reference.adata.obsm["true_z"]
    # the same linear map from true factors to fitted ones holds for reference and query cells
    coef, *_ = np.linalg.lstsq(np.c_[ref_true, np.ones(len(ref_true))], ref_z, rcond=None)
    predicted = np.c_[query.obsm["true_z"], np.ones(query.n_obs)] @ coef
    assert np.corrcoef(predicted.ravel(), z.ravel())[0, 1] > 0.9


def test_mapped_model_saves_and_loads_with_its_new_batch(data, tmp_path):
    reference, query = data
    mapped = LinearSCVI.load_query_data(LinearSCVI.prepare_query_anndata(query, reference), reference)
    mapped.train(2, progress_bar=False)
    mapped.save(tmp_path / "q", save_anndata=True)
    loaded = LinearSCVI.load(tmp_path / "q")
    assert loaded.setup_["batch_categories"] == ["b0", "b1", "b2"]
    np.testing.assert_array_equal(loaded.get_latent_representation(), mapped.get_latent_representation())
    # loaded, it is still a mapped model: more training leaves the reference's factors as they are
    loaded.train(5, lr=1e-2, progress_bar=False)
    np.testing.assert_array_equal(loaded.get_loadings().to_numpy(), reference.get_loadings().to_numpy())
    np.testing.assert_array_equal(loaded.get_gene_intercepts().to_numpy(),
                                  reference.get_gene_intercepts().to_numpy())


def test_mapping_refusals(data, tmp_path):
    reference, query = data
    with pytest.raises(ValueError, match=r"align them first: adata = LinearSCVI.prepare_query_anndata"):
        LinearSCVI.load_query_data(query[:, ::-1].copy(), reference)
    q = LinearSCVI.prepare_query_anndata(query, reference)
    q.obs["batch"] = "b0"  # no new batch: with frozen encoders there is nothing to fit
    mapped = LinearSCVI.load_query_data(q, reference, train_encoder=False)
    with pytest.raises(ValueError, match="Nothing to fit: the query adds no batch to the reference"):
        mapped.train(1)
    mapped = LinearSCVI.load_query_data(q, reference)  # the encoders are free: they are fitted to the query
    before = _state(mapped)
    mapped.train(2, progress_bar=False)
    after = _state(mapped)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("z_encoder.", "l_encoder.")) for k in moved), moved
    reference.save(tmp_path / "ref")
    from_disk = LinearSCVI.load_query_data(LinearSCVI.prepare_query_anndata(query, tmp_path / "ref"), tmp_path / "ref")
    np.testing.assert_array_equal(from_disk.get_loadings().to_numpy(), reference.get_loadings().to_numpy())


def test_ldvae_map_writes_query_results_and_a_joint_report(data, tmp_path, capsys):
    from ldvae.cli.app import main

    reference, query = data
    reference.save(tmp_path / "ref", save_anndata=True)
    q = query.copy()
    q.X = q.layers["counts"].copy()
    del q.layers["counts"]
    q.obs = q.obs.drop(columns=["batch"])
    q.write_h5ad(tmp_path / "query.h5ad")
    code = main(["map", str(tmp_path / "ref"), str(tmp_path / "query.h5ad"), "--out-dir", str(tmp_path / "out"),
                 "--max-epochs", "3", "--no-progress-bar", "--query-batch", "new"])
    assert code == 0
    out = tmp_path / "out"
    assert {"results.h5ad", "model", "report.html", "umap_reference_query.png", "query_latent.csv"} <= {
        p.name for p in out.iterdir()}
    import anndata as ad

    res = ad.read_h5ad(out / "results.h5ad")
    assert res.obsm["X_ldvae"].shape == (query.n_obs, 3) and res.obs["batch"].unique().tolist() == ["new"]
    html = (out / "report.html").read_text()
    assert "Reference and query" in html and "unchanged, so the factors keep their meaning" in html
    assert sp.issparse(res.layers["counts"])
    before = (tmp_path / "query.h5ad").read_bytes()
    (tmp_path / "query.h5ad").rename(out / "query.h5ad")  # the query inside the output directory
    code = main(["map", str(tmp_path / "ref"), str(out / "query.h5ad"), "--out-dir", str(out), "--overwrite",
                 "--max-epochs", "1", "--no-progress-bar", "--query-batch", "new"])
    assert code == 1 and (out / "query.h5ad").read_bytes() == before  # refused: it holds the input
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    reference.save(run_dir / "model", overwrite=True)
    assert main(["map", str(run_dir), str(out / "query.h5ad"), "--out-dir", str(tmp_path / "o2")]) == 1
    assert f"{run_dir / 'model'} does (the layout of `ldvae run`)" in capsys.readouterr().err
    assert main(["map", str(tmp_path / "ref"), str(out / "query.h5ad"), "--out-dir", str(tmp_path / "o3"),
                 "--color-by", "nope"]) == 1
    assert "--color-by 'nope' is a column of neither" in capsys.readouterr().err and not (tmp_path / "o3").exists()


def test_a_mapping_fit_resumes_from_its_checkpoint(data, tmp_path):
    reference, query = data
    q = LinearSCVI.prepare_query_anndata(query, reference)
    first = LinearSCVI.load_query_data(q.copy(), reference)
    first.train(2, progress_bar=False, checkpoint_dir=tmp_path, checkpoint_every_n_epochs=1)
    again = LinearSCVI.load_query_data(q.copy(), reference)
    again.train(4, progress_bar=False, resume_from=tmp_path)  # the optimizer covers the same free parameters
    assert again.train_state_.epoch == 4
    np.testing.assert_array_equal(again.get_loadings().to_numpy(), reference.get_loadings().to_numpy())


def test_ldvae_map_reads_the_query_counts_from_the_layer_named(data, tmp_path, capsys):
    from ldvae.cli.app import main

    reference, query = data
    reference.save(tmp_path / "ref", save_anndata=True)
    q = query.copy()
    q.layers["umi"] = q.layers.pop("counts")
    q.X = q.layers["umi"] * 0.5  # not counts: X holds something else
    q.write_h5ad(tmp_path / "query.h5ad")
    base = ["map", str(tmp_path / "ref"), str(tmp_path / "query.h5ad"), "--max-epochs", "1", "--no-progress-bar"]
    assert main([*base, "--out-dir", str(tmp_path / "o1")]) == 1
    assert "non-integer values" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    assert main([*base, "--out-dir", str(tmp_path / "o2"), "--layer", "raw"]) == 1
    assert "layer='raw' is not in adata.layers (have: 'umi')" in capsys.readouterr().err
    assert main([*base, "--out-dir", str(tmp_path / "o3"), "--layer", "umi"]) == 0


def test_joint_umap_tells_reference_from_query_whatever_the_batch_column_is_called():
    import anndata as ad
    import pandas as pd

    from ldvae.cli.mapping import SIDE, _together

    class Fitted:  # what _together reads of a model
        def __init__(self, batches, setup):
            self.adata = ad.AnnData(obs=pd.DataFrame({"dataset": batches}, index=[f"c{i}" for i in range(len(batches))]))
            self.setup_ = setup

        def get_latent_representation(self):
            return np.zeros((self.adata.n_obs, 2))

    setup = {"batch_key": "dataset"}
    together = _together(Fitted(["a", "b", None], setup), Fitted(["new", "new"], setup), [])
    assert together.obs[SIDE].tolist() == ["reference"] * 3 + ["query"] * 2
    assert together.obs["dataset"].tolist()[:2] == ["a", "b"] and pd.isna(together.obs["dataset"].iloc[2])


def test_ldvae_map_gives_the_query_the_references_named_factors(data, tmp_path, capsys):
    import anndata as ad

    from ldvae.cli.app import main
    from ldvae.factors.consensus import consensus_factors, write_factors

    reference, _ = data
    ref_adata = reference.adata.copy()
    factors = consensus_factors([reference])
    write_factors(ref_adata, factors)  # as `ldvae run` leaves them in results.h5ad
    ref_adata.write_h5ad(tmp_path / "reference.h5ad")
    reference.save(tmp_path / "ref")
    own = reference.adata.copy()  # the reference's own cells, by the reference's encoder: nothing to fit
    own.obs_names = [f"q{i}" for i in range(own.n_obs)]
    own.write_h5ad(tmp_path / "own.h5ad")
    assert main(["map", str(tmp_path / "ref"), str(tmp_path / "own.h5ad"), "--reference-adata",
                 str(tmp_path / "reference.h5ad"), "--out-dir", str(tmp_path / "out"), "--no-progress-bar",
                 "--frozen-encoder"]) == 0
    res = ad.read_h5ad(tmp_path / "out" / "results.h5ad")
    names = list(factors.table.index)
    np.testing.assert_allclose(res.obsm["X_ldvae_factors"], factors.latent.to_numpy(), atol=1e-4)
    np.testing.assert_allclose(res.obs[names].to_numpy(), factors.latent.to_numpy(), atol=1e-4)
    import pandas as pd

    table = pd.read_csv(tmp_path / "out" / "query_latent.csv", index_col=0)
    np.testing.assert_allclose(table[names].to_numpy(), factors.latent.to_numpy(), atol=1e-4)
