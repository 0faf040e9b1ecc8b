"""Out of core: train and query a model on counts that stay on disk.

Counts on disk are a CSR matrix in anndata's on-disk layout (``data``, ``indices``,
``indptr``), or a dense cells x genes array (read a block of rows at a time and made CSR
block by block), inside an ``.h5ad`` (HDF5) or ``.zarr`` store. Open one as an AnnData whose
``X`` stays on disk, then use the usual API::

    adata = anndata.read_h5ad("atlas.h5ad", backed="r")     # counts in X
    adata = ldvae.data.stream.read_backed("atlas.zarr", layer="counts")  # .h5ad or .zarr, any layer
    ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")  # streaming validation pass
    model = ldvae.LinearSCVI(adata, n_latent=10)                # streaming library-prior pass
    model.train(max_epochs=20)                                  # StreamingSource below
    z = model.get_latent_representation(out="z.npy")           # DiskCells below
    rho = model.get_normalized_expression(out="rho.npy")        # cells x genes, on disk

Training reads shuffled contiguous chunks of cells (``chunk_size`` cells each),
``buffer_chunks`` of them at a time into a buffer whose cells are shuffled and cut into
minibatches; a background thread reads and prepares the next buffer while the current
one trains. Peak memory is a few buffers plus the model, whatever the number of cells.

Posterior queries read the query's own minibatches (the ones an in-memory query would
gather, in the same order, hence the same random draws) one ahead in a background thread.
Per-cell results (ELBO, library size, latent) are small; results of cells x genes go to
disk with ``out=``: ``.npy`` files filled in place, or an ``.h5ad`` for sparse posterior
predictive counts (:class:`Output`, :class:`SparseOutput`).

Every pass here is shard-aware: when ``ldvae.distributed`` has initialized
``torch.distributed``, each rank reads only its own contiguous block of cells and the
statistics of all ranks are summed, so the same calls run unchanged under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .contract import CountData, Covariates, SetupError, get_counts, read_covariates, validate_counts
from ..util.io import atomic_path
from ..nn.module import CountBatch
from ..util.prefetch import prefetched
from ..train.loop import minibatches

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
        Read the counts from ``layers[layer]`` instead of ``X``; they become ``adata.X``,
        so set up the model with ``layer=None``.
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
    return ad.AnnData(X=X, obs=read(root["obs"]), var=read(root["var"]), uns=uns)


def is_on_disk(mat) -> bool:
    """True for counts left on disk by anndata (backed mode or :func:`read_backed`): a CSR
    matrix, or a dense array (an HDF5 dataset or a zarr array, read a block of rows at a time)."""
    from anndata.abc import CSCDataset, CSRDataset

    if isinstance(mat, CSCDataset):
        raise SetupError(
            "The counts on disk are CSC (genes are columns of contiguous storage); streaming cells needs CSR. "
            "Rewrite the file once with adata.X = scipy.sparse.csr_matrix(adata.X)."
        )
    return isinstance(mat, CSRDataset) or _is_dense_on_disk(mat)


def _is_dense_on_disk(mat) -> bool:
    import h5py

    if isinstance(mat, h5py.Dataset):
        return True
    try:
        import zarr
    except ImportError:
        return False
    return isinstance(mat, zarr.Array)


def read_into_memory(mat):
    """Counts on disk read into memory: scipy CSR (sparse on disk) or NumPy (dense on disk)."""
    return np.asarray(mat[()]) if _is_dense_on_disk(mat) else mat.to_memory()


def counts_on_disk(adata, setup: dict) -> bool:
    """Whether the model's counts of ``adata`` (``X`` or the set-up layer) stay on disk."""
    return is_on_disk(get_counts(adata, setup.get("layer")))


def open_on_disk(mat) -> "DiskCSR | DiskDense":
    """Row access to counts on disk (see :func:`is_on_disk`), giving float32 CSR either way."""
    return DiskDense(mat) if _is_dense_on_disk(mat) else DiskCSR(mat)


