"""What each factor explains, in a stable order and sign, and the covariate effects.

Deviance on the count scale is computed in :mod:`ldvae.query.deviance`.

Sign convention: a factor is flipped so that its largest absolute loading is positive.
The views below never touch the model; :func:`reorder_factors` rewrites its weights
only when asked.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ..query.deviance import factor_deviance as deviance_table
from ..query.deviance import sign_convention  # noqa: F401 (public here too)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..model import LinearSCVI

logger = logging.getLogger(__name__)


def _check_model(model, where: str) -> None:
    from ..model import LinearSCVI

    if not isinstance(model, LinearSCVI):
        raise TypeError(f"{where} needs a trained ldvae.LinearSCVI, got {type(model).__name__}.")
    model._check_trained()


# --- deviance explained ---------------------------------------------------------------------------


def factor_deviance(
    model: LinearSCVI,
    adata=None,
    indices=None,
    *,
    rotation=None,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Deviance explained per factor on the count scale, factors ordered by it: see
    :func:`ldvae.query.deviance.factor_deviance` for the table; ``model`` is a trained
    :class:`ldvae.LinearSCVI`."""
    _check_model(model, "factor_deviance")
    return deviance_table(model._fitted(), adata, indices, rotation=rotation, batch_size=batch_size)


# --- order and sign ---------------------------------------------------------------------------------


def _order_and_signs(model: LinearSCVI, deviance: pd.DataFrame | None) -> tuple[list[str], pd.Series]:
    deviance = factor_deviance(model) if deviance is None else deviance
    columns = list(model.get_loadings().columns)
    if sorted(deviance.index) != sorted(columns):
        raise ValueError(
            f"deviance has factors {list(deviance.index)} but the model has {columns}. "
            "Pass the table factor_deviance(model) returned for this model."
        )
    return list(deviance.index), deviance["sign"].astype(int)


def ordered_loadings(model: LinearSCVI, deviance: pd.DataFrame | None = None) -> pd.DataFrame:
    """The loadings ordered by deviance explained and sign-flipped (largest |loading| positive).

    A view: the model is unchanged. Columns keep their original names (``Z_3`` stays
    ``Z_3``) so they can be traced back; :func:`reorder_factors` renumbers for good.

    Parameters
    ----------
    model
        A trained :class:`ldvae.LinearSCVI`.
    deviance
        The table of :func:`factor_deviance` for this model (computed when omitted).
    """
    _check_model(model, "ordered_loadings")
    order, signs = _order_and_signs(model, deviance)
    loadings = model.get_loadings()
    return loadings[order] * signs[order].to_numpy()[None, :]


def ordered_latent(model: LinearSCVI, adata=None, deviance: pd.DataFrame | None = None) -> pd.DataFrame:
    """Latent means (cells x factors) in the order and sign of :func:`ordered_loadings`.

    For ``latent_distribution="ln"`` signs are not flipped (softmax(-z) is not a flip of
    softmax(z)); the ``sign`` column still tells which end of the factor is which.
    """
    _check_model(model, "ordered_latent")
    order, signs = _order_and_signs(model, deviance)
    target = model.adata if adata is None else adata
    z = pd.DataFrame(
        model.get_latent_representation(adata), index=target.obs_names.copy(), columns=model.get_loadings().columns
    )
    if model.init_params_["latent_distribution"] == "ln":
        return z[order]
    return z[order] * signs[order].to_numpy()[None, :]


