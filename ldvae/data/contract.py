"""The AnnData contract: what ``setup_anndata`` checks and records, and how the
counts reach the compute device.

``setup_anndata`` writes one plain dict, ``adata.uns["ldvae_setup"]``:

- ``layer``: the layer holding raw counts (absent: ``adata.X``);
- ``batch_key``, ``labels_key``: obs columns (absent: a single batch / label);
- ``batch_categories``, ``label_categories``: the categories, in code order;
- ``categorical_covariate_keys`` and, per key, ``categorical_covariate_categories``;
- ``continuous_covariate_keys``.

Nothing else is written into the AnnData. ``CountData`` holds the counts as CSR
tensors on the compute device and gathers minibatches there by index.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import Tensor

from ..cpu import fused
from ..util.checks import MissingKeyError, SetupError
from ..nn.module import CountBatch, gene_order

SETUP_KEY = "ldvae_setup"
MAX_COUNT = 1e9  # per cell and gene; far above any sequencing count, far below float32 overflow


# --- validation ---------------------------------------------------------------------


def check_not_view(adata, what: str = "setup_anndata", alternative: str = "") -> None:
    """A SetupError when ``adata`` is a view: what ``what`` writes would never reach its parent."""
    if adata.is_view:
        raise SetupError(
            f"{what} got a view of an AnnData; writing to a view never reaches its parent. "
            f"Pass the parent, or make it a real object first: adata = {_subset(adata, 'adata')}{alternative}."
        )


def _subset(adata, view: str) -> str:
    """How to make the subset ``view`` of ``adata`` a real object: a copy, or for a backed
    AnnData a copy written to a new file, which stays on disk (a view's counts are read into
    memory when used)."""
    if getattr(adata, "isbacked", False):
        return (f"{view}.copy(filename='subset.h5ad') (a backed AnnData: the subset is written to that file and "
                "stays on disk, where a view would be read into memory)")
    return f"{view}.copy()"


def check_same_genes(adata, var_names: pd.Index) -> None:
    """A SetupError unless ``adata``'s genes are ``var_names``, in that order."""
    names = pd.Index(adata.var_names.astype(str))
    if len(names) == len(var_names) and names.equals(var_names):
        return
    n = min(len(names), len(var_names))
    diff = np.flatnonzero(names[:n] != var_names[:n])
    where = (
        f"first mismatch at position {diff[0]}: model has {var_names[diff[0]]!r}, adata has {names[diff[0]]!r}"
        if diff.size
        else f"model has {len(var_names)} genes, adata has {len(names)}"
    )
    view = "adata[:, model.var_names_]"
    subset = _subset(adata, view) if getattr(adata, "isbacked", False) else view
    raise SetupError(f"adata's genes differ from the model's ({where}). Subset adata to the model's genes: {subset}.")


def get_counts(adata, layer: str | None):
    """The raw count matrix (adata.X or a layer), as stored."""
    if layer is None:
        if adata.X is None:
            raise SetupError("adata.X is empty. Pass the layer holding raw counts, e.g. layer='counts'.")
        return adata.X
    if layer not in adata.layers:
        have = ", ".join(repr(k) for k in adata.layers.keys()) or "none"
        fix = ("The counts of this backed AnnData are its X on disk: pass layer=None."
               if getattr(adata, "isbacked", False) else
               "Store raw counts there first, e.g. adata.layers['counts'] = adata.X.copy().")
        raise SetupError(f"layer={layer!r} is not in adata.layers (have: {have}). {fix}")
    return adata.layers[layer]


def counts_identity(adata, layer: str | None) -> tuple:
    """What changes when an AnnData's cells, genes or counts are replaced, in place (as
    scanpy's ``filter_cells``) or not: the key under which counts read from it may be kept."""
    if adata.isbacked:
        return id(adata), str(adata.filename), adata.shape, id(adata.obs_names), id(adata.var_names)
    counts = adata.X if layer is None else adata.layers.get(layer)
    return id(adata), adata.shape, id(counts), id(adata.obs_names), id(adata.var_names)


