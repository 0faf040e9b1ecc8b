"""Minibatches streamed from counts on disk: the training source for an AnnData whose
counts stay in an ``.h5ad`` or ``.zarr`` store.

Training reads shuffled contiguous chunks of cells (``chunk_size`` cells each),
``buffer_chunks`` of them at a time into a buffer whose cells are shuffled and cut into
minibatches; a background thread reads and prepares the next buffer while the current
one trains. Peak memory is a few buffers plus the model, whatever the number of cells.
"""

from __future__ import annotations

import threading
from typing import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from ..data import backed
from ..data.disk import DiskCSR, DiskDense, open_on_disk
from ..data.shard import row_chunks, shard, shard_rows
from ..data.contract import CountData, Covariates, SetupError, get_counts, read_covariates
from ..nn.module import CountBatch
from ..util.checks import positive_int
from ..util.prefetch import prefetched
from .batches import minibatches, n_minibatches


def count_data(csr: sp.csr_matrix, cov: Covariates, rows: np.ndarray, device: torch.device) -> CountData:
    """A buffer: cells ``rows`` (global row numbers) with their counts ``csr``, on ``device``."""
    pick = Covariates(
        cov.batch[rows],
        cov.label[rows],
        None if cov.cat_covs is None else cov.cat_covs[rows],
        None if cov.cont_covs is None else cov.cont_covs[rows],
    )
    return CountData(csr, pick, device)


def _n_steps(n_cells: int, batch_size: int) -> int:
    """Minibatches of ``n_cells`` training cells, as ``loop.minibatches`` cuts them; none for
    fewer than two cells, which batch normalization cannot train on."""
    return n_minibatches(n_cells, batch_size) if n_cells >= 2 else 0


class StreamingSource:
    """Minibatches streamed from counts on disk, with the members of ``train.InMemorySource``
    (``device``, ``n_train``, ``n_val``, ``steps_per_epoch``, ``train_batches``,
    ``val_batches``).

    Per epoch the chunks of ``chunk_size`` contiguous cells (of this rank's block under
    ``torch.distributed``) are visited in a seeded random order, ``buffer_chunks`` at a
    time; the training cells of a buffer are shuffled (with the few left over from the
    previous buffer) and cut into minibatches. The buffers are read and prepared on the
    compute device by a background thread, ``prefetch`` ahead. The three sizes default to
    ``ldvae.data.backed``'s ``CHUNK_SIZE``, ``BUFFER_CHUNKS`` and ``PREFETCH``, read at construction.

    With a communicator registered (``ldvae.data.backed.use_communicator``, as
    ``ldvae.distributed`` does) every rank runs the same number of steps (the smallest
    block's), ``n_train`` and ``n_val`` count the cells of all ranks, and ``comm`` tells
    ``train.fit`` how to combine gradients and metrics.
    """

    # CPUs the background reader keeps busy: the compiled step's default threads leave them
    reader_cpus = 1

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
        # The module settings are read now, so ``ldvae.stream.CHUNK_SIZE = n`` applies to later sources.
        self.chunk_size = positive_int("chunk_size", int(backed.CHUNK_SIZE if chunk_size is None else chunk_size))
        self.buffer_chunks = positive_int(
            "buffer_chunks", int(backed.BUFFER_CHUNKS if buffer_chunks is None else buffer_chunks))
        self.prefetch = positive_int("prefetch", int(backed.PREFETCH if prefetch is None else prefetch))
        n = disk.shape[0]
        # 1 = training cell, 2 = validation cell, 0 = neither (train_size + validation_size < 1)
        self.role = np.zeros(n, dtype=np.int8)
        self.role[np.asarray(train_idx, dtype=np.int64)] = 1
        self.role[np.asarray(val_idx, dtype=np.int64)] = 2
        rank, world, self.comm = shard()
        self.start, self.stop = shard_rows(n, rank, world)
        self.chunks = row_chunks(self.start, self.stop, self.chunk_size)
        is_train = self.role == 1
        self.train_per_chunk = np.array([int(is_train[a:b].sum()) for a, b in self.chunks], dtype=np.int64)
        # Steps of every rank's block; all ranks run the smallest number (collectives need it).
        blocks = [shard_rows(n, r, world) for r in range(world)]
        per_rank = [int(is_train[a:b].sum()) for a, b in blocks]
        steps = [_n_steps(m, self.batch_size) for m in per_rank]
        self.steps_per_epoch = min(steps)
        if self.steps_per_epoch == 0:
            raise SetupError(
                f"A rank's block of cells has fewer than two training cells ({per_rank}); use fewer ranks than "
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
                yield count_data(buffer, self.cov, buffer_rows, self.device)

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
                    yield count_data(sp.vstack(parts, format="csr"), self.cov, np.concatenate(rows), self.device)

        size = max(self.batch_size, 1024)
        for buf in prefetched(produce, self.prefetch):
            for rows in torch.split(torch.arange(buf.n_cells, device=self.device), size):
                yield buf.gather(rows)
