"""Hostile input is refused with one clear line and leaves nothing behind: bad batch columns
and gene sets too small for the HVG fit (refused before scanpy, whose loess crashes the
process), downloads that are truncated, HTML pages or interrupted, dense counts on disk,
and user strings that matplotlib would read as mathtext."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import ldvae
from ldvae import cli
from ldvae.data import SetupError
from ldvae.readers import ReadError, download, read_counts
from ldvae.workflow import MIN_VARYING_GENES, prepare

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--n-top-genes", "20", "--n-latent", "3", "--max-epochs", "2", "--check-val-every-n-epoch", "1",
        "--n-neighbors", "10", "--no-progress-bar"]


def _counts(n_cells: int = 200, n_genes: int = 40, seed: int = 3) -> ad.AnnData:
    sim = ldvae.simulate(n_cells, n_genes, 3, seed=seed)
    return ad.AnnData(X=sp.csr_matrix(sim.layers["counts"], dtype=np.float32),
                      obs=pd.DataFrame(index=sim.obs_names), var=pd.DataFrame(index=sim.var_names))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("ldvae: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- batch columns and the HVG fit ------------------------------------------------------------


@pytest.fixture
def no_scanpy_hvg(monkeypatch):
    """scanpy's HVG step must not be reached: its loess crashes the process on these inputs."""
    import scanpy as sc

    def refuse(*args, **kwargs):
        raise AssertionError("scanpy's highly_variable_genes was called")

    monkeypatch.setattr(sc.pp, "highly_variable_genes", refuse)


def _with_batches(values) -> ad.AnnData:
    adata = _counts(len(values))
    adata.obs["plate"] = pd.Series(values, index=adata.obs_names, dtype=object)
    return adata


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (["p1"] * 199 + ["p2"], r"batch_key='plate': 1 batch\(es\) of adata.obs\['plate'\] have a single cell "
                                r"\(first: 'p2'\).*needs at least 2\. Merge or drop those cells, or leave out batch_key"),
        ([np.nan] * 200, r"batch_key='plate': 200 cells have a missing value in adata.obs\['plate'\] "
                         r"\(first: cell 'cell0'\)\. Fill or drop them\."),
        (["p1"] * 7 + [None] + ["p2"] * 190 + [np.nan, "p1"],
         r"batch_key='plate': 2 cells have a missing value in adata.obs\['plate'\] \(first: cell 'cell7'\)"),
    ],
    ids=["one-cell batch", "all missing", "some missing"],
)
def test_bad_batch_column_is_refused_before_scanpy(no_scanpy_hvg, values, match):
    adata = _with_batches(values)
    before = adata.copy()
    with pytest.raises(SetupError, match=match):
        prepare(adata, n_top_genes=10, batch_key="plate")
    assert adata.obs.equals(before.obs) and (adata.X != before.X).nnz == 0 and not adata.uns


def test_absent_batch_column_is_refused(no_scanpy_hvg):
    with pytest.raises(SetupError, match=r"batch_key='plate' is not a column of adata.obs \(columns: none\)"):
        prepare(_counts(), n_top_genes=10, batch_key="plate")


def test_setup_anndata_refuses_missing_batches_naming_the_first_cell():
    adata = _with_batches(["a"] * 50 + [np.nan] + ["b"] * 149)
    with pytest.raises(SetupError, match=r"batch_key='plate': 1 cells have a missing value .*first: cell 'cell50'"):
        ldvae.LinearSCVI.setup_anndata(adata, batch_key="plate")
    assert "ldvae_setup" not in adata.uns


@pytest.mark.parametrize("n_genes", [2, 3, MIN_VARYING_GENES - 1])
def test_too_few_varying_genes_for_the_loess_are_refused_before_scanpy(no_scanpy_hvg, n_genes):
    adata = _counts(100)[:, :n_genes].copy()
    with pytest.raises(SetupError, match=rf"hvg_flavor='seurat_v3' fits a loess curve .* at least "
                                         rf"{MIN_VARYING_GENES} genes whose counts vary across the cells; only "
                                         rf"{n_genes} do\. Pass more genes, or hvg_flavor='seurat'"):
        prepare(adata, n_top_genes=n_genes)


def test_a_batch_with_too_few_varying_genes_is_named(no_scanpy_hvg):
    adata = _with_batches(["big"] * 196 + ["tiny"] * 4)
    adata.X[196:] = 0
    adata.X[196:, :3] = np.array([[1], [2], [3], [4]])  # 3 genes vary in batch 'tiny'
    adata.X = sp.csr_matrix(adata.X)
    with pytest.raises(SetupError, match=r"vary across the cells of batch 'tiny' \(batch_key='plate'\); only 3 do\. "
                                         r"Merge that batch with another"):
        prepare(adata, n_top_genes=10, batch_key="plate")


def test_smallest_fittable_gene_set_and_two_cell_batch_pass():
    out = prepare(_counts(100)[:, :MIN_VARYING_GENES].copy(), n_top_genes=MIN_VARYING_GENES)
    assert out.n_vars == MIN_VARYING_GENES
    out = prepare(_with_batches(["a", "a"] + ["b"] * 198), n_top_genes=10, batch_key="plate")
    assert out.n_vars == 10


def test_cli_one_cell_batch_is_one_line_and_input_intact(tmp_path, capsys):
    adata = _with_batches(["p1"] * 199 + ["p2"])
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    digest = _digest(path)
    code, err = _run(capsys, "run", path, "--out-dir", tmp_path / "out", "--batch-key", "plate", *FAST)
    assert code == 1
    assert re.search(r"ldvae: error: batch_key='plate': 1 batch\(es\) .* single cell \(first: 'p2'\)",
                     _one_error_line(err))
    assert _digest(path) == digest and sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


def test_cli_loess_failure_in_a_small_batch_names_it(tmp_path):
    """A 20-cell batch of real data passes the counts-only checks, but its genes share too few
    distinct means for the loess; the run (in a child process: a crash there would not take the
    test run down) ends with the batch named."""
    demo = ldvae.read_demo()
    demo.obs["plate"] = ["small"] * 20 + ["big"] * (demo.n_obs - 20)
    path = tmp_path / "in.h5ad"
    demo.write_h5ad(path)
    digest = _digest(path)
    code = ("import sys; from ldvae import cli; "
            f"sys.exit(cli.main(['run', {str(path)!r}, '--out-dir', {str(tmp_path / 'out')!r}, "
            f"'--batch-key', 'plate', *{FAST!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = _one_error_line(proc.stderr)
    assert re.search(r"hvg_flavor='seurat_v3': the loess fit of gene variance on gene mean failed for batch "
                     r"'small' of batch_key='plate' \(20 cells\): too many genes share the same mean.*Drop rare genes first",
                     line), line
    assert _digest(path) == digest and sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]