class _DiskRows:
    """Cells of a matrix on disk as float32 CSR; subclasses read contiguous ``rows``."""

    shape: tuple[int, int]

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        raise NotImplementedError

    def take(self, rows: np.ndarray, max_gap: int = 64) -> sp.csr_matrix:
        """Cells ``rows`` (any order, repeats allowed) as :meth:`rows` gives them. Sorted
        rows fewer than ``max_gap`` apart share one contiguous read."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        if rows[-1] - rows[0] == rows.size - 1 and (np.diff(rows) == 1).all():
            return self.rows(int(rows[0]), int(rows[-1]) + 1)
        order = np.argsort(rows, kind="stable")
        ascending = rows[order]
        runs = np.split(ascending, np.flatnonzero(np.diff(ascending) > max_gap) + 1)
        parts = [self.rows(int(run[0]), int(run[-1]) + 1)[run - run[0]] for run in runs]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return sp.vstack(parts, format="csr")[inverse]


class DiskDense(_DiskRows):
    """Contiguous row ranges of a dense cells x genes array on disk (an HDF5 dataset or a zarr
    array), read in slabs of at most ``SLAB_VALUES`` values and stored as CSR slab by slab, so
    that a dense read never holds more than one slab."""

    SLAB_VALUES = 1 << 23

    def __init__(self, mat):
        if len(mat.shape) != 2:
            raise SetupError(f"The counts on disk have shape {tuple(mat.shape)}; expected cells x genes.")
        self.array = mat
        self.shape = tuple(int(s) for s in mat.shape)
        self.slab = max(1, self.SLAB_VALUES // max(self.shape[1], 1))  # rows per read

    def _slabs(self, start: int, stop: int) -> Iterator[np.ndarray]:
        for a in range(start, stop, self.slab):
            yield np.asarray(self.array[a : min(a + self.slab, stop)])

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``[start, stop)`` as float32 CSR with sorted indices and no stored zeros."""
        parts = [sp.csr_matrix(block.astype(np.float32, copy=False)) for block in self._slabs(start, stop)]
        if not parts:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        csr = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
        csr.eliminate_zeros()
        return csr

    def row_totals(self, start: int, stop: int) -> np.ndarray:
        """Total counts of cells ``[start, stop)``, float64."""
        parts = [block.sum(axis=1, dtype=np.float64) for block in self._slabs(start, stop)]
        return np.concatenate(parts) if parts else np.zeros(0)


class DiskCSR(_DiskRows):
    """Contiguous row ranges of a CSR matrix on disk. ``indptr`` (8 bytes a cell) is held in
    memory; ``data`` and ``indices`` are read range by range."""

    def __init__(self, mat):
        self.group = mat.group
        self.shape = tuple(int(s) for s in mat.shape)
        self.indptr = np.asarray(self.group["indptr"][:], dtype=np.int64)
        self._data = self.group["data"]
        self._indices = self.group["indices"]

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``[start, stop)`` as float32 CSR with sorted indices and no stored zeros."""
        p0, p1 = int(self.indptr[start]), int(self.indptr[stop])
        data = np.asarray(self._data[p0:p1], dtype=np.float32)
        indices = np.asarray(self._indices[p0:p1])
        csr = sp.csr_matrix((data, indices, self.indptr[start : stop + 1] - p0), shape=(stop - start, self.shape[1]))
        csr.sum_duplicates()  # no-op (one O(nnz) check) for canonical files
        csr.eliminate_zeros()
        return csr

    def row_totals(self, start: int, stop: int) -> np.ndarray:
        """Total counts of cells ``[start, stop)`` (reads ``data`` only), float64."""
        p0, p1 = int(self.indptr[start]), int(self.indptr[stop])
        cum = np.concatenate([[0.0], np.cumsum(np.asarray(self._data[p0:p1], dtype=np.float64))])
        ptr = self.indptr[start : stop + 1] - p0
        return cum[ptr[1:]] - cum[ptr[:-1]]


def _chunks(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, stop)) for a in range(start, stop, size)]


def _shard() -> tuple[int, int, object | None]:
    """(rank, world size, communicator) of the running distributed job, or (0, 1, None)."""
    from ..distributed import current

    comm = current()
    return (0, 1, None) if comm is None else (comm.rank, comm.world_size, comm)


def shard_rows(n_cells: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block of cells: ``[rank * n / W, (rank + 1) * n / W)``."""
    return rank * n_cells // world_size, (rank + 1) * n_cells // world_size


