"""Compiled CPU kernels (numba) for the dense work of a training step over cells x genes:
batch normalization, the decoder's batch norm + softmax + negative binomial log-likelihood
(forward and backward, each in one pass over a minibatch's grid, exp and log from
``special``), and the gathers of minibatches from CSR counts.

``ldvae.cpu.fused`` wraps them as torch autograd functions; ``step`` calls them.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .special import (  # noqa: F401  vexp, vlog, lgamma64, digamma64: the kernels' math, for tests
    _JIT,
    _digamma,
    _exp_shifted_into,
    _lgamma,
    _log_into,
    _max,
    digamma64,
    f32,
    lgamma64,
    part,
    twins,
    vexp,
    vlog,
)


@nb.njit(inline="always", **_JIT)
def _batch_norm_update(f, batch_mean, batch_var, n, mean, var, momentum, eps, inv_std):
    """Feature f's 1 / sqrt(batch variance + eps), and its running mean and running unbiased variance."""
    inv_std[f] = 1.0 / math.sqrt(batch_var + eps)
    mean[f] = (1.0 - momentum) * mean[f] + momentum * batch_mean
    var[f] = (1.0 - momentum) * var[f] + momentum * batch_var * n / max(n - 1, 1)


@nb.njit(**_JIT)
def _batch_norm_statistics(h, mean, var, training, momentum, eps, inv_std):
    """nn.BatchNorm1d's statistics of h (n, F): in training the batch mean (returned) and
    1 / sqrt(biased batch variance + eps) (into inv_std), with the running mean and the
    running unbiased variance updated in place; otherwise the running ones."""
    n, F = h.shape
    mu = np.empty(F, np.float32)
    if training:
        acc = np.zeros(F)
        for i in range(n):
            for f in range(F):
                acc[f] += h[i, f]
        for f in range(F):
            mu[f] = acc[f] / n
            acc[f] = 0.0
        for i in range(n):
            for f in range(F):
                dv = h[i, f] - mu[f]
                acc[f] += dv * dv
        for f in range(F):
            _batch_norm_update(f, mu[f], acc[f] / n, n, mean, var, momentum, eps, inv_std)
    else:
        for f in range(F):
            mu[f] = mean[f]
            inv_std[f] = 1.0 / math.sqrt(var[f] + eps)
    return mu


@nb.njit(**_JIT)
def _batch_norm_backward(grad, xhat, gamma, inv_std, training, sum_grad, sum_grad_xhat):
    """In place, the gradient with respect to nn.BatchNorm1d's output (n, F) becomes the one
    with respect to its input: gamma * inv_std * (grad - mean(grad) - xhat * mean(grad * xhat))
    with batch statistics, gamma * inv_std * grad with running ones. ``sum_grad`` and
    ``sum_grad_xhat`` (F,) are the column sums of grad and grad * xhat."""
    c0, c1, c2 = batch_norm_backward_terms(gamma, inv_std, training, sum_grad, sum_grad_xhat, grad.shape[0])
    batch_norm_backward_rows(grad, xhat, c0, c1, c2)


@nb.njit(**_JIT)
def batch_norm_backward_terms(gamma, inv_std, training, sum_grad, sum_grad_xhat, n):
    """``_batch_norm_backward``'s per-feature terms for a batch of n cells: gamma * inv_std,
    mean(grad) and mean(grad * xhat) (0 with running statistics)."""
    F = gamma.shape[0]
    c0 = np.empty(F, np.float32)
    c1 = np.empty(F, np.float32)
    c2 = np.empty(F, np.float32)
    for f in range(F):
        c0[f] = gamma[f] * inv_std[f]
        c1[f] = sum_grad[f] / n if training else 0.0
        c2[f] = sum_grad_xhat[f] / n if training else 0.0
    return c0, c1, c2


@nb.njit(**_JIT)
def batch_norm_backward_rows(grad, xhat, c0, c1, c2):
    """``_batch_norm_backward`` on some of the batch's rows, from its terms."""
    for i in range(grad.shape[0]):
        gi = grad[i]
        xh = xhat[i]
        for f in range(gi.shape[0]):
            gi[f] = c0[f] * (gi[f] - c1[f] - xh[f] * c2[f])


