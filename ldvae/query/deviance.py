"""Deviance explained per factor on the count scale.

For cell n, let ``LL(z)`` be log p(x_n | z, l_n) under the fitted decoder, with z the
posterior mean and l_n the posterior-mean (or observed) library. Four models are
compared on the same cells:

- full: ``LL(z)``;
- factor k removed: ``LL(z with z_k at its mean)`` (0, the prior mean; for
  ``latent_distribution="ln"`` the cells' mean of z_k);
- null: every factor at its mean, i.e. gene intercepts, covariates and library only;
- saturated: mean equal to the observed count.

Deviance is D = 2 (LL_saturated - LL). Factor k's ``deviance_drop`` is
2 sum_n (LL_full - LL_without_k), the deviance the model loses without it;
``fraction_of_model`` divides it by the deviance the whole model explains over the null,
2 sum_n (LL_full - LL_null). The lgamma(x + 1) term cancels in every difference.

Sign convention: a factor is flipped so that its largest absolute loading is positive.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from ..nn.module import Generative
from .target import Fitted, factor_loadings, query_batch_size, rows_of

logger = logging.getLogger(__name__)

SATURATED_ZI_LOGIT = -30.0  # zero-inflation switched off (sigmoid(-30) ~ 1e-13) in the saturated model


@torch.no_grad()
def _log_likelihoods(
    fitted: Fitted, adata, indices, batch_size: int | None, rotation: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    """Summed log-likelihoods (float64) of the full, per-factor-removed, factor-alone, null
    and saturated models over the chosen cells (lgamma(x + 1) left out everywhere).

    With an orthogonal ``rotation`` R (K x K), factor k is the direction R[:, k] of z:
    removing it sets the coordinate (z R)_k to 0, i.e. z -> z - (z R)_k R[:, k]^T."""
    module = fitted.module
    was_training = module.training
    module.eval()
    data = fitted.cells(adata, False)
    rows = rows_of(data.n_cells, indices, fitted.device)
    if rows.numel() == 0:
        raise ValueError("factor_deviance got no cells: indices selects 0 cells. Pass indices=None for all cells.")
    K = fitted.config.n_latent
    batches = list(torch.split(rows, query_batch_size(batch_size, fitted.n_genes)))
    fill = torch.zeros(K, device=fitted.device)
    if fitted.config.latent_distribution == "ln":
        # softmax(z) is not centred at z = 0; "at its mean" is the cells' mean of z_k.
        total = torch.zeros(K, device=fitted.device, dtype=torch.float64)
        for r in batches:
            total += module.inference(data.gather(r), use_mean=True).qz_m.double().sum(0)
        fill = (total / rows.numel()).float()

    sums = {key: 0.0 for key in ("full", "null", "saturated")}
    sums["without"] = np.zeros(K)
    sums["alone"] = np.zeros(K)
    for r in batches:
        b = data.gather(r)
        inf = module.inference(b, use_mean=True)
        cov = module.covariate_columns(b)

        def ll(z: torch.Tensor) -> float:
            gen = module.generative(z, inf.library, cov, b.batch, b.label)
            return float(module.log_likelihood(b, gen).double().sum())

        z = inf.qz_m  # (n_cells, K)
        full_gen = module.generative(z, inf.library, cov, b.batch, b.label)
        sums["full"] += float(module.log_likelihood(b, full_gen).double().sum())
        at_mean = fill.expand_as(z)
        sums["null"] += ll(at_mean)
        for k in range(K):
            if rotation is None:
                without = z.clone()
                without[:, k] = fill[k]
                alone = at_mean.clone()
                alone[:, k] = z[:, k]
            else:
                direction = rotation[:, k]  # (K,)
                part = (z @ direction)[:, None] * direction[None, :]  # (n_cells, K)
                without, alone = z - part, part
            sums["without"][k] += ll(without)
            sums["alone"][k] += ll(alone)
        # Saturated: mean = observed count (a tiny floor for zeros), dispersion as fitted.
        log_x = torch.log(b.x.clamp_min(1e-8))  # (n_cells, G)
        zi = None if full_gen.zi_logits is None else torch.full_like(log_x, SATURATED_ZI_LOGIT)
        sat = Generative(full_gen.log_rho, log_x, full_gen.log_theta, zi)
        sums["saturated"] += float(module.log_likelihood(b, sat).double().sum())
    module.train(was_training)
    return sums


def factor_deviance(
    fitted: Fitted,
    adata=None,
    indices=None,
    *,
    rotation=None,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Deviance explained per factor on the count scale, factors ordered by it.

    Parameters
    ----------
    fitted
        A trained model's :class:`ldvae.query.target.Fitted`.
    adata
        Cells to evaluate (default: the training AnnData), with the model's genes.
    indices
        Cells of ``adata`` to use (default: all). ``fitted.validation_indices_`` gives the
        held-out cells.
    rotation
        An orthogonal K x K matrix R (e.g. one of ``StabilityResult.rotations`` of
        :func:`ldvae.factors.stability.factor_stability` with ``rotation="varimax"``): score the
        rotated factors ``V_k``, whose loadings are ``W @ R`` and latent ``z @ R``, instead
        of the model's own. Removing ``V_k`` removes the component of z along R[:, k]. Needs
        ``latent_distribution="normal"``.
    batch_size
        Cells per evaluation batch.

    Returns
    -------
    pd.DataFrame
        One row per factor, indexed by its loadings column (``Z_k``, or ``V_k`` with
        ``rotation``), sorted by
        ``deviance_drop`` (largest first), with columns

        ``rank``
            1 for the factor whose removal costs most.
        ``deviance_drop``
            2 sum_n [LL_full - LL_without_k]: deviance lost when z_k is set to its mean.
        ``fraction_of_model``
            ``deviance_drop`` / (2 sum_n [LL_full - LL_null]).
        ``fraction_of_null``
            ``deviance_drop`` / null deviance 2 sum_n [LL_saturated - LL_null].
        ``alone_fraction_of_null``
            Null deviance explained by z_k alone (every other factor at its mean).
        ``sign``
            +1 or -1: the flip that makes the factor's largest absolute loading positive.

        ``attrs`` holds ``null_deviance``, ``model_deviance`` (2 sum_n [LL_sat - LL_full]),
        ``fraction_explained`` (1 - model / null deviance) and ``n_cells``.
    """
    rot = None
    if rotation is not None:
        rot = check_rotation(fitted, rotation)
    s = _log_likelihoods(fitted, adata, indices, batch_size,
                         None if rot is None else torch.as_tensor(rot, dtype=torch.float32, device=fitted.device))
    null_dev = 2.0 * (s["saturated"] - s["null"])
    explained = 2.0 * (s["full"] - s["null"])
    drop = 2.0 * (s["full"] - s["without"])
    loadings = factor_loadings(fitted.module, fitted.var_names)
    if rot is not None:
        loadings = pd.DataFrame(loadings.to_numpy() @ rot, index=loadings.index,
                                columns=[f"V_{k}" for k in range(rot.shape[1])])
    table = pd.DataFrame(
        {
            "deviance_drop": drop,
            "fraction_of_model": drop / explained if explained > 0 else np.nan,
            "fraction_of_null": drop / null_dev if null_dev > 0 else np.nan,
            "alone_fraction_of_null": 2.0 * (s["alone"] - s["null"]) / null_dev if null_dev > 0 else np.nan,
            "sign": sign_convention(loadings).to_numpy(),
        },
        index=loadings.columns.copy(),
    )
    table = table.sort_values("deviance_drop", ascending=False, kind="stable")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table.index.name = "factor"
    n_cells = rows_of(fitted.cells(adata, False).n_cells, indices, fitted.device).numel()
    table.attrs.update(
        null_deviance=float(null_dev),
        model_deviance=float(2.0 * (s["saturated"] - s["full"])),
        fraction_explained=float(explained / null_dev) if null_dev > 0 else float("nan"),
        n_cells=int(n_cells),
    )
    if explained <= 0:
        logger.warning(
            "The model fits these %d cells no better than its null (intercepts only): it explains %.1f%% of the "
            "null deviance, so fraction_of_model is undefined. Train longer or check the data.", n_cells,
            100 * table.attrs["fraction_explained"],
        )
    return table