def _where(adata, idx_cell: int, idx_gene: int) -> str:
    return f"cell {adata.obs_names[idx_cell]!r}, gene {adata.var_names[idx_gene]!r}"


def _first_bad(mat, bad_mask_fn):
    """(cell, gene, value) of the first entry, in cell order, where bad_mask_fn is True; or None.
    Scans every stored value."""
    if sp.issparse(mat):
        coo_like = sp.csr_matrix(mat)  # no copy when already CSR
        data = coo_like.data
        bad = bad_mask_fn(data)
        if not bad.any():
            return None
        k = int(np.flatnonzero(bad)[0])
        cell = int(np.searchsorted(coo_like.indptr, k, side="right") - 1)
        return cell, int(coo_like.indices[k]), data[k]  # NumPy's scalar: printed to its own precision
    arr = np.asarray(mat)
    bad = bad_mask_fn(arr)
    if not bad.any():
        return None
    cell, gene = (int(i) for i in np.argwhere(bad)[0])
    return cell, gene, arr[cell, gene]


def validate_counts(adata, mat, layer: str | None) -> None:
    """Raise SetupError naming the first non-finite, negative, non-integer or too large
    (> ``MAX_COUNT``) value."""
    where_from = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    others = [k for k in getattr(adata, "layers", {}).keys() if k != layer]
    fix = ("Pass the raw counts layer (layer='name', --layer name on the command line); "
           + (f"this AnnData's other layers: {', '.join(map(repr, others))}." if others
              else "this AnnData has no other layer.")
           + (" If adata.raw holds the raw counts, copy them in: adata.layers['counts'] = "
              "adata.raw[:, adata.var_names].X." if getattr(adata, "raw", None) is not None else ""))
    dtype = mat.dtype
    if dtype.kind not in "biuf":  # complex and time deltas are numbers too, but never counts
        raise SetupError(f"{where_from} has dtype {dtype}; LDVAE needs numeric raw counts. {fix}")
    if sp.issparse(mat):
        check_sparse_structure(mat, where_from)
        if getattr(mat, "has_canonical_format", True) is False or mat.format == "coo":
            mat = mat.tocsr(copy=True)  # repeated entries checked as the value they add up to
            mat.sum_duplicates()
    if np.issubdtype(dtype, np.floating):
        first = _first_bad(mat, lambda a: ~np.isfinite(a))
        if first is not None:
            c, g, v = first
            raise SetupError(
                f"LDVAE models raw counts, but {where_from} has a non-finite value "
                f"(first: {v!s} at {_where(adata, c, g)}). Remove or fix those entries. {fix}"
            )
    first = _first_bad(mat, lambda a: a < 0)
    if first is not None:
        c, g, v = first
        raise SetupError(
            f"LDVAE models raw counts, but {where_from} has negative values "
            f"(first: {v:g} at {_where(adata, c, g)}). {fix}"
        )
    if np.issubdtype(dtype, np.floating):
        first = _first_bad(mat, lambda a: a != np.floor(a))
        if first is not None:
            c, g, v = first
            raise SetupError(
                f"LDVAE models raw counts, but {where_from} has non-integer values "
                f"(first: {v!s} at {_where(adata, c, g)}). {fix}"
            )
    first = _first_bad(mat, lambda a: a > MAX_COUNT)
    if first is not None:
        c, g, v = first
        raise SetupError(
            f"LDVAE models raw counts, but {where_from} has values too large to be counts "
            f"(first: {v:.3g} at {_where(adata, c, g)}; the limit is {MAX_COUNT:.0e}, beyond which "
            f"float32 training overflows). {fix}"
        )