# A cell whose log library exceeds min_g log theta by less than this has mu / theta < e^80
# for every gene: 1 + mu / theta and its log stay finite in float32, so the kernels work
# with mu / theta itself; other cells take the slower float64 path from d = log(mu / theta).
LINEAR_LIMIT = 80.0


@nb.njit(inline="always", **_JIT)
def _softplus(d):
    """log(1 + e^d) in float64 for any d."""
    return d + math.log1p(math.exp(-d)) if d > 0 else math.log1p(math.exp(d))


@nb.njit(inline="always", **_JIT)
def _sigmoid(d):
    return 1.0 / (1.0 + math.exp(-d)) if d > -700.0 else 0.0


@nb.njit(inline="always", **_JIT)
def _log_mu_over_theta(p, library, log_theta):
    """d = log(mu / theta) = log p + library - log theta, from the softmax p (-inf at p = 0)."""
    return math.log(p) + library - log_theta if p > 0 else -np.inf


# Counts up to TABLE - 1 take lgamma(x + theta) - lgamma(theta) = sum_{k<x} log(theta + k) and
# digamma(x + theta) - digamma(theta) = sum_{k<x} 1 / (theta + k) from a per-gene table built
# once per minibatch (UMI counts are mostly small); larger or non-integer counts take the series.
TABLE = 32


@nb.njit(inline="always", **_JIT)
def _lgamma_ratio_table(theta, kbuf):
    """(TABLE, G): row k is lgamma(k + theta) - lgamma(theta), for float32 theta (G,)."""
    G = theta.shape[0]
    table = np.empty((TABLE, G), np.float32)
    y = np.empty(G, np.float32)
    for g in range(G):
        table[0, g] = 0.0
    for k in range(1, TABLE):
        for g in range(G):
            y[g] = theta[g] + f32(k - 1)
        _log_into(y, y, kbuf)
        for g in range(G):
            table[k, g] = table[k - 1, g] + y[g]
    return table


@nb.njit(inline="always", **_JIT)
def _digamma_ratio_table(theta):
    """(TABLE, G): row k is digamma(k + theta) - digamma(theta)."""
    G = theta.shape[0]
    table = np.empty((TABLE, G), np.float32)
    for g in range(G):
        table[0, g] = 0.0
    for k in range(1, TABLE):
        for g in range(G):
            table[k, g] = table[k - 1, g] + f32(1.0) / (theta[g] + f32(k - 1))
    return table


@nb.njit(**_JIT)
def _lgamma_ratio_rare(start, stop, col, val, theta, table):
    """For the counts in [start, stop) that the table does not hold: lgamma(x + theta) -
    lgamma(theta) from the series, less the table entry the main loop added."""
    out = 0.0
    for k in range(start, stop):
        x = val[k]
        xi = min(max(int(x), 0), TABLE - 1)
        if xi != x:
            g = col[k]
            out += _lgamma(float(x) + theta[g]) - _lgamma(float(theta[g])) - table[xi, g]
    return out


@nb.njit(**_JIT)
def _digamma_ratio_rare(x, theta):
    """digamma(x + theta) - digamma(theta) for a count the table does not hold."""
    return _digamma(float(x) + theta) - _digamma(float(theta))


@nb.njit(inline="always", **_JIT)
def _dispersion(log_theta):
    """theta, 1 / theta (float32, exact exp: theta also enters lgamma and digamma), min log theta."""
    G = log_theta.shape[0]
    theta = np.empty(G, np.float32)
    inv_theta = np.empty(G, np.float32)
    for g in range(G):
        theta[g] = math.exp(log_theta[g])
        inv_theta[g] = 1.0 / theta[g]
    return theta, inv_theta, log_theta.min()


