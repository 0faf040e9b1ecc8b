"""Count log-likelihoods that touch zero counts only where they must.

For a count x with mean mu and inverse dispersion theta, the negative binomial
log-probability is

    log NB(x; mu, theta) = theta * log(theta / (theta + mu))             (A, every entry)
                         + x * log(mu / (theta + mu))                    (B, 0 when x = 0)
                         + lgamma(x + theta) - lgamma(theta)             (C, 0 when x = 0)
                         - lgamma(x + 1)                                 (D, no parameters)

With d = log mu - log theta: A = -theta * softplus(d) and B = x * logsigmoid(d).
Only A is evaluated on the dense cells x genes grid; B and C are evaluated on
the stored nonzeros of the minibatch; D never enters the gradient and is added
once per cell where a log-likelihood value is reported (``lgamma_x1``).

Every function returns the per-cell sum over genes *without* term D, shape
(n_cells,). The dense reference formulas live in ``dense_log_prob`` for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _at_nonzeros(t: Tensor, flat: Tensor, col: Tensor) -> Tensor:
    """Values of a per-entry (n_cells, n_genes) or per-gene (n_genes,) tensor at the nonzeros."""
    # index_select: its CPU backward (index_add_) is deterministic, unlike advanced indexing's.
    if t.dim() == 1:
        return torch.index_select(t, 0, col)
    return torch.index_select(t.reshape(-1), 0, flat)


def _sum_rows(values: Tensor, row: Tensor, n_cells: int) -> Tensor:
    return values.new_zeros(n_cells).index_add_(0, row, values)


def _lgamma_ratio_at_nonzeros(log_theta: Tensor, val: Tensor, flat: Tensor, col: Tensor) -> Tensor:
    """lgamma(x + theta) - lgamma(theta) at the nonzeros (term C), (nnz,).

    For a per-gene theta, lgamma(theta) is evaluated once per gene and gathered,
    instead of once per nonzero."""
    if log_theta.dim() == 1:
        theta = log_theta.exp()  # (G,)
        theta_nz = torch.index_select(theta, 0, col)
        return torch.lgamma(val + theta_nz) - torch.index_select(torch.lgamma(theta), 0, col)
    theta_nz = _at_nonzeros(log_theta, flat, col).exp()
    return torch.lgamma(val + theta_nz) - torch.lgamma(theta_nz)


def nb_log_prob(
    log_mu: Tensor, log_theta: Tensor, row: Tensor, col: Tensor, flat: Tensor, val: Tensor
) -> Tensor:
    """Per-cell negative binomial log-likelihood, less sum_g lgamma(x + 1).

    Parameters
    ----------
    log_mu
        log mean, (n_cells, n_genes).
    log_theta
        log inverse dispersion, (n_genes,) or (n_cells, n_genes).
    row, col, flat, val
        The minibatch's nonzero counts: cell row, gene column, ``row * n_genes + col``
        and the count, each (nnz,).
    """
    theta = log_theta.exp()
    d = log_mu - log_theta  # (n_cells, n_genes)
    softplus_d = F.softplus(d)
    # term A, (n_cells,); a matrix-vector product when theta is per gene
    dense = -(softplus_d @ theta) if theta.dim() == 1 else -(theta * softplus_d).sum(-1)
    lgamma_ratio = _lgamma_ratio_at_nonzeros(log_theta, val, flat, col)
    nz = val * F.logsigmoid(_at_nonzeros(d, flat, col)) + lgamma_ratio  # terms B and C
    return dense + _sum_rows(nz, row, log_mu.shape[0])


def zinb_log_prob(
    log_mu: Tensor,
    log_theta: Tensor,
    zi_logits: Tensor,
    row: Tensor,
    col: Tensor,
    flat: Tensor,
    val: Tensor,
) -> Tensor:
    """Per-cell zero-inflated NB log-likelihood, less sum_g lgamma(x + 1).

    ``zi_logits`` (n_cells, n_genes) are the logits of the zero-inflation
    probability pi. For x = 0: log(pi + (1 - pi) NB(0)); for x > 0:
    log(1 - pi) + log NB(x). The zero case is summed over every entry and
    replaced at the nonzeros.
    """
    theta = log_theta.exp()
    d = log_mu - log_theta
    log_nb0 = -theta * F.softplus(d)  # log NB(0), (n_cells, n_genes)
    zero_case = torch.logaddexp(zi_logits, log_nb0) - F.softplus(zi_logits)
    dense = zero_case.sum(-1)
    lgamma_ratio = _lgamma_ratio_at_nonzeros(log_theta, val, flat, col)
    nz_case = (
        -F.softplus(_at_nonzeros(zi_logits, flat, col))
        + _at_nonzeros(log_nb0, flat, col)
        + val * F.logsigmoid(_at_nonzeros(d, flat, col))
        + lgamma_ratio
    )
    return dense + _sum_rows(nz_case - _at_nonzeros(zero_case, flat, col), row, log_mu.shape[0])


def poisson_log_prob(log_mu: Tensor, row: Tensor, flat: Tensor, val: Tensor) -> Tensor:
    """Per-cell Poisson log-likelihood, less sum_g lgamma(x + 1)."""
    dense = -log_mu.exp().sum(-1)
    return dense + _sum_rows(val * _at_nonzeros(log_mu, flat, flat), row, log_mu.shape[0])


def dense_log_prob(
    x: Tensor,
    log_mu: Tensor,
    log_theta: Tensor | None = None,
    zi_logits: Tensor | None = None,
) -> Tensor:
    """Reference: the full per-entry log-likelihood on dense counts, (n_cells, n_genes).

    Includes -lgamma(x + 1). Poisson when ``log_theta`` is None, ZINB when
    ``zi_logits`` is given. Used by tests and by sampling-free checks.
    """
    mu = log_mu.exp()
    if log_theta is None:
        return x * log_mu - mu - torch.lgamma(x + 1)
    theta = log_theta.exp().expand_as(mu)
    log_theta_mu = torch.log(theta + mu)
    log_nb = (
        theta * (log_theta - log_theta_mu)
        + x * (log_mu - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    if zi_logits is None:
        return log_nb
    log_pi = -F.softplus(-zi_logits)
    log_one_minus_pi = -F.softplus(zi_logits)
    zero = torch.logaddexp(log_pi, log_one_minus_pi + log_nb)
    return torch.where(x == 0, zero, log_one_minus_pi + log_nb)