def check_sparse_structure(mat, where_from: str) -> None:
    """Refuse a sparse matrix whose index arrays point outside its shape, which scipy builds
    without a check (e.g. one-based indices from another writer): the compiled kernels would
    read past a row, and a negative index would put a count on another gene."""
    n_rows, n_cols = mat.shape
    if mat.format in ("csr", "csc"):
        n_major, n_minor = (n_rows, n_cols) if mat.format == "csr" else (n_cols, n_rows)
        ptr, idx = np.asarray(mat.indptr), np.asarray(mat.indices)
        problem = (
            f"indptr has {ptr.size} entries for {n_major} {'rows' if mat.format == 'csr' else 'columns'}"
            if ptr.size != n_major + 1 else
            "indptr does not start at 0, rise, and end at the number of stored values"
            if ptr[0] != 0 or ptr[-1] != idx.size or (ptr.size > 1 and np.diff(ptr).min() < 0) else
            f"an index lies outside 0..{n_minor - 1} (found {int(idx.min())}..{int(idx.max())})"
            if idx.size and (idx.min() < 0 or idx.max() >= n_minor) else None
        )
    elif mat.format == "coo":
        bad = (mat.row.size and (mat.row.min() < 0 or mat.row.max() >= n_rows)) or (
            mat.col.size and (mat.col.min() < 0 or mat.col.max() >= n_cols))
        problem = "a row or column index lies outside the shape" if bad else None
    else:
        return
    if problem:
        raise SetupError(f"{where_from} is not a valid {mat.format.upper()} matrix of shape {n_rows} x {n_cols}: "
                         f"{problem}. Rebuild it, e.g. with scipy.sparse.csr_matrix((data, indices, indptr)), "
                         "and check it with .check_format(full_check=True).")


def warn_empty_cells(n_empty: int, n_cells: int) -> None:
    """Cells with zero total counts are kept, as scvi-tools keeps them; a warning counts them."""
    if n_empty:
        warnings.warn(
            f"{n_empty} of {n_cells} cells have zero total counts. They are kept (as scvi-tools keeps them): "
            "each is encoded from all-zero input, its observed library is 0 and it is left out of the library "
            "prior. Remove them first unless you need them: sc.pp.filter_cells(adata, min_counts=1).",
            UserWarning, stacklevel=3,
        )


def warn_repeated_genes(var_names: pd.Index) -> None:
    """Repeated gene names are modelled as separate genes (as scvi-tools models them), but
    every result indexed by gene then repeats them; a warning names the first."""
    repeated = var_names[var_names.duplicated()].unique()
    if len(repeated):
        warnings.warn(
            f"adata.var_names repeats {len(repeated)} gene names (first: {repeated[0]!r}). Each copy is modelled as "
            "its own gene, but the loadings and every per-gene result will repeat those names; make them unique "
            "first: adata.var_names_make_unique().",
            UserWarning, stacklevel=3,
        )


def obs_column(adata, key: str, arg: str) -> pd.Series:
    if key not in adata.obs.columns:
        raise MissingKeyError(
            f"{arg}={key!r} is not a column of adata.obs (columns: "
            f"{', '.join(map(repr, adata.obs.columns[:10])) or 'none'})."
        )
    return adata.obs[key]


def _check_missing(col: pd.Series, key: str, arg: str) -> None:
    missing = col.isna().to_numpy()
    if missing.any():
        raise SetupError(
            f"{arg}={key!r}: {int(missing.sum())} cells have a missing value in adata.obs[{key!r}] "
            f"(first: cell {str(col.index[missing.argmax()])!r}). Fill or drop them."
        )