@nb.njit(inline="always", **_JIT)
def _cell_softmax(hi, mu_g, inv_std, gamma, beta, library, theta, inv_theta, log_theta, log_theta_min,
                  xh, t, pi, spi, kbuf):
    """A cell's rows xhat (xh, may be hi), t = BN(h), p = softmax(t) (pi) and softplus(d) =
    log(1 + mu / theta) (spi). Returns max t, log(l / sum exp(t - max t)) and the dense
    part of the log-likelihood, -sum theta * softplus(d)."""
    G = hi.shape[0]
    for g in range(G):
        xv = (hi[g] - mu_g[g]) * inv_std[g]
        xh[g] = xv
        t[g] = xv * gamma[g] + beta[g]
    tmax = _max(t, spi)
    _exp_shifted_into(t, tmax, pi, kbuf)
    s = 0.0
    for g in range(G):
        s += pi[g]
    inv_s = f32(1.0 / s)
    log_l_over_s = library - math.log(s)  # log(l / s)
    if library - log_theta_min < LINEAR_LIMIT:
        scale = f32(math.exp(library))  # l: mu = l * p
        for g in range(G):
            pv = pi[g] * inv_s
            pi[g] = pv
            spi[g] = f32(1.0) + pv * scale * inv_theta[g]  # 1 + mu / theta
        _log_into(spi, spi, kbuf)
    else:  # mu / theta may pass float32's range: softplus(d) from d, in float64
        for g in range(G):
            pi[g] *= inv_s
            spi[g] = _softplus(t[g] - tmax + log_l_over_s - log_theta[g])
    dense = 0.0
    for g in range(G):
        dense -= theta[g] * spi[g]
    return tmax, log_l_over_s, dense


@nb.njit(inline="always", **_JIT)
def _cell_nonzeros_ll(t, tmax, log_l_over_s, spi, log_theta, theta, ratio, start, stop, col, val):
    """The nonzeros' part of a cell's log-likelihood: x * log sigmoid(d) + lgamma(x + theta)
    - lgamma(theta), with d = t - tmax + log(l / s) - log theta and log sigmoid(d) = d - softplus(d)."""
    nz = 0.0
    rare = 0
    for k in range(start, stop):
        g = col[k]
        x = val[k]
        d = t[g] - tmax + log_l_over_s - log_theta[g]
        xi = min(max(int(x), 0), TABLE - 1)
        rare += xi != x
        nz += x * (d - spi[g]) + ratio[xi, g]
    if rare:  # counts off the table, kept out of the loop above so that it vectorizes
        nz += _lgamma_ratio_rare(start, stop, col, val, theta, ratio)
    return nz


@nb.njit(inline="always", **_JIT)
def _cell_dense_grad(gi, library, theta, inv_theta, log_theta, log_theta_min, pi, gd):
    """dll/dd times gi for every gene as if its count were 0: -gi * theta * sigmoid(d), into
    gd. Returns whether the cell takes the float32 path, and l."""
    G = pi.shape[0]
    linear = library - log_theta_min < LINEAR_LIMIT
    scale = f32(math.exp(library)) if linear else f32(0.0)
    if linear:
        for g in range(G):
            r = pi[g] * scale * inv_theta[g]  # mu / theta
            gd[g] = -gi * theta[g] * (r / (f32(1.0) + r))
    else:
        for g in range(G):
            gd[g] = -gi * theta[g] * _sigmoid(_log_mu_over_theta(pi[g], library, log_theta[g]))
    return linear, scale


@nb.njit(inline="always", **_JIT)
def _cell_nonzeros_grad(gi, linear, scale, library, theta, inv_theta, log_theta, ratio, start, stop, col, val,
                        pi, gd, grad_log_theta):
    """The nonzeros' gradient terms: x * (1 - sigmoid(d)) into gd, and theta * (digamma(x +
    theta) - digamma(theta)) into grad_log_theta, each times gi."""
    for k in range(start, stop):
        g = col[k]
        x = float(val[k])
        if linear:
            r = pi[g] * scale * inv_theta[g]
            gd[g] += gi * x / (1.0 + r)  # x * (1 - sigmoid(d))
        else:
            gd[g] += gi * x * _sigmoid(-_log_mu_over_theta(pi[g], library, log_theta[g]))
        xi = min(max(int(x), 0), TABLE - 1)
        psi = ratio[xi, g] if xi == x else _digamma_ratio_rare(x, theta[g])
        grad_log_theta[g] += gi * theta[g] * psi


