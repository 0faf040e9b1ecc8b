"""The whole training step of the default LDVAE as one compiled CPU function (numba).

Loss and every parameter gradient of ``LDVAEModule.loss`` in train mode, for the model
``fused.TrainStep`` accepts (NB likelihood, one dispersion per gene, normal latent, one
hidden layer, decoder batch norm). The torch version of the same step is hundreds of small
operator calls; here the small matrix products, the reparameterization and the KL terms run
inside the compiled code between the kernels of ``kernels`` and ``encoder``.

Shapes: n cells, G genes, H hidden units, K latent dimensions, C = K + covariate columns.
Encoder first-layer weights are passed gene-major (G, H), as ``GaussianEncoder`` stores them.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .dense import _decoder_product, _decoder_product_backward, _heads_backward, _heads_forward
from .encoder import (
    _sparse_product, _weight_grad_by_gene, column_sums, count_genes, encoder_grad_sums, encoder_rows, gene_offsets,
    scatter_by_gene,
)
from .special import part, twins
from .kernels import (
    _JIT, _batch_norm_update, batch_norm_backward_rows, batch_norm_backward_terms, decoder_train_cells,
    decoder_train_terms,
)


@nb.njit(**_JIT)
def _add_columns(x, sums):
    """sums (float64) += the column sums of x."""
    for i in range(x.shape[0]):
        xi = x[i]
        for j in range(sums.shape[0]):
            sums[j] += xi[j]


@nb.njit(**_JIT)
def _add_squared_deviations(x, mu, sums):
    """sums (float64) += the column sums of (x - mu)^2."""
    for i in range(x.shape[0]):
        xi = x[i]
        for j in range(sums.shape[0]):
            d = xi[j] - mu[j]
            sums[j] += d * d


@nb.njit(**_JIT)
def _sum_parts(parts, out):
    """out = parts[0] + parts[1] + ... (parts (T, *out.shape), both contiguous)."""
    T = parts.shape[0]
    p = parts.reshape((T, out.size))
    o = out.reshape(out.size)
    for j in range(o.shape[0]):
        o[j] = p[0, j]
    for t in range(1, T):
        for j in range(o.shape[0]):
            o[j] += p[t, j]


@nb.njit(**_JIT)
def _batch_mean(sums, n):
    """The batch mean (float32) from the parts' column sums (float64, (T, F))."""
    total = np.zeros(sums.shape[1])
    _sum_parts(sums, total)
    return (total / n).astype(np.float32)


@nb.njit(**_JIT)
def _loss_rows(lgamma_x1, ll, qz_m, qz_v, ql_m, ql_v, batch, prior_means, prior_vars, observed, kl_weight,
               rec, kl_z, kl_l):
    """The per-cell terms of these rows, and the sum of their losses."""
    K = qz_m.shape[1]
    total = 0.0
    for i in range(ll.shape[0]):
        rec[i] = lgamma_x1[i] - ll[i]
        s = 0.0
        for k in range(K):
            v = float(qz_v[i, k])
            m = float(qz_m[i, k])
            s += v + m * m - 1.0 - math.log(v)
        kl_z[i] = 0.5 * s
        if observed:
            kl_l[i] = 0.0
        else:
            pm = prior_means[batch[i]]
            pv = prior_vars[batch[i]]
            v = float(ql_v[i, 0])
            dm = float(ql_m[i, 0]) - pm
            kl_l[i] = 0.5 * (math.log(pv / v) + (v + dm * dm) / pv - 1.0)
        total += float(rec[i]) + kl_weight * float(kl_z[i]) + float(kl_l[i])
    return total


@nb.njit(**_JIT)
def _latent_grads(g_z, qz_m, qz_v, noise_z, w, g_m, g_v):
    """Through z = m + sqrt(v) * noise, plus w * KL_z: the gradients of q's mean and variance."""
    for i in range(g_z.shape[0]):
        for k in range(g_z.shape[1]):
            m = qz_m[i, k]
            v = qz_v[i, k]
            g_m[i, k] = g_z[i, k] + w * m
            g_v[i, k] = g_z[i, k] * noise_z[i, k] / (2.0 * math.sqrt(v)) + w * 0.5 * (1.0 - 1.0 / v)


