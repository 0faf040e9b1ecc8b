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


def _theta_at_nonzeros(log_theta: Tensor, flat: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
    """theta and lgamma(theta) at the nonzeros, each (nnz,). For a per-gene theta,
    lgamma(theta) is evaluated once per gene and gathered, instead of once per nonzero."""
    if log_theta.dim() == 1:
        theta = log_theta.exp()  # (G,)
        return torch.index_select(theta, 0, col), torch.index_select(torch.lgamma(theta), 0, col)
    theta_nz = _at_nonzeros(log_theta, flat, col).exp()
    return theta_nz, torch.lgamma(theta_nz)


def _lgamma_ratio_at_nonzeros(log_theta: Tensor, val: Tensor, flat: Tensor, col: Tensor) -> Tensor:
    """lgamma(x + theta) - lgamma(theta) at the nonzeros (term C), (nnz,)."""
    theta_nz, lgamma_theta_nz = _theta_at_nonzeros(log_theta, flat, col)
    return torch.lgamma(val + theta_nz) - lgamma_theta_nz


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


def _softplus(d: Tensor) -> Tensor:
    """log(1 + exp(d)) in four vectorized passes (F.softplus is slower on CPU): exact to
    float32 rounding of 1 + exp(d), i.e. an absolute error below 1.2e-7 per entry."""
    return torch.exp(d.clamp(max=80.0)).add_(1.0).log_().add_((d - 80.0).clamp_(min=0.0))


def _digamma_above_one(y: Tensor) -> Tensor:
    """digamma(y) for y >= 1 (counts plus theta), vectorized: the recurrence
    psi(y) = psi(y + 5) - sum_{k<5} 1 / (y + k) and the asymptotic series at y + 5 >= 6,
    accurate to ~1e-10 (torch.digamma is scalar code on CPU)."""
    shifted = torch.reciprocal(y)
    for k in range(1, 5):
        shifted.add_(torch.reciprocal(y + k))
    w = y + 5.0
    r = torch.reciprocal(w)
    r2 = r * r
    series = r2 * (1 / 12 - r2 * (1 / 120 - r2 * (1 / 252 - r2 * (1 / 240))))
    return torch.log(w).sub_(0.5 * r).sub_(series).sub_(shifted)


class _SoftmaxNB(torch.autograd.Function):
    """``nb_log_prob(library + log_softmax(t), log_theta, ...)`` with a hand-written backward.

    The training step's dense work over cells x genes is here. Autograd would keep and
    revisit a dozen (n_cells, n_genes) intermediates (log_softmax, log_mu, d, softplus and
    their gradients); the formulas below need d and t, and ~10 dense passes in all. With
    g_b the incoming gradient per cell and s = sigmoid(d):

    - dLL/dd = -theta * s everywhere, plus x * (1 - s) at the nonzeros;
    - d = t + library - logsumexp(t) - log theta, so dLL/dt = dLL/dd - softmax(t) * sum_g dLL/dd,
      dLL/dlibrary = sum_g dLL/dd, and log theta receives -sum_b dLL/dd plus its direct terms
      -theta * softplus(d) (term A) and theta * (digamma(x + theta) - digamma(theta)) (term C).
    """

    @staticmethod
    def forward(ctx, t, library, log_theta, row, col, flat, val):
        lse = torch.logsumexp(t, dim=1)  # (n_cells,)
        d = (t + (library - lse).unsqueeze(1)).sub_(log_theta)  # log mu - log theta
        softplus_d = _softplus(d)
        theta = log_theta.exp()
        dense = -(softplus_d @ theta) if theta.dim() == 1 else -(theta * softplus_d).sum(-1)  # term A
        theta_nz, lgamma_theta_nz = _theta_at_nonzeros(log_theta, flat, col)
        d_nz = torch.index_select(d.reshape(-1), 0, flat)
        nz = val * F.logsigmoid(d_nz) + torch.lgamma(val + theta_nz) - lgamma_theta_nz
        ctx.save_for_backward(t, d, softplus_d, lse, theta, theta_nz, d_nz, row, col, flat, val)
        return dense.index_add_(0, row, nz)

    @staticmethod
    def backward(ctx, grad):
        t, d, softplus_d, lse, theta, theta_nz, d_nz, row, col, flat, val = ctx.saved_tensors
        grad_nz = torch.index_select(grad, 0, row)
        per_gene = theta.dim() == 1
        # dLL/dd, weighted by the incoming per-cell gradient
        grad_d = torch.sigmoid(d).mul_(theta).mul_(-grad.unsqueeze(1))
        grad_d.view(-1).index_add_(0, flat, grad_nz * val * torch.sigmoid(-d_nz))
        grad_library = grad_d.sum(1)
        # log theta: through d, and directly (terms A and C)
        digamma_theta_nz = (
            torch.index_select(torch.digamma(theta), 0, col) if per_gene else torch.digamma(theta_nz)
        )
        psi = _digamma_above_one(val + theta_nz) - digamma_theta_nz
        if per_gene:
            grad_log_theta = theta * (-(softplus_d.t() @ grad)) - grad_d.sum(0)
            grad_log_theta.index_add_(0, col, grad_nz * psi * theta_nz)
        else:
            grad_log_theta = (softplus_d * theta).mul_(-grad.unsqueeze(1)).sub_(grad_d)
            grad_log_theta.view(-1).index_add_(0, flat, grad_nz * psi * theta_nz)
        # t: through log mu = t - logsumexp(t) (+ library)
        rho = (t - lse.unsqueeze(1)).exp_()
        grad_t = grad_d.addcmul_(rho, grad_library.unsqueeze(1), value=-1.0)
        return grad_t, grad_library, grad_log_theta, None, None, None, None


def nb_log_prob_softmax(
    t: Tensor, library: Tensor, log_theta: Tensor, row: Tensor, col: Tensor, flat: Tensor, val: Tensor
) -> Tensor:
    """``nb_log_prob(library + log_softmax(t), log_theta, ...)``, the same values, with the
    decoder's softmax fused into a hand-written backward (see ``_SoftmaxNB``).

    ``t`` (n_cells, n_genes) are the decoder's logits, ``library`` (n_cells,) the log library
    size, ``log_theta`` (n_genes,) or (n_cells, n_genes)."""
    return _SoftmaxNB.apply(t, library, log_theta, row, col, flat, val)


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