@nb.njit(inline="always", **_JIT)
def _cell_grad_finish(gi, theta, pi, spi, xh, gd, acc_theta, acc_beta, acc_gamma):
    """dll/dt = dll/dd - p * dll/dlibrary into gd and the per-gene sums; returns dll/dlibrary."""
    G = pi.shape[0]
    gl = 0.0
    for g in range(G):
        gl += gd[g]
    glf = f32(gl)
    gif = f32(gi)
    for g in range(G):
        acc_theta[g] += gif * theta[g] * spi[g] + gd[g]
        gt = gd[g] - pi[g] * glf
        gd[g] = gt
        acc_beta[g] += gt
        acc_gamma[g] += gt * xh[g]
    return gl


@nb.njit(inline="always", **_JIT)
def _finish_backward(grad_h, xhat, gamma, inv_std, training, acc_theta, acc_beta, acc_gamma,
                     grad_gamma, grad_beta, grad_log_theta):
    for g in range(grad_h.shape[1]):
        grad_log_theta[g] -= acc_theta[g]
        grad_beta[g] = acc_beta[g]
        grad_gamma[g] = acc_gamma[g]
    _batch_norm_backward(grad_h, xhat, gamma, inv_std, training, acc_beta, acc_gamma)


@nb.njit(**_JIT)
def bn_softmax_nb_forward(
    h, gamma, beta, mean, var, training, momentum, eps, library, log_theta, row_start, col, val,
    ll, xhat, p, sp, inv_std,
):
    """Per-cell NB log-likelihood of library + log_softmax(BN(h)), less lgamma(x + 1).

    h (n, G) decoder pre-activations; gamma, beta (G,) batch-norm affine; mean, var (G,)
    running statistics, updated in place when ``training`` (batch statistics are used then,
    as nn.BatchNorm1d does). log_theta (G,). The minibatch's nonzeros by cell: cell i's
    are [row_start[i], row_start[i + 1]) of col, val. Writes ll (n,) and, for the
    backward, xhat = (h - mean) * inv_std, p = softmax, sp = softplus(log mu - log theta)
    (each (n, G)) and inv_std (G,)."""
    n, G = h.shape
    kbuf = np.empty(G, np.int32)
    mu_g = _batch_norm_statistics(h, mean, var, training, momentum, eps, inv_std)
    theta, inv_theta, log_theta_min = _dispersion(log_theta)
    ratio = _lgamma_ratio_table(theta, kbuf)
    t = np.empty(G, np.float32)
    for i in range(n):
        tmax, log_l_over_s, dense = _cell_softmax(h[i], mu_g, inv_std, gamma, beta, library[i], theta, inv_theta,
                                                  log_theta, log_theta_min, xhat[i], t, p[i], sp[i], kbuf)
        ll[i] = dense + _cell_nonzeros_ll(t, tmax, log_l_over_s, sp[i], log_theta, theta, ratio, row_start[i],
                                          row_start[i + 1], col, val)


@nb.njit(**_JIT)
def bn_softmax_nb_backward(
    grad, gamma, training, library, log_theta, row_start, col, val, xhat, p, sp, inv_std,
    grad_h, grad_gamma, grad_beta, grad_library, grad_log_theta,
):
    """Gradients of sum_i grad[i] * ll[i] (``bn_softmax_nb_forward``) with respect to h
    (written into grad_h, (n, G)), gamma, beta, library and log_theta. With
    s = sigmoid(d) = 1 - exp(-softplus(d)) = (mu / theta) / (1 + mu / theta):
    dll/dd = -theta * s, plus x * (1 - s) at the nonzeros; dll/dlibrary = sum_g dll/dd;
    dll/dt = dll/dd - p * dll/dlibrary; log theta gets -dll/dd and its direct terms
    -theta * softplus(d) and theta * (digamma(x + theta) - digamma(theta)) at nonzeros."""
    n, G = xhat.shape
    acc_theta = np.zeros(G)  # sum_i grad_i * (theta * softplus + dll/dd), dense part
    acc_beta = np.zeros(G)
    acc_gamma = np.zeros(G)
    theta, inv_theta, log_theta_min = _dispersion(log_theta)
    grad_log_theta[:] = 0.0
    ratio = _digamma_ratio_table(theta)
    for i in range(n):
        gi, pi, gd = grad[i], p[i], grad_h[i]
        linear, scale = _cell_dense_grad(gi, library[i], theta, inv_theta, log_theta, log_theta_min, pi, gd)
        _cell_nonzeros_grad(gi, linear, scale, library[i], theta, inv_theta, log_theta, ratio, row_start[i],
                            row_start[i + 1], col, val, pi, gd, grad_log_theta)
        grad_library[i] = _cell_grad_finish(gi, theta, pi, sp[i], xhat[i], gd, acc_theta, acc_beta, acc_gamma)
    _finish_backward(grad_h, xhat, gamma, inv_std, training, acc_theta, acc_beta, acc_gamma,
                     grad_gamma, grad_beta, grad_log_theta)


