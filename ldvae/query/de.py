"""Bayesian differential expression from the LDVAE posterior, as scvi-tools computes it.

For two groups of cells A and B, draw normalized expressions rho_A, rho_B from the
posterior of randomly chosen cells of each group (``n_samples_overall`` draws per group)
and compare them pair by pair:

- ``mode="vanilla"`` (Lopez et al. 2018): M1 is rho_A > rho_B; ``proba_m1`` = P(M1),
  ``bayes_factor`` = log P(M1) - log P(M2);
- ``mode="change"`` (Boyeau et al. 2019): the effect size is the log2 fold change
  r = log2(rho_A + c) - log2(rho_B + c) with a pseudocount c; a gene is DE when
  |r| >= ``delta``; ``proba_de`` = max(P(r >= delta), P(r < -delta)) and genes are called
  at a posterior expected false discovery rate ``fdr_target`` (``is_de_fdr_<target>``).

With ``batch_correction=True`` every draw is decoded in each batch in turn (the
counterfactual of ``transform_batch``) and only draws decoded in the same batch are
paired; otherwise each cell is decoded in its observed batch.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import numpy as np
import pandas as pd
import torch

from ..util.checks import MissingKeyError
from ..util.settings import settings
from .posterior import get_latent_representation, normalized_expression
from .target import Fitted, batch_codes, querying, start


logger = logging.getLogger(__name__)

EPS = 1e-8
# Options of scvi-tools' DifferentialComputation.get_bayes_factors passed through **kwargs.
BAYES_OPTIONS = {
    "n_samples_overall": 5000,
    "use_permutation": False,
    "m_permutation": 10000,
    "pseudocounts": None,
    "threshold_counts": 0.01,
    "test_mode": "three",
    "cred_interval_lvls": None,
}


def _mask(adata, idx, name: str) -> np.ndarray:
    """A boolean cell mask from a mask, a list of positions or an ``adata.obs.query`` string."""
    n = adata.n_obs
    if isinstance(idx, str):  # by position: cell names may repeat
        selected = adata.obs.eval(idx)
        if not (isinstance(selected, pd.Series) and selected.dtype == bool):
            raise ValueError(f"{name}={idx!r} is not a condition on adata.obs columns (as adata.obs.query takes).")
        return selected.to_numpy()
    arr = np.asarray(idx).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} selects no cells.")
    if arr.dtype == bool:
        if arr.size != n:
            raise ValueError(f"{name} is a boolean mask of length {arr.size}; adata has {n} cells.")
        return arr
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < -n or arr.max() >= n):
        raise ValueError(f"{name} must hold cell positions in [0, {n}), a boolean mask or a query string.")
    mask = np.zeros(n, dtype=bool)
    mask[arr] = True
    return mask


def _comparisons(adata, groupby, group1, group2, idx1, idx2) -> list[tuple]:
    """(group1 name, group2 name, mask1, mask2) per comparison; names are None for idx1/idx2."""
    if idx1 is not None:
        m1 = _mask(adata, idx1, "idx1")
        m2 = ~m1 if idx2 is None else _mask(adata, idx2, "idx2")
        return [(None, None, m1, m2)]
    if groupby is None:
        raise ValueError(
            "differential_expression needs groupby= (an adata.obs column) or idx1= (the cells of group 1)."
        )
    if groupby not in adata.obs.columns:
        raise MissingKeyError(
            f"groupby={groupby!r} is not a column of adata.obs (columns: {list(adata.obs.columns[:10])})."
        )
    col = adata.obs[groupby]
    present = list(col.astype("category").cat.categories)
    if group1 is None:
        group1 = present
        if len(group1) < 2:
            raise ValueError(f"adata.obs[{groupby!r}] has a single group ({present}); DE needs two.")
    groups1 = [group1] if isinstance(group1, (str, int, np.integer)) or not np.iterable(group1) else list(group1)
    def cells_of(g):  # a missing label (NaN, None or pandas' NA) is no group's
        return (col == g).fillna(False).to_numpy(dtype=bool)

    for g in groups1 + ([] if group2 is None else [group2]):
        if not cells_of(g).any():
            raise ValueError(f"group {g!r} has no cells in adata.obs[{groupby!r}] (groups: {present[:10]}).")
    out = []
    for g in groups1:
        m1 = cells_of(g)
        m2 = ~m1 if group2 is None else cells_of(group2)
        out.append((g, "Rest" if group2 is None else group2, m1, m2))
    return out


def _raw_properties(fitted: Fitted, data, rows: torch.Tensor, size: int) -> dict[str, np.ndarray]:
    """Per-gene mean count, fraction of nonzero counts and mean count per 10^4 (streamed)."""
    g = len(fitted.var_names)
    total = torch.zeros(3, g, dtype=torch.float64, device=data.device)
    for r in torch.split(rows, size):
        b = data.gather(r)
        scale = 1e4 / b.log_total.exp()  # (n,)
        total[0] += b.x.sum(0)
        total[1] += (b.x > 0).sum(0)
        total[2] += (b.x * scale[:, None]).sum(0)
    n = max(rows.shape[0], 1)
    mean, nonzero, normalized = (total / n).cpu().numpy()
    return {"raw_mean": mean, "non_zeros_proportion": nonzero, "raw_normalized_mean": normalized}


def _filter_outliers(fitted: Fitted, adata, cells: np.ndarray) -> np.ndarray:
    from sklearn.covariance import EllipticEnvelope

    reps = get_latent_representation(fitted, adata, cells)
    try:
        keep = EllipticEnvelope().fit_predict(reps) == 1
    except ValueError:
        warnings.warn("Could not estimate the latent covariance to filter outliers; using all cells.", stacklevel=4)
        return cells
    return cells[keep]


def _sample_scales(fitted: Fitted, data, cells: np.ndarray, codes, n_total: int, size: int, *, adata=None,
                   importance: dict | None = None, rng=None) -> tuple[np.ndarray, np.ndarray]:
    """``n_total`` posterior draws of rho from random cells, split evenly over ``codes``:
    scales (n_draws, n_genes) float32 and the batch code of each draw (-1: observed batch).
    ``importance`` (keywords of ``importance_weights``): ``n_total // n_cells + 1`` draws per
    cell, resampled by their importance weights (each cell decoded in its own batch)."""
    if importance is not None:
        from .importance import resampled_expression

        if codes != [None]:
            raise ValueError("Importance weights need each cell decoded in its own batch (batch_correction=False).")
        rows = torch.as_tensor(cells, device=data.device)
        scales, _ = resampled_expression(fitted, adata, data, rows, size, n_total, None, 1, rng, **importance)
        return scales.astype(np.float32), np.full(n_total, -1)
    per_code = max(n_total // len(codes), 2)
    cells_t = torch.as_tensor(cells, device=data.device)
    scales, ids = [], []
    for code in codes:
        rows = cells_t[torch.randint(len(cells), (per_code,), device=data.device)]
        s = normalized_expression(fitted, data, rows, size, codes=[code], mask=None, library_size=1, n_samples=1)[0]
        scales.append(s.astype(np.float32))
        ids.append(np.full(per_code, -1 if code is None else code))
    return np.concatenate(scales), np.concatenate(ids)


def _pairs(a: np.ndarray, b: np.ndarray, use_permutation: bool, m: int | None, rng) -> tuple[np.ndarray, np.ndarray]:
    if not use_permutation:
        n = min(len(a), len(b))
        return a[:n], b[:n]
    return a[rng.integers(len(a), size=m)], b[rng.integers(len(b), size=m)]


def _pseudocounts(s1, s2, zero1: np.ndarray, zero2: np.ndarray, quantile: float = 0.9) -> float:
    """Offset c that shrinks the LFC of genes not expressed in a group, scvi-tools 1.5's
    estimate: the ``quantile`` of the largest sampled rho among those genes (1e-10 for a
    group without such genes), the larger of the two groups', over the number of genes, at
    least 1e-10."""
    eps = []
    for s, zero in ((s1, zero1), (s2, zero2)):
        eps.append(np.quantile(s.max(0)[zero], quantile) if zero.any() else 1e-10)
    return float(max(max(eps) / s1.shape[1], 1e-10))


def _estimate_delta(lfc_means: np.ndarray, coef: float = 0.6, min_thres: float = 0.1) -> float:
    """A DE threshold from the spread of mean LFCs: ``coef`` times the mean absolute value of
    the outer modes of a 3-component Gaussian mixture, at least ``min_thres``."""
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(n_components=3, random_state=0).fit(lfc_means[:, None])
    modes = np.sort(gmm.means_.ravel())
    return float(max(min_thres, coef * np.abs(modes[[0, -1]]).mean()))


def _hpd(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Highest posterior density interval per column of ``samples`` (n_samples, n_genes)."""
    s = np.sort(samples, axis=0)
    n = s.shape[0]
    k = int(np.floor(level * n))
    if k >= n or k < 1:
        raise ValueError(f"cred_interval_lvls must be in (0, 1) with enough samples, got {level!r}.")
    widths = s[k:] - s[: n - k]  # (n - k, G)
    lo = np.argmin(widths, axis=0)
    cols = np.arange(s.shape[1])
    return s[lo, cols], s[lo + k, cols]


