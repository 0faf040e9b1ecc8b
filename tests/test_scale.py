"""Scale: out-of-core training and queries from .h5ad and .zarr, and a 2-process DDP fit.

Quality is compared on the same simulated data, split and seed, within the noise of the
in-memory fit itself: the spread over training seeds of the validation ELBO (and of the
training ELBO). The validation pass runs in eval mode with batch-norm running statistics
(momentum 0.01), which lag the parameters while they still move fast: after 40 epochs the
validation ELBO still falls by ~6 nats between checks and its seed-to-seed sd is ~1.8
nats. So the fits run 120 epochs (the KL weight reaches 1 at epoch 60), where it has
nearly levelled off, and the checks use the median of the last 4 validations (epochs
90-120; seed-to-seed sd ~0.7 nats on ~186) and the last training ELBO.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import ldvae
from ldvae.data import backed as stream
from ldvae.train.streaming import StreamingSource
from ldvae.data.contract import SetupError
from ldvae.train.loop import minibatches, split_indices

FIT = dict(max_epochs=120, lr=3e-3, train_size=0.7, check_val_every_n_epoch=10, seed=0,
           progress_bar=False, accelerator="cpu")
NOISE_SEEDS = (1, 2, 3)  # in-memory refits beside the reference's seed 0


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """2000 cells x 40 genes (counts in X, 2 batches) as .h5ad and .zarr, and in memory."""
    d = tmp_path_factory.mktemp("scale")
    adata = ldvae.simulate(2000, 40, 3, n_batches=2, seed=3)
    del adata.layers["counts"]
    adata.write_h5ad(d / "sim.h5ad")
    adata.write_zarr(d / "sim.zarr")
    return {"memory": adata, "h5ad": d / "sim.h5ad", "zarr": d / "sim.zarr", "dir": d}


def _open(stores, kind):
    if kind == "memory":
        return stores["memory"].copy()
    if kind == "h5ad":
        return ad.read_h5ad(stores["h5ad"], backed="r")
    return stream.read_backed(stores["zarr"])


def _values(history: dict, key: str) -> np.ndarray:
    """Per-epoch values from ``model.history`` (DataFrames) or a saved model's JSON ([[epoch, value]])."""
    h = history[key]
    return h.iloc[:, 0].to_numpy() if isinstance(h, pd.DataFrame) else np.asarray(h)[:, 1]


def _quality(history: dict) -> tuple[float, float]:
    """(median of the last 4 validation ELBOs, last training ELBO)."""
    return float(np.median(_values(history, "elbo_validation")[-4:])), float(_values(history, "elbo_train")[-1])


def _fit_in_memory(stores, seed: int):
    adata = _open(stores, "memory")
    ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")
    model = ldvae.LinearSCVI(adata, n_latent=3)
    model.train(**{**FIT, "seed": seed})
    return model


@pytest.fixture(scope="module")
def reference(stores):
    return _fit_in_memory(stores, FIT["seed"])


@pytest.fixture(scope="module")
def in_memory_quality(stores, reference) -> np.ndarray:
    """(validation, training) ELBO of the in-memory fits with seeds 0-3, (4, 2); each seed
    also draws its own validation cells."""
    return np.array([_quality(reference.history)] + [_quality(_fit_in_memory(stores, s).history) for s in NOISE_SEEDS])


@pytest.fixture(scope="module")
def expected(in_memory_quality) -> np.ndarray:
    """The quality another way of fitting should reach: the in-memory fits' mean (a single
    reference fit would add its own seed noise to every comparison)."""
    return in_memory_quality.mean(axis=0)


@pytest.fixture(scope="module")
def tolerance(in_memory_quality) -> np.ndarray:
    """How far a fit may land from ``expected`` and still be "the same fit": 3 sd of the
    in-memory fits over seeds, at least (0.5, 0.2) nats."""
    return np.maximum(3 * np.std(in_memory_quality, axis=0, ddof=1), [0.5, 0.2])


def _assert_same_quality(got, ref, tolerance):
    """Validation and training ELBO within the seed-to-seed noise of the in-memory fit."""
    assert (np.abs(np.subtract(got, ref)) <= tolerance).all(), f"(validation, training) {got} vs {ref}: " \
        f"differences {np.subtract(got, ref)}, tolerance {tolerance}"


