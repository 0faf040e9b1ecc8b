"""Importance weights of posterior draws (scvi-tools' ``weights="importance"``).

Draws of z pooled over a group of cells are not draws of the group's aggregate posterior
p(z | group): a cell with a wide posterior contributes draws that explain few cells. Each
draw z_d gets the weight

    w_d ∝ sum_a p(z_d) p(x_a | z_d, l_a) / p(x_a) / sum_a' q(z_d | x_a'),

over anchor cells a of the group (at most ``max_cells``), with p(x_a) the importance-sampled
marginal likelihood and l_a the anchor's observed total count; weights are self-normalized
and, with ``truncation``, clamped from below at their mean (Ionides 2008)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..nn.likelihoods import dense_log_prob
from .cells import minibatches_of
from .posterior import _normal_log_prob, decode, get_marginal_ll, sample_latents
from .target import Fitted


@dataclass(frozen=True)
class CountDistribution:
    """p(x | z, l) of posterior draws, as importance weighting reads it."""

    scale: Tensor  # (n_draws, n_genes) normalized expression rho of each draw
    log_theta: Tensor | None  # (n_genes,) or (n_draws, n_genes); None: Poisson
    zi_logits: Tensor | None  # (n_draws, n_genes) for ZINB


@dataclass(frozen=True)
class Draws:
    """``n_samples`` posterior draws per cell of ``rows``, draw-major (draw s of cell i at s * n + i)."""

    z: Tensor  # (n_draws, K)
    qz_m: Tensor  # (n_cells, K) mean of q(z | x) of each cell
    qz_v: Tensor  # (n_cells, K)
    px: CountDistribution
    expression: np.ndarray  # (n_draws, n_genes): rho times library_size, or mu for "latent"


def draw(fitted: Fitted, data, rows: Tensor, size: int, n_samples: int, code: int | None,
         library_size: float | str = 1) -> Draws:
    """Posterior draws of the cells ``rows`` (no seeding), with what importance weights need."""
    parts = []
    for b in minibatches_of(data, rows, size):
        inf = fitted.module.inference(b, use_mean=True)
        z, library = sample_latents(inf, n_samples)  # (S, n, K), (S, n)
        gen = decode(fitted, b, z.reshape(-1, z.shape[-1]), library.reshape(-1), code)
        expr = gen.log_mu.exp() if library_size == "latent" else gen.log_rho.exp() * float(library_size)
        theta = gen.log_theta
        if theta is not None and theta.dim() == 2:
            theta = theta.reshape(n_samples, b.n_cells, -1)
        zi = None if gen.zi_logits is None else gen.zi_logits.reshape(n_samples, b.n_cells, -1)
        parts.append((z, inf.qz_m, inf.qz_v, gen.log_rho.exp().reshape(n_samples, b.n_cells, -1), theta, zi,
                      expr.reshape(n_samples, b.n_cells, -1)))
    cat = lambda i, dim: torch.cat([p[i] for p in parts], dim)  # noqa: E731
    n_genes = parts[0][3].shape[-1]
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    theta = parts[0][4]
    if theta is not None and theta.dim() == 3:
        theta = flat(cat(4, 1))
    zi = None if parts[0][5] is None else flat(cat(5, 1))
    return Draws(
        z=flat(cat(0, 1)), qz_m=cat(1, 0), qz_v=cat(2, 0),
        px=CountDistribution(scale=flat(cat(3, 1)).reshape(-1, n_genes), log_theta=theta, zi_logits=zi),
        expression=flat(cat(6, 1)).cpu().numpy(),
    )


def importance_weights(fitted: Fitted, adata, cells: np.ndarray, qz_m: Tensor, qz_v: Tensor,
                       px: CountDistribution, zs: Tensor, *, max_cells: int = 1024, truncation: bool = False,
                       n_mc_samples: int = 500, rng: np.random.Generator) -> np.ndarray:
    """Self-normalized importance weights of the draws ``zs`` (n_draws, K), whose count
    distributions are ``px``, for the group of ``cells`` (positions in ``adata``) with
    posteriors ``qz_m``, ``qz_v`` (n_cells, K). Returns (n_draws,) weights summing to 1."""
    from .target import start

    n = len(cells)
    anchors = rng.choice(n, size=max_cells, replace=False) if n > max_cells else np.arange(n)
    log_px = get_marginal_ll(fitted, adata, cells[anchors], n_mc_samples=n_mc_samples, return_mean=False)
    log_px = log_px.to(zs.device, torch.float64)  # (A,)
    log_pz = _normal_log_prob(zs, torch.zeros_like(zs), torch.ones_like(zs)).sum(-1).double()  # (D,)
    qm, qv = qz_m[anchors], qz_v[anchors]
    log_qz = torch.stack([_normal_log_prob(zs, qm[a], qv[a]).sum(-1) for a in range(len(anchors))], 1).double()
    data, rows, size = start(fitted, adata, cells[anchors], None)
    log_scale = px.scale.clamp_min(1e-30).log()
    terms = []
    for b in minibatches_of(data, rows, size):
        x = b.x  # (m, G) dense counts of these anchors
        for i in range(b.n_cells):
            log_mu = log_scale + b.log_total[i]  # the anchor's observed library
            ll = dense_log_prob(x[i : i + 1], log_mu, px.log_theta, px.zi_logits).sum(-1)  # (D,)
            terms.append(ll.double())
    log_px_z = torch.stack(terms, 1)  # (D, A)
    log_w = torch.logsumexp(log_pz[:, None] + log_px_z - log_px[None, :] - torch.logsumexp(log_qz, 1, keepdim=True),
                            dim=1)
    if truncation:
        tau = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
        log_w = torch.clamp(log_w, min=tau)
    return (log_w - torch.logsumexp(log_w, 0)).exp().cpu().numpy()


def resampled_expression(fitted: Fitted, adata, data, rows: Tensor, size: int, n_total: int, code: int | None,
                         library_size: float | str, rng: np.random.Generator,
                         **options) -> tuple[np.ndarray, np.ndarray]:
    """``n_total`` draws of the expression of the cells ``rows`` (n_draws, n_genes): about
    ``n_total / n_cells`` posterior draws per cell, resampled by their importance weights
    (``options``: keywords of :func:`importance_weights`; ``n_mc_samples_per_pass`` is
    accepted and unused), and the position in ``rows`` of each draw's cell. No seeding: the
    caller runs it under ``querying``."""
    options.pop("n_mc_samples_per_pass", None)
    d = draw(fitted, data, rows, size, n_total // rows.shape[0] + 1, code, library_size)
    p = importance_weights(fitted, adata, rows.cpu().numpy(), d.qz_m, d.qz_v, d.px, d.z, rng=rng, **options)
    chosen = rng.choice(len(p), size=n_total, p=p, replace=True)
    return d.expression[chosen], chosen % rows.shape[0]  # draws are laid out sample by sample


def weighted_expression(fitted: Fitted, adata=None, indices=None, transform_batch=None, gene_list=None,
                        library_size: float | str = 1, n_samples_overall: int = 1, batch_size=None,
                        return_numpy: bool | None = None, **options):
    """``get_normalized_expression(weights="importance", n_samples_overall=...)``: rows are
    draws (see :func:`resampled_expression`), named by their cells, columns genes."""
    import pandas as pd

    from ..util.settings import settings
    from .target import batch_codes, gene_mask, obs_names, querying, start

    codes = batch_codes(fitted, transform_batch)
    if len(codes) != 1:
        raise ValueError("Importance weights cannot be computed when expression is averaged over batches.")
    mask = gene_mask(fitted, gene_list)
    data, rows, size = start(fitted, adata, indices, batch_size)
    with querying(fitted):
        expr, cells = resampled_expression(fitted, adata, data, rows, size, n_samples_overall, codes[0],
                                           library_size, np.random.default_rng(settings.seed), **options)
    expr = expr if mask is None else expr[:, mask]
    if return_numpy:
        return expr
    return pd.DataFrame(expr, index=obs_names(fitted, adata, rows[torch.from_numpy(cells).to(rows.device)]),
                        columns=(fitted.var_names if mask is None else fitted.var_names[mask]).copy())
