"""The tutorial's preparation of raw counts (:func:`prepare`) and the preconditions of its
highly-variable-gene selection, checked before scanpy runs so that a failure says why."""

from __future__ import annotations

import logging
import math
import traceback
from typing import Literal

import numpy as np
import scipy.sparse as sp

from ..data.contract import SetupError, get_counts, obs_categories, validate_counts
from .checks import check_option

logger = logging.getLogger(__name__)


def prepare(
    adata,
    *,
    layer: str | None = None,
    target_sum: float = 1e5,
    n_top_genes: int = 1000,
    hvg_flavor: Literal["seurat_v3", "seurat_v3_paper", "seurat", "cell_ranger"] = "seurat_v3",
    batch_key: str | None = None,
):
    """The tutorial's preparation, on a copy of ``adata`` (the input is not modified).

    Counts (``adata.X`` or ``adata.layers[layer]``) are checked to be raw counts, then:
    ``layers["counts"]``, ``normalize_total(target_sum)``, ``log1p``, ``raw`` frozen,
    ``highly_variable_genes(flavor, n_top_genes, subset=True)`` (on the counts layer for the
    ``seurat_v3`` flavors; per batch with ``batch_key``). Cells left without counts in the
    selected genes are dropped with a warning (they carry nothing the factors could explain).

    Returns
    -------
    A new AnnData, genes subset to the highly variable ones, with ``X`` (log1p of
    normalized counts), ``layers["counts"]``, ``raw`` (all genes, log-normalized),
    ``var["highly_variable"]`` and the other HVG columns, ``uns["log1p"]``, ``uns["hvg"]``.

    Raises
    ------
    SetupError
        Counts that are not raw counts; a ``batch_key`` column that is absent, has missing
        values or a batch of one cell; for the ``seurat_v3`` flavors, fewer than
        ``MIN_VARYING_GENES`` genes varying in a batch, or a loess fit that fails (checked
        before scanpy, whose loess crashes the process on such input).
    """
    import scanpy as sc

    counts = get_counts(adata, layer)
    validate_counts(adata, counts, layer)
    batches = _hvg_batches(adata, batch_key)
    check_option("n_top_genes", n_top_genes, integer=True, minimum=1)
    check_option("target_sum", target_sum, minimum=0, exclusive=True)
    counts = sp.csr_matrix(counts, dtype=np.float32)
    detected = int((counts.getnnz(axis=0) > 0).sum())
    if n_top_genes > detected:
        raise SetupError(
            f"n_top_genes={n_top_genes} but only {detected} of the {adata.n_vars} genes have any counts; "
            f"ask for at most {detected} highly variable genes (--n-top-genes)."
        )
    if hvg_flavor.startswith("seurat_v3"):
        _check_loess_points(counts, batches, batch_key, hvg_flavor)
    out = adata.copy()
    out.X = counts.copy()
    out.layers["counts"] = counts
    sc.pp.normalize_total(out, target_sum=target_sum)
    sc.pp.log1p(out)
    out.raw = out
    try:
        sc.pp.highly_variable_genes(
            out,
            flavor=hvg_flavor,
            layer="counts" if hvg_flavor.startswith("seurat_v3") else None,
            n_top_genes=n_top_genes,
            batch_key=batch_key,
            subset=True,
        )
    except ValueError as err:
        if hvg_flavor.startswith("seurat_v3"):
            _explain_loess_failure(counts, batches, batch_key, hvg_flavor, err)
            if any("loess" in frame.f_code.co_filename for frame, _ in traceback.walk_tb(err.__traceback__)):
                raise SetupError(
                    f"hvg_flavor={hvg_flavor!r}: scanpy's loess fit of gene variance on gene mean failed "
                    f"({_one_line_error(err)}), as it can on few cells or many rare genes. {_LOESS_FIXES}"
                ) from err
        raise
    empty = np.asarray(out.layers["counts"].sum(axis=1)).ravel() <= 0
    if empty.any():
        logger.warning(
            "Dropping %d of %d cells with no counts in the %d highly variable genes.",
            int(empty.sum()), out.n_obs, out.n_vars,
        )
        out = out[~empty].copy()
    logger.info("prepared %d cells x %d highly variable genes (%s)", out.n_obs, out.n_vars, hvg_flavor)
    return out


# scanpy's seurat_v3 loess (span 0.3, degree 2) needs more than degree + 1 = 3 points in a
# span's neighbourhood: with fewer genes it never fits, and with 3 or fewer it crashes the process.
_LOESS_SPAN = 0.3
MIN_VARYING_GENES = math.ceil(4 / _LOESS_SPAN)