# --- reading ---------------------------------------------------------------------------------


def test_backed_setup_and_prior_match_in_memory(stores, reference):
    for kind in ("h5ad", "zarr"):
        adata = _open(stores, kind)
        assert stream.counts_on_disk(adata, {})
        ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")
        assert adata.uns["ldvae_setup"] == reference.setup_
        model = ldvae.LinearSCVI(adata, n_latent=3)
        for name in ("library_log_means", "library_log_vars"):
            np.testing.assert_allclose(getattr(model.module, name), getattr(reference.module, name), rtol=1e-5)


def test_streamed_epoch_visits_every_training_cell_once(stores):
    adata = _open(stores, "h5ad")
    ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")
    train_idx, val_idx = split_indices(adata.n_obs, 0.9, None, 0)
    # Small chunks and buffers: many buffers, leftovers carried between them.
    source = StreamingSource.from_adata(adata, adata.uns["ldvae_setup"], train_idx, val_idx, 50,
                                               chunk_size=64, buffer_chunks=3)
    counts = stores["memory"].X
    assert source.steps_per_epoch == len(minibatches(torch.arange(len(train_idx)), 50))
    for epoch in range(2):
        batches = list(source.train_batches(torch.Generator().manual_seed(epoch)))
        assert len(batches) == source.steps_per_epoch
        assert all(b.n_cells >= 2 for b in batches)
        assert sum(b.n_cells for b in batches) == source.n_train == len(train_idx)
        totals = np.sort(np.concatenate([b.x.sum(1).numpy() for b in batches]))
        np.testing.assert_allclose(totals, np.sort(np.asarray(counts[train_idx].sum(1)).ravel()))
    val = list(source.val_batches())
    np.testing.assert_allclose(np.concatenate([b.log_total.numpy() for b in val]),
                               np.log(np.asarray(counts[np.sort(val_idx)].sum(1)).ravel()), rtol=1e-6)


def test_single_leftover_cell_joins_a_full_batch(stores):
    adata = _open(stores, "h5ad")
    ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")
    train_idx = np.arange(201)  # 4 batches of 50 and one cell
    source = StreamingSource.from_adata(adata, adata.uns["ldvae_setup"], train_idx, np.arange(201, 300), 50,
                                               chunk_size=32, buffer_chunks=2)
    sizes = [b.n_cells for b in source.train_batches(torch.Generator().manual_seed(0))]
    assert sorted(sizes) == [50, 50, 50, 51]


def test_streaming_validation_names_the_bad_cell(tmp_path):
    x = sp.random(300, 20, density=0.3, format="csr", random_state=0, dtype=np.float32)
    x.data = np.ceil(x.data * 5)
    x[257, 3] = -2.0
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(300)]),
                       var=pd.DataFrame(index=[f"g{i}" for i in range(20)]))
    adata.write_h5ad(tmp_path / "bad.h5ad")
    backed = ad.read_h5ad(tmp_path / "bad.h5ad", backed="r")
    with pytest.raises(SetupError, match=r"negative values \(first: -2 at cell 'c257', gene 'g3'\)"):
        ldvae.LinearSCVI.setup_anndata(backed)


def test_read_backed_errors(stores, tmp_path):
    with pytest.raises(SetupError, match=r"has no 'layers/counts' .*Pass the layer holding raw counts"):
        stream.read_backed(stores["h5ad"], layer="counts")
    csc = ad.AnnData(X=sp.csc_matrix(np.ones((5, 3), dtype=np.float32)))
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(SetupError, match=r"stored as 'csc_matrix'; streaming needs CSR \(cells are rows\) or a dense"):
        stream.read_backed(tmp_path / "csc.h5ad")


def test_streaming_hvg_matches_scanpy_seurat_v3(stores):
    import scanpy as sc

    threads = torch.get_num_threads()
    for batch_key in (None, "batch"):
        expected = sc.pp.highly_variable_genes(stores["memory"].copy(), flavor="seurat_v3", n_top_genes=10,
                                               batch_key=batch_key, inplace=False)
        torch.set_num_threads(threads)  # scanpy's numba kernels leave torch with more threads (10x slower fits)
        got = stream.highly_variable_genes(_open(stores, "h5ad"), 10, batch_key=batch_key, inplace=False)
        for col in ("means", "variances", "variances_norm"):
            np.testing.assert_allclose(got[col], expected[col], rtol=1e-5)
        assert list(got.index[got.highly_variable]) == list(expected.index[expected.highly_variable])


