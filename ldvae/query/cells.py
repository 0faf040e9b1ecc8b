"""Posterior queries over cells in memory or on disk, and the outputs they fill.

Posterior queries read the query's own minibatches (the ones an in-memory query would
gather, in the same order, hence the same random draws) one ahead in a background thread.
Per-cell results (ELBO, library size, latent) are small; results of cells x genes go to
disk with ``out=``: ``.npy`` files filled in place, or an ``.h5ad`` for sparse posterior
predictive counts (:class:`Output`, :class:`SparseOutput`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..data.backed import Window, read_backed
from ..data.disk import open_on_disk
from ..data.contract import CountData, get_counts, read_covariates, validate_counts
from ..nn.module import CountBatch
from ..train.streaming import count_data
from ..util.io import atomic_path, new_npy, nullable_strings_allowed, refuse_existing
from ..util.prefetch import prefetched


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
        window = Window(self.adata, rows)
        validate_counts(window, csr, self.layer)
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
                data = count_data(self._read(sel), self.cov, sel, self.device)
                yield data.gather(torch.arange(data.n_cells, device=self.device))

        return prefetched(produce)


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
        if out is not None:
            if Path(out).suffix != ".npy":
                raise ValueError(f"out must be a .npy path, got {str(out)!r}.")
            refuse_existing(out)
        self.shape, self.axis, self.out = shape, axis, out
        self.offset = 0

    def open(self, stack: contextlib.ExitStack) -> None:
        if self.out is None:
            self.array = np.empty(self.shape, dtype=np.float32)
        else:
            tmp = stack.enter_context(atomic_path(self.out))
            new_npy(tmp, self.shape)
            self.array = np.load(tmp, mmap_mode="r+")

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
        refuse_existing(out)
        self.out, self.obs_names, self.var_names = out, obs_names, var_names

    def open(self, stack: contextlib.ExitStack) -> None:
        import anndata as ad
        import h5py

        tmp = stack.enter_context(atomic_path(self.out))
        with nullable_strings_allowed():
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