def check_rotation(fitted: Fitted, rotation) -> np.ndarray:
    rot = np.asarray(rotation, dtype=float)
    k = fitted.config.n_latent
    if rot.shape != (k, k):
        raise ValueError(f"rotation must be {k} x {k} for this model's {k} factors, got shape {rot.shape}.")
    if not np.allclose(rot.T @ rot, np.eye(k), atol=1e-6):
        raise ValueError("rotation must be orthogonal (R^T R = I): the prior N(0, I) is invariant only under those.")
    if fitted.config.latent_distribution == "ln":
        raise ValueError("A rotation needs latent_distribution='normal': softmax(z) is not rotation invariant.")
    return rot


def sign_convention(loadings: pd.DataFrame) -> pd.Series:
    """+1 or -1 per column: the flip that makes each column's largest absolute entry positive.

    Deterministic (ties go to the first gene); NaN rows (unmodelled genes) are ignored.
    """
    values = np.nan_to_num(np.asarray(loadings, dtype=float), nan=0.0)
    if values.shape[0] == 0:
        return pd.Series(np.ones(values.shape[1], dtype=int), index=loadings.columns, name="sign")
    top = values[np.abs(values).argmax(axis=0), np.arange(values.shape[1])]
    return pd.Series(np.where(top < 0, -1, 1), index=loadings.columns, name="sign")