# --- training and queries --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["h5ad", "zarr"])
def test_out_of_core_fit_matches_in_memory_quality(stores, expected, tolerance, kind):
    adata = _open(stores, kind)
    ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")
    model = ldvae.LinearSCVI(adata, n_latent=3)
    model.train(**FIT)
    _assert_same_quality(_quality(model.history), expected, tolerance)


def _backed(stores, kind, reference):
    adata = _open(stores, kind)
    adata.uns["ldvae_setup"] = reference.setup_
    return adata


def test_streamed_latent_equals_in_memory_and_writes_npy(stores, reference, tmp_path):
    expected = reference.get_latent_representation()
    backed = _backed(stores, "zarr", reference)
    got = reference.get_latent_representation(backed)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    idx = np.array([1999, 3, 1024, 3, 0])
    out = reference.get_latent_representation(backed, idx, batch_size=2, out=tmp_path / "z.npy")
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), expected[idx], rtol=1e-5, atol=1e-5)
    assert isinstance(out, np.memmap)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.npy"]  # no temporary file left
    m, v = reference.get_latent_representation(backed, return_dist=True)
    np.testing.assert_allclose(m, expected, rtol=1e-5, atol=1e-5)
    assert (v > 0).all()
    with pytest.raises(ValueError, match=r"out must be a \.npy path"):
        reference.get_latent_representation(backed, out=tmp_path / "z.csv")
    with pytest.raises(ValueError, match=r"cannot be combined with return_dist=True"):
        reference.get_latent_representation(backed, return_dist=True, out=tmp_path / "z.npy")


def _same(got, expected):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Observation names are not unique")  # repeated cells in idx
@pytest.mark.parametrize("kind", ["h5ad", "zarr"])
def test_streamed_queries_equal_in_memory(stores, reference, kind, tmp_path):
    """Every posterior query on counts left on disk gives the in-memory answer (same seed,
    same minibatches), also for unsorted, repeated indices read across many minibatches;
    cells x genes results written with out= equal the in-memory ones."""
    m, backed = reference, _backed(stores, kind, reference)
    idx = np.concatenate([np.random.default_rng(0).permutation(2000)[:300], [5, 5, 1999]])
    for kwargs in (
        {},
        {"indices": idx, "batch_size": 37},
        {"indices": idx, "n_samples": 3, "return_mean": False, "transform_batch": ["b0", "b1"]},
        {"library_size": "latent", "gene_list": ["gene3", "gene0"], "n_samples_overall": 50},
    ):
        _same(m.get_normalized_expression(backed, return_numpy=True, **kwargs),
              m.get_normalized_expression(return_numpy=True, **kwargs))
    frame = m.get_normalized_expression(backed, indices=idx)
    assert list(frame.index) == list(stores["memory"].obs_names[idx])
    kwargs = {"indices": idx, "batch_size": 64}
    _same(m.get_elbo(backed, **kwargs), m.get_elbo(**kwargs))
    _same(m.get_reconstruction_error(backed, **kwargs)["reconstruction_loss"],
          m.get_reconstruction_error(**kwargs)["reconstruction_loss"])
    _same(m.get_latent_library_size(backed, **kwargs), m.get_latent_library_size(**kwargs))
    _same(m.get_elbo(backed, return_mean=False), m.get_elbo(return_mean=False))
    _same(m.get_marginal_ll(backed, idx, n_mc_samples=20), m.get_marginal_ll(indices=idx, n_mc_samples=20))
    _same(m.get_latent_library_size(backed, give_mean=False), m.get_latent_library_size(give_mean=False))
    for kwargs in ({"n_samples": 2}, {"n_samples": 2, "give_mean": True, "indices": idx}):
        got, expected = m.get_likelihood_parameters(backed, **kwargs), m.get_likelihood_parameters(**kwargs)
        assert got.keys() == expected.keys() == {"mean", "dispersions"}
        for key in got:
            _same(got[key], expected[key])
    expected = m.posterior_predictive_sample(indices=idx, batch_size=50)
    assert abs(m.posterior_predictive_sample(backed, idx, batch_size=50) - expected).max() == 0
    corr = m.get_feature_correlation_matrix(backed, indices=idx[:100], n_samples=2)
    _same(corr, m.get_feature_correlation_matrix(indices=idx[:100], n_samples=2))

    # cells x genes results written to disk, minibatch by minibatch
    rho = m.get_normalized_expression(backed, indices=idx, batch_size=37, out=tmp_path / "rho.npy")
    assert isinstance(rho, np.memmap)
    _same(np.load(tmp_path / "rho.npy"), m.get_normalized_expression(indices=idx, batch_size=37, return_numpy=True))
    draws = m.get_normalized_expression(backed, n_samples=2, return_mean=False, out=tmp_path / "draws.npy")
    _same(draws, m.get_normalized_expression(n_samples=2, return_mean=False))
    params = m.get_likelihood_parameters(backed, n_samples=2, out=tmp_path / "params")
    expected_params = m.get_likelihood_parameters(n_samples=2)
    for key in ("mean", "dispersions"):
        _same(np.load(tmp_path / "params" / f"{key}.npy"), expected_params[key])
        assert params[key].shape == (2, 2000, 40)
    x = m.posterior_predictive_sample(backed, idx, batch_size=50, out=tmp_path / "ppc.h5ad")
    assert abs(x[:] - expected).max() == 0
    written = ad.read_h5ad(tmp_path / "ppc.h5ad")
    assert list(written.obs_names) == list(stores["memory"].obs_names[idx])
    assert list(written.var_names) == list(m.var_names_)
    assert abs(written.X - expected).max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draws.npy", "params", "ppc.h5ad", "rho.npy"]


