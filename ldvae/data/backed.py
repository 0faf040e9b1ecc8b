"""Counts on disk: open them, shard them by rank, scan them, select genes from them.

Counts on disk are a CSR matrix in anndata's on-disk layout (``data``, ``indices``,
``indptr``), or a dense cells x genes array (read a block of rows at a time and made CSR
block by block), inside an ``.h5ad`` (HDF5) or ``.zarr`` store. Open one as an AnnData whose
``X`` stays on disk, then use the usual API::

    adata = anndata.read_h5ad("atlas.h5ad", backed="r")     # counts in X
    adata = ldvae.stream.read_backed("atlas.zarr", layer="counts")  # .h5ad or .zarr, any layer
    ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")  # streaming validation pass
    model = ldvae.LinearSCVI(adata, n_latent=10)                # streaming library-prior pass
    model.train(max_epochs=20)                                  # ldvae.train.streaming
    z = model.get_latent_representation(out="z.npy")           # ldvae.query.cells
    rho = model.get_normalized_expression(out="rho.npy")        # cells x genes, on disk

``CHUNK_SIZE``, ``BUFFER_CHUNKS`` and ``PREFETCH`` are the streaming sizes; code reads them
from this module when it runs, so ``ldvae.stream.CHUNK_SIZE = n`` takes effect.

Every pass here is shard-aware: once a communicator is registered with
:func:`use_communicator` (``ldvae.distributed`` does so), each rank reads only its own
contiguous block of cells and the statistics of all ranks are summed, so the same calls run
unchanged under ``torchrun``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..util.checks import SetupError
from ..util.prefetch import prefetched
from .contract import get_counts, library_prior_from_sums, read_covariates, validate_counts
# Readers and sharding are also reached through this module (``ldvae.stream``).
from .disk import DiskCSR, DiskDense, counts_on_disk, is_on_disk, open_on_disk, read_into_memory  # noqa: F401
from .shard import row_chunks, shard, shard_rows, use_communicator  # noqa: F401


logger = logging.getLogger(__name__)

CHUNK_SIZE = 1024  # contiguous cells per read
BUFFER_CHUNKS = 8  # chunks shuffled together in one buffer
PREFETCH = 1  # buffers prepared ahead by the background thread


# --- opening counts on disk ---------------------------------------------------------------


def read_backed(path: str | os.PathLike, *, layer: str | None = None):
    """An AnnData whose ``X`` is the count matrix (CSR or dense) of an ``.h5ad`` or ``.zarr``
    store, left on disk.

    Only ``obs``, ``var`` and ``uns`` are read into memory (``anndata.read_h5ad(path,
    backed="r")`` would also load every layer, and has no zarr counterpart).

    Parameters
    ----------
    path
        An ``.h5ad`` file or a ``.zarr`` directory written by anndata.
    layer
        Read the counts from ``layers[layer]`` instead of ``X``; they become ``adata.X``
        and stay ``adata.layers[layer]`` (the same data on disk). Set the model up with
        ``layer=layer`` so that it records the layer and later loads with the file read as
        usual (``layer=None`` reads the same counts).
    """
    import anndata as ad

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.is_dir():
        import zarr

        root = zarr.open_group(str(path), mode="r")
    else:
        import h5py

        root = h5py.File(path, "r")
    key = "X" if layer is None else f"layers/{layer}"
    if key not in root:
        have = ", ".join(repr(k) for k in root.get("layers", {}).keys()) or "none"
        raise SetupError(f"{path} has no {key!r} (layers: {have}). Pass the layer holding raw counts.")
    group = root[key]
    encoding = group.attrs.get("encoding-type", "array")
    if encoding not in ("csr_matrix", "array"):
        raise SetupError(
            f"{path}:{key} is stored as {encoding!r}; streaming needs CSR (cells are rows) or a dense array. "
            "Rewrite it once: adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(...)."
        )
    read = ad.io.read_elem
    uns = read(root["uns"]) if "uns" in root else {}
    X = group if encoding == "array" else ad.io.sparse_dataset(group)
    return ad.AnnData(X=X, obs=read(root["obs"]), var=read(root["var"]), uns=uns,
                      layers=None if layer is None else {layer: X})


# --- streaming passes -----------------------------------------------------------------------


class Window:
    """Cell and gene names of ``rows`` (a slice or positions), so that ``validate_counts`` on
    the counts read for them names the true cell."""

    def __init__(self, adata, rows: slice | np.ndarray):
        self.obs_names = adata.obs_names[rows]
        self.var_names = adata.var_names


@dataclass
class CountStats:
    """Sums over every cell scanned (all ranks together under ``torch.distributed``)."""

    n_cells: np.ndarray  # (n_batch,) cells per batch
    empty: np.ndarray  # (n_batch,) cells with zero total counts
    log_total_sum: np.ndarray  # (n_batch,) sum over non-empty cells of log total counts
    log_total_sumsq: np.ndarray  # (n_batch,)
    gene_sum: np.ndarray | None  # (n_batch, n_genes) sum of counts, with ``genes=True``
    gene_sumsq: np.ndarray | None  # (n_batch, n_genes) sum of squared counts

    def gene_mean_var(self, batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance (ddof=1) per gene, of one batch or of all cells."""
        if self.gene_sum is None:
            raise ValueError("These statistics were scanned without genes=True.")
        sel = slice(None) if batch is None else slice(batch, batch + 1)
        n = float(self.n_cells[sel].sum())
        s1, s2 = self.gene_sum[sel].sum(0), self.gene_sumsq[sel].sum(0)
        mean = s1 / n
        var = np.maximum(s2 - n * mean**2, 0.0) / max(n - 1.0, 1.0)
        return mean, var

    @property
    def n_empty(self) -> int:
        return int(self.empty.sum())

    def library_prior(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-batch mean and variance of log total counts over the cells with counts
        (``ldvae.data.contract.library_prior``)."""
        return library_prior_from_sums(self.n_cells - self.empty, self.log_total_sum, self.log_total_sumsq)


def scan_counts(
    adata,
    layer: str | None = None,
    *,
    validate: bool = True,
    batch: np.ndarray | None = None,
    n_batch: int = 1,
    genes: bool = False,
    chunk_size: int | None = None,
) -> CountStats:
    """One streaming pass over the counts on disk: checks every stored value (the messages
    of ``ldvae.data.contract.validate_counts``, naming the first bad cell of this rank's block) and
    sums per batch the log library sizes and, with ``genes``, per-gene counts and squares.

    Parameters
    ----------
    adata
        AnnData with counts on disk (``X`` or ``layers[layer]``).
    layer
        Where the counts are.
    validate
        Check the values (skip on a second pass).
    batch
        Batch code per cell, (n_cells,); default all zero.
    n_batch
        Number of batches.
    genes
        Also sum counts and squared counts per gene and batch (for HVG statistics).
    chunk_size
        Cells read at a time (default ``8 * CHUNK_SIZE``).
    """
    chunk_size = 8 * CHUNK_SIZE if chunk_size is None else chunk_size
    mat = get_counts(adata, layer)
    disk = open_on_disk(mat)
    n, n_genes = disk.shape
    batch = np.zeros(n, dtype=np.int64) if batch is None else np.asarray(batch)
    rank, world, comm = shard()
    start, stop = shard_rows(n, rank, world)
    n_cells = np.zeros(n_batch)
    s1 = np.zeros(n_batch)
    s2 = np.zeros(n_batch)
    g1 = np.zeros((n_batch, n_genes)) if genes else None
    g2 = np.zeros((n_batch, n_genes)) if genes else None
    empty = np.zeros(n_batch)
    error: SetupError | None = None

    def produce(stop_event):
        for a, b in row_chunks(start, stop, chunk_size):
            if stop_event.is_set():
                return
            yield a, b, (disk.rows(a, b) if validate or genes else disk.row_totals(a, b))

    try:
        for a, b, chunk in prefetched(produce):
            codes = batch[a:b]
            if isinstance(chunk, np.ndarray):
                totals = chunk
            else:
                if validate:
                    validate_counts(Window(adata, slice(a, b)), chunk, layer)
                totals = np.asarray(chunk.sum(axis=1), dtype=np.float64).ravel()
            full = totals > 0
            empty += np.bincount(codes[~full], minlength=n_batch)
            log_t = np.log(totals[full])
            n_cells += np.bincount(codes, minlength=n_batch)
            s1 += np.bincount(codes[full], weights=log_t, minlength=n_batch)
            s2 += np.bincount(codes[full], weights=log_t**2, minlength=n_batch)
            if genes:
                onehot = sp.csr_matrix((np.ones(b - a), (codes, np.arange(b - a))), shape=(n_batch, b - a))
                x = chunk.astype(np.float64)
                g1 += (onehot @ x).toarray()
                g2 += (onehot @ x.multiply(x)).toarray()
    except SetupError as err:
        if comm is None:
            raise
        error = err
    stats = CountStats(n_cells, empty, s1, s2, g1, g2)
    if comm is not None:
        stats = _sum_over_ranks(stats, comm, error)
    return stats


def _sum_over_ranks(stats: CountStats, comm, error: SetupError | None) -> CountStats:
    """``stats`` summed over all ranks; this rank's ``error`` raised after the reduction,
    which every rank reaches (also one that found bad input), or a note of other ranks' errors."""
    n_batch = len(stats.n_cells)
    genes = stats.gene_sum is not None
    parts = [stats.n_cells, stats.empty, stats.log_total_sum, stats.log_total_sumsq,
             np.array([error is not None], dtype=np.float64)]
    if genes:
        parts += [stats.gene_sum.ravel(), stats.gene_sumsq.ravel()]
    flat = comm.all_reduce_sum_numpy(np.concatenate(parts))
    n_cells, empty, s1, s2 = (flat[i * n_batch : (i + 1) * n_batch] for i in range(4))
    n_failed = int(flat[4 * n_batch])
    g1 = g2 = None
    if genes:
        shape = stats.gene_sum.shape
        rest = flat[4 * n_batch + 1 :]
        g1 = rest[: shape[0] * shape[1]].reshape(shape)
        g2 = rest[shape[0] * shape[1] :].reshape(shape)
    if error is not None:
        raise error
    if n_failed:
        raise SetupError(
            f"{n_failed} other rank(s) found invalid counts in their blocks of cells; see their messages."
        )
    return CountStats(n_cells, empty, s1, s2, g1, g2)


def library_prior_on_disk(adata, setup: dict, n_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch mean and variance of log total counts in one streaming pass (reads only the
    stored values, not their gene indices)."""
    batch = read_covariates(adata, setup).batch
    stats = scan_counts(adata, setup.get("layer"), validate=False, batch=batch, n_batch=n_batch)
    return stats.library_prior()


def highly_variable_genes(
    adata,
    n_top_genes: int = 2000,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    span: float = 0.3,
    inplace: bool = True,
) -> pd.DataFrame | None:
    """scanpy's ``highly_variable_genes(flavor="seurat_v3")`` on counts on disk, in two
    streaming passes: per-gene mean and variance (per batch), a loess fit of log variance on
    log mean, then the variance of the standardized counts clipped at sqrt(n_cells).

    Parameters
    ----------
    adata
        AnnData with raw counts on disk.
    n_top_genes
        Number of genes flagged.
    layer
        Where the counts are.
    batch_key
        Rank genes within each batch, then by median rank (Seurat v3's integration features).
    span
        Loess span.
    inplace
        Write ``adata.var`` columns ``highly_variable``, ``highly_variable_rank``, ``means``,
        ``variances``, ``variances_norm`` and, with ``batch_key``, ``highly_variable_nbatches``
        (scanpy's names); otherwise return them as a DataFrame.
    """
    if batch_key is None:
        codes, n_batch = np.zeros(adata.n_obs, dtype=np.int64), 1
    else:
        col = pd.Categorical(adata.obs[batch_key])
        codes, n_batch = col.codes.astype(np.int64), len(col.categories)
    first = scan_counts(adata, layer, validate=False, batch=codes, n_batch=n_batch, genes=True)
    mean_all, var_all = first.gene_mean_var()
    means, reg_var = _loess_variances(first, n_batch, span)
    clip = np.sqrt(reg_var) * np.sqrt(first.n_cells[:, None]) + means  # (n_batch, n_genes)
    c1, c2 = _clipped_sums(adata, layer, codes, clip)
    n = first.n_cells[:, None]
    norm_var = (n * means**2 + c2 - 2 * c1 * means) / ((n - 1) * reg_var)  # (n_batch, n_genes)
    df = _rank_genes(norm_var, n_top_genes, adata.var_names, mean_all, var_all)
    if batch_key is None:
        df = df.drop(columns="highly_variable_nbatches")
    if not inplace:
        return df
    for column in df.columns:
        adata.var[column] = df[column].to_numpy()
    logger.info("added adata.var columns %s", ", ".join(repr(c) for c in df.columns))
    return None


def _loess_variances(stats: CountStats, n_batch: int, span: float) -> tuple[np.ndarray, np.ndarray]:
    """Per batch, gene means and the loess fit of log variance on log mean (Seurat v3's
    expected variance), each (n_batch, n_genes)."""
    from skmisc.loess import loess

    n_genes = stats.gene_sum.shape[1]
    reg_var = np.ones((n_batch, n_genes))
    means = np.zeros((n_batch, n_genes))
    for s in range(n_batch):
        mean, var = stats.gene_mean_var(s)
        varies = var > 0
        fitted = np.zeros(n_genes)
        fit = loess(np.log10(mean[varies]), np.log10(var[varies]), span=span, degree=2)
        fit.fit()
        fitted[varies] = fit.outputs.fitted_values
        reg_var[s] = 10**fitted
        means[s] = mean
    return means, reg_var


def _clipped_sums(adata, layer: str | None, codes: np.ndarray, clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Second pass: sums of counts clipped at ``clip`` per gene and batch, and of their
    squares (zeros stay zero), over all ranks."""
    disk = open_on_disk(get_counts(adata, layer))
    rank, world, comm = shard()
    start, stop = shard_rows(disk.shape[0], rank, world)
    c1 = np.zeros(clip.shape)
    c2 = np.zeros(clip.shape)
    size = 8 * CHUNK_SIZE

    def produce(stop_event):
        for a, b in row_chunks(start, stop, size):
            if stop_event.is_set():
                return
            yield a, disk.rows(a, b)

    for a, chunk in prefetched(produce):
        row_codes = np.repeat(codes[a : a + chunk.shape[0]], np.diff(chunk.indptr))
        clipped = np.minimum(chunk.data.astype(np.float64), clip[row_codes, chunk.indices])
        np.add.at(c1, (row_codes, chunk.indices), clipped)
        np.add.at(c2, (row_codes, chunk.indices), clipped**2)
    if comm is not None:
        flat = comm.all_reduce_sum_numpy(np.concatenate([c1.ravel(), c2.ravel()]))
        c1, c2 = flat[: c1.size].reshape(c1.shape), flat[c1.size :].reshape(c2.shape)
    return c1, c2


def _rank_genes(norm_var: np.ndarray, n_top_genes: int, var_names: pd.Index, mean_all: np.ndarray,
                var_all: np.ndarray) -> pd.DataFrame:
    """scanpy's columns from the normalized variances (n_batch, n_genes): genes ranked within
    each batch, then by median rank and by the number of batches that select them."""
    ranks = np.argsort(np.argsort(-norm_var, axis=1), axis=1).astype(np.float32)
    n_batches_hvg = (ranks < n_top_genes).sum(0)
    ranks[ranks >= n_top_genes] = np.nan
    median_rank = np.ma.median(np.ma.masked_invalid(ranks), axis=0).filled(np.nan)
    df = pd.DataFrame(
        {
            "means": mean_all,
            "variances": var_all,
            "variances_norm": norm_var.mean(0),
            "highly_variable_rank": median_rank,
            "highly_variable_nbatches": n_batches_hvg,
        },
        index=var_names.copy(),
    )
    order = df.sort_values(
        ["highly_variable_rank", "highly_variable_nbatches"], ascending=[True, False], na_position="last"
    ).index
    df["highly_variable"] = False
    df.loc[order[: int(n_top_genes)], "highly_variable"] = True
    return df