# --- streaming passes -----------------------------------------------------------------------


class _Window:
    """Cell and gene names of ``rows`` (a slice or positions), so that ``validate_counts`` on
    the counts read for them names the true cell."""

    def __init__(self, adata, rows: slice | np.ndarray):
        self.obs_names = adata.obs_names[rows]
        self.var_names = adata.var_names


@dataclass
class CountStats:
    """Sums over every cell scanned (all ranks together under ``torch.distributed``)."""

    n_cells: np.ndarray  # (n_batch,) cells per batch
    n_empty: int  # cells with zero total counts
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

    def library_prior(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-batch mean and variance of log total counts, as ``ldvae.data.contract.library_prior``."""
        n = self.n_cells.astype(np.float64)
        safe = np.maximum(n, 1.0)
        means = np.where(n > 0, self.log_total_sum / safe, 0.0)
        var = np.maximum(self.log_total_sumsq / safe - means**2, 0.0)
        variances = np.where(n > 1, np.maximum(var, 1e-4), 1.0)
        return means.astype(np.float32), variances.astype(np.float32)


def scan_counts(
    adata,
    layer: str | None = None,
    *,
    validate: bool = True,
    batch: np.ndarray | None = None,
    n_batch: int = 1,
    genes: bool = False,
    chunk_size: int = 8 * CHUNK_SIZE,
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
        Cells read at a time.
    """
    mat = get_counts(adata, layer)
    disk = open_on_disk(mat)
    n, n_genes = disk.shape
    batch = np.zeros(n, dtype=np.int64) if batch is None else np.asarray(batch)
    rank, world, comm = _shard()
    start, stop = shard_rows(n, rank, world)
    n_cells = np.zeros(n_batch)
    s1 = np.zeros(n_batch)
    s2 = np.zeros(n_batch)
    g1 = np.zeros((n_batch, n_genes)) if genes else None
    g2 = np.zeros((n_batch, n_genes)) if genes else None
    n_empty = 0
    error: SetupError | None = None

    def produce(stop_event):
        for a, b in _chunks(start, stop, chunk_size):
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
                    validate_counts(_Window(adata, slice(a, b)), chunk, layer)
                totals = np.asarray(chunk.sum(axis=1), dtype=np.float64).ravel()
            full = totals > 0
            n_empty += int((~full).sum())
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
    if comm is not None:
        # Every rank reaches this reduction, also the one that found bad input.
        parts = [n_cells, s1, s2, np.array([n_empty, error is not None], dtype=np.float64)]
        if genes:
            parts += [g1.ravel(), g2.ravel()]
        flat = comm.all_reduce_sum_numpy(np.concatenate(parts))
        n_cells, s1, s2 = flat[:n_batch], flat[n_batch : 2 * n_batch], flat[2 * n_batch : 3 * n_batch]
        n_empty, n_failed = int(flat[3 * n_batch]), int(flat[3 * n_batch + 1])
        if genes:
            rest = flat[3 * n_batch + 2 :]
            g1 = rest[: n_batch * n_genes].reshape(n_batch, n_genes)
            g2 = rest[n_batch * n_genes :].reshape(n_batch, n_genes)
        if error is not None:
            raise error
        if n_failed:
            raise SetupError(
                f"{n_failed} other rank(s) found invalid counts in their blocks of cells; see their messages."
            )
    return CountStats(n_cells, n_empty, s1, s2, g1, g2)


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
    from skmisc.loess import loess

    if batch_key is None:
        codes, n_batch = np.zeros(adata.n_obs, dtype=np.int64), 1
    else:
        col = pd.Categorical(adata.obs[batch_key])
        codes, n_batch = col.codes.astype(np.int64), len(col.categories)
    first = scan_counts(adata, layer, validate=False, batch=codes, n_batch=n_batch, genes=True)
    mean_all, var_all = first.gene_mean_var()
    n_genes = len(mean_all)
    clip = np.zeros((n_batch, n_genes))
    reg_var = np.ones((n_batch, n_genes))
    means = np.zeros((n_batch, n_genes))
    for s in range(n_batch):
        mean, var = first.gene_mean_var(s)
        varies = var > 0
        fitted = np.zeros(n_genes)
        fit = loess(np.log10(mean[varies]), np.log10(var[varies]), span=span, degree=2)
        fit.fit()
        fitted[varies] = fit.outputs.fitted_values
        reg_var[s] = 10**fitted
        clip[s] = np.sqrt(reg_var[s]) * np.sqrt(first.n_cells[s]) + mean
        means[s] = mean

    # Second pass: sums of counts clipped per gene and batch (zeros stay zero).
    disk = open_on_disk(get_counts(adata, layer))
    rank, world, comm = _shard()
    start, stop = shard_rows(disk.shape[0], rank, world)
    c1 = np.zeros((n_batch, n_genes))
    c2 = np.zeros((n_batch, n_genes))

    def produce(stop_event):
        for a, b in _chunks(start, stop, 8 * CHUNK_SIZE):
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
    n = first.n_cells[:, None]
    norm_var = (n * means**2 + c2 - 2 * c1 * means) / ((n - 1) * reg_var)  # (n_batch, n_genes)

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
        index=adata.var_names.copy(),
    )
    order = df.sort_values(
        ["highly_variable_rank", "highly_variable_nbatches"], ascending=[True, False], na_position="last"
    ).index
    df["highly_variable"] = False
    df.loc[order[: int(n_top_genes)], "highly_variable"] = True
    if batch_key is None:
        df = df.drop(columns="highly_variable_nbatches")
    if not inplace:
        return df
    for column in df.columns:
        adata.var[column] = df[column].to_numpy()
    logger.info("added adata.var columns %s", ", ".join(repr(c) for c in df.columns))
    return None


