"""Compiled CPU kernels (numba) for the training step's dense work over cells x genes.

The decoder's batch norm, softmax and the negative binomial log-likelihood, forward and
backward, each in one pass over a minibatch's cells x genes grid. In torch the same math
is ~40 operator calls of 10-30 us each, and exp/log dominate what remains; here exp and
log are float32 polynomials that the compiler vectorizes (relative error below 3.1e-7 and
1.3e-7, against 6e-8 for float32 rounding), and the grid is read and written a few times in all.

Numba comes with scanpy (and pynndescent/umap); the kernels compile once per machine
(cached beside this file, or in numba's user cache when that is read-only) on first use.
``ldvae.cpu.fused`` wraps them as a torch autograd function.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

f32 = np.float32
_JIT = dict(nogil=True, fastmath=True, cache=True, error_model="numpy")


@nb.njit(inline="always", **_JIT)
def _exp_into(x, out, kbuf):
    """out[j] = exp(x[j]) for a contiguous float32 row (x may be out)."""
    _exp_shifted_into(x, f32(0.0), out, kbuf)


@nb.njit(inline="always", **_JIT)
def _exp_shifted_into(x, shift, out, kbuf):
    """out[j] = exp(x[j] - shift) for a contiguous float32 row (x may be out): a degree-7
    polynomial on [-ln2/2, ln2/2] scaled by 2^k through the exponent bits."""
    ob = out.view(np.int32)
    for j in range(x.shape[0]):
        v = min(max(x[j] - shift, f32(-87.0)), f32(88.0))
        k = np.floor(v * f32(1.4426950408889634) + f32(0.5))
        r = v - k * f32(0.693359375) - k * f32(-2.12194440e-4)
        p = f32(1.9875691500e-4)
        p = p * r + f32(1.3981999507e-3)
        p = p * r + f32(8.3334519073e-3)
        p = p * r + f32(4.1665795894e-2)
        p = p * r + f32(1.6666665459e-1)
        p = p * r + f32(5.0000001201e-1)
        out[j] = p * r * r + r + f32(1.0)
        kbuf[j] = np.int32(k) << 23
    for j in range(x.shape[0]):
        ob[j] = ob[j] + kbuf[j]


@nb.njit(inline="always", **_JIT)
def _log_into(x, out, kbuf):
    """out[j] = log(x[j]) for positive normal float32 x (x may be out): exponent and
    mantissa split through the bits, then a degree-9 polynomial of the mantissa."""
    xb = x.view(np.int32)
    ob = out.view(np.int32)
    for j in range(x.shape[0]):
        b = xb[j]
        kbuf[j] = ((b >> 23) & 0xFF) - 126
        ob[j] = (b & 0x007FFFFF) | 0x3F000000  # mantissa in [0.5, 1)
    for j in range(x.shape[0]):
        m = out[j]
        e = f32(kbuf[j])
        if m < f32(0.70710678):
            e = e - f32(1.0)
            m = m + m - f32(1.0)
        else:
            m = m - f32(1.0)
        z = m * m
        y = f32(7.0376836292e-2)
        y = y * m + f32(-1.1514610310e-1)
        y = y * m + f32(1.1676998740e-1)
        y = y * m + f32(-1.2420140846e-1)
        y = y * m + f32(1.4249322787e-1)
        y = y * m + f32(-1.6668057665e-1)
        y = y * m + f32(2.0000714765e-1)
        y = y * m + f32(-2.4999993993e-1)
        y = y * m + f32(3.3333331174e-1)
        y = y * m * z + e * f32(-2.12194440e-4) - f32(0.5) * z
        out[j] = m + y + e * f32(0.693359375)


@nb.njit(inline="always", **_JIT)
def _max(x, buf):
    """max of a float32 row as a pairwise tree over ``buf`` (a plain running max does not
    vectorize: 8x slower)."""
    w = x.shape[0]
    for j in range(w):
        buf[j] = x[j]
    while w > 1:
        half = w // 2
        for j in range(half):
            a = buf[j]
            b = buf[j + half]
            buf[j] = a if a > b else b
        if w % 2:
            a = buf[0]
            b = buf[w - 1]
            buf[0] = a if a > b else b
        w = half
    return buf[0]


@nb.njit(**_JIT)
def vexp(x):
    """exp of a 1-D float32 array with ``_exp_into`` (for tests)."""
    out = np.empty_like(x)
    _exp_into(x, out, np.empty(x.shape[0], np.int32))
    return out


@nb.njit(**_JIT)
def vlog(x):
    """log of a 1-D positive float32 array with ``_log_into`` (for tests)."""
    out = np.empty_like(x)
    _log_into(x, out, np.empty(x.shape[0], np.int32))
    return out


@nb.njit(inline="always", **_JIT)
def _lgamma(y):
    """log Gamma(y) for y > 0 in float64: shifted to y + 6 >= 6, then Stirling's series
    (absolute error below 1e-10)."""
    shift = 0.0
    if y < 6.0:
        p = y * (y + 1.0) * (y + 2.0) * (y + 3.0) * (y + 4.0) * (y + 5.0)
        shift = math.log(p)
        y = y + 6.0
    r = 1.0 / y
    r2 = r * r
    series = r * (1.0 / 12 - r2 * (1.0 / 360 - r2 * (1.0 / 1260 - r2 * (1.0 / 1680))))
    return (y - 0.5) * math.log(y) - y + 0.91893853320467274 + series - shift


@nb.njit(inline="always", **_JIT)
def _digamma(y):
    """digamma(y) for y > 0 in float64: the recurrence up to y >= 6, then the asymptotic
    series (absolute error below 2e-10). The recurrence is bounded: under fastmath a NaN
    (a diverged fit) would otherwise never leave ``while y < 6``, and the step would hang
    instead of reporting a non-finite loss."""
    acc = 0.0
    for _ in range(7):  # any y > 0 reaches 6 within 7 steps
        if y >= 6.0:
            break
        acc -= 1.0 / y
        y += 1.0
    r = 1.0 / y
    r2 = r * r
    return acc + math.log(y) - 0.5 * r - r2 * (1.0 / 12 - r2 * (1.0 / 120 - r2 * (1.0 / 252 - r2 * (1.0 / 240))))


@nb.njit(**_JIT)
def _series64(y, digamma):
    out = np.empty(y.shape[0])
    for j in range(y.shape[0]):
        out[j] = _digamma(float(y[j])) if digamma else _lgamma(float(y[j]))
    return out


def lgamma64(y: np.ndarray) -> np.ndarray:
    """``_lgamma`` over an array, in float64 (for tests)."""
    return _series64(y, False)


def digamma64(y: np.ndarray) -> np.ndarray:
    """``_digamma`` over an array, in float64 (for tests)."""
    return _series64(y, True)


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
    n, F = grad.shape
    c0 = np.empty(F, np.float32)
    c1 = np.empty(F, np.float32)
    c2 = np.empty(F, np.float32)
    for f in range(F):
        c0[f] = gamma[f] * inv_std[f]
        c1[f] = sum_grad[f] / n if training else 0.0
        c2[f] = sum_grad_xhat[f] / n if training else 0.0
    for i in range(n):
        gi = grad[i]
        xh = xhat[i]
        for f in range(F):
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
    if rare:  # counts off the table (kept out of the loop above: 2x faster)
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
    kbuf = np.empty(G, np.int32)
    inv_std = np.empty(G, np.float32)
    mu_g = np.empty(G, np.float32)
    for g in range(G):
        batch_mean = h_sum[g] / n
        mu_g[g] = batch_mean
        _batch_norm_update(g, batch_mean, max(h_sum_sq[g] / n - batch_mean * batch_mean, 0.0), n, mean, var,
                           momentum, eps, inv_std)
    theta, inv_theta, log_theta_min = _dispersion(log_theta)
    lg_ratio = _lgamma_ratio_table(theta, kbuf)
    dg_ratio = _digamma_ratio_table(theta)
    acc_theta = np.zeros(G, np.float32)
    acc_beta = np.zeros(G, np.float32)
    acc_gamma = np.zeros(G, np.float32)
    grad_log_theta[:] = 0.0
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
    _finish_backward(grad_h, h, gamma, inv_std, True, acc_theta, acc_beta, acc_gamma,
                     grad_gamma, grad_beta, grad_log_theta)


_GOLDEN, _MASK32, _M1, _M2 = (np.uint64(c) for c in (0x9E3779B9, 0xFFFFFFFF, 0x7FEB352D, 0x846CA68B))
_S15, _S16 = np.uint64(15), np.uint64(16)


@nb.njit(inline="always", **_JIT)
def _keep(seed, index, threshold):
    """Dropout's keep decision for one unit: a 32-bit hash of (seed, index) (Wellons'
    lowbias32 finalizer) at or above ``threshold`` = rate * 2^32; vectorizes, unlike a
    sequential generator, and gives independent Bernoulli draws for distinct indices."""
    x = (index * _GOLDEN + seed) & _MASK32
    x ^= x >> _S16
    x = (x * _M1) & _MASK32
    x ^= x >> _S15
    x = (x * _M2) & _MASK32
    x ^= x >> _S16
    return x >= threshold


@nb.njit(**_JIT)
def _sparse_product(weight_t, bias, row_start, col, log1p_val, out):
    """out[i] = bias + sum over cell i's nonzeros k of log1p_val[k] * weight_t[col[k]]:
    eight weight rows per pass over out[i] (bound by reading the rows from L2; 25 % faster
    than two)."""
    n, H = out.shape
    for i in range(n):
        o = out[i]
        for j in range(H):
            o[j] = bias[j]
        k, stop = row_start[i], row_start[i + 1]
        while k + 7 < stop:
            v0, v1, v2, v3 = log1p_val[k], log1p_val[k + 1], log1p_val[k + 2], log1p_val[k + 3]
            v4, v5, v6, v7 = log1p_val[k + 4], log1p_val[k + 5], log1p_val[k + 6], log1p_val[k + 7]
            w0, w1, w2, w3 = weight_t[col[k]], weight_t[col[k + 1]], weight_t[col[k + 2]], weight_t[col[k + 3]]
            w4, w5, w6, w7 = weight_t[col[k + 4]], weight_t[col[k + 5]], weight_t[col[k + 6]], weight_t[col[k + 7]]
            for j in range(H):
                o[j] += ((v0 * w0[j] + v1 * w1[j]) + (v2 * w2[j] + v3 * w3[j])) + (
                    (v4 * w4[j] + v5 * w5[j]) + (v6 * w6[j] + v7 * w7[j])
                )
            k += 8
        while k + 1 < stop:
            v0, v1 = log1p_val[k], log1p_val[k + 1]
            w0, w1 = weight_t[col[k]], weight_t[col[k + 1]]
            for j in range(H):
                o[j] += v0 * w0[j] + v1 * w1[j]
            k += 2
        if k < stop:
            v = log1p_val[k]
            w = weight_t[col[k]]
            for j in range(H):
                o[j] += v * w[j]


@nb.njit(**_JIT)
def encoder_block_forward(
    weight_t, bias, gamma, beta, mean, var, training, momentum, eps, rate, seed, row_start, col, log1p_val,
    out, xhat, mult, inv_std,
):
    """The encoder's first block on a minibatch's nonzeros: Dropout(ReLU(BN(log1p(x) W^T + b))).

    weight_t (G, H) is the first Linear's weight, gene-major; cell i's nonzeros are
    [row_start[i], row_start[i + 1]) of col and log1p_val. BN as nn.BatchNorm1d (batch
    statistics and a running update in training, running statistics otherwise). Dropout at
    ``rate`` in training only, its mask drawn from ``seed``. Writes out (n, H) and, for the
    backward, xhat (n, H), mult = d out / d BN-output (n, H) and inv_std (H,)."""
    n, H = out.shape
    _sparse_product(weight_t, bias, row_start, col, log1p_val, out)
    mu = _batch_norm_statistics(out, mean, var, training, momentum, eps, inv_std)
    drop = training and rate > 0.0
    scale = f32(1.0 / (1.0 - rate)) if drop else f32(1.0)
    threshold = np.uint64(min(rate, 1.0) * 4294967296.0)
    for i in range(n):
        o = out[i]
        xh = xhat[i]
        mi = mult[i]
        for j in range(H):
            xv = (o[j] - mu[j]) * inv_std[j]
            xh[j] = xv
            y = xv * gamma[j] + beta[j]
            m = scale if y > 0 else f32(0.0)
            if drop and not _keep(np.uint64(seed), np.uint64(i * H + j), threshold):
                m = f32(0.0)
            mi[j] = m
            o[j] = y * m


@nb.njit(**_JIT)
def by_gene(row_start, col, val, G):
    """The minibatch's nonzeros (by cell) regrouped by gene (a counting sort): gene g's are
    [ptr[g], ptr[g + 1]) of rows (their cells, ascending) and vals."""
    n = row_start.shape[0] - 1
    nnz = row_start[n]
    ptr = np.zeros(G + 1, np.int64)
    for k in range(nnz):
        ptr[col[k] + 1] += 1
    for g in range(G):
        ptr[g + 1] += ptr[g]
    pos = ptr[:G].copy()
    rows = np.empty(nnz, np.int64)
    vals = np.empty(nnz, np.float32)
    for i in range(n):
        for k in range(row_start[i], row_start[i + 1]):
            g = col[k]
            d = pos[g]
            pos[g] = d + 1
            rows[d] = i
            vals[d] = val[k]
    return ptr, rows, vals


@nb.njit(**_JIT)
def _encoder_grad_pre(grad, gamma, training, xhat, mult, inv_std, grad_bias, grad_gamma, grad_beta):
    """The gradient with respect to the first Linear's output (n, H), and those of its bias
    and of the BN affine."""
    n, H = grad.shape
    gy = np.empty((n, H), np.float32)
    acc_b = np.zeros(H, np.float32)
    acc_g = np.zeros(H, np.float32)
    for i in range(n):
        for j in range(H):
            v = grad[i, j] * mult[i, j]
            gy[i, j] = v
            acc_b[j] += v
            acc_g[j] += v * xhat[i, j]
    for j in range(H):
        grad_beta[j] = acc_b[j]
        grad_gamma[j] = acc_g[j]
        grad_bias[j] = 0.0
    _batch_norm_backward(gy, xhat, gamma, inv_std, training, acc_b, acc_g)
    for i in range(n):
        g = gy[i]
        for j in range(H):
            grad_bias[j] += g[j]
    return gy


@nb.njit(**_JIT)
def _weight_grad_by_gene(gy, ptr, rows, vals, grad_weight_t):
    """grad_weight_t[g] = sum over gene g's nonzeros of vals * gy[rows] (each row of the
    gradient written once, four cells per pass). The loop has ``_sparse_product``'s shape;
    one shared helper with its eight rows per pass made the training step 5 % slower."""
    H = gy.shape[1]
    for g in range(grad_weight_t.shape[0]):
        a = grad_weight_t[g]
        for j in range(H):
            a[j] = 0.0
        k, stop = ptr[g], ptr[g + 1]
        while k + 3 < stop:
            v0, v1, v2, v3 = vals[k], vals[k + 1], vals[k + 2], vals[k + 3]
            r0, r1, r2, r3 = gy[rows[k]], gy[rows[k + 1]], gy[rows[k + 2]], gy[rows[k + 3]]
            for j in range(H):
                a[j] += (v0 * r0[j] + v1 * r1[j]) + (v2 * r2[j] + v3 * r3[j])
            k += 4
        while k < stop:
            v = vals[k]
            r = gy[rows[k]]
            for j in range(H):
                a[j] += v * r[j]
            k += 1


@nb.njit(**_JIT)
def encoder_block_backward_by_gene(
    grad, gamma, training, xhat, mult, inv_std, ptr, rows, vals,
    grad_weight_t, grad_bias, grad_gamma, grad_beta,
):
    """``encoder_block_backward`` with the nonzeros grouped by gene (``by_gene``)."""
    gy = _encoder_grad_pre(grad, gamma, training, xhat, mult, inv_std, grad_bias, grad_gamma, grad_beta)
    _weight_grad_by_gene(gy, ptr, rows, vals, grad_weight_t)


@nb.njit(**_JIT)
def encoder_block_backward(
    grad, gamma, training, xhat, mult, inv_std, row_start, col, log1p_val,
    grad_weight_t, grad_bias, grad_gamma, grad_beta,
):
    """Gradients of sum(grad * out) (``encoder_block_forward``) with respect to the
    first Linear's weight (gene-major, (G, H), overwritten) and bias, and the BN affine."""
    ptr, rows, vals = by_gene(row_start, col, log1p_val, grad_weight_t.shape[0])
    encoder_block_backward_by_gene(grad, gamma, training, xhat, mult, inv_std, ptr, rows, vals,
                                   grad_weight_t, grad_bias, grad_gamma, grad_beta)


@nb.njit(**_JIT)
def gather_nonzeros(indptr, indices, values, rows):
    """The CSR nonzeros of cells ``rows``: row pointer (n + 1,), gene (int64), count and
    log1p(count) (float32, exact 1 + x for counts below 2^24)."""
    n = rows.shape[0]
    ptr = np.empty(n + 1, np.int64)
    ptr[0] = 0
    for i in range(n):
        r = rows[i]
        ptr[i + 1] = ptr[i] + indptr[r + 1] - indptr[r]
    nnz = ptr[n]
    col = np.empty(nnz, np.int64)
    val = np.empty(nnz, np.float32)
    for i in range(n):
        src = indptr[rows[i]]
        dst = ptr[i]
        for k in range(ptr[i + 1] - dst):
            col[dst + k] = indices[src + k]
            val[dst + k] = values[src + k]
    log1p = np.empty(nnz, np.float32)
    for k in range(nnz):
        log1p[k] = f32(1.0) + val[k]
    _log_into(log1p, log1p, np.empty(nnz, np.int32))
    return ptr, col, val, log1p


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