def fdr_calls(proba_de: pd.Series, fdr: float) -> pd.Series:
    """Call the largest set of top genes whose posterior expected FDR, mean(1 - proba_de),
    is at most ``fdr``."""
    order = proba_de.sort_values(ascending=False)
    expected_fdr = (1.0 - order).cumsum() / np.arange(1, len(order) + 1)
    called = pd.Series(False, index=order.index)
    called.iloc[: int((expected_fdr <= fdr).sum())] = True
    return called.loc[proba_de.index]


def _bayes_factors(s1, s2, b1, b2, mode, delta, batch_correction, opts, rng, zero1, zero2) -> dict[str, np.ndarray]:
    if batch_correction and set(b1) == set(b2):
        per = None if opts["m_permutation"] is None else opts["m_permutation"] // len(set(b1))
        pairs = [_pairs(s1[b1 == v], s2[b2 == v], opts["use_permutation"], per, rng) for v in sorted(set(b1))]
        a, b = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    else:
        if batch_correction and set(b1) & set(b2):
            warnings.warn(
                "batchid1 and batchid2 differ but overlap; draws are paired across batches, so batch "
                "correction is not trustworthy. Pass the same batches or disjoint ones.", UserWarning, stacklevel=4,
            )
        a, b = _pairs(s1, s2, opts["use_permutation"], opts["m_permutation"], rng)
    if mode == "vanilla":
        p1 = np.mean(a > b, axis=0)
        return {"proba_m1": p1, "proba_m2": 1.0 - p1, "bayes_factor": np.log(p1 + EPS) - np.log(1.0 - p1 + EPS),
                "scale1": s1.mean(0), "scale2": s2.mean(0)}
    pc = opts["pseudocounts"]
    if pc is None:
        pc = _pseudocounts(a, b, zero1, zero2)
    lfc = np.log2(a + pc) - np.log2(b + pc)  # (n_pairs, G)
    delta_ = _estimate_delta(lfc.mean(0)) if delta is None else float(delta)
    p_plus, p_minus = np.mean(lfc >= delta_, axis=0), np.mean(lfc < -delta_, axis=0)
    proba_de = p_plus + p_minus if opts["test_mode"] == "two" else np.maximum(p_plus, p_minus)
    # LFC summaries use a 1000x smaller pseudocount so they estimate the fold change itself.
    effect = np.log2(a + 1e-3 * pc) - np.log2(b + 1e-3 * pc)
    res = {
        "proba_de": proba_de, "proba_not_de": 1.0 - proba_de,
        "bayes_factor": np.log(proba_de + EPS) - np.log(1.0 - proba_de + EPS),  # the direction is lfc's
        "scale1": s1.mean(0), "scale2": s2.mean(0), "pseudocounts": pc, "delta": delta_,
        "lfc_mean": effect.mean(0), "lfc_median": np.median(effect, 0), "lfc_std": effect.std(0),
        "lfc_min": effect.min(0), "lfc_max": effect.max(0),
    }
    for level in opts["cred_interval_lvls"] or []:
        lo, hi = _hpd(effect, level)
        res[f"lfc_confidence_interval_{str(level)[:5]}_min"] = lo
        res[f"lfc_confidence_interval_{str(level)[:5]}_max"] = hi
    return res


