"""Where a fit starts: its own random weights, or the principal components of the counts.

An LDVAE's likelihood changes little along the directions of its weakest factors, so where
a fit ends there depends on where it began: fits that differ only by their seed agree on
the strong factors and disagree on the weak ones. ``train(init="pca")`` starts every fit
from the same point, chosen by the data:

- the decoder's loadings (the first K columns of its linear map) are the top K principal
  axes of log-normalized counts (``log1p(1e4 x / total)``, centred within each batch),
  each scaled by its standard deviation;
- the z encoder's first layer gives, in its first hidden units, the projection of
  ``log1p(x)`` on each of the top ``n_hidden / 2`` axes and its negative (batch
  normalization rescales them, the ReLU keeps either side), and its mean head is solved
  by least squares so that the encoder maps each cell to its component scores (unit
  variance);
- every other weight is drawn as the model draws it, from seed 0 whatever the fit's seed.

The components come from the model's cells (at most ``START_CELLS``, a fixed subset), so
the start depends on the data alone: the fit's seed still sets the train/validation split,
the minibatch order and the sampling. The start sees the validation cells' counts (no
labels, 10 % of the cells by default) and no step of the fit does. The model and its prior
are unchanged; only the first step's weights differ.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch

from ..data.contract import get_counts, read_covariates, to_csr
from ..nn.module import LDVAEModule
from ..util.checks import SetupError
from ..util.settings import own_rng

logger = logging.getLogger(__name__)

START_CELLS = 20000  # cells the principal components are computed from
_TARGET_SUM = 1e4
_RIDGE = 1e-3  # relative ridge of the head's least squares (a few collinear hidden units)


def start_cells(n_cells: int, n: int = START_CELLS) -> np.ndarray:
    """Sorted cells the start is computed from: all ``n_cells``, or a fixed subset of ``n``."""
    if n_cells <= n:
        return np.arange(n_cells, dtype=np.int64)
    return np.sort(np.random.default_rng(0).choice(n_cells, n, replace=False))


def log_normalized(csr: sp.csr_matrix) -> sp.csr_matrix:
    """``log1p(1e4 x / total)`` per cell (cells without counts stay zero)."""
    totals = np.asarray(csr.sum(axis=1), dtype=np.float64).ravel()
    scale = np.divide(_TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    out = sp.csr_matrix(sp.diags(scale) @ csr, dtype=np.float64)
    np.log1p(out.data, out=out.data)
    return out


def principal_components(x: sp.csr_matrix, batch: np.ndarray, k: int, *, n_iter: int = 6,
                         oversample: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top ``k`` principal components of ``x`` centred within each batch, by randomized SVD.

    The centred matrix is never formed: ``A v = x v - B (M v)`` with ``B`` the one-hot batch
    matrix and ``M`` the per-batch gene means. Returns ``u`` (n_cells, k), ``s`` (k,) and
    ``v`` (n_genes, k); signs as the fixed random start leaves them.
    """
    n, g = x.shape
    codes, batch = np.unique(batch, return_inverse=True)
    onehot = sp.csr_matrix((np.ones(n), (np.arange(n), batch)), shape=(n, codes.size))
    counts = np.asarray(onehot.sum(axis=0)).ravel()
    means = (onehot.T @ x).toarray() / counts[:, None]  # (n_batch, n_genes)

    def a(v):  # (n_genes, m) -> (n_cells, m)
        return x @ v - onehot @ (means @ v)

    def at(u):  # (n_cells, m) -> (n_genes, m)
        return x.T @ u - means.T @ (onehot.T @ u)

    m = min(k + oversample, n, g)
    q, _ = np.linalg.qr(a(np.random.default_rng(0).standard_normal((g, m))))
    for _ in range(n_iter):
        q, _ = np.linalg.qr(at(q))
        q, _ = np.linalg.qr(a(q))
    u_small, s, vt = np.linalg.svd(np.asarray(at(q)).T, full_matrices=False)  # q.T A = u_small s vt
    return (q @ u_small)[:, :k], s[:k], vt[:k].T


def _hidden(module: LDVAEModule, log1p_x: sp.csr_matrix) -> np.ndarray:
    """The z encoder's last hidden layer for these cells, batch normalization on their own
    statistics (as in training), no dropout: (n_cells, n_hidden)."""
    trunk = module.z_encoder.trunk
    h = None
    for layer in trunk:
        if isinstance(layer, torch.nn.Linear):
            w = layer.weight.detach().cpu().double().numpy()
            b = layer.bias.detach().cpu().double().numpy()
            h = (log1p_x @ w.T if h is None else h @ w.T) + b
        elif isinstance(layer, torch.nn.BatchNorm1d):
            h = (h - h.mean(0)) / np.sqrt(h.var(0) + layer.eps)
            h = h * layer.weight.detach().cpu().double().numpy() + layer.bias.detach().cpu().double().numpy()
        elif isinstance(layer, torch.nn.ReLU):
            h = np.maximum(h, 0.0)
    return h