def test_streamed_query_errors(stores, reference, tmp_path):
    backed = _backed(stores, "h5ad", reference)
    with pytest.raises(ValueError, match=r"out must be a \.npy path, got '.*rho\.csv'"):
        reference.get_normalized_expression(backed, out=tmp_path / "rho.csv")
    with pytest.raises(ValueError, match=r"cannot be a DataFrame\. Pass return_numpy=None or True with out="):
        reference.get_normalized_expression(backed, return_numpy=False, out=tmp_path / "rho.npy")
    with pytest.raises(ValueError, match=r"out must be a directory \(it receives mean\.npy, dispersions\.npy\)"):
        reference.get_likelihood_parameters(backed, out=tmp_path / "params.npy")
    with pytest.raises(ValueError, match=r"out must be an \.h5ad path, got '.*x\.npy'"):
        reference.posterior_predictive_sample(backed, out=tmp_path / "x.npy")
    with pytest.raises(ValueError, match=r"writes one sample .* got n_samples=2\. Pass n_samples=1"):
        reference.posterior_predictive_sample(backed, n_samples=2, out=tmp_path / "x.h5ad")
    assert list(tmp_path.iterdir()) == []

    # The checks of an in-memory query run on each minibatch read, naming the cell; a cell
    # without counts is read as in memory.
    x = stores["memory"].X[:300].copy()
    x[257] = 0
    x.eliminate_zeros()
    bad = ad.AnnData(X=x, obs=stores["memory"].obs.iloc[:300], var=stores["memory"].var)
    bad.write_h5ad(tmp_path / "empty.h5ad")
    backed = ad.read_h5ad(tmp_path / "empty.h5ad", backed="r")
    backed.uns["ldvae_setup"] = reference.setup_
    in_memory = bad.copy()
    in_memory.uns["ldvae_setup"] = reference.setup_
    _same(reference.get_elbo(backed, batch_size=100, return_mean=False),
          reference.get_elbo(in_memory, batch_size=100, return_mean=False))
    x[3, 0] = 0.5
    bad.X = x
    bad.write_h5ad(tmp_path / "fraction.h5ad")
    backed = ad.read_h5ad(tmp_path / "fraction.h5ad", backed="r")
    backed.uns["ldvae_setup"] = reference.setup_
    with pytest.raises(SetupError, match=r"non-integer values \(first: 0\.5 at cell 'cell3', gene 'gene0'\)"):
        reference.get_normalized_expression(backed, out=tmp_path / "rho.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.h5ad", "fraction.h5ad"]  # no partial output


