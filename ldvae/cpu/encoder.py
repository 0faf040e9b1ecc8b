"""Compiled CPU kernels (numba) for an encoder's first block from a minibatch's nonzeros:
``dropout(relu(batch_norm(log1p(x) @ W.T + b)))`` forward, and its backward with the weight
gradient summed per gene. Dropout masks come from a hash of a seed (``_keep``).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .kernels import _JIT, _batch_norm_backward, _batch_norm_statistics, f32


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
    eight weight rows per pass over out[i], as the loop is bound by reading the rows."""
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
    _sparse_product(weight_t, bias, row_start, col, log1p_val, out)
    mu = _batch_norm_statistics(out, mean, var, training, momentum, eps, inv_std)
    encoder_rows(out, xhat, mult, mu, inv_std, gamma, beta, training, rate, seed, 0)


@nb.njit(**_JIT)
def encoder_rows(out, xhat, mult, mu, inv_std, gamma, beta, training, rate, seed, first):
    """``encoder_block_forward`` after the product and the statistics, on rows of the batch
    that start at its row ``first`` (dropout's mask is drawn per row of the whole batch)."""
    n, H = out.shape
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
            if drop and not _keep(np.uint64(seed), np.uint64((first + i) * H + j), threshold):
                m = f32(0.0)
            mi[j] = m
            o[j] = y * m


@nb.njit(**_JIT)
def by_gene(row_start, col, val, G):
    """The minibatch's nonzeros (by cell) regrouped by gene (a counting sort): gene g's are
    [ptr[g], ptr[g + 1]) of rows (their cells, ascending) and vals."""
    counts = np.zeros((1, G), np.int64)
    count_genes(row_start, col, counts[0])
    ptr, starts = gene_offsets(counts)
    rows = np.empty(ptr[G], np.int64)
    vals = np.empty(ptr[G], np.float32)
    scatter_by_gene(row_start, col, val, 0, starts[0], rows, vals)
    return ptr, rows, vals


@nb.njit(**_JIT)
def count_genes(row_start, col, counts):
    """counts[g] += the nonzeros of gene g among the cells of row_start."""
    for k in range(row_start[0], row_start[row_start.shape[0] - 1]):
        counts[col[k]] += 1


@nb.njit(**_JIT)
def gene_offsets(counts):
    """From each part's counts per gene (T, G), in order of parts: where each gene's nonzeros
    start (G + 1,) and where each part's start within them (T, G)."""
    T, G = counts.shape
    ptr = np.empty(G + 1, np.int64)
    starts = np.empty((T, G), np.int64)
    pos = 0
    for g in range(G):
        ptr[g] = pos
        for t in range(T):
            starts[t, g] = pos
            pos += counts[t, g]
    ptr[G] = pos
    return ptr, starts


@nb.njit(**_JIT)
def scatter_by_gene(row_start, col, val, first_row, pos, rows, vals):
    """The nonzeros of the cells of row_start (rows first_row, first_row + 1, ... of the
    batch) into rows and vals by gene, from positions ``pos`` (G,), which advance."""
    for i in range(row_start.shape[0] - 1):
        for k in range(row_start[i], row_start[i + 1]):
            g = col[k]
            d = pos[g]
            pos[g] = d + 1
            rows[d] = first_row + i
            vals[d] = val[k]


@nb.njit(**_JIT)
def _encoder_grad_pre(grad, gamma, training, xhat, mult, inv_std, grad_bias, grad_gamma, grad_beta):
    """The gradient with respect to the first Linear's output (n, H), and those of its bias
    and of the BN affine."""
    n, H = grad.shape
    gy = np.empty((n, H), np.float32)
    encoder_grad_sums(grad, mult, xhat, gy, grad_beta, grad_gamma)
    _batch_norm_backward(gy, xhat, gamma, inv_std, training, grad_beta, grad_gamma)
    column_sums(gy, grad_bias)
    return gy


@nb.njit(**_JIT)
def encoder_grad_sums(grad, mult, xhat, gy, sum_gy, sum_gy_xhat):
    """gy = grad * mult, the gradient with respect to the BN output, for some rows; its column
    sums and those of gy * xhat (float32, (H,), overwritten): the BN affine's gradients."""
    n, H = grad.shape
    for j in range(H):
        sum_gy[j] = 0.0
        sum_gy_xhat[j] = 0.0
    for i in range(n):
        for j in range(H):
            v = grad[i, j] * mult[i, j]
            gy[i, j] = v
            sum_gy[j] += v
            sum_gy_xhat[j] += v * xhat[i, j]


@nb.njit(**_JIT)
def column_sums(x, out):
    """out (float32, overwritten) = the column sums of x."""
    for j in range(out.shape[0]):
        out[j] = 0.0
    for i in range(x.shape[0]):
        xi = x[i]
        for j in range(out.shape[0]):
            out[j] += xi[j]


@nb.njit(**_JIT)
def _weight_grad_by_gene(gy, ptr, rows, vals, grad_weight_t):
    """grad_weight_t[g] = sum over gene g's nonzeros of vals * gy[rows] (each row of the
    gradient written once, four cells per pass). The loop has ``_sparse_product``'s shape
    but not its eight rows per pass, which suit the forward product only."""
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