@nb.njit(**_JIT)
def bn_softmax_nb_train(
    h, h_sum, h_sum_sq, gamma, beta, mean, var, momentum, eps, library, log_theta, row_start, col, val, grad,
    ll, grad_h, grad_gamma, grad_beta, grad_library, grad_log_theta,
):
    """``bn_softmax_nb_forward`` in training mode and ``bn_softmax_nb_backward`` for upstream
    gradient ``grad`` in one pass over the cells: each cell's softmax and softplus rows stay
    in cache instead of three (n, G) arrays going to memory and back. The batch statistics
    come from h's column sums and sums of squares (float64, (G,)), which the caller adds up
    as it writes h. Overwrites h with xhat (no longer needed by the training step)."""
    n, G = h.shape
    terms = decoder_train_terms(h_sum, h_sum_sq, n, mean, var, momentum, eps, log_theta)
    acc_theta = np.zeros(G, np.float32)
    acc_beta = np.zeros(G, np.float32)
    acc_gamma = np.zeros(G, np.float32)
    grad_log_theta[:] = 0.0
    decoder_train_cells(h, terms, gamma, beta, library, log_theta, row_start, col, val, grad, ll, grad_h,
                        grad_library, acc_theta, acc_beta, acc_gamma, grad_log_theta)
    _finish_backward(grad_h, h, gamma, terms[1], True, acc_theta, acc_beta, acc_gamma,
                     grad_gamma, grad_beta, grad_log_theta)


@nb.njit(**_JIT)
def decoder_train_terms(h_sum, h_sum_sq, n, mean, var, momentum, eps, log_theta):
    """What every cell of a training step's decoder pass shares: the batch mean and inv_std of
    h (from its column sums over the n cells; the running statistics updated), theta, 1 / theta,
    min log theta and the lgamma and digamma ratio tables."""
    G = h_sum.shape[0]
    inv_std = np.empty(G, np.float32)
    mu_g = np.empty(G, np.float32)
    for g in range(G):
        batch_mean = h_sum[g] / n
        mu_g[g] = batch_mean
        _batch_norm_update(g, batch_mean, max(h_sum_sq[g] / n - batch_mean * batch_mean, 0.0), n, mean, var,
                           momentum, eps, inv_std)
    theta, inv_theta, log_theta_min = _dispersion(log_theta)
    lg_ratio = _lgamma_ratio_table(theta, np.empty(G, np.int32))
    return mu_g, inv_std, theta, inv_theta, log_theta_min, lg_ratio, _digamma_ratio_table(theta)


