"""Batch sources of the training loop and the rules they share: the train/validation
split, the one-cell last minibatch and the validation batch size."""

from __future__ import annotations

import logging
import math
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from ..data.contract import CountData
from ..nn.module import CountBatch
from ..util.checks import SetupError
from ..util.prefetch import prefetched

logger = logging.getLogger(__name__)

def split_indices(n: int, train_size: float, validation_size: float | None, seed: int, *, shuffle: bool = True,
                  batch_size: int | None = None, with_test: bool = False):
    """scvi-tools' split: the first ``n_val`` cells of a seeded permutation (``shuffle=False``:
    of the cells in order) validate, the next ``n_train`` train. With the same seed both
    packages validate on the same cells. ``batch_size`` (scvi-tools 1.5's rule when
    ``train_size`` was not given): a last training minibatch of 1 or 2 cells moves to the
    validation cells, when there are any. ``with_test``: also the rest of the permutation, in
    its order (scvi-tools' test cells)."""
    if not 0.0 < train_size <= 1.0:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
    n_train = math.ceil(train_size * n)
    if validation_size is None:
        n_val = n - n_train
    else:
        if not 0.0 <= validation_size < 1.0 or train_size + validation_size > 1.0:
            raise ValueError(
                f"validation_size must be in [0, 1) with train_size + validation_size <= 1, "
                f"got train_size={train_size}, validation_size={validation_size}."
            )
        n_val = math.floor(validation_size * n)
    if batch_size is not None and 0 < n_train % batch_size < 3 and n_val > 0:
        n_val += n_train % batch_size
        n_train -= n_train % batch_size
    perm = np.random.RandomState(seed).permutation(n) if shuffle else np.arange(n)
    if with_test:
        return perm[n_val : n_val + n_train], perm[:n_val], perm[n_val + n_train :]
    return perm[n_val : n_val + n_train], perm[:n_val]


def split_cells(n: int, train_size: float | None, validation_size: float | None, seed: int, batch_size: int, *,
                shuffle: bool = True, external: list[np.ndarray] | None = None):
    """A fit's training, validation and test cells: ``external`` ([train, validation, test]),
    or :func:`split_indices` (``train_size=None``: 0.9, with scvi-tools 1.5's rule for a last
    minibatch of 1 or 2 cells); the test cells are the rest. At least two training cells."""
    if external is not None:
        train_idx, val_idx, test_idx = external
    else:
        size = 0.9 if train_size is None else train_size
        train_idx, val_idx, test_idx = split_indices(n, size, validation_size, seed, shuffle=shuffle,
                                                     batch_size=batch_size if train_size is None else None,
                                                     with_test=True)
        moved = math.ceil(size * n) - len(train_idx)
        if train_size is None and moved:
            logger.warning("%d cells moved from the training to the validation cells (a last minibatch of %d); "
                           "pass train_size to keep them.", moved, moved)
    if len(train_idx) < 2:
        raise SetupError(
            f"LDVAE needs at least 2 training cells (batch normalization); adata has {n} cells and "
            f"train_size={train_size} leaves {len(train_idx)}."
        )
    if len(train_idx) < batch_size:
        logger.warning(
            "batch_size=%d is larger than the %d training cells; each epoch is one minibatch of %d cells.",
            batch_size, len(train_idx), len(train_idx),
        )
    return train_idx, val_idx, test_idx


def minibatches(perm: Tensor, batch_size: int) -> list[Tensor]:
    """Split a permutation into batches; a last batch of one cell joins the previous one
    (batch normalization needs two cells). Every training source cuts its batches here."""
    parts = list(torch.split(perm, batch_size))
    if len(parts) > 1 and parts[-1].shape[0] == 1:
        last = parts.pop()
        parts[-1] = torch.cat([parts[-1], last])
    return parts


def n_minibatches(n_cells: int, batch_size: int) -> int:
    """``len(minibatches(perm, batch_size))`` for ``n_cells`` >= 1 cells, without the split."""
    parts = -(-n_cells // batch_size)
    last = n_cells - (parts - 1) * batch_size
    return parts - 1 if parts > 1 and last == 1 else parts


def validation_batch_size(batch_size: int) -> int:
    """Cells per validation minibatch: no gradients are kept, so larger than training's."""
    return max(batch_size, 1024)


class InMemorySource:
    """Minibatches of an in-memory ``CountData``: a seeded shuffle of the training cells per
    epoch, gathered on the device. Every source offers ``device``, ``n_train``, ``n_val``,
    ``steps_per_epoch``, ``comm`` (a distributed communicator or None), ``by_gene``,
    ``train_batches`` and ``val_batches``; this one also ``data`` and ``epoch_rows``, which
    the compiled runs of many steps per call read directly."""

    comm = None  # one process holds all the cells

    def __init__(self, data: CountData, train_idx: np.ndarray, val_idx: np.ndarray, batch_size: int):
        self.data = data
        self.device = data.device
        self.batch_size = batch_size
        self.train_rows = torch.as_tensor(np.asarray(train_idx), dtype=torch.int64, device=data.device)
        self.val_rows = torch.as_tensor(np.asarray(val_idx), dtype=torch.int64, device=data.device)
        self.n_train = len(self.train_rows)
        self.n_val = len(self.val_rows)
        self.steps_per_epoch = len(minibatches(torch.arange(self.n_train), batch_size))

    # Group each training batch's nonzeros by gene; fit sets it from the module
    # (LDVAEModule.needs_gene_order): only the torch encoder's gradient uses the grouping.
    by_gene = True

    def epoch_rows(self, generator: torch.Generator) -> list[Tensor]:
        """An epoch's minibatches as cell indices: a seeded shuffle of the training cells."""
        perm = self.train_rows[torch.randperm(self.n_train, generator=generator).to(self.device)]
        return minibatches(perm, self.batch_size)

    def train_batches(self, generator: torch.Generator) -> Iterator[CountBatch]:
        parts = self.epoch_rows(generator)
        if self.device.type != "cpu" or len(parts) < 2 or not self.by_gene:
            for rows in parts:
                yield self.data.gather(rows, by_gene=self.by_gene)
            return

        # With the gene grouping (autograd's path) gathering is worth a background thread
        # while this one trains (the same batches in the same order); without it the
        # compiled gather is cheaper than the hand-over between threads.
        def produce(stop):
            for rows in parts:
                if stop.is_set():
                    return
                yield self.data.gather(rows, by_gene=self.by_gene)

        yield from prefetched(produce, depth=2)

    def val_batches(self) -> Iterator[CountBatch]:
        for rows in torch.split(self.val_rows, validation_batch_size(self.batch_size)):
            yield self.data.gather(rows)