def _named_codes(col: pd.Series, key: str, arg: str) -> tuple[np.ndarray, list[str]]:
    """Each cell's code among the column's distinct values, grouped as pandas groups them,
    and each value's name: one conversion for the setup's categories and every later
    reading of codes. Two distinct values of one name (``1`` and ``"1"``) are refused."""
    _check_missing(col, key, arg)
    if isinstance(col.dtype, pd.CategoricalDtype):
        codes, values = col.cat.codes.to_numpy(), col.cat.categories
    else:
        try:
            codes, values = pd.factorize(col, sort=True)
        except TypeError:  # values that do not sort together (numbers and strings)
            codes, values = pd.factorize(col)
    names = [str(n) for n in pd.Index(values).astype(str)]
    if len(set(names)) < len(names):
        first = next(n for n in names if names.count(n) > 1)
        same = [v for v, n in zip(values, names) if n == first]
        raise SetupError(
            f"{arg}={key!r}: adata.obs[{key!r}] holds distinct values of the same name {first!r} "
            f"({', '.join(map(repr, same))}), which a saved model could not tell apart. Make them one type first, "
            f"e.g. adata.obs[{key!r}] = adata.obs[{key!r}].astype(str)."
        )
    return np.asarray(codes, dtype=np.int64), names


def _categories(col: pd.Series, key: str, arg: str) -> list[str]:
    names = _named_codes(col, key, arg)[1]
    return names if isinstance(col.dtype, pd.CategoricalDtype) else sorted(names)


def obs_categories(adata, key: str, arg: str) -> list[str]:
    """The categories of ``adata.obs[key]`` (as strings, in code order); SetupError naming ``arg``
    when the column is absent or has missing values."""
    return _categories(obs_column(adata, key, arg), key, arg)


def _codes(col: pd.Series, categories: list[str], key: str, arg: str) -> np.ndarray:
    codes, names = _named_codes(col, key, arg)
    index = {c: i for i, c in enumerate(categories)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise SetupError(
            f"adata.obs[{key!r}] has categories the model was not set up with "
            f"(first: {unknown[0]!r}; known: {categories[:10]}). If they were renamed after setup_anndata, run it "
            "again; a model maps only the categories it was trained on."
        )
    return np.array([index[n] for n in names], dtype=np.int64)[codes]


def get_setup(adata) -> dict:
    if SETUP_KEY not in adata.uns:
        raise SetupError(
            "adata has not been set up for ldvae. Run ldvae.LinearSCVI.setup_anndata(adata, layer='counts') first."
        )
    return plain(adata.uns[SETUP_KEY])


def plain(obj):
    """A value read from ``uns`` as plain Python (arrays of strings come back from h5ad as
    NumPy arrays): dicts, lists, str, int, float."""
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray, pd.Index)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# --- tensors on the device ------------------------------------------------------------


@dataclass
class Covariates:
    """Per-cell codes and values, NumPy, in the model's category order."""

    batch: np.ndarray  # (n_cells,) int64
    label: np.ndarray  # (n_cells,) int64
    cat_covs: np.ndarray | None  # (n_cells, n_cat) int64
    cont_covs: np.ndarray | None  # (n_cells, n_cont) float32


def read_covariates(adata, setup: dict) -> Covariates:
    n = adata.n_obs
    batch = (
        _codes(obs_column(adata, setup["batch_key"], "batch_key"), list(setup["batch_categories"]), setup["batch_key"],
               "batch_key")
        if "batch_key" in setup
        else np.zeros(n, dtype=np.int64)
    )
    label = (
        _codes(obs_column(adata, setup["labels_key"], "labels_key"), list(setup["label_categories"]),
               setup["labels_key"], "labels_key")
        if "labels_key" in setup
        else np.zeros(n, dtype=np.int64)
    )
    cat = None
    if setup.get("categorical_covariate_keys"):
        cats = setup["categorical_covariate_categories"]
        cat = np.stack(
            [_codes(obs_column(adata, k, "categorical_covariate_keys"), list(cats[k]), k, "categorical_covariate_keys")
             for k in setup["categorical_covariate_keys"]],
            axis=1,
        )
    cont = None
    if setup.get("continuous_covariate_keys"):
        cont = np.stack(
            [pd.to_numeric(adata.obs[k]).to_numpy(dtype=np.float32) for k in setup["continuous_covariate_keys"]],
            axis=1,
        )
    return Covariates(batch, label, cat, cont)


