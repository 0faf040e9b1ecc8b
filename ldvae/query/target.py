"""What a query reads of a trained model, and the rules every query shares: the rows it
selects, its rows per minibatch, its random stream and the decoder's loadings."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..data.contract import CountData
from ..nn.module import LDVAEModule, ModuleConfig
from ..util.checks import positive_int
from ..util.settings import float32_default, own_rng, settings

# Large batches under no_grad: about this many dense entries per minibatch. A query holds a
# score of such tensors at once; 2M entries (8 MB each in float32) gave the same or shorter
# times than 8M on the 8498-cell, 1000-gene data, with half the memory or less.
QUERY_ENTRIES = 2_000_000


@dataclass(frozen=True)
class Fitted:
    """A trained model as queries see it.

    ``cells(adata, streamed)`` returns the validated counts of ``adata`` (None: the training
    data) on ``device``: a ``CountData``, or with ``streamed`` counts on disk left there."""

    module: LDVAEModule
    var_names: pd.Index
    setup: dict
    adata: object
    device: torch.device
    cells: Callable[[object, bool], CountData]

    @property
    def config(self) -> ModuleConfig:
        return self.module.config

    @property
    def n_genes(self) -> int:
        return len(self.var_names)


def query_batch_size(batch_size: int | None, n_genes: int) -> int:
    """Rows per minibatch: ``batch_size`` checked, or about QUERY_ENTRIES dense entries."""
    if batch_size is not None:
        return positive_int("batch_size", batch_size)
    return int(np.clip(QUERY_ENTRIES // max(n_genes, 1), 128, 16384))


def rows_of(n_cells: int, indices, device: torch.device) -> torch.Tensor:
    """The selected rows (positions, negative ones from the end, or a boolean mask) on ``device``."""
    if indices is None:
        return torch.arange(n_cells, device=device)
    idx = np.asarray(indices)
    if idx.dtype == bool:
        if idx.shape != (n_cells,):
            raise IndexError(f"indices is a boolean mask of shape {idx.shape}; it needs one entry per cell "
                             f"({n_cells}).")
        idx = np.flatnonzero(idx)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise IndexError(f"indices must be integer cell positions or a boolean mask, got {idx.dtype} values "
                         f"(first: {idx.ravel()[0]!r}); for cell names use adata.obs_names.get_indexer(names).")
    idx = idx.astype(np.int64).ravel()
    if idx.size == 0:
        raise IndexError("indices selects no cells; a query needs at least one (indices=None: every cell).")
    if idx.min() < -n_cells or idx.max() >= n_cells:
        raise IndexError(f"indices out of range for {n_cells} cells.")
    return torch.as_tensor(idx % max(n_cells, 1), device=device)


@contextlib.contextmanager
def querying(fitted: Fitted):
    """Run a query of ``fitted``'s module in eval mode, without gradients, under
    ``ldvae.settings.seed``, leaving the global torch RNG as it was (see ``own_rng``: a fit
    or query in another thread waits)."""
    devices = [fitted.device] if fitted.device.type == "cuda" else []
    with own_rng(settings.seed, devices), float32_default():
        fitted.module.eval()
        with torch.no_grad():
            yield


def start(fitted: Fitted, adata, indices, batch_size: int | None, per_row: int = 1, *, streamed: bool = False):
    """The data, the selected rows (a device tensor) and the rows per minibatch of a query.

    ``per_row`` is how many decoded copies of each cell a minibatch holds (samples), so the
    default batch size keeps the dense work per minibatch bounded. The data is a
    ``CountData`` in memory; with ``streamed``, counts on disk stay there (a
    ``DiskCells``: iterate it with ``minibatches_of``)."""
    data = fitted.cells(adata, streamed)
    rows = rows_of(data.n_cells, indices, fitted.device)
    size = query_batch_size(batch_size, fitted.n_genes)
    if batch_size is None:
        size = max(size // per_row, 1)
    return data, rows, size


def obs_names(fitted: Fitted, adata, rows: torch.Tensor) -> pd.Index:
    names = (fitted.adata if adata is None else adata).obs_names
    return pd.Index(names[rows.cpu().numpy()])


def gene_mask(fitted: Fitted, gene_list: Sequence[str] | None) -> np.ndarray | None:
    """Boolean mask over the model's genes (in model order), or None for all genes."""
    if gene_list is None:
        return None
    if isinstance(gene_list, str):
        gene_list = [gene_list]
    wanted = pd.Index([str(g) for g in gene_list])
    missing = wanted.difference(fitted.var_names)
    if len(missing):
        raise ValueError(
            f"gene_list has {len(missing)} gene(s) the model does not have (first: {missing[0]!r}). "
            "Pass names from model.var_names_."
        )
    return np.asarray(fitted.var_names.isin(wanted))


def batch_codes(fitted: Fitted, transform_batch) -> list[int | None]:
    """Batch codes for ``transform_batch``: None (each cell's own batch), a category or a list."""
    if transform_batch is None:
        return [None]
    one = isinstance(transform_batch, str) or np.ndim(transform_batch) == 0  # a category: str, int, float, ...
    values = [transform_batch] if one else list(transform_batch)
    categories = [str(c) for c in fitted.setup.get("batch_categories", ["0"])]
    codes: list[int | None] = []
    for v in values:
        if v is None:
            codes.append(None)
        elif str(v) in categories:
            codes.append(categories.index(str(v)))
        else:
            raise ValueError(
                f"transform_batch={v!r} is not a batch category of the model (categories: {categories[:10]}). "
                "Pass one of them, a list of them, or None for each cell's observed batch."
            )
    return codes


def decoder_scale(module: LDVAEModule) -> torch.Tensor:
    """Per-gene factor that batch normalization (eval mode) multiplies the linear map by."""
    bn = module.factor_bn
    if bn is None:
        return torch.ones(module.config.n_genes)
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().cpu()


def factor_loadings(module: LDVAEModule, var_names: pd.Index) -> pd.DataFrame:
    """Loadings W: genes x ``Z_0 … Z_{K-1}``, batch-norm scale gamma/sqrt(var + eps) folded in.

    Decoding z + e_k minus decoding z, in unnormalized log-rate space, equals column k."""
    K = module.config.n_latent
    w = module.factor_regressor.weight.detach().cpu()[:, :K] * decoder_scale(module)[:, None]
    return pd.DataFrame(w.numpy(), index=var_names.copy(), columns=[f"Z_{i}" for i in range(K)])


def covariate_coefficients(module: LDVAEModule, var_names: pd.Index, columns: list[str]) -> pd.DataFrame:
    """Decoder coefficients of the covariate columns ``columns``, on the loadings' scale."""
    K = module.config.n_latent
    w = module.factor_regressor.weight.detach().cpu()[:, K:] * decoder_scale(module)[:, None]
    return pd.DataFrame(w.numpy(), index=var_names.copy(), columns=columns)


def gene_intercepts(module: LDVAEModule, var_names: pd.Index) -> pd.Series:
    """Per-gene intercept of the unnormalized log rate (batch-norm shift and bias), at z = 0."""
    bn = module.factor_bn
    lin = module.factor_regressor
    bias = lin.bias.detach().cpu() if lin.bias is not None else torch.zeros(len(var_names))
    if bn is None:
        value = bias
    else:
        value = (bias - bn.running_mean.detach().cpu()) * decoder_scale(module) + bn.bias.detach().cpu()
    return pd.Series(value.numpy(), index=var_names.copy(), name="intercept")