def test_out_never_writes_over_a_file(stores, reference, tmp_path):
    """out= naming an existing file (the backed input itself, or an earlier result) is refused
    before any work, and the file is left as it was."""
    import shutil

    victim = tmp_path / "victim.h5ad"
    shutil.copy(stores["h5ad"], victim)
    before = victim.read_bytes()
    backed = ad.read_h5ad(victim, backed="r")
    backed.uns["ldvae_setup"] = reference.setup_
    with pytest.raises(FileExistsError, match=r"out='.*victim\.h5ad' exists; results are never written over"):
        reference.posterior_predictive_sample(backed, out=victim)
    (tmp_path / "z.npy").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=r"z\.npy' exists"):
        reference.get_latent_representation(backed, out=tmp_path / "z.npy")
    with pytest.raises(FileExistsError, match=r"z\.npy' exists"):
        reference.get_normalized_expression(backed, out=tmp_path / "z.npy")
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "mean.npy").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=r"mean\.npy' exists"):
        reference.get_likelihood_parameters(backed, out=tmp_path / "params")
    backed.file.close()
    assert victim.read_bytes() == before and (tmp_path / "z.npy").read_bytes() == b"mine"
    assert [p.name for p in (tmp_path / "params").iterdir()] == ["mean.npy"]


def test_a_full_disk_fails_before_a_memory_map_is_filled(reference, tmp_path, monkeypatch):
    """The .npy is reserved on disk before it is filled: a full disk raises DiskFullError at
    once (filling a map of a sparse file on a full disk kills the process with SIGBUS)."""
    import errno

    from ldvae.util.io import DiskFullError

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(DiskFullError, match=r"No space left on device while writing .*rho\.npy"):
        reference.get_normalized_expression(out=tmp_path / "rho.npy")
    assert list(tmp_path.iterdir()) == []


def test_backed_counts_in_a_layer_are_recorded_by_the_setup(stores, reference, tmp_path):
    """read_backed(path, layer=L) keeps the counts as layers[L] too, so a model set up with
    layer=L records it and loads with the file read as usual."""
    layered = stores["memory"].copy()
    layered.layers["counts"] = layered.X.copy()
    layered.X = sp.csr_matrix(layered.X.shape, dtype=np.float32)
    layered.write_h5ad(tmp_path / "layered.h5ad")
    backed = stream.read_backed(tmp_path / "layered.h5ad", layer="counts")
    ldvae.LinearSCVI.setup_anndata(backed, layer="counts", batch_key="batch")
    model = ldvae.LinearSCVI(backed, n_latent=2, n_hidden=16)
    model.train(max_epochs=1, progress_bar=False, threads=1)
    model.save(tmp_path / "m")
    again = ldvae.LinearSCVI.load(tmp_path / "m", adata=ad.read_h5ad(tmp_path / "layered.h5ad"))
    assert again.setup_["layer"] == "counts"
    np.testing.assert_allclose(again.get_latent_representation(), model.get_latent_representation(), atol=1e-5)


def test_counts_changed_on_disk_are_refused_not_read(stores, tmp_path):
    """Row offsets that do not fit the file (a file emptied or rewritten by another process
    while open reads as zeros), and a file that changes between reads, raise instead of
    giving other counts."""
    import h5py
    import shutil

    from ldvae.data.disk import open_on_disk

    path = tmp_path / "c.h5ad"
    shutil.copy(stores["h5ad"], path)
    backed = ad.read_h5ad(path, backed="r")
    rows = open_on_disk(backed.X)
    first = rows.rows(0, 5).toarray()
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(SetupError, match=r"c\.h5ad changed on disk while its counts were being read"):
        rows.rows(0, 5)
    backed.file.close()
    with h5py.File(path, "r+") as f:
        f["X/indptr"][-1] = 0
    with pytest.raises(SetupError, match=r"c\.h5ad are damaged: their row offsets \(indptr\) do not fit 2000 cells"):
        open_on_disk(ad.read_h5ad(path, backed="r").X)
    assert first.sum() > 0


def test_a_rank_needs_two_training_cells():
    from ldvae.train.streaming import _n_steps

    assert [_n_steps(n, 4) for n in range(7)] == [0, 0, 1, 1, 1, 1, 2]