def to_csr(mat) -> sp.csr_matrix:
    """Any stored matrix as float32 CSR with sorted indices (a copy; the input is untouched)."""
    csr = sp.csr_matrix(mat, dtype=np.float32, copy=True)
    csr.sum_duplicates()
    csr.eliminate_zeros()
    csr.sort_indices()
    return csr


class CountData:
    """Counts as CSR tensors on one device, with per-cell covariates; gathers minibatches."""

    def __init__(self, csr: sp.csr_matrix, cov: Covariates, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self.device = device
        self.n_cells, self.n_genes = csr.shape
        self.indptr = torch.as_tensor(csr.indptr.astype(np.int64), device=device)
        # Gene indices as int32 (half the memory of int64; gather widens a minibatch's only).
        self.indices = torch.as_tensor(np.asarray(csr.indices, dtype=np.int32), device=device)
        self.values = torch.as_tensor(np.asarray(csr.data, dtype=np.float32), device=device)
        self.row_nnz = self.indptr[1:] - self.indptr[:-1]
        totals = np.asarray(csr.sum(axis=1), dtype=np.float64).ravel()
        self.log_total = torch.as_tensor(np.log(np.maximum(totals, 1e-12)).astype(np.float32), device=device)
        self.lgamma_x1 = torch.as_tensor(_row_sums_lgamma1(csr), device=device)
        self.batch = torch.as_tensor(cov.batch, device=device)
        self.label = torch.as_tensor(cov.label, device=device)
        self.cat_covs = None if cov.cat_covs is None else torch.as_tensor(cov.cat_covs, device=device)
        self.cont_covs = None if cov.cont_covs is None else torch.as_tensor(cov.cont_covs, device=device)
        self.posterior: tuple[Tensor, Tensor] | None = None

    def use_posterior(self, qz_m: np.ndarray, qz_v: np.ndarray, library: np.ndarray) -> None:
        """Cells without counts (a minified AnnData): minibatches carry the stored mean and
        variance of q(z | x), (n_cells, K), and the observed library ``library`` (n_cells,)."""
        as_tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32), device=self.device)  # noqa: E731
        self.posterior = (as_tensor(qz_m), as_tensor(qz_v))
        self.log_total = as_tensor(np.log(np.maximum(np.asarray(library, dtype=np.float64), 1e-12)))

    def gather(self, rows: Tensor, *, by_gene: bool = False) -> CountBatch:
        """The minibatch of cells ``rows`` (int64 on this device), built by index gather.

        ``by_gene`` also groups the nonzeros by gene, which the encoder's weight gradient
        needs (training); without it that grouping is made on first use."""
        b, g = rows.shape[0], self.n_genes
        if self.device.type == "cpu" and fused.ENABLED and fused.cpu_kernels is not None and not by_gene:
            return self._gather_compiled(rows)
        # index_select throughout: a third of advanced indexing's cost on small index sets.
        starts = torch.index_select(self.indptr, 0, rows)
        lens = torch.index_select(self.row_nnz, 0, rows)
        total = int(lens.sum())
        row = torch.repeat_interleave(torch.arange(b, device=self.device), lens, output_size=total)
        ends = torch.cumsum(lens, 0)
        first = ends - lens  # position of each row's first nonzero in the batch
        pos = torch.arange(total, device=self.device).add_(torch.index_select(starts - first, 0, row))
        col32 = torch.index_select(self.indices, 0, pos)
        col = col32.long()
        val = torch.index_select(self.values, 0, pos)
        log1p_val = torch.log1p(val)
        order = None
        if by_gene:
            if self.device.type == "cpu":
                # NumPy's stable sort of 16-bit keys is a radix sort, cheaper than torch's CPU sort.
                keys = col32.numpy()
                order = torch.from_numpy(np.argsort(keys.astype(np.int16) if g < 2**15 else keys, kind="stable"))
            order = gene_order(row, col, log1p_val, g, order)

        ptr = torch.cat([lens.new_zeros(1), ends])
        return self._batch(rows, row, col, row * g + col, val, first, log1p_val, order, ptr)

    def _gather_compiled(self, rows: Tensor) -> CountBatch:
        """``gather`` in one compiled pass (CPU) instead of a dozen torch calls."""
        ptr, row, col, flat, val, log1p_val = (
            torch.from_numpy(a) for a in fused.cpu_kernels.gather_rows(
                self.indptr.numpy(), self.indices.numpy(), self.values.numpy(), rows.numpy(), self.n_genes)
        )
        return self._batch(rows, row, col, flat, val, ptr[:-1], log1p_val, None, ptr)

    def _batch(self, rows, row, col, flat, val, first, log1p_val, order, ptr) -> CountBatch:
        def per_cell(t: Tensor | None) -> Tensor | None:
            return None if t is None else torch.index_select(t, 0, rows)

        return CountBatch(
            row=row,
            col=col,
            flat=flat,
            val=val,
            batch=per_cell(self.batch),
            label=per_cell(self.label),
            cat_covs=per_cell(self.cat_covs),
            cont_covs=per_cell(self.cont_covs),
            log_total=per_cell(self.log_total),
            lgamma_x1=per_cell(self.lgamma_x1),
            n_genes=self.n_genes,
            row_start=first,
            log1p_values=log1p_val,
            gene_order=order,
            row_pointer=ptr,
            posterior=None if self.posterior is None else tuple(per_cell(t) for t in self.posterior),
        )