def _fit_head(hidden: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Least squares ``target ≈ hidden @ w.T + b`` with a small ridge; returns w, b and R²."""
    mean_h, mean_t = hidden.mean(0), target.mean(0)
    h, t = hidden - mean_h, target - mean_t
    gram = h.T @ h
    gram[np.diag_indices_from(gram)] += _RIDGE * np.trace(gram) / gram.shape[0]
    w = np.linalg.solve(gram, h.T @ t).T  # (k, n_hidden)
    b = mean_t - w @ mean_h
    r2 = 1.0 - ((t - h @ w.T) ** 2).sum() / (t**2).sum()
    return w, b, float(r2)


@torch.no_grad()
def pca_start(module: LDVAEModule, counts: sp.csr_matrix, batch: np.ndarray) -> None:
    """Start ``module`` from the principal components of ``counts`` (cells x the model's
    genes, raw counts) with batch codes ``batch``: see the module's docstring.

    Its dense algebra runs on one BLAS thread: the matrices are small (cells x K + 10 at
    most), and a multithreaded BLAS beside busy cores (the workflow's refit workers) spins
    for its threads: 14 s instead of 0.2 s for the QR steps of the demo's start."""
    from threadpoolctl import threadpool_limits  # here: importing it sets KMP_DUPLICATE_LIB_OK for the process

    with threadpool_limits(limits=1, user_api="blas"):
        _pca_start(module, counts, batch)


def _pca_start(module: LDVAEModule, counts: sp.csr_matrix, batch: np.ndarray) -> None:
    c = module.config
    k = c.n_latent
    if c.latent_distribution != "normal":
        raise SetupError("init='pca' needs latent_distribution='normal' (the decoder of 'ln' sees softmax(z)).")
    n, g = counts.shape
    if n < k + 2 or g < k:
        logger.warning("init='pca' needs more cells and genes than factors (%d cells, %d genes, n_latent=%d); "
                       "the fit starts from its random weights.", n, g, k)
        return
    with own_rng(0):  # the weights no component sets: the same for every seed
        fixed = type(module)(c, module.library_log_means.cpu(), module.library_log_vars.cpu())
    module.load_state_dict(fixed.state_dict())
    first = module.z_encoder.trunk[0]
    n_pc = min(max(k, first.weight.shape[0] // 2), n - 1, g)
    x = log_normalized(counts)
    u, s, v = principal_components(x, batch, n_pc)
    weight = module.factor_regressor.weight  # (n_genes, K + covariate columns)
    weight[:, :k] = torch.as_tensor(v[:, :k] * (s[:k] / np.sqrt(n)), dtype=weight.dtype)
    # First hidden units: +-(projection on each component); batch norm rescales them.
    pairs = min(n_pc, first.weight.shape[0] // 2)
    rows = np.repeat(v[:, :pairs].T, 2, axis=0) * np.tile([[1.0], [-1.0]], (pairs, 1))  # (2 pairs, n_genes)
    first.weight[: 2 * pairs] = torch.as_tensor(rows, dtype=first.weight.dtype)
    first.bias[: 2 * pairs] = 0.0
    log1p_x = counts.astype(np.float64)
    np.log1p(log1p_x.data, out=log1p_x.data)
    w, b, r2 = _fit_head(_hidden(module, log1p_x), u[:, :k] * np.sqrt(n))  # scores of unit variance
    module.z_encoder.mean.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
    module.z_encoder.mean.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    logger.info("Started from the top %d principal components of %d cells (they hold %.1f %% of the variance "
                "of log-normalized counts; the encoder reproduces their scores with R² %.2f).",
                k, n, 100 * float((s[:k] ** 2).sum() / _total_variance(x, batch)), r2)


def start_from_counts(init: Literal["random", "pca"], module: LDVAEModule, adata, setup: dict, *,
                      frozen: dict | None, fresh: bool) -> None:
    """``train(init=...)`` on a model of ``adata`` (set up as ``setup``): with ``"pca"``, start
    an untrained ``module`` from the principal components of its cells; leave a trained one
    as it is. ``"random"`` keeps the weights as built."""
    if init == "random":
        return
    if frozen:
        raise SetupError("init='pca' starts a new model; a query mapped onto a reference keeps the reference's "
                         "weights. Leave init at 'random' (its default) for load_query_data models.")
    if not fresh:
        logger.info("init='pca' applies to an untrained model; this one continues from its weights.")
        return
    rows = start_cells(adata.n_obs)
    counts = to_csr(get_counts(adata, setup.get("layer"))[rows])
    pca_start(module, counts, read_covariates(adata, setup).batch[rows])


def _total_variance(x: sp.csr_matrix, batch: np.ndarray) -> float:
    """Sum of squares of ``x`` centred within each batch."""
    total = float(x.multiply(x).sum())
    for code in np.unique(batch):
        rows = x[batch == code]
        total -= float((np.asarray(rows.sum(axis=0)).ravel() ** 2).sum()) / rows.shape[0]
    return total
