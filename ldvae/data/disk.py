"""Counts left on disk: a CSR matrix in anndata's on-disk layout (``data``, ``indices``,
``indptr``) or a dense cells x genes array, in an ``.h5ad`` (HDF5) or ``.zarr`` store, read a
block of rows at a time as CSR."""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import scipy.sparse as sp

from ..util.checks import SetupError
from .contract import get_counts


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


def _file_of(node) -> str | None:
    """The HDF5 file holding ``node`` (None for a zarr store)."""
    file = getattr(node, "file", None)
    return getattr(file, "filename", None)


def _stamp(path: str | None):
    if path is None:
        return None
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class _DiskRows:
    """Cells of a matrix on disk as float32 CSR; subclasses read contiguous ``rows``. An
    HDF5 file that changes on disk while it is read (another process writing it) is refused
    at the next read instead of read as other or missing counts."""

    shape: tuple[int, int]

    def _remember(self, node) -> None:
        self._path = _file_of(node)
        self._seen = _stamp(self._path)

    def _check_unchanged(self) -> None:
        if self._path is not None and _stamp(self._path) != self._seen:
            raise SetupError(
                f"{self._path} changed on disk while its counts were being read (another process wrote it?). "
                "Open it again (anndata.read_h5ad(path, backed='r')) and repeat the call."
            )

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
        self._remember(mat)

    def _slabs(self, start: int, stop: int) -> Iterator[np.ndarray]:
        self._check_unchanged()
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
        self._remember(self.group)
        self.indptr = np.asarray(self.group["indptr"][:], dtype=np.int64)
        self._data = self.group["data"]
        self._indices = self.group["indices"]
        ptr = self.indptr
        if len(ptr) != self.shape[0] + 1 or ptr[0] != 0 or ptr[-1] != self._data.shape[0] or (np.diff(ptr) < 0).any():
            where = self._path or "the store"
            raise SetupError(
                f"The counts on disk in {where} are damaged: their row offsets (indptr) do not fit "
                f"{self.shape[0]} cells and {self._data.shape[0]} values (was the file changed while open?). "
                "Open it again, or rewrite it with anndata."
            )

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``[start, stop)`` as float32 CSR with sorted indices and no stored zeros."""
        self._check_unchanged()
        p0, p1 = int(self.indptr[start]), int(self.indptr[stop])
        data = np.asarray(self._data[p0:p1], dtype=np.float32)
        indices = np.asarray(self._indices[p0:p1])
        csr = sp.csr_matrix((data, indices, self.indptr[start : stop + 1] - p0), shape=(stop - start, self.shape[1]))
        csr.sum_duplicates()  # no-op (one O(nnz) check) for canonical files
        csr.eliminate_zeros()
        return csr

    def row_totals(self, start: int, stop: int) -> np.ndarray:
        """Total counts of cells ``[start, stop)`` (reads ``data`` only), float64."""
        self._check_unchanged()
        p0, p1 = int(self.indptr[start]), int(self.indptr[stop])
        cum = np.concatenate([[0.0], np.cumsum(np.asarray(self._data[p0:p1], dtype=np.float64))])
        ptr = self.indptr[start : stop + 1] - p0
        return cum[ptr[1:]] - cum[ptr[:-1]]