@nb.njit(**_JIT)
def _library_grads(g_library, ql_m, ql_v, noise_l, batch, prior_means, prior_vars, inv_n, g_ml, g_vl):
    """Through library = m + sqrt(v) * noise, plus KL_l / n: the gradients of q's mean and variance."""
    for i in range(g_library.shape[0]):
        pm = prior_means[batch[i]]
        pv = prior_vars[batch[i]]
        m = ql_m[i, 0]
        v = ql_v[i, 0]
        g_ml[i, 0] = g_library[i] + inv_n * (m - pm) / pv
        g_vl[i, 0] = g_library[i] * noise_l[i, 0] / (2.0 * math.sqrt(v)) + inv_n * 0.5 * (1.0 / pv - 1.0 / v)


@nb.njit(**_JIT)
def _split_by_count(ptr, T):
    """T + 1 boundaries splitting the groups of ``ptr`` (group g: [ptr[g], ptr[g + 1])) into T
    runs of about equal total size."""
    G = ptr.shape[0] - 1
    bounds = np.empty(T + 1, np.int64)
    bounds[0] = 0
    bounds[T] = G
    g = 0
    for t in range(1, T):
        target = ptr[G] * t // T
        while g < G and ptr[g] < target:
            g += 1
        bounds[t] = g
    return bounds