def test_streamed_query_memory_is_bounded_by_the_minibatch(tmp_path, monkeypatch):
    """10,000 cells x 1,000 genes on disk (16 MB of counts), queried 200 cells at a time with
    the cells x genes results written to .npy files: no read holds more than a minibatch,
    and the traced peak (NumPy and Python allocations: counts read from disk, results held
    in memory) stays far below the counts or a result (40 MB)."""
    import tracemalloc

    n, n_genes = 10000, 1000
    rng = np.random.default_rng(0)
    x = sp.random(n, n_genes, density=0.2, format="csr", random_state=0, dtype=np.float32,
                  data_rvs=lambda k: rng.integers(1, 20, k))
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]),
                       var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    adata.write_h5ad(tmp_path / "wide.h5ad")
    counts_bytes, result_bytes = x.data.nbytes + x.indices.nbytes, 4 * n * n_genes
    model_data = adata[:1000].copy()
    del adata, x
    ldvae.LinearSCVI.setup_anndata(model_data)
    model = ldvae.LinearSCVI(model_data, n_latent=3)
    model.train(max_epochs=1, progress_bar=False, accelerator="cpu")
    backed = ad.read_h5ad(tmp_path / "wide.h5ad", backed="r")
    backed.uns["ldvae_setup"] = model.setup_
    reads = []
    rows = stream.DiskCSR.rows
    monkeypatch.setattr(stream.DiskCSR, "rows", lambda self, a, b: reads.append(b - a) or rows(self, a, b))

    def peak(query) -> int:
        tracemalloc.start()
        try:
            query()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    streamed = {
        "normalized expression": peak(lambda: model.get_normalized_expression(
            backed, batch_size=200, out=tmp_path / "rho.npy")),
        "likelihood parameters": peak(lambda: model.get_likelihood_parameters(
            backed, batch_size=200, out=tmp_path / "params")),
        "elbo": peak(lambda: model.get_elbo(backed, batch_size=200)),
        "posterior predictive": peak(lambda: model.posterior_predictive_sample(
            backed, batch_size=200, out=tmp_path / "x.h5ad")),
    }
    assert max(reads) == 200 and sum(reads) == 4 * n
    # (A minibatch's nonzeros are NumPy arrays from the compiled gather, so they count here:
    # ~1.3 MB per 200 cells of this data; peaks measured 4.7-6.3 MB.)
    assert max(streamed.values()) < counts_bytes / 2, (streamed, counts_bytes)
    # Controls: a result returned in memory, and counts loaded, are measured above the bound.
    in_memory = peak(lambda: model.get_normalized_expression(backed, batch_size=200, return_numpy=True))
    loaded = peak(lambda: model._data(backed))
    assert min(in_memory - result_bytes, loaded - counts_bytes) > 0, (in_memory, loaded)


# --- distributed -----------------------------------------------------------------------------


