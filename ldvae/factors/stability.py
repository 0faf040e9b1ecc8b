"""Are the factors reproducible, and how many are there?

``fit_seeds`` fits the same model with several seeds (initialization, split, minibatch
order and sampling all follow the seed), in parallel processes on CPU. ``factor_stability``
matches the factors of the runs by the absolute Pearson correlation of their loadings over
genes, with an optimal one-to-one assignment (``scipy.optimize.linear_sum_assignment``)
against a reference run; a factor's stability is the median of its matched absolute
correlations, and its consensus loadings the mean of the matched, sign-aligned columns.
With ``rotation="varimax"`` each run's loadings are first rotated by their own
:func:`varimax` rotation, since the prior N(0, I) leaves the factors' rotation free.
``select_k`` fits a range of ``n_latent`` and reports the held-out ELBO and the held-out
marginal log-likelihood (importance sampling) of the validation cells and the stability
against K. The fits themselves run in ``ldvae.factors.seeds`` (worker processes on CPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment

from ..query.deviance import check_rotation, sign_convention
from ..query.target import query_batch_size, rows_of
from ..train.batches import split_indices
from ..util.checks import positive_int
from ..util.settings import own_rng
from .seeds import (  # noqa: F401 (public here too)
    BackgroundFits, check_seeds, _fit_many, _train_defaults, fit_seeds, uses_gpu,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..model import LinearSCVI

logger = logging.getLogger(__name__)

STABLE_THRESHOLD = 0.9


# --- rotation -------------------------------------------------------------------------------------


def varimax(loadings, *, max_iter: int = 500, tol: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """The orthogonal rotation that maximizes the varimax criterion of ``loadings @ R``.

    The LDVAE prior N(0, I) is unchanged by any rotation R of z, and the decoder's log-rate
    W z equals (W R)(R^T z), so a model's factors are identified only up to rotation. The
    varimax rotation (Kaiser 1958) is the one whose columns are simplest: it maximizes the
    summed variance over genes of the squared loadings, so each factor loads strongly on
    few genes. It is unique up to the order and sign of its columns, which the matching
    handles. Rows are not normalized (genes with small loadings stay small).

    Parameters
    ----------
    loadings
        Genes x factors (array or DataFrame); NaN rows count as zero.
    max_iter, tol
        Iterations of the SVD update, and the relative gain of the criterion below which
        it stops.

    Returns
    -------
    rotated, rotation
        ``loadings @ rotation`` (genes x factors) and the orthogonal ``rotation`` (K x K).
        The matching latent is ``z @ rotation`` (cells x factors).
    """
    w = np.nan_to_num(np.asarray(loadings, dtype=float), nan=0.0)  # (G, K)
    n_genes, k = w.shape
    rotation = np.eye(k)
    criterion = 0.0
    for _ in range(max_iter):
        r = w @ rotation
        # gradient of sum_k var_g(r_gk^2), up to a factor; its polar factor is the update
        r2 = r * r  # (products: NumPy's float power ** is ~100x slower)
        u, s, vt = np.linalg.svd(w.T @ (r * (r2 - r2.mean(axis=0, keepdims=True))))
        rotation = u @ vt
        previous, criterion = criterion, float(s.sum())
        if criterion <= previous * (1.0 + tol):
            break
    return w @ rotation, rotation


# --- matching factors across runs ----------------------------------------------------------------


@dataclass(frozen=True)
class StabilityResult:
    """Factors of several runs matched to a reference run.

    Attributes
    ----------
    factors
        Per reference factor (index ``Z_k`` of the reference run): ``stability`` (median
        matched absolute correlation over the other runs), ``min_correlation``,
        ``mean_correlation`` and ``stable`` (stability >= threshold); sorted by stability.
    correlations
        Matched absolute correlation, factors x runs (the reference's own column is 1).
    matches
        The matched loadings column of each run, factors x runs (``"-Z_3"``: sign flipped).
    consensus
        Genes x factors: mean of the matched, sign-aligned loadings, largest entry positive.
    reference
        Position of the reference run.
    rotation
        ``"varimax"`` when the runs' loadings were rotated before matching, else None.
    rotations
        Per run, the K x K rotation applied to its loadings (the identity without rotation).
    """

    factors: pd.DataFrame
    correlations: pd.DataFrame
    matches: pd.DataFrame
    consensus: pd.DataFrame
    reference: int
    rotation: str | None = None
    rotations: list = field(default_factory=list)


def _loadings_list(runs) -> list[pd.DataFrame]:
    from ..model import LinearSCVI

    out = []
    for i, run in enumerate(runs):
        if isinstance(run, LinearSCVI):
            out.append(run.get_loadings())
        elif isinstance(run, pd.DataFrame):
            out.append(run)
        else:
            raise TypeError(
                f"factor_stability takes trained LinearSCVI models or loadings DataFrames; run {i} is a "
                f"{type(run).__name__}."
            )
    if len(out) < 2:
        raise ValueError(f"factor_stability needs at least 2 runs to compare, got {len(out)}.")
    for i, frame in enumerate(out[1:], start=1):
        if not frame.index.equals(out[0].index):
            raise ValueError(
                f"run {i} has different genes from run 0 ({frame.shape[0]} vs {out[0].shape[0]}, or another "
                "order). Fit every run on the same AnnData."
            )
    return out


def _column_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlations between the columns of a (G, Ka) and b (G, Kb) -> (Ka, Kb)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    norm = np.linalg.norm(a, axis=0)[:, None] * np.linalg.norm(b, axis=0)[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a.T @ b) / norm
    return np.nan_to_num(r, nan=0.0)


def _match(ref: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each column of ref, the matched column of other (-1 when other has fewer) and its
    signed correlation, by maximum total absolute correlation."""
    r = _column_correlations(ref, other)
    rows, cols = linear_sum_assignment(-np.abs(r))
    match = np.full(ref.shape[1], -1)
    corr = np.zeros(ref.shape[1])
    match[rows] = cols
    corr[rows] = r[rows, cols]
    return match, corr


def factor_stability(
    runs,
    *,
    reference: int | None = None,
    threshold: float = STABLE_THRESHOLD,
    rotation: Literal["varimax"] | None = None,
) -> StabilityResult:
    """Match factors across runs and measure how reproducible each one is.

    Parameters
    ----------
    runs
        Trained models (e.g. from :func:`fit_seeds`) or their loadings DataFrames, all on
        the same genes.
    reference
        The run whose factors the others are matched to. Default: the run with the largest
        total matched absolute correlation to all others (the most typical run).
    threshold
        ``stable`` marks factors whose stability reaches it.
    rotation
        ``"varimax"``: rotate each run's loadings by its own :func:`varimax` rotation
        before matching. The prior N(0, I) cannot tell rotations of the factors apart, so
        seeds may agree on the space the factors span but not on its axes; varimax picks
        the same axes in every run when they span the same space. The factors are then
        the rotated ones, named ``V_0 … V_{K-1}`` (by decreasing sum of squared loadings,
        sign convention applied); ``rotations`` holds each run's rotation, and
        :func:`rotated_latent` gives the matching latent. None: the model's own factors.

    Returns
    -------
    StabilityResult
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}.")
    if rotation not in (None, "varimax"):
        raise ValueError(f"rotation must be None or 'varimax', got {rotation!r}.")
    frames = _loadings_list(runs)
    rotations = [np.eye(f.shape[1]) for f in frames]
    if rotation == "varimax":
        rotated = [_varimax_frame(f) for f in frames]
        frames, rotations = [f for f, _ in rotated], [r for _, r in rotated]
    mats = [np.nan_to_num(f.to_numpy(dtype=float), nan=0.0) for f in frames]
    n = len(mats)
    if reference is None:
        totals = [sum(np.abs(_match(mats[i], mats[j])[1]).sum() for j in range(n) if j != i) for i in range(n)]
        reference = int(np.argmax(totals))
    elif not 0 <= reference < n:
        raise ValueError(f"reference must index one of the {n} runs (0 … {n - 1}), got {reference}.")
    ref = mats[reference]
    names = list(frames[reference].columns)
    runs_idx = pd.Index([f"run_{i}" for i in range(n)], name="run")
    corr = np.ones((ref.shape[1], n))
    matches = np.empty((ref.shape[1], n), dtype=object)
    aligned_sum = np.zeros_like(ref)
    counts = np.zeros(ref.shape[1])
    for i, mat in enumerate(mats):
        if i == reference:
            matches[:, i] = names
            aligned_sum += ref
            counts += 1
            continue
        match, r = _match(ref, mat)
        corr[:, i] = np.abs(r)
        for k, (j, rk) in enumerate(zip(match, r)):
            if j < 0:
                matches[k, i] = ""
                continue
            sign = -1.0 if rk < 0 else 1.0
            matches[k, i] = ("-" if sign < 0 else "") + str(frames[i].columns[j])
            aligned_sum[:, k] += sign * mat[:, j]
            counts[k] += 1
    others = np.delete(corr, reference, axis=1)
    consensus = aligned_sum / counts[None, :]
    consensus = pd.DataFrame(consensus, index=frames[reference].index.copy(), columns=names)
    consensus = consensus * sign_convention(consensus).to_numpy()[None, :]
    factors = pd.DataFrame(
        {
            "stability": np.median(others, axis=1),
            "min_correlation": others.min(axis=1),
            "mean_correlation": others.mean(axis=1),
        },
        index=pd.Index(names, name="factor"),
    )
    factors["stable"] = factors["stability"] >= threshold
    factors = factors.sort_values("stability", ascending=False, kind="stable")
    factors.attrs.update(threshold=float(threshold), n_runs=n, reference=int(reference), rotation=rotation)
    return StabilityResult(
        factors=factors,
        correlations=pd.DataFrame(corr, index=pd.Index(names, name="factor"), columns=runs_idx).loc[factors.index],
        matches=pd.DataFrame(matches, index=pd.Index(names, name="factor"), columns=runs_idx).loc[factors.index],
        consensus=consensus,
        reference=int(reference),
        rotation=rotation,
        rotations=rotations,
    )


def _varimax_frame(loadings: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Varimax-rotated loadings named ``V_k``, by decreasing sum of squares, largest entry
    positive; and the rotation (K x K) that gives them: ``rotated = loadings @ rotation``."""
    rotated, rot = varimax(loadings)
    order = np.argsort(-(rotated**2).sum(axis=0), kind="stable")
    rotated, rot = rotated[:, order], rot[:, order]
    names = [f"V_{k}" for k in range(rotated.shape[1])]
    signs = sign_convention(pd.DataFrame(rotated)).to_numpy()
    rot = rot * signs[None, :]
    frame = pd.DataFrame(rotated * signs[None, :], index=loadings.index.copy(), columns=names)
    frame[loadings.isna().any(axis=1).to_numpy()] = np.nan  # unmodelled genes stay NaN
    return frame, rot


def rotated_latent(model: LinearSCVI, rotation: np.ndarray, adata=None) -> pd.DataFrame:
    """Latent means in rotated axes, ``z @ rotation`` (cells x factors, columns ``V_k``).

    ``rotation`` is one of ``StabilityResult.rotations`` (the one of this model's run);
    with it, the decoder's log-rate is unchanged: W z = (W R)(R^T z).
    """
    from .interpret import _check_model

    _check_model(model, "rotated_latent")
    rotation = check_rotation(model._fitted(), rotation)
    k = rotation.shape[0]
    target = model.adata if adata is None else adata
    z = model.get_latent_representation(adata) @ rotation  # (n_cells, K)
    return pd.DataFrame(z, index=target.obs_names.copy(), columns=[f"V_{i}" for i in range(k)])


# --- choosing K -----------------------------------------------------------------------------------


def _validation_cells(model: LinearSCVI, what: str) -> np.ndarray:
    model._check_trained()
    val = getattr(model, "validation_indices_", None)
    if val is None or len(val) == 0:
        raise ValueError(
            f"The model has no validation cells, so no held-out {what}. Train with train_size < 1 "
            "(e.g. train_size=0.9, the default)."
        )
    return np.asarray(val)


@torch.no_grad()
def heldout_elbo(model: LinearSCVI, *, n_samples: int = 10, seed: int = 0) -> np.ndarray:
    """Per-cell negative ELBO of the model's validation cells (lower is better), averaged
    over ``n_samples`` draws of z and l, lgamma(x + 1) included; (n_validation_cells,)."""
    val = _validation_cells(model, "ELBO")
    positive_int("n_samples", n_samples)
    fitted = model._fitted()
    module = fitted.module
    data = fitted.cells(None, False)
    rows = rows_of(data.n_cells, val, fitted.device)
    out = []
    with own_rng(seed):
        was_training = module.training
        module.eval()
        for b in map(data.gather, torch.split(rows, query_batch_size(None, fitted.n_genes))):
            out.append((sum(module.loss(b).elbo.double() for _ in range(n_samples)) / n_samples).cpu().numpy())
        module.train(was_training)
    return np.concatenate(out)


def heldout_marginal_nll(model: LinearSCVI, *, n_mc_samples: int = 50) -> np.ndarray:
    """Per-cell negative log-likelihood -log p(x) of the model's validation cells (lower is
    better), importance-sampled with ``n_mc_samples`` draws from q(z, l | x) (see
    :meth:`LinearSCVI.get_marginal_ll`); (n_validation_cells,).

    The estimate is a bound like the ELBO, but tighter: in expectation it lies between
    -log p(x) and the negative ELBO, and approaches -log p(x) as ``n_mc_samples`` grows.
    """
    val = _validation_cells(model, "marginal log-likelihood")
    return -np.asarray(model.get_marginal_ll(indices=val, n_mc_samples=n_mc_samples, return_mean=False),
                       dtype=np.float64)


def _check_validation_split(n_cells: int, train_kwargs: dict) -> None:
    """Before any fit: the split of ``train_kwargs`` leaves validation cells to score K on."""
    train_size = train_kwargs.get("train_size") or 0.9
    _, val = split_indices(n_cells, train_size, train_kwargs.get("validation_size"), 0)
    if len(val) == 0:
        raise ValueError(
            f"select_k scores each K on held-out cells, and train_size={train_size} leaves none of the "
            f"{n_cells} cells to validate on. Pass more cells, or (from Python) a smaller train_size in train_kwargs."
        )


def _paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of the mean of the per-cell difference a - b."""
    diff = a - b
    return float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else 0.0


def select_k(
    adata,
    n_latents: Sequence[int],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    n_jobs: int | None = None,
    train_kwargs: dict | None = None,
    threshold: float = STABLE_THRESHOLD,
    n_samples: int = 10,
    n_mc_samples: int = 50,
    **model_kwargs,
) -> pd.DataFrame:
    """Fit each ``n_latent`` with several seeds; held-out ELBO, held-out marginal
    log-likelihood and stability against K.

    The fits start and hold out cells as :func:`fit_seeds`' do (the principal components;
    the same validation cells in every fit, unless ``train_kwargs`` say otherwise), so the
    stability columns mean what :func:`factor_stability` of ``fit_seeds`` means. The held-out
    ELBO is the per-cell negative ELBO of each run's validation cells (the split follows
    ``split_seed``, so every K is scored on the same cells), averaged over seeds.
    Extra factors that the data do not support collapse to the prior and barely change
    it, so the chosen K follows the one-standard-error rule: the smallest K whose held-out
    ELBO is within one standard error (of the per-cell paired difference) of the best.
    The held-out marginal log-likelihood (importance sampling, :func:`heldout_marginal_nll`)
    is reported beside it on the same cells: a tighter bound, which shows whether the
    ELBO's ranking of K is an artefact of the variational gap.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`LinearSCVI.setup_anndata`.
    n_latents
        Candidate numbers of factors.
    seeds
        Seeds per K (at least 2 for stability).
    n_jobs, train_kwargs, **model_kwargs
        As in :func:`fit_seeds`.
    threshold
        Stability threshold for counting stable factors.
    n_samples
        Draws of z per cell for the held-out ELBO.
    n_mc_samples
        Importance samples per cell for the held-out marginal log-likelihood (validation
        cells only: about as long as 5-7 training epochs per fit).

    Returns
    -------
    pd.DataFrame
        Indexed by ``n_latent``: ``elbo_validation`` (mean per-cell negative ELBO, lower
        is better), ``elbo_se`` (standard error of its paired difference to the best K),
        ``nll_validation`` (mean per-cell negative marginal log-likelihood, lower is
        better), ``nll_se`` (standard error of its paired difference to the K of the lowest
        ``nll_validation``), ``median_stability``, ``min_stability``, ``n_stable`` and
        ``selected`` (True for the chosen K). ``attrs["best_k"]`` is the chosen K,
        ``attrs["lowest_elbo_k"]`` and ``attrs["lowest_nll_k"]`` the K of the lowest
        held-out ELBO and negative log-likelihood.
    """
    ks = sorted({int(k) for k in n_latents})
    if not ks or ks[0] < 1:
        raise ValueError(f"n_latents must be positive integers, got {list(n_latents)}.")
    if "n_latent" in model_kwargs:
        raise TypeError("select_k sets n_latent itself; pass the candidates as n_latents=[...].")
    seeds = check_seeds(seeds, 2)
    positive_int("n_mc_samples", n_mc_samples)
    train_kwargs = _train_defaults(train_kwargs)
    _check_validation_split(adata.n_obs, train_kwargs)
    jobs = [({**model_kwargs, "n_latent": k}, s) for k in ks for s in seeds]
    models = _fit_many(adata, jobs, n_jobs, train_kwargs)
    by_k = {k: models[i * len(seeds) : (i + 1) * len(seeds)] for i, k in enumerate(ks)}
    elbos = {k: np.concatenate([heldout_elbo(m, n_samples=n_samples) for m in runs]) for k, runs in by_k.items()}
    nlls = {k: np.concatenate([heldout_marginal_nll(m, n_mc_samples=n_mc_samples) for m in runs])
            for k, runs in by_k.items()}
    mean = {k: float(e.mean()) for k, e in elbos.items()}
    lowest = min(ks, key=lambda k: mean[k])
    lowest_nll = min(ks, key=lambda k: nlls[k].mean())
    rows = []
    for k in ks:
        stab = factor_stability(by_k[k], threshold=threshold).factors
        rows.append(
            {
                "n_latent": k,
                "elbo_validation": mean[k],
                "elbo_se": _paired_se(elbos[k], elbos[lowest]),
                "nll_validation": float(nlls[k].mean()),
                "nll_se": _paired_se(nlls[k], nlls[lowest_nll]),
                "median_stability": float(stab["stability"].median()),
                "min_stability": float(stab["stability"].min()),
                "n_stable": int(stab["stable"].sum()),
            }
        )
    table = pd.DataFrame(rows).set_index("n_latent")
    best = next(k for k in ks if table.loc[k, "elbo_validation"] - mean[lowest] <= table.loc[k, "elbo_se"])
    table["selected"] = table.index == best
    table.attrs.update(best_k=int(best), lowest_elbo_k=int(lowest), lowest_nll_k=int(lowest_nll),
                       threshold=float(threshold), seeds=seeds, n_mc_samples=int(n_mc_samples))
    logger.info("select_k: lowest held-out ELBO at K=%d, lowest held-out -log p(x) at K=%d; one-SE choice K=%d.",
                lowest, lowest_nll, best)
    return table


# --- figures ----------------------------------------------------------------------------------


def plot_stability(result: StabilityResult) -> Figure:
    """Matched correlations per factor (points, one per run) and the median (bar), with the
    threshold as a dashed line. Returns the figure (not shown)."""
    from matplotlib.figure import Figure

    f = result.factors
    fig = Figure(figsize=(max(4.0, 0.5 * len(f) + 2), 3.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(f))
    colors = np.where(f["stable"], "#4C72B0", "#C44E52")
    ax.bar(x, f["stability"], color=colors, alpha=0.8)
    others = result.correlations.drop(columns=result.correlations.columns[result.reference])
    for i, name in enumerate(f.index):
        ax.plot(np.full(others.shape[1], i), others.loc[name], ".", color="black", ms=4)
    ax.axhline(f.attrs.get("threshold", STABLE_THRESHOLD), ls="--", color="grey", lw=1)
    ax.set_xticks(x, list(f.index), rotation=45 if len(f) > 8 else 0)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("matched |correlation|")
    ax.set_title(f"Factor stability across {f.attrs.get('n_runs', '?')} runs (red: unstable)", fontsize=10)
    return fig


def plot_select_k(table: pd.DataFrame) -> Figure:
    """Held-out negative ELBO and negative marginal log-likelihood (with standard errors)
    and stability against K, the chosen K marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.0), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    k = table.index.to_numpy()
    ax1.errorbar(k, table["elbo_validation"], yerr=table["elbo_se"], marker="o", color="#4C72B0", capsize=3,
                 label="negative ELBO")
    if "nll_validation" in table:
        ax1.errorbar(k, table["nll_validation"], yerr=table["nll_se"], marker="s", color="#55A868", capsize=3,
                     label=f"-log p(x), {table.attrs.get('n_mc_samples', '?')} importance samples")
        ax1.legend(fontsize=8, frameon=False)
    ax1.set_xlabel("n_latent (K)")
    ax1.set_ylabel("held-out, per cell (lower is better)")
    ax2.plot(k, table["median_stability"], "o-", label="median", color="#4C72B0")
    ax2.plot(k, table["min_stability"], "s--", label="least stable factor", color="#C44E52")
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("n_latent (K)")
    ax2.set_ylabel("stability (matched |correlation|)")
    ax2.legend(fontsize=8, frameon=False)
    best = table.attrs.get("best_k")
    for ax in (ax1, ax2):
        ax.set_xticks(k)
        if best is not None:
            ax.axvline(best, color="grey", ls=":", lw=1)
    fig.suptitle(f"Choosing K (chosen: {best})", fontsize=10)
    return fig