def _lgamma1(values: np.ndarray) -> np.ndarray:
    from scipy.special import gammaln

    return gammaln(values.astype(np.float64) + 1.0)


def _row_sums_lgamma1(csr: sp.csr_matrix, chunk_nnz: int = 1 << 22) -> np.ndarray:
    """sum_g lgamma(x_ng + 1) per cell, float32 (n_cells,), in float64 over chunks of rows
    so that the temporary memory stays bounded (a few chunk_nnz values)."""
    out = np.empty(csr.shape[0], dtype=np.float64)
    indptr = csr.indptr.astype(np.int64)
    start = 0
    while start < csr.shape[0]:
        stop = max(int(np.searchsorted(indptr, indptr[start] + chunk_nnz, side="right")) - 1, start + 1)
        stop = min(stop, csr.shape[0])
        a, b = indptr[start], indptr[stop]
        cumulative = np.concatenate([[0.0], np.cumsum(_lgamma1(csr.data[a:b]))])
        out[start:stop] = cumulative[indptr[start + 1 : stop + 1] - a] - cumulative[indptr[start:stop] - a]
        start = stop
    return out.astype(np.float32)


def library_prior(csr: sp.csr_matrix, batch: np.ndarray, n_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch mean and variance of log total counts (the learned library's prior), over
    the cells with counts."""
    totals = np.asarray(csr.sum(axis=1), dtype=np.float64).ravel()
    full = totals > 0
    log_tot = np.log(totals[full])
    batch = np.asarray(batch)[full]
    return library_prior_from_sums(np.bincount(batch, minlength=n_batch).astype(np.float64),
                                   np.bincount(batch, weights=log_tot, minlength=n_batch),
                                   np.bincount(batch, weights=log_tot**2, minlength=n_batch))


def library_prior_from_sums(n_cells: np.ndarray, log_total_sum: np.ndarray,
                            log_total_sumsq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The prior of :func:`library_prior` from per-batch sums (cells, log totals and their
    squares), as a streaming pass over counts on disk collects them: mean 0 and variance 1
    for a batch without cells, variance 1 for a batch of one cell, at least 1e-4 otherwise."""
    n = np.asarray(n_cells, dtype=np.float64)
    safe = np.maximum(n, 1.0)
    means = np.where(n > 0, log_total_sum / safe, 0.0)
    var = np.maximum(log_total_sumsq / safe - means**2, 0.0)
    variances = np.where(n > 1, np.maximum(var, 1e-4), 1.0)
    return means.astype(np.float32), variances.astype(np.float32)