@nb.njit(**_JIT)
def decoder_train_cells(h, terms, gamma, beta, library, log_theta, row_start, col, val, grad, ll, grad_h,
                        grad_library, acc_theta, acc_beta, acc_gamma, grad_log_theta):
    """``bn_softmax_nb_train``'s pass over the cells (rows) of h, with ``decoder_train_terms``'
    ``terms``; adds each gene's sums over these cells into acc_theta, acc_beta, acc_gamma and
    grad_log_theta. Cell i's nonzeros are [row_start[i], row_start[i + 1]) of col and val."""
    mu_g, inv_std, theta, inv_theta, log_theta_min, lg_ratio, dg_ratio = terms
    n, G = h.shape
    kbuf = np.empty(G, np.int32)
    t, pi, spi = np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32)
    for i in range(n):
        start, stop, gi, gd = row_start[i], row_start[i + 1], grad[i], grad_h[i]
        xh = h[i]  # xhat replaces h, element by element
        tmax, log_l_over_s, dense = _cell_softmax(h[i], mu_g, inv_std, gamma, beta, library[i], theta, inv_theta,
                                                  log_theta, log_theta_min, xh, t, pi, spi, kbuf)
        linear, scale = _cell_dense_grad(gi, library[i], theta, inv_theta, log_theta, log_theta_min, pi, gd)
        if linear:  # the forward's and the backward's terms of each nonzero in one loop
            nz = 0.0
            rare = 0
            for k in range(start, stop):
                g = col[k]
                x = val[k]
                xi = min(max(int(x), 0), TABLE - 1)
                rare += xi != x
                nz += x * (t[g] - tmax + log_l_over_s - log_theta[g] - spi[g]) + lg_ratio[xi, g]
                gd[g] += gi * x / (f32(1.0) + pi[g] * scale * inv_theta[g])
                psi = dg_ratio[xi, g] if xi == x else _digamma_ratio_rare(float(x), theta[g])
                grad_log_theta[g] += gi * theta[g] * psi
            if rare:
                nz += _lgamma_ratio_rare(start, stop, col, val, theta, lg_ratio)
        else:
            nz = _cell_nonzeros_ll(t, tmax, log_l_over_s, spi, log_theta, theta, lg_ratio, start, stop, col, val)
            _cell_nonzeros_grad(gi, linear, scale, library[i], theta, inv_theta, log_theta, dg_ratio, start, stop,
                                col, val, pi, gd, grad_log_theta)
        ll[i] = dense + nz
        grad_library[i] = _cell_grad_finish(gi, theta, pi, spi, xh, gd, acc_theta, acc_beta, acc_gamma)


def _gather_nonzeros(indptr, indices, values, rows, T):
    """The CSR nonzeros of cells ``rows``: row pointer (n + 1,), gene (int64), count and
    log1p(count) (float32, exact 1 + x for counts below 2^24); copied in T parts."""
    n = rows.shape[0]
    ptr = np.empty(n + 1, np.int64)
    ptr[0] = 0
    for i in range(n):
        r = rows[i]
        ptr[i + 1] = ptr[i] + indptr[r + 1] - indptr[r]
    nnz = ptr[n]
    col = np.empty(nnz, np.int64)
    val = np.empty(nnz, np.float32)
    log1p = np.empty(nnz, np.float32)
    for t in nb.prange(T):
        a, b = part(n, T, t)
        _copy_rows(indptr, indices, values, rows[a:b], ptr[a:], col, val, log1p)
    return ptr, col, val, log1p


@nb.njit(**_JIT)
def _copy_rows(indptr, indices, values, rows, ptr, col, val, log1p):
    """Cells ``rows``' nonzeros into col, val and log1p from ptr[0] on (ptr as ``_gather_nonzeros``'s)."""
    for i in range(rows.shape[0]):
        src = indptr[rows[i]]
        dst = ptr[i]
        for k in range(ptr[i + 1] - dst):
            col[dst + k] = indices[src + k]
            val[dst + k] = values[src + k]
    a, b = ptr[0], ptr[rows.shape[0]]
    for k in range(a, b):
        log1p[k] = f32(1.0) + val[k]
    _log_into(log1p[a:b], log1p[a:b], np.empty(b - a, np.int32))


gather_nonzeros_parts, gather_nonzeros_threaded = twins(_gather_nonzeros)


@nb.njit(**_JIT)
def gather_nonzeros(indptr, indices, values, rows):
    """``_gather_nonzeros`` on one thread."""
    return gather_nonzeros_parts(indptr, indices, values, rows, 1)


@nb.njit(**_JIT)
def gather_rows(indptr, indices, values, rows, n_genes):
    """A minibatch of CSR rows: (row_pointer (n + 1,), row, col, flat = row * n_genes + col
    (int64, (nnz,)), val and log1p(val) (float32, (nnz,))) for the cells ``rows``."""
    ptr, col, val, log1p = gather_nonzeros(indptr, indices, values, rows)
    row = np.empty(col.shape[0], np.int64)
    flat = np.empty(col.shape[0], np.int64)
    for i in range(rows.shape[0]):
        for k in range(ptr[i], ptr[i + 1]):
            row[k] = i
            flat[k] = i * n_genes + col[k]
    return ptr, row, col, flat, val, log1p
