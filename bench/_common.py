"""Shared by the benchmark scripts: the tutorial's data preparation and memory probes."""

from __future__ import annotations

import os
import resource
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DATA = REPO.parent / "shared" / "data" / "pbmc_5batch_8k.h5ad"
CACHE = BENCH_DIR / "out" / "pbmc_5batch_8k_hvg1000.h5ad"


def load_tutorial_hvg(path: str | os.PathLike = DATA, cache: Path | None = CACHE):
    """The LDVAE tutorial's preprocessing: raw counts in ``layers["counts"]``,
    normalize_total(1e5) + log1p in X, 1000 seurat_v3 HVGs chosen on the counts.
    Cached as h5ad so every run (and both packages) sees the same genes."""
    import anndata as ad

    if cache is not None and cache.exists():
        return ad.read_h5ad(cache)
    import scanpy as sc

    adata = ad.read_h5ad(path)
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e5)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", layer="counts", n_top_genes=1000, subset=True)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(cache)
    return adata


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_threads(batch_size: int) -> int:
    """Threads of ldvae's compiled training step in a fit at its default (NUMBA_NUM_THREADS caps them)."""
    from ldvae.cpu import fused

    return fused.default_threads(batch_size)