def _hvg_batches(adata, batch_key: str | None) -> tuple[list[str], np.ndarray]:
    """(batch names, code per cell) as scanpy's HVG step groups the cells; SetupError for an absent
    column, missing values, or a batch of one cell (whose variance across cells is undefined)."""
    if batch_key is None:
        return ["all cells"], np.zeros(adata.n_obs, dtype=np.int64)
    obs_categories(adata, batch_key, "batch_key")  # absent column, missing values
    names, codes = np.unique(adata.obs[batch_key].astype(str).to_numpy(), return_inverse=True)
    sizes = np.bincount(codes, minlength=len(names))
    if sizes.min() < 2:
        small = names[sizes < 2]
        raise SetupError(
            f"batch_key={batch_key!r}: {len(small)} batch(es) of adata.obs[{batch_key!r}] have a single cell "
            f"(first: {str(small[0])!r}); highly variable genes are selected per batch from the variance "
            "across its cells, which needs at least 2. Merge or drop those cells, or leave out batch_key "
            "(--batch-key)."
        )
    return [str(n) for n in names], codes.astype(np.int64)


def _varying_genes(counts: sp.csr_matrix, codes: np.ndarray, n_batch: int) -> np.ndarray:
    """Per batch, the number of genes whose counts are not all equal across its cells, (n_batch,)."""
    onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n_batch, len(codes)))
    x = counts.astype(np.float64)
    nnz = (onehot @ (x != 0).astype(np.float64)).toarray()  # (n_batch, n_genes)
    s1 = (onehot @ x).toarray()
    s2 = (onehot @ x.multiply(x)).toarray()
    n = np.bincount(codes, minlength=n_batch)[:, None]
    # Some but not all cells detected, or all detected with unequal values.
    varies = ((nnz > 0) & (nnz < n)) | ((nnz == n) & (n * s2 - s1**2 > 0))
    return varies.sum(axis=1)


def _check_loess_points(counts, batches, batch_key: str | None, hvg_flavor: str) -> None:
    names, codes = batches
    varying = _varying_genes(counts, codes, len(names))
    if varying.min() >= MIN_VARYING_GENES:
        return
    worst = int(varying.argmin())
    where = "the cells" if batch_key is None else f"the cells of batch {names[worst]!r} (batch_key={batch_key!r})"
    fix = (
        "Pass more genes, or hvg_flavor='seurat' (--hvg-flavor seurat)"
        if batch_key is None
        else "Merge that batch with another, leave out batch_key (--batch-key), or pass hvg_flavor='seurat'"
    )
    raise SetupError(
        f"hvg_flavor={hvg_flavor!r} fits a loess curve of gene variance on gene mean, which needs at least "
        f"{MIN_VARYING_GENES} genes whose counts vary across {where}; only {int(varying[worst])} do. {fix}."
    )


_LOESS_FIXES = ("Drop rare genes first (sc.pp.filter_genes(adata, min_cells=10)), merge small batches, leave out "
                "batch_key (--batch-key), or pass hvg_flavor='seurat' (--hvg-flavor seurat).")


def _explain_loess_failure(counts, batches, batch_key: str | None, hvg_flavor: str, err: ValueError) -> None:
    """Raise SetupError naming the first batch whose seurat_v3 loess fit fails (scanpy's own error
    names neither the batch nor the cause); return when every batch fits (another error)."""
    from skmisc.loess import loess

    names, codes = batches
    for b, name in enumerate(names):
        x = counts[codes == b].astype(np.float64)
        n = x.shape[0]
        mean = np.asarray(x.mean(axis=0)).ravel()
        var = (np.asarray(x.multiply(x).sum(axis=0)).ravel() - n * mean**2) / (n - 1)
        keep = var > 0
        try:
            loess(np.log10(mean[keep]), np.log10(var[keep]), span=_LOESS_SPAN, degree=2).fit()
        except ValueError as fit_err:
            where = "the cells" if batch_key is None else f"batch {name!r} of batch_key={batch_key!r} ({n} cells)"
            raise SetupError(
                f"hvg_flavor={hvg_flavor!r}: the loess fit of gene variance on gene mean failed for {where}: "
                f"too many genes share the same mean, as rare genes in few cells do ({_one_line_error(fit_err)}). "
                f"{_LOESS_FIXES}"
            ) from err


def _one_line_error(err: BaseException) -> str:
    text = err.args[0] if err.args else ""
    text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    return " ".join(text.split()) or type(err).__name__


# --- fit and interpret ------------------------------------------------------------------------