@torch.no_grad()
def reorder_factors(
    model: LinearSCVI, deviance: pd.DataFrame | None = None, *, flip_signs: bool = True
) -> pd.DataFrame:
    """Rewrite the model's weights so that ``Z_0`` explains most deviance, and so on.

    An exact reparameterization: the prior N(0, I) is unchanged by permuting and flipping
    factors, so every likelihood, ELBO and prediction stays the same; ``get_loadings()``
    and ``get_latent_representation()`` then return the ordered, sign-flipped factors.
    Changes the decoder's factor columns (and those of the zero-inflation and per-cell
    dispersion heads, when present) and the rows of the z encoder's mean and variance heads.

    Parameters
    ----------
    model
        A trained :class:`ldvae.LinearSCVI`; modified in place.
    deviance
        The table of :func:`factor_deviance` for this model (computed when omitted).
    flip_signs
        Also apply the sign convention. Must be False for ``latent_distribution="ln"``,
        whose prior is not symmetric under a flip.

    Returns
    -------
    pd.DataFrame
        The deviance table re-indexed by the new names (column ``was`` gives the old).
    """
    _check_model(model, "reorder_factors")
    ln = model.init_params_["latent_distribution"] == "ln"
    if ln and flip_signs:
        raise ValueError(
            "reorder_factors cannot flip signs of a latent_distribution='ln' model (softmax(-z) is "
            "not a flip of softmax(z)). Pass flip_signs=False to reorder only."
        )
    deviance = factor_deviance(model) if deviance is None else deviance
    order_names, signs = _order_and_signs(model, deviance)
    columns = list(model.get_loadings().columns)
    perm = torch.as_tensor([columns.index(c) for c in order_names])
    sign = torch.as_tensor(
        [float(signs[c]) if flip_signs else 1.0 for c in order_names], dtype=torch.float32
    )
    K = len(columns)
    module = model.module
    heads = [module.factor_regressor]
    heads += [getattr(module, name) for name in ("zi_regressor", "px_r_regressor") if hasattr(module, name)]
    for lin in heads:
        w = lin.weight  # (G, K + covariate columns)
        w[:, :K] = w[:, perm] * sign.to(w.device)[None, :]
    enc = module.z_encoder
    enc.mean.weight.copy_(enc.mean.weight[perm] * sign.to(enc.mean.weight.device)[:, None])
    enc.mean.bias.copy_(enc.mean.bias[perm] * sign.to(enc.mean.bias.device))
    enc.var.weight.copy_(enc.var.weight[perm])
    enc.var.bias.copy_(enc.var.bias[perm])
    out = deviance.loc[order_names].copy()
    out.insert(1, "was", order_names)
    out.index = pd.Index([f"Z_{i}" for i in range(K)], name="factor")
    out["sign"] = 1
    logger.info("Reordered factors by deviance explained: %s -> Z_0 … Z_%d.", ", ".join(order_names), K - 1)
    return out


# --- covariate effects ----------------------------------------------------------------------------


def _covariate_terms(model: LinearSCVI) -> list[tuple[str, str, str]]:
    """(covariate, level, kind) per covariate column, in the decoder's order."""
    s = model.setup_
    terms = []
    if model.n_batch > 1:
        terms += [(s["batch_key"], str(c), "batch") for c in s["batch_categories"]]
    for key in s.get("categorical_covariate_keys", []):
        cats = s["categorical_covariate_categories"][key]
        if len(cats) > 1:
            terms += [(key, str(c), "categorical") for c in cats]
    terms += [(key, "", "continuous") for key in s.get("continuous_covariate_keys", [])]
    return terms