def differential_expression(
    fitted: Fitted,
    adata=None,
    groupby: str | None = None,
    group1=None,
    group2=None,
    idx1=None,
    idx2=None,
    mode: Literal["vanilla", "change"] = "vanilla",
    delta: float | None = 0.25,
    batch_size: int | None = None,
    all_stats: bool = True,
    batch_correction: bool = False,
    batchid1=None,
    batchid2=None,
    fdr_target: float = 0.05,
    silent: bool = False,
    filter_outlier_cells: bool = False,
    importance: dict | None = None,
    **kwargs,
) -> pd.DataFrame:
    """See :meth:`ldvae.LinearSCVI.differential_expression`; ``importance``: keywords of
    :func:`ldvae.query.importance.importance_weights`, to weight each group's draws."""
    unknown = sorted(set(kwargs) - set(BAYES_OPTIONS))
    if unknown:
        raise TypeError(
            f"differential_expression got unknown keyword arguments {unknown}; known: {sorted(BAYES_OPTIONS)}."
        )
    opts = {**BAYES_OPTIONS, **kwargs}
    if mode not in ("vanilla", "change"):
        raise ValueError(f"mode must be 'vanilla' or 'change', got {mode!r}.")
    if not 0.0 < float(fdr_target) < 1.0:
        raise ValueError(f"fdr_target must be in (0, 1), got {fdr_target!r}.")
    if delta is not None and not float(delta) > 0.0:
        raise ValueError(f"delta must be positive (or None to estimate it), got {delta!r}.")
    if opts["test_mode"] not in ("two", "three"):
        raise ValueError(f"test_mode must be 'two' or 'three', got {opts['test_mode']!r}.")
    if not batch_correction and (batchid1 is not None or batchid2 is not None):
        raise ValueError("batchid1/batchid2 choose the batches to decode in; they need batch_correction=True.")
    ad = fitted.adata if adata is None else adata
    comparisons = _comparisons(ad, groupby, group1, group2, idx1, idx2)
    all_batches = list(fitted.setup.get("batch_categories", ["0"]))
    codes1 = batch_codes(fitted, all_batches if batchid1 is None else batchid1) if batch_correction else [None]
    codes2 = batch_codes(fitted, all_batches if batchid2 is None else batchid2) if batch_correction else [None]
    data, _, size = start(fitted, adata, None, batch_size)

    rng = np.random.default_rng(settings.seed)
    tables = []
    with querying(fitted):
        for name1, name2, m1, m2 in comparisons:
            cells1, cells2 = np.flatnonzero(m1), np.flatnonzero(m2)
            for cells, what in ((cells1, "group1/idx1"), (cells2, "group2/idx2 (or the rest)")):
                if cells.size == 0:
                    raise ValueError(f"{what} selects no cells; DE needs cells in both groups.")
            if filter_outlier_cells:
                cells1, cells2 = _filter_outliers(fitted, adata, cells1), _filter_outliers(fitted, adata, cells2)
            if not silent:
                logger.info("DE %s (%d cells) vs %s (%d cells)", name1 or "idx1", len(cells1), name2 or "idx2",
                            len(cells2))
            s1, b1 = _sample_scales(fitted, data, cells1, codes1, opts["n_samples_overall"], size, adata=adata,
                                    importance=importance, rng=rng)
            s2, b2 = _sample_scales(fitted, data, cells2, codes2, opts["n_samples_overall"], size, adata=adata,
                                    importance=importance, rng=rng)
            raw1 = _raw_properties(fitted, data, torch.as_tensor(cells1, device=data.device), size)
            raw2 = _raw_properties(fitted, data, torch.as_tensor(cells2, device=data.device), size)
            zero1 = raw1["raw_mean"] < opts["threshold_counts"]
            zero2 = raw2["raw_mean"] < opts["threshold_counts"]
            info = _bayes_factors(s1, s2, b1, b2, mode, delta, batch_correction, opts, rng, zero1, zero2)
            if all_stats:
                for key in ("raw_mean", "non_zeros_proportion", "raw_normalized_mean"):
                    info[f"{key}1"], info[f"{key}2"] = raw1[key], raw2[key]
            res = pd.DataFrame(info, index=fitted.var_names.copy())
            res = res.sort_values(by="proba_de" if mode == "change" else "bayes_factor", ascending=False)
            if mode == "change":
                res[f"is_de_fdr_{fdr_target}"] = fdr_calls(res["proba_de"], float(fdr_target))
            if name1 is not None:
                res["comparison"] = f"{name1} vs {name2}"
                res["group1"], res["group2"] = name1, name2
            tables.append(res)
    return pd.concat(tables, axis=0)