# Long: the whole step in one compiled function keeps its intermediates local; its parts are
# kernels. Every ``prange(T)`` loop is a parallel region over T parts of the cells (or of the
# genes); per-part sums are added up in part order after it.
def _train_step(
    indptr, col, val, log1p_val, cov, lgamma_x1, batch, prior_means, prior_vars, log_total, noise_z, noise_l,
    params, grads, stats, observed, mom_z, mom_l, mom_d, bn_eps, rate, seed_z, seed_l, kl_weight, rec, kl_z, kl_l,
    T,
):
    """One training-mode forward and backward pass; returns the loss (mean over cells of
    reconstruction + kl_weight * KL_z + KL_l), writes the per-cell terms and every gradient
    and updates the batch-norm running statistics.

    ``params`` and ``grads``: tuples of arrays in ``_views``'s order (``layout.Layout``'s);
    ``stats``: the running means and variances of the z encoder's, the l encoder's and the
    decoder's batch norms. The noise is the caller's: the samples' (noise_z (n, K),
    noise_l (n,)) and the dropout seeds. ``observed``: the library is log_total and the
    l-encoder arrays are ignored. A decoder bias of length 0: the decoder has none.
    ``T``: the parts the cells are split into (one per thread); the results differ between
    values of T only in the order of float sums."""
    wz_t, bz, gz, betaz, wzm, bzm, wzv, bzv, wl_t, bl, gl, betal, wlm, blm, wlv, blv, wd, bd, gd, betad, log_theta = (
        params
    )
    (g_wz_t, g_bz, g_gz, g_betaz, g_wzm, g_bzm, g_wzv, g_bzv, g_wl_t, g_bl, g_gl, g_betal, g_wlm, g_blm, g_wlv, g_blv,
     g_wd, g_bd, g_gd, g_betad, g_log_theta) = grads
    rmz, rvz, rml, rvl, rmd, rvd = stats
    n = indptr.shape[0] - 1
    H = bz.shape[0]
    K = bzm.shape[0]
    G, C = wd.shape
    f32 = np.float32
    inv_n = 1.0 / n

    # --- forward: the encoders' first products and their batch statistics ------------------------
    a_z, xhat_z, mult_z = np.empty((n, H), f32), np.empty((n, H), f32), np.empty((n, H), f32)
    a_l, xhat_l, mult_l = np.empty((n, H), f32), np.empty((n, H), f32), np.empty((n, H), f32)
    sums = np.zeros((2, T, H))  # z, l
    gene_counts = np.zeros((T, G), np.int64)  # for the nonzeros by gene, which the backward needs
    for t in nb.prange(T):
        lo, hi = part(n, T, t)
        count_genes(indptr[lo : hi + 1], col, gene_counts[t])
        _sparse_product(wz_t, bz, indptr[lo : hi + 1], col, log1p_val, a_z[lo:hi])
        _add_columns(a_z[lo:hi], sums[0, t])
        if not observed:
            _sparse_product(wl_t, bl, indptr[lo : hi + 1], col, log1p_val, a_l[lo:hi])
            _add_columns(a_l[lo:hi], sums[1, t])
    mu_z, mu_l = _batch_mean(sums[0], n), _batch_mean(sums[1], n)
    squares = np.zeros((2, T, H))
    gene_ptr, gene_starts = gene_offsets(gene_counts)
    gene_rows, gene_vals = np.empty(gene_ptr[G], np.int64), np.empty(gene_ptr[G], f32)
    for t in nb.prange(T):
        lo, hi = part(n, T, t)
        scatter_by_gene(indptr[lo : hi + 1], col, log1p_val, lo, gene_starts[t], gene_rows, gene_vals)
        _add_squared_deviations(a_z[lo:hi], mu_z, squares[0, t])
        if not observed:
            _add_squared_deviations(a_l[lo:hi], mu_l, squares[1, t])
    inv_z, inv_l = np.empty(H, f32), np.empty(H, f32)
    var_z, var_l = np.zeros(H), np.zeros(H)
    _sum_parts(squares[0], var_z)
    _sum_parts(squares[1], var_l)
    for j in range(H):
        _batch_norm_update(j, mu_z[j], var_z[j] / n, n, rmz, rvz, mom_z, bn_eps, inv_z)
        if not observed:
            _batch_norm_update(j, mu_l[j], var_l[j] / n, n, rml, rvl, mom_l, bn_eps, inv_l)

    # --- forward: the rest of the encoders, and the decoder's product h = [z, cov] W^T (+ b) -------
    qz_m, qz_v, z = np.empty((n, K), f32), np.empty((n, K), f32), np.empty((n, K), f32)
    library = np.empty(n, f32)
    ql_m, ql_v, lib2 = np.empty((n, 1), f32), np.empty((n, 1), f32), np.empty((n, 1), f32)
    noise_l2 = noise_l.reshape((n, 1))
    wd_t = np.ascontiguousarray(wd.T)  # (C, G)
    zc = np.empty((n, C), f32)
    h = np.empty((n, G), f32)
    h_parts = np.zeros((2, T, G))  # column sums and sums of squares
    for t in nb.prange(T):
        lo, hi = part(n, T, t)
        encoder_rows(a_z[lo:hi], xhat_z[lo:hi], mult_z[lo:hi], mu_z, inv_z, gz, betaz, True, rate, seed_z, lo)
        _heads_forward(a_z[lo:hi], wzm, bzm, wzv, bzv, noise_z[lo:hi], qz_m[lo:hi], qz_v[lo:hi], z[lo:hi])
        if observed:
            for i in range(lo, hi):
                library[i] = log_total[i]
        else:
            encoder_rows(a_l[lo:hi], xhat_l[lo:hi], mult_l[lo:hi], mu_l, inv_l, gl, betal, True, rate, seed_l, lo)
            _heads_forward(a_l[lo:hi], wlm, blm, wlv, blv, noise_l2[lo:hi], ql_m[lo:hi], ql_v[lo:hi], lib2[lo:hi])
            for i in range(lo, hi):
                library[i] = lib2[i, 0]
        for i in range(lo, hi):
            for c in range(K):
                zc[i, c] = z[i, c]
            for c in range(K, C):
                zc[i, c] = cov[i, c - K]
        _decoder_product(zc[lo:hi], wd_t, bd, h[lo:hi], h_parts[0, t], h_parts[1, t])

    # --- the decoder's BN, softmax and NB, forward and backward in one pass per cell --------------
    h_sum, h_sum_sq = np.zeros(G), np.zeros(G)
    _sum_parts(h_parts[0], h_sum)
    _sum_parts(h_parts[1], h_sum_sq)
    terms = decoder_train_terms(h_sum, h_sum_sq, n, rmd, rvd, mom_d, bn_eps, log_theta)
    upstream = np.full(n, f32(-inv_n))  # the gradient of the loss with respect to each cell's ll
    ll = np.empty(n, f32)
    g_h = np.empty((n, G), f32)
    g_library = np.empty(n, f32)
    gene_parts = np.zeros((4, T, G), f32)  # per gene: theta, beta, gamma and log-theta sums
    for t in nb.prange(T):
        lo, hi = part(n, T, t)
        decoder_train_cells(h[lo:hi], terms, gd, betad, library[lo:hi], log_theta, indptr[lo : hi + 1], col, val,
                            upstream[lo:hi], ll[lo:hi], g_h[lo:hi], g_library[lo:hi], gene_parts[0, t],
                            gene_parts[1, t], gene_parts[2, t], gene_parts[3, t])
    acc_theta = np.empty(G, f32)
    _sum_parts(gene_parts[0], acc_theta)
    _sum_parts(gene_parts[1], g_betad)
    _sum_parts(gene_parts[2], g_gd)
    _sum_parts(gene_parts[3], g_log_theta)
    for g in range(G):
        g_log_theta[g] -= acc_theta[g]
    c0, c1, c2 = batch_norm_backward_terms(gd, terms[1], True, g_betad, g_gd, n)

    # --- the loss, and backward through the decoder's product and the heads ----------------------
    totals = np.zeros(T)
    wd_parts = np.empty((T, G, C), f32)
    bd_parts = np.empty((T, bd.shape[0]), f32)
    head_w = np.empty((4, T, K, H), f32)  # z mean, z var, l mean (first row), l var (first row)
    head_b = np.empty((4, T, K), f32)
    enc_parts = np.empty((4, T, H), f32)  # z: BN bias and weight sums; l: the same
    g_z, g_m, g_v = np.empty((n, K), f32), np.empty((n, K), f32), np.empty((n, K), f32)
    g_az, gy_z = np.empty((n, H), f32), np.empty((n, H), f32)
    g_al, gy_l = np.empty((n, H), f32), np.empty((n, H), f32)
    g_ml, g_vl = np.empty((n, 1), f32), np.empty((n, 1), f32)
    w = kl_weight * inv_n
    for t in nb.prange(T):
        lo, hi = part(n, T, t)
        batch_norm_backward_rows(g_h[lo:hi], h[lo:hi], c0, c1, c2)
        totals[t] = _loss_rows(lgamma_x1[lo:hi], ll[lo:hi], qz_m[lo:hi], qz_v[lo:hi], ql_m[lo:hi], ql_v[lo:hi],
                               batch[lo:hi], prior_means, prior_vars, observed, kl_weight, rec[lo:hi], kl_z[lo:hi],
                               kl_l[lo:hi])
        _decoder_product_backward(g_h[lo:hi], zc[lo:hi], wd_t, K, wd_parts[t], bd_parts[t], g_z[lo:hi])
        _latent_grads(g_z[lo:hi], qz_m[lo:hi], qz_v[lo:hi], noise_z[lo:hi], w, g_m[lo:hi], g_v[lo:hi])
        _heads_backward(a_z[lo:hi], wzm, wzv, qz_v[lo:hi], g_m[lo:hi], g_v[lo:hi], g_az[lo:hi], head_w[0, t],
                        head_b[0, t], head_w[1, t], head_b[1, t])
        encoder_grad_sums(g_az[lo:hi], mult_z[lo:hi], xhat_z[lo:hi], gy_z[lo:hi], enc_parts[0, t], enc_parts[1, t])
        if not observed:
            _library_grads(g_library[lo:hi], ql_m[lo:hi], ql_v[lo:hi], noise_l2[lo:hi], batch[lo:hi], prior_means,
                           prior_vars, inv_n, g_ml[lo:hi], g_vl[lo:hi])
            _heads_backward(a_l[lo:hi], wlm, wlv, ql_v[lo:hi], g_ml[lo:hi], g_vl[lo:hi], g_al[lo:hi],
                            head_w[2, t, :1], head_b[2, t, :1], head_w[3, t, :1], head_b[3, t, :1])
            encoder_grad_sums(g_al[lo:hi], mult_l[lo:hi], xhat_l[lo:hi], gy_l[lo:hi], enc_parts[2, t],
                              enc_parts[3, t])
    _sum_parts(wd_parts, g_wd)
    if bd.shape[0] > 0:
        _sum_parts(bd_parts, g_bd)
    _sum_parts(head_w[0], g_wzm)
    _sum_parts(head_b[0], g_bzm)
    _sum_parts(head_w[1], g_wzv)
    _sum_parts(head_b[1], g_bzv)
    _sum_parts(enc_parts[0], g_betaz)
    _sum_parts(enc_parts[1], g_gz)
    cz0, cz1, cz2 = batch_norm_backward_terms(gz, inv_z, True, g_betaz, g_gz, n)
    cl0, cl1, cl2 = cz0, cz1, cz2
    if not observed:
        _sum_parts(np.ascontiguousarray(head_w[2, :, :1]), g_wlm)
        _sum_parts(np.ascontiguousarray(head_b[2, :, :1]), g_blm)
        _sum_parts(np.ascontiguousarray(head_w[3, :, :1]), g_wlv)
        _sum_parts(np.ascontiguousarray(head_b[3, :, :1]), g_blv)
        _sum_parts(enc_parts[2], g_betal)
        _sum_parts(enc_parts[3], g_gl)
        cl0, cl1, cl2 = batch_norm_backward_terms(gl, inv_l, True, g_betal, g_gl, n)

    # --- backward: the encoders' batch norms, then their first weights by gene -------------------
    bias_parts = np.empty((2, T, H), f32)
    for t in nb.prange(T):
        lo, hi = part(n, T, t)
        batch_norm_backward_rows(gy_z[lo:hi], xhat_z[lo:hi], cz0, cz1, cz2)
        column_sums(gy_z[lo:hi], bias_parts[0, t])
        if not observed:
            batch_norm_backward_rows(gy_l[lo:hi], xhat_l[lo:hi], cl0, cl1, cl2)
            column_sums(gy_l[lo:hi], bias_parts[1, t])
    _sum_parts(bias_parts[0], g_bz)
    if not observed:
        _sum_parts(bias_parts[1], g_bl)
    genes = _split_by_count(gene_ptr, T)
    for t in nb.prange(T):
        g0, g1 = genes[t], genes[t + 1]
        _weight_grad_by_gene(gy_z, gene_ptr[g0 : g1 + 1], gene_rows, gene_vals, g_wz_t[g0:g1])
        if not observed:
            _weight_grad_by_gene(gy_l, gene_ptr[g0 : g1 + 1], gene_rows, gene_vals, g_wl_t[g0:g1])
    total = 0.0
    for t in range(T):
        total += totals[t]
    return total * inv_n