def covariate_effects(model: LinearSCVI) -> pd.DataFrame:
    """The decoder's batch and covariate coefficients as a tidy table.

    One-hot coefficients of a categorical variable are identified only up to a per-gene
    constant (the gene intercept absorbs it), so ``effect`` centres them over the levels
    of that variable: the log-rate effect of a level relative to the average level.
    Continuous covariates keep their coefficient (log-rate change per unit).

    Returns
    -------
    pd.DataFrame
        Columns ``gene``, ``covariate``, ``level`` ("" for continuous), ``kind``
        (``"batch"``, ``"categorical"`` or ``"continuous"``), ``coefficient`` (as in
        :meth:`LinearSCVI.get_covariate_coefficients`) and ``effect``; one row per gene and
        column, sorted by covariate, level, then decreasing absolute effect. Empty when the
        model has no covariates.
    """
    _check_model(model, "covariate_effects")
    coef = model.get_covariate_coefficients()
    terms = _covariate_terms(model)
    if len(terms) != coef.shape[1]:
        raise RuntimeError(
            f"covariate_effects found {len(terms)} covariate terms in model.setup_ but the decoder has "
            f"{coef.shape[1]} covariate columns; the model and its setup disagree."
        )
    cols = ["gene", "covariate", "level", "kind", "coefficient", "effect"]
    if not terms:
        return pd.DataFrame(columns=cols)
    values = coef.to_numpy(dtype=float)  # (G, C)
    effect = values.copy()
    keys = np.array([t[0] for t in terms], dtype=object)
    kinds = np.array([t[2] for t in terms], dtype=object)
    for key in dict.fromkeys(keys[kinds != "continuous"]):
        j = np.flatnonzero((keys == key) & (kinds != "continuous"))
        effect[:, j] -= values[:, j].mean(axis=1, keepdims=True)
    genes = np.asarray(coef.index, dtype=object)
    parts = [
        pd.DataFrame(
            {
                "gene": genes,
                "covariate": key,
                "level": level,
                "kind": kind,
                "coefficient": values[:, j],
                "effect": effect[:, j],
            }
        )
        for j, (key, level, kind) in enumerate(terms)
    ]
    table = pd.concat(parts, ignore_index=True)[cols]
    table["_abs"] = table["effect"].abs()
    table = table.sort_values(["covariate", "level", "_abs"], ascending=[True, True, False], kind="stable")
    return table.drop(columns="_abs").reset_index(drop=True)


# --- figures ----------------------------------------------------------------------------------


def plot_deviance(deviance: pd.DataFrame) -> Figure:
    """Bar chart of ``fraction_of_model`` per factor, in the table's order, with the
    null deviance each factor explains alone as points. Returns the figure (not shown)."""
    from matplotlib.figure import Figure

    names = list(deviance.index)
    fig = Figure(figsize=(max(4.0, 0.5 * len(names) + 2), 3.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    ax.bar(x, deviance["fraction_of_model"], color="#4C72B0", label="lost when removed (of model)")
    ax.plot(x, deviance["alone_fraction_of_null"], "o", color="#DD8452", label="explained alone (of null)")
    ax.set_xticks(x, names, rotation=45 if len(names) > 8 else 0)
    ax.set_ylabel("fraction of deviance")
    total = deviance.attrs.get("fraction_explained")
    title = "Deviance explained per factor"
    if total is not None and np.isfinite(total):
        title += f" (model: {100 * total:.1f}% of null)"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    return fig


def plot_covariate_effects(effects: pd.DataFrame, n_genes: int = 10) -> Figure:
    """One heatmap panel per covariate: the ``n_genes`` genes with the largest absolute
    centred effect (rows) by level (columns). Takes the table of :func:`covariate_effects`."""
    from matplotlib.figure import Figure

    if n_genes < 1:
        raise ValueError(f"n_genes must be at least 1, got {n_genes}.")
    covariates = list(dict.fromkeys(effects["covariate"])) if len(effects) else []
    if not covariates:
        fig = Figure(figsize=(4, 2))
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "The model has no batch or covariates.", ha="center", va="center")
        return fig
    fig = Figure(figsize=(3.2 * len(covariates) + 1, 0.28 * n_genes + 1.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(covariates)))
    for ax, key in zip(axes, covariates):
        wide = effects[effects["covariate"] == key].pivot(index="gene", columns="level", values="effect")
        top = wide.abs().max(axis=1).sort_values(ascending=False).index[:n_genes]
        wide = wide.loc[top]
        lim = float(np.nanmax(np.abs(wide.to_numpy()))) or 1.0
        im = ax.imshow(wide.to_numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_yticks(np.arange(len(wide)), list(wide.index), fontsize=7)
        levels = [lvl or key for lvl in wide.columns]
        ax.set_xticks(np.arange(len(levels)), levels, rotation=45, ha="right", fontsize=8)
        ax.set_title(key, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.7, label="log-rate effect")
    return fig