# --- training source ------------------------------------------------------------------------


def _count_data(csr: sp.csr_matrix, cov: Covariates, rows: np.ndarray, device: torch.device) -> CountData:
    """A buffer: cells ``rows`` (global row numbers) with their counts ``csr``, on ``device``."""
    pick = Covariates(
        cov.batch[rows],
        cov.label[rows],
        None if cov.cat_covs is None else cov.cat_covs[rows],
        None if cov.cont_covs is None else cov.cont_covs[rows],
    )
    return CountData(csr, pick, device)


def _n_steps(n_cells: int, batch_size: int) -> int:
    """``len(train.minibatches(range(n_cells), batch_size))``: a last batch of one cell joins
    the previous one."""
    q, r = divmod(n_cells, batch_size)
    return q + (r > 0) - (r == 1 and q >= 1)


class StreamingSource:
    """Minibatches streamed from counts on disk, with the members of ``train.InMemorySource``
    (``device``, ``n_train``, ``n_val``, ``steps_per_epoch``, ``train_batches``,
    ``val_batches``).

    Per epoch the chunks of ``chunk_size`` contiguous cells (of this rank's block under
    ``torch.distributed``) are visited in a seeded random order, ``buffer_chunks`` at a
    time; the training cells of a buffer are shuffled (with the few left over from the
    previous buffer) and cut into minibatches. The buffers are read and prepared on the
    compute device by a background thread, ``prefetch`` ahead. The three sizes default to
    the module's ``CHUNK_SIZE``, ``BUFFER_CHUNKS`` and ``PREFETCH``, read at construction.

    Under ``torch.distributed`` every rank runs the same number of steps (the smallest
    block's), ``n_train`` and ``n_val`` count the cells of all ranks, and ``comm`` tells
    ``train.fit`` how to combine gradients and metrics.
    """

    def __init__(
        self,
        disk: DiskCSR | DiskDense,
        cov: Covariates,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        chunk_size: int | None = None,
        buffer_chunks: int | None = None,
        prefetch: int | None = None,
    ):
        self.disk = disk
        self.cov = cov
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.chunk_size = int(CHUNK_SIZE if chunk_size is None else chunk_size)
        self.buffer_chunks = int(BUFFER_CHUNKS if buffer_chunks is None else buffer_chunks)
        self.prefetch = int(PREFETCH if prefetch is None else prefetch)
        for name in ("chunk_size", "buffer_chunks", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        n = disk.shape[0]
        # 1 = training cell, 2 = validation cell, 0 = neither (train_size + validation_size < 1)
        self.role = np.zeros(n, dtype=np.int8)
        self.role[np.asarray(train_idx, dtype=np.int64)] = 1
        self.role[np.asarray(val_idx, dtype=np.int64)] = 2
        rank, world, self.comm = _shard()
        self.start, self.stop = shard_rows(n, rank, world)
        self.chunks = _chunks(self.start, self.stop, self.chunk_size)
        is_train = self.role == 1
        self.train_per_chunk = np.array([int(is_train[a:b].sum()) for a, b in self.chunks], dtype=np.int64)
        # Steps of every rank's block; all ranks run the smallest number (collectives need it).
        blocks = [shard_rows(n, r, world) for r in range(world)]
        per_rank = [int(is_train[a:b].sum()) for a, b in blocks]
        steps = [_n_steps(m, self.batch_size) for m in per_rank]
        self.steps_per_epoch = min(steps)
        if self.steps_per_epoch == 0:
            raise SetupError(
                f"A rank's block of cells has no training cells ({per_rank}); use fewer ranks than "
                f"{world} or more cells."
            )
        # Cells all ranks train on per epoch (a longer block stops after steps_per_epoch full batches).
        self.n_train = sum(m if s == self.steps_per_epoch else self.steps_per_epoch * self.batch_size
                           for m, s in zip(per_rank, steps))
        self.n_val = int((self.role == 2).sum())

    @classmethod
    def from_adata(cls, adata, setup: dict, train_idx, val_idx, batch_size: int, **kwargs) -> "StreamingSource":
        """The source for an AnnData set up for ldvae whose counts stay on disk."""
        return cls(open_on_disk(get_counts(adata, setup.get("layer"))), read_covariates(adata, setup),
                   train_idx, val_idx, batch_size, **kwargs)

    # --- buffers ---------------------------------------------------------------------------
    def _read(self, chunk_ids, role: int) -> tuple[list[sp.csr_matrix], list[np.ndarray]]:
        """Cells of ``role`` in these chunks: CSR parts and their global row numbers."""
        parts, rows = [], []
        for i in chunk_ids:
            a, b = self.chunks[i]
            local = np.flatnonzero(self.role[a:b] == role)
            if local.size == 0:
                continue
            csr = self.disk.rows(a, b)
            parts.append(csr if local.size == b - a else csr[local])
            rows.append(a + local)
        return parts, rows

    def _emitted(self, groups: list[np.ndarray]) -> np.ndarray:
        """Training cells each buffer hands out: whole minibatches until the last buffer,
        which takes the rest; a single leftover cell (batch norm needs two) goes with one
        more full batch instead, as ``train.minibatches`` merges it."""
        cum = np.cumsum([self.train_per_chunk[g].sum() for g in groups])
        out = (cum // self.batch_size) * self.batch_size
        out[-1] = cum[-1]
        if len(out) > 1 and cum[-1] - out[-2] == 1 and out[-2] >= self.batch_size:
            out[:-1] = np.minimum(out[:-1], out[-2] - self.batch_size)
        return np.diff(out, prepend=0)

    def _train_buffers(self, rng: np.random.Generator, stop_event: threading.Event) -> Iterator[CountData]:
        order = rng.permutation(len(self.chunks))
        groups = [order[i : i + self.buffer_chunks] for i in range(0, len(order), self.buffer_chunks)]
        pending = [sp.csr_matrix((0, self.disk.shape[1]), dtype=np.float32)]
        pending_rows = [np.zeros(0, dtype=np.int64)]
        for group, take in zip(groups, self._emitted(groups)):
            if stop_event.is_set():
                return
            parts, rows = self._read(group, role=1)
            csr = sp.vstack(pending + parts, format="csr")
            rows = np.concatenate(pending_rows + rows)
            perm = rng.permutation(len(rows))
            # One row gather for the buffer; the few cells left over wait for the next one.
            pending, pending_rows = [csr[perm[take:]]], [rows[perm[take:]]]
            if take:
                buffer, buffer_rows = csr[perm[:take]], rows[perm[:take]]
                del csr
                yield _count_data(buffer, self.cov, buffer_rows, self.device)

    # --- the source interface ----------------------------------------------------------
    by_gene = True  # grouped by gene for the torch encoder's gradient (train.fit sets it)

    def train_batches(self, generator: torch.Generator) -> Iterator[CountBatch]:
        # Seeded by fit's per-epoch generator; the block start keeps ranks' orders distinct.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = np.random.default_rng([seed, self.start])
        buffers = prefetched(lambda stop: self._train_buffers(rng, stop), self.prefetch)
        steps = 0
        try:
            for buf in buffers:
                for rows in minibatches(torch.arange(buf.n_cells, device=self.device), self.batch_size):
                    if steps == self.steps_per_epoch:
                        return
                    yield buf.gather(rows, by_gene=self.by_gene)
                    steps += 1
        finally:
            buffers.close()

    def val_batches(self) -> Iterator[CountBatch]:
        def produce(stop_event):
            ids = np.arange(len(self.chunks))
            for i in range(0, len(ids), self.buffer_chunks):
                if stop_event.is_set():
                    return
                parts, rows = self._read(ids[i : i + self.buffer_chunks], role=2)
                if parts:
                    yield _count_data(sp.vstack(parts, format="csr"), self.cov, np.concatenate(rows), self.device)

        size = max(self.batch_size, 1024)
        for buf in prefetched(produce, self.prefetch):
            for rows in torch.split(torch.arange(buf.n_cells, device=self.device), size):
                yield buf.gather(rows)


# --- queries --------------------------------------------------------------------------------


class DiskCells:
    """The cells of an AnnData whose counts stay on disk, read for a posterior query one
    minibatch at a time (``ldvae.query.posterior`` asks :func:`minibatches_of` for them)."""

    def __init__(self, adata, setup: dict, device: torch.device):
        self.adata = adata
        self.layer = setup.get("layer")
        self.disk = open_on_disk(get_counts(adata, self.layer))
        self.cov = read_covariates(adata, setup)
        self.device = device
        self.n_cells = self.disk.shape[0]

    def _read(self, rows: np.ndarray) -> sp.csr_matrix:
        """Validated counts of cells ``rows`` (the checks of an in-memory query, on these cells)."""
        csr = self.disk.take(rows)
        window = _Window(self.adata, rows)
        validate_counts(window, csr, self.layer)
        empty = np.flatnonzero(np.diff(csr.indptr) == 0)
        if empty.size:
            raise SetupError(
                f"{empty.size} of the {len(rows)} cells read have zero total counts (first: cell "
                f"{window.obs_names[empty[0]]!r}). Filter them first: sc.pp.filter_cells(adata, min_counts=1)."
            )
        return csr

    def minibatches(self, rows: torch.Tensor, size: int) -> Iterator[CountBatch]:
        """The minibatches ``torch.split(rows, size)``, in that order, read and gathered on
        the device by a background thread one minibatch ahead."""
        idx = rows.cpu().numpy()

        def produce(stop_event):
            for lo in range(0, len(idx), size):
                if stop_event.is_set():
                    return
                sel = idx[lo : lo + size]
                data = _count_data(self._read(sel), self.cov, sel, self.device)
                yield data.gather(torch.arange(data.n_cells, device=self.device))

        return prefetched(produce)


def query_cells(model, adata=None) -> CountData | DiskCells:
    """The cells a query of ``model`` reads: counts on disk stay there (:class:`DiskCells`),
    others are validated and held on the model's device (``CountData``)."""
    target = model.adata if adata is None else adata
    if counts_on_disk(target, model.setup_):
        model._check_genes(target)
        return DiskCells(target, model.setup_, model.device)
    return model._data(adata)


def minibatches_of(cells: CountData | DiskCells, rows: torch.Tensor, size: int) -> Iterator[CountBatch]:
    """The minibatches of cells ``rows``, ``size`` at a time, in order: the same batches (so
    the same random draws) whether the counts are in memory or on disk."""
    if isinstance(cells, DiskCells):
        return cells.minibatches(rows, size)
    return (cells.gather(r) for r in torch.split(rows, size))


class Output:
    """A query result of known ``shape``, filled block after block along ``axis`` by
    :func:`fill`: in memory, or with ``out`` in that ``.npy`` file, filled in place under a
    temporary name, renamed when complete (``ldvae.util.io.atomic_path``) and returned as a
    read-only memory map, so the result need not fit in memory."""

    def __init__(self, shape: tuple[int, ...], *, axis: int = 0, out: str | os.PathLike | None = None):
        if out is not None and Path(out).suffix != ".npy":
            raise ValueError(f"out must be a .npy path, got {str(out)!r}.")
        self.shape, self.axis, self.out = shape, axis, out
        self.offset = 0

    def open(self, stack: contextlib.ExitStack) -> None:
        if self.out is None:
            self.array = np.empty(self.shape, dtype=np.float32)
        else:
            tmp = stack.enter_context(atomic_path(self.out))
            self.array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=self.shape)

    def add(self, block: np.ndarray) -> None:
        n = block.shape[self.axis]
        self.array[(slice(None),) * self.axis + (slice(self.offset, self.offset + n),)] = block
        self.offset += n

    def close(self) -> None:
        if self.out is not None:
            self.array.flush()
            del self.array

    def result(self) -> np.ndarray:
        return self.array if self.out is None else np.load(self.out, mmap_mode="r")


class SparseOutput:
    """Sparse cells x genes rows appended, block after block, to ``X`` of an AnnData written
    at ``out`` (an ``.h5ad``, under a temporary name until complete), with the cells and
    genes as ``obs`` and ``var``. The result is that ``X`` left on disk (an ``anndata`` CSR
    dataset: slice it to read rows)."""

    def __init__(self, out: str | os.PathLike, obs_names: pd.Index, var_names: pd.Index):
        if Path(out).suffix != ".h5ad":
            raise ValueError(f"out must be an .h5ad path, got {str(out)!r}.")
        self.out, self.obs_names, self.var_names = out, obs_names, var_names

    def open(self, stack: contextlib.ExitStack) -> None:
        import anndata as ad
        import h5py

        tmp = stack.enter_context(atomic_path(self.out))
        ad.AnnData(obs=pd.DataFrame(index=self.obs_names), var=pd.DataFrame(index=self.var_names)).write_h5ad(tmp)
        self.file = stack.enter_context(h5py.File(tmp, "r+"))
        # Chunks sized for appending (an empty dataset would get small ones).
        ad.io.write_elem(self.file, "X", sp.csr_matrix((0, len(self.var_names)), dtype=np.float32),
                         dataset_kwargs={"chunks": (1 << 16,)})
        self.X = ad.io.sparse_dataset(self.file["X"])

    def add(self, block: sp.csr_matrix) -> None:
        self.X.append(block)

    def close(self) -> None:
        del self.X
        self.file.close()

    def result(self):
        return read_backed(self.out).X


def fill(outputs: dict[str, Output | SparseOutput], blocks: Iterator[dict]) -> dict:
    """Add each block's arrays to the outputs of the same keys and return the results; on
    any error (or interrupt) no output file is left behind, complete or partial."""
    with contextlib.ExitStack() as stack:
        for output in outputs.values():
            output.open(stack)
        for block in blocks:
            for key, value in block.items():
                outputs[key].add(value)
        for output in outputs.values():
            output.close()
    return {key: output.result() for key, output in outputs.items()}