# One thread (T = 1: the parallel regions are plain loops), and threads over the parts.
train_step, train_step_threaded = twins(_train_step)


@nb.njit(inline="always", **_JIT)
def _vec(flat, off, size):
    return flat[off : off + size] if off >= 0 else flat[0:0]


@nb.njit(inline="always", **_JIT)
def _mat(flat, off, rows, cols):
    return flat[off : off + rows * cols].reshape((rows, cols)) if off >= 0 else flat[0:0].reshape((0, cols))


@nb.njit(inline="always", **_JIT)
def _views(flat, L):
    """Every parameter (or gradient) as a view of ``flat``, in ``train_step``'s order."""
    G, H, K, C = L.n_genes, L.n_hidden, L.n_latent, L.n_columns
    bd_size = G if L.decoder_bias >= 0 else 0
    return (
        _mat(flat, L.z_weight, G, H), _vec(flat, L.z_bias, H), _vec(flat, L.z_bn_weight, H),
        _vec(flat, L.z_bn_bias, H), _mat(flat, L.z_mean_weight, K, H), _vec(flat, L.z_mean_bias, K),
        _mat(flat, L.z_var_weight, K, H), _vec(flat, L.z_var_bias, K),
        _mat(flat, L.l_weight, G, H), _vec(flat, L.l_bias, H), _vec(flat, L.l_bn_weight, H),
        _vec(flat, L.l_bn_bias, H), _mat(flat, L.l_mean_weight, 1, H), _vec(flat, L.l_mean_bias, 1),
        _mat(flat, L.l_var_weight, 1, H), _vec(flat, L.l_var_bias, 1),
        _mat(flat, L.decoder_weight, G, C), _vec(flat, L.decoder_bias, bd_size), _vec(flat, L.decoder_bn_weight, G),
        _vec(flat, L.decoder_bn_bias, G), _vec(flat, L.log_theta, G),
    )


def _train_step_flat(
    indptr, col, val, log1p_val, cov, lgamma_x1, batch, prior_means, prior_vars, log_total, noise_z, noise_l,
    params, grads, layout, rmz, rvz, rml, rvl, rmd, rvd,
    mom_z, mom_l, mom_d, bn_eps, rate, seed_z, seed_l, kl_weight, rec, kl_z, kl_l, threads,
):
    """``train_step`` with every parameter and gradient a view of one flat array, placed by
    ``layout`` (a ``layout.Layout``), its cells in ``threads`` parts (one each of numba's
    threads, which the caller sets; the twin ``train_step_flat_threaded`` runs them in parallel)."""
    return train_step(
        indptr, col, val, log1p_val, cov, lgamma_x1, batch, prior_means, prior_vars, log_total, noise_z, noise_l,
        _views(params, layout), _views(grads, layout), (rmz, rvz, rml, rvl, rmd, rvd), layout.l_weight < 0,
        mom_z, mom_l, mom_d, bn_eps, rate, seed_z, seed_l, kl_weight, rec, kl_z, kl_l, threads,
    )


train_step_flat, train_step_flat_threaded = twins(_train_step_flat, parallel=False, train_step=train_step_threaded)