def test_ddp_two_ranks_gloo_identical_parameters_and_quality(stores, expected, tolerance, tmp_path):
    """torchrun with 2 CPU processes (gloo), 64 cells per rank and step = the reference's 128."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ldvae.distributed", str(stores["h5ad"]), str(out), "--batch-key", "batch", "--n-latent", "3",
           "--max-epochs", str(FIT["max_epochs"]), "--batch-size", "64", "--lr", str(FIT["lr"]),
           "--train-size", str(FIT["train_size"]), "--check-val-every-n-epoch", str(FIT["check_val_every_n_epoch"]),
           "--check-sync",
           "--latent-out", str(tmp_path / "z.npy")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = FIT["max_epochs"] * len(minibatches(torch.arange(700), 64))  # 1400 training cells, 700 per rank
    assert f"2 ranks, {steps} steps: largest parameter difference between ranks 0 " \
           f"(identical before each of {steps} steps)" in proc.stderr
    assert "train strategy" not in proc.stderr  # no advice to run what is running
    meta = json.loads((out / "ldvae_model.json").read_text())
    _assert_same_quality(_quality(meta["train_state"]["history"]), expected, tolerance)
    loaded = ldvae.LinearSCVI.load(out, adata=stores["memory"].copy())
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), loaded.get_latent_representation(), rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "z.npy"]  # the ranks' temporary file renamed


def test_ddp_refuses_before_any_work(stores, tmp_path):
    """An output that exists, or more ranks than the cells can feed: every rank says so in one
    line before it trains, and none waits for another."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("mine")
    tiny = tmp_path / "tiny.h5ad"
    stores["memory"][:3].copy().write_h5ad(tiny)
    (tmp_path / "z.npy").write_bytes(b"mine")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for data, out, extra, message in (
            (stores["h5ad"], taken, [], "already exists and is not empty"),
            (stores["h5ad"], tmp_path / "new", ["--latent-out", str(tmp_path / "z.npy")], "z.npy already exists"),
            (tiny, tmp_path / "new", [], "2 ranks but 3 cells"),
            (stores["h5ad"], tmp_path / "new", ["--checkpoint-dir", str(tmp_path / "z.npy" / "ck")],
             "checkpoint_dir: '" + str(tmp_path / "z.npy" / "ck") + "' cannot be written"),
            (stores["h5ad"], tmp_path / "new", ["--latent-out", str(tmp_path / "z.npy" / "z.npy")],
             "latent_out: '" + str(tmp_path / "z.npy") + "' cannot be written")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "ldvae.distributed", str(data), str(out), "--max-epochs", "50", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode != 0 and proc.stderr.count(message) == 2, proc.stderr[-3000:]
        assert "steps: largest parameter difference" not in proc.stderr
    assert [p.name for p in taken.iterdir()] == ["mine.txt"] and not (tmp_path / "new").exists()
    assert (tmp_path / "z.npy").read_bytes() == b"mine"


def test_ddp_interrupted_writes_no_model_or_latent(stores, tmp_path):
    """Ctrl-C (SIGINT to torchrun, which passes it to every rank) once training has written a
    checkpoint: no model or latent file looks finished. (A rank that was inside a step when
    another stopped reports the closed connection instead.)"""
    import signal
    import time

    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ldvae.distributed", str(stores["h5ad"]), str(out), "--max-epochs", "100000",
           "--checkpoint-dir", str(ckpt), "--latent-out", str(tmp_path / "z.npy")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not (ckpt / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (ckpt / "checkpoint.pt").exists(), "training never reached its first checkpoint"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert "): interrupted; no model or latent file was written" in err, err[-3000:]  # whichever rank stopped first
    assert not out.exists() and not (tmp_path / "z.npy").exists() and (ckpt / "checkpoint.pt").exists()


def test_the_distributed_command_resumes_and_sets_the_checkpoint_pace(monkeypatch):
    from ldvae import distributed

    seen = {}
    monkeypatch.setattr(distributed, "fit_distributed", lambda *a, **k: seen.update(k["train_kwargs"]))
    monkeypatch.setattr(distributed, "shutdown", lambda: None)
    assert distributed.main(["data.h5ad", "run", "--checkpoint-dir", "ck", "--resume-from", "ck",
                             "--checkpoint-every-n-epochs", "3"]) == 0
    assert seen["resume_from"] == "ck" and seen["checkpoint_dir"] == "ck" and seen["checkpoint_every_n_epochs"] == 3


def test_a_backed_file_with_other_genes_is_told_how_to_subset_it_on_disk(stores, reference, tmp_path):
    """adata[:, genes] of a backed file would be read into memory: the messages name the
    subset that stays on disk, which works."""
    wider = ad.read_h5ad(stores["h5ad"], backed="r")
    wider.uns["ldvae_setup"] = reference.setup_
    with pytest.raises(SetupError, match=r"adata\[:, model.var_names_\]\.copy\(filename='subset\.h5ad'\)"):
        reference.get_latent_representation(wider[:, :20])
    with pytest.raises(SetupError, match=r"adata = adata\.copy\(filename='subset\.h5ad'\) \(a backed AnnData"):
        ldvae.LinearSCVI.setup_anndata(wider[:10])
    subset = wider[:, list(reference.var_names_)].copy(filename=tmp_path / "subset.h5ad")
    assert subset.isbacked
    np.testing.assert_allclose(reference.get_latent_representation(subset), reference.get_latent_representation(),
                               rtol=1e-5, atol=1e-5)
