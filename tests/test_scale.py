"""Scale: out-of-core training and queries from .h5ad and .zarr, and a 2-process DDP fit.

Quality is compared on the same simulated data, split and seed. Single validation ELBOs
of a short fit jump by tens of nats between evaluations (eval-mode batch-norm statistics
lag the parameters), so the checks use the median of the last validations and the last
training ELBO.
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
from ldvae import stream
from ldvae.data import SetupError
from ldvae.train import minibatches, split_indices

FIT = dict(max_epochs=40, lr=3e-3, train_size=0.7, check_val_every_n_epoch=5, seed=0,
           progress_bar=False, accelerator="cpu")


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


def _assert_same_quality(got, ref):
    (val, train), (val_ref, train_ref) = got, ref
    assert abs(train - train_ref) < 0.02 * train_ref, (got, ref)
    assert abs(val - val_ref) < 0.08 * val_ref, (got, ref)


@pytest.fixture(scope="module")
def reference(stores):
    adata = _open(stores, "memory")
    ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")
    model = ldvae.LinearSCVI(adata, n_latent=3)
    model.train(**FIT)
    return model


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
    source = stream.StreamingSource.from_adata(adata, adata.uns["ldvae_setup"], train_idx, val_idx, 50,
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
    source = stream.StreamingSource.from_adata(adata, adata.uns["ldvae_setup"], train_idx, np.arange(201, 300), 50,
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
    dense = ad.AnnData(X=np.ones((5, 3), dtype=np.float32))
    dense.write_h5ad(tmp_path / "dense.h5ad")
    with pytest.raises(SetupError, match=r"stored as 'array'; streaming needs CSR"):
        stream.read_backed(tmp_path / "dense.h5ad")


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
def test_out_of_core_fit_matches_in_memory_quality(stores, reference, kind):
    adata = _open(stores, kind)
    ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")
    model = ldvae.LinearSCVI(adata, n_latent=3)
    model.train(**FIT)
    _assert_same_quality(_quality(model.history), _quality(reference.history))


def test_streamed_latent_equals_in_memory_and_writes_npy(stores, reference, tmp_path):
    expected = reference.get_latent_representation()
    backed = _open(stores, "zarr")
    backed.uns["ldvae_setup"] = reference.setup_
    got = reference.get_latent_representation(backed)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    idx = np.array([1999, 3, 1024, 3, 0])
    out = stream.get_latent_representation(reference, backed, idx, out=tmp_path / "z.npy", chunk_size=100)
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), expected[idx], rtol=1e-5, atol=1e-5)
    assert isinstance(out, np.memmap)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.npy"]  # no temporary file left
    m, v = reference.get_latent_representation(backed, return_dist=True)
    np.testing.assert_allclose(m, expected, rtol=1e-5, atol=1e-5)
    assert (v > 0).all()
    with pytest.raises(ValueError, match=r"out must be a \.npy path"):
        stream.get_latent_representation(reference, backed, out=tmp_path / "z.csv")


# --- distributed -----------------------------------------------------------------------------


def test_ddp_two_ranks_gloo_identical_parameters_and_quality(stores, reference, tmp_path):
    """torchrun with 2 CPU processes (gloo), 64 cells per rank and step = the reference's 128."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ldvae.distributed", str(stores["h5ad"]), str(out), "--batch-key", "batch", "--n-latent", "3",
           "--max-epochs", str(FIT["max_epochs"]), "--batch-size", "64", "--lr", str(FIT["lr"]),
           "--train-size", str(FIT["train_size"]), "--check-val-every-n-epoch", "5", "--check-sync",
           "--latent-out", str(tmp_path / "z.npy")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = 40 * len(minibatches(torch.arange(700), 64))  # 1400 training cells, 700 per rank
    assert f"2 ranks, {steps} steps: largest parameter difference between ranks 0 " \
           f"(identical before each of {steps} steps)" in proc.stderr
    meta = json.loads((out / "ldvae_model.json").read_text())
    _assert_same_quality(_quality(meta["train_state"]["history"]), _quality(reference.history))
    loaded = ldvae.LinearSCVI.load(out, adata=stores["memory"].copy())
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), loaded.get_latent_representation(), rtol=1e-4, atol=1e-4)
