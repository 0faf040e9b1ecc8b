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

from ..nn.module import VAR_EPS  # q's variance is exp(.) + VAR_EPS
from .encoder import by_gene, encoder_block_backward_by_gene, encoder_block_forward
from .kernels import _JIT, bn_softmax_nb_train



@nb.njit(**_JIT)
def _heads_forward(a, w_mean, b_mean, w_var, b_var, noise, mean, var, sample):
    """mean = a w_mean^T + b_mean, var = exp(a w_var^T + b_var) + VAR_EPS and the
    reparameterized sample mean + sqrt(var) * noise, each (n, K)."""
    n, K = mean.shape
    for i in range(n):
        ai = a[i]
        for k in range(K):
            m = b_mean[k]
            v = b_var[k]
            wm = w_mean[k]
            wv = w_var[k]
            for j in range(ai.shape[0]):
                m += ai[j] * wm[j]
                v += ai[j] * wv[j]
            vv = math.exp(v) + VAR_EPS
            mean[i, k] = m
            var[i, k] = vv
            sample[i, k] = m + math.sqrt(vv) * noise[i, k]


@nb.njit(**_JIT)
def _heads_backward(a, w_mean, w_var, var, g_mean, g_var, g_a, g_w_mean, g_b_mean, g_w_var, g_b_var):
    """From the gradients with respect to mean and var (n, K): those of a (n, H) and of the
    heads' weights and biases. g_var is turned into the gradient of the pre-exp value."""
    n, K = g_mean.shape
    H = a.shape[1]
    g_pre = np.empty((n, K), np.float32)
    for i in range(n):
        for k in range(K):
            g_pre[i, k] = g_var[i, k] * (var[i, k] - VAR_EPS)  # var = exp(pre) + VAR_EPS
    for i in range(n):  # g_a = g_mean w_mean + g_pre w_var
        gai = g_a[i]
        for j in range(H):
            gai[j] = 0.0
        for k in range(K):
            gm = g_mean[i, k]
            gp = g_pre[i, k]
            wm = w_mean[k]
            wv = w_var[k]
            for j in range(H):
                gai[j] += gm * wm[j] + gp * wv[j]
    for k in range(K):  # the weights' gradients, a row at a time
        gwm = g_w_mean[k]
        gwv = g_w_var[k]
        for j in range(H):
            gwm[j] = 0.0
            gwv[j] = 0.0
        sm = np.float32(0.0)
        sv = np.float32(0.0)
        for i in range(n):
            gm = g_mean[i, k]
            gp = g_pre[i, k]
            sm += gm
            sv += gp
            ai = a[i]
            for j in range(H):
                gwm[j] += gm * ai[j]
                gwv[j] += gp * ai[j]
        g_b_mean[k] = sm
        g_b_var[k] = sv


@nb.njit(**_JIT)
def _decoder_product(zc, wd_t, bd, h, h_sum, h_sum_sq):
    """h = zc wd_t (+ bd): zc (n, C), wd_t (C, G), bd (G,) or empty; four columns of zc per
    pass over a row of h. Also h's column sums and sums of squares (float64), for its batch norm."""
    n, C = zc.shape
    G = wd_t.shape[1]
    has_bias = bd.shape[0] > 0
    for i in range(n):
        hi = h[i]
        zi = zc[i]
        if has_bias:
            for g in range(G):
                hi[g] = bd[g]
        else:
            for g in range(G):
                hi[g] = 0.0
        c = 0
        while c + 3 < C:
            z0, z1, z2, z3 = zi[c], zi[c + 1], zi[c + 2], zi[c + 3]
            w0, w1, w2, w3 = wd_t[c], wd_t[c + 1], wd_t[c + 2], wd_t[c + 3]
            for g in range(G):
                hi[g] += (z0 * w0[g] + z1 * w1[g]) + (z2 * w2[g] + z3 * w3[g])
            c += 4
        while c < C:
            z0 = zi[c]
            w0 = wd_t[c]
            for g in range(G):
                hi[g] += z0 * w0[g]
            c += 1
        for g in range(G):
            v = float(hi[g])
            h_sum[g] += v
            h_sum_sq[g] += v * v


@nb.njit(**_JIT)
def _decoder_product_backward(g_h, zc, wd_t, K, g_wd, g_bd, g_z):
    """For h = zc wd_t (+ b): g_wd (G, C) = g_h^T zc, g_bd = column sums of g_h (when not
    empty) and g_z (n, K) = g_h wd_t[:K]^T. Four cells per pass over a row of the
    gradient of wd_t (which is held (C, G) here and transposed at the end)."""
    n, G = g_h.shape
    C = zc.shape[1]
    f32 = np.float32
    g_wd_t = np.empty((C, G), f32)
    for c in range(C):
        gw = g_wd_t[c]
        i = 0
        for g in range(G):
            gw[g] = 0.0
        while i + 3 < n:
            z0, z1, z2, z3 = zc[i, c], zc[i + 1, c], zc[i + 2, c], zc[i + 3, c]
            h0, h1, h2, h3 = g_h[i], g_h[i + 1], g_h[i + 2], g_h[i + 3]
            for g in range(G):
                gw[g] += (z0 * h0[g] + z1 * h1[g]) + (z2 * h2[g] + z3 * h3[g])
            i += 4
        while i < n:
            z0 = zc[i, c]
            h0 = g_h[i]
            for g in range(G):
                gw[g] += z0 * h0[g]
            i += 1
    for i in range(n):
        ghi = g_h[i]
        for c in range(K):
            wc = wd_t[c]
            s = f32(0.0)
            for g in range(G):
                s += ghi[g] * wc[g]
            g_z[i, c] = s
    if g_bd.shape[0] > 0:
        for g in range(G):
            g_bd[g] = 0.0
        for i in range(n):
            ghi = g_h[i]
            for g in range(G):
                g_bd[g] += ghi[g]
    for g in range(G):
        for c in range(C):
            g_wd[g, c] = g_wd_t[c, g]


# Long: the whole step in one compiled function keeps its intermediates local; its parts are kernels.
@nb.njit(**_JIT)
def train_step(
    indptr, col, val, log1p_val, cov, lgamma_x1, batch, prior_means, prior_vars, log_total, noise_z, noise_l,
    params, grads, stats, observed, mom_z, mom_l, mom_d, bn_eps, rate, seed_z, seed_l, kl_weight, rec, kl_z, kl_l,
):
    """One training-mode forward and backward pass; returns the loss (mean over cells of
    reconstruction + kl_weight * KL_z + KL_l), writes the per-cell terms and every gradient
    and updates the batch-norm running statistics.

    ``params`` and ``grads``: tuples of arrays in ``_views``'s order (``layout.Layout``'s);
    ``stats``: the running means and variances of the z encoder's, the l encoder's and the
    decoder's batch norms. The noise is the caller's: the samples' (noise_z (n, K),
    noise_l (n,)) and the dropout seeds. ``observed``: the library is log_total and the
    l-encoder arrays are ignored. A decoder bias of length 0: the decoder has none."""
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

    # --- forward: encoders -----------------------------------------------------------------
    a_z, xhat_z, mult_z = np.empty((n, H), f32), np.empty((n, H), f32), np.empty((n, H), f32)
    inv_z = np.empty(H, f32)
    encoder_block_forward(wz_t, bz, gz, betaz, rmz, rvz, True, mom_z, bn_eps, rate, seed_z, indptr, col,
                          log1p_val, a_z, xhat_z, mult_z, inv_z)
    qz_m, qz_v, z = np.empty((n, K), f32), np.empty((n, K), f32), np.empty((n, K), f32)
    _heads_forward(a_z, wzm, bzm, wzv, bzv, noise_z, qz_m, qz_v, z)
    library = np.empty(n, f32)
    a_l, xhat_l, mult_l = np.empty((n, H), f32), np.empty((n, H), f32), np.empty((n, H), f32)
    inv_l = np.empty(H, f32)
    ql_m, ql_v, lib2 = np.empty((n, 1), f32), np.empty((n, 1), f32), np.empty((n, 1), f32)
    if observed:
        for i in range(n):
            library[i] = log_total[i]
    else:
        encoder_block_forward(wl_t, bl, gl, betal, rml, rvl, True, mom_l, bn_eps, rate, seed_l, indptr, col,
                              log1p_val, a_l, xhat_l, mult_l, inv_l)
        _heads_forward(a_l, wlm, blm, wlv, blv, noise_l.reshape((n, 1)), ql_m, ql_v, lib2)
        for i in range(n):
            library[i] = lib2[i, 0]

    # --- forward: decoder h = [z, cov] W^T (+ b), then BN, softmax and NB ------------------------
    wd_t = np.ascontiguousarray(wd.T)  # (C, G)
    zc = np.empty((n, C), f32)
    for i in range(n):
        for c in range(K):
            zc[i, c] = z[i, c]
        for c in range(K, C):
            zc[i, c] = cov[i, c - K]
    h = np.empty((n, G), f32)
    h_sum, h_sum_sq = np.zeros(G), np.zeros(G)
    _decoder_product(zc, wd_t, bd, h, h_sum, h_sum_sq)
    # the decoder's forward and backward in one pass (its upstream gradient is -1/n per cell)
    inv_n = 1.0 / n
    ll = np.empty(n, f32)
    g_h = np.empty((n, G), f32)
    g_library = np.empty(n, f32)
    bn_softmax_nb_train(h, h_sum, h_sum_sq, gd, betad, rmd, rvd, mom_d, bn_eps, library, log_theta, indptr, col,
                        val, np.full(n, f32(-inv_n)), ll, g_h, g_gd, g_betad, g_library, g_log_theta)

    # --- loss ------------------------------------------------------------------------------
    total = 0.0
    for i in range(n):
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
    loss = total / n

    # --- backward: decoder product -------------------------------------------------------------
    g_z = np.empty((n, K), f32)
    _decoder_product_backward(g_h, zc, wd_t, K, g_wd, g_bd, g_z)

    # --- backward: z = m + sqrt(v) * noise, and kl_weight * KL_z / n ---------------------------
    w = kl_weight * inv_n
    g_m = np.empty((n, K), f32)
    g_v = np.empty((n, K), f32)
    for i in range(n):
        for k in range(K):
            m = qz_m[i, k]
            v = qz_v[i, k]
            g_m[i, k] = g_z[i, k] + w * m
            g_v[i, k] = g_z[i, k] * noise_z[i, k] / (2.0 * math.sqrt(v)) + w * 0.5 * (1.0 - 1.0 / v)
    g_a = np.empty((n, H), f32)
    _heads_backward(a_z, wzm, wzv, qz_v, g_m, g_v, g_a, g_wzm, g_bzm, g_wzv, g_bzv)
    gene_ptr, gene_rows, gene_vals = by_gene(indptr, col, log1p_val, G)
    encoder_block_backward_by_gene(g_a, gz, True, xhat_z, mult_z, inv_z, gene_ptr, gene_rows, gene_vals,
                                   g_wz_t, g_bz, g_gz, g_betaz)

    # --- backward: library = m + sqrt(v) * noise, and KL_l / n ---------------------------------
    if not observed:
        g_ml = np.empty((n, 1), f32)
        g_vl = np.empty((n, 1), f32)
        for i in range(n):
            pm = prior_means[batch[i]]
            pv = prior_vars[batch[i]]
            m = ql_m[i, 0]
            v = ql_v[i, 0]
            g_ml[i, 0] = g_library[i] + inv_n * (m - pm) / pv
            g_vl[i, 0] = g_library[i] * noise_l[i] / (2.0 * math.sqrt(v)) + inv_n * 0.5 * (1.0 / pv - 1.0 / v)
        _heads_backward(a_l, wlm, wlv, ql_v, g_ml, g_vl, g_a, g_wlm, g_blm, g_wlv, g_blv)
        encoder_block_backward_by_gene(g_a, gl, True, xhat_l, mult_l, inv_l, gene_ptr, gene_rows, gene_vals,
                                       g_wl_t, g_bl, g_gl, g_betal)
    return loss


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


@nb.njit(**_JIT)
def train_step_flat(
    indptr, col, val, log1p_val, cov, lgamma_x1, batch, prior_means, prior_vars, log_total, noise_z, noise_l,
    params, grads, layout, rmz, rvz, rml, rvl, rmd, rvd,
    mom_z, mom_l, mom_d, bn_eps, rate, seed_z, seed_l, kl_weight, rec, kl_z, kl_l,
):
    """``train_step`` with every parameter and gradient a view of one flat array, placed by
    ``layout`` (a ``layout.Layout``)."""
    return train_step(
        indptr, col, val, log1p_val, cov, lgamma_x1, batch, prior_means, prior_vars, log_total, noise_z, noise_l,
        _views(params, layout), _views(grads, layout), (rmz, rvz, rml, rvl, rmd, rvd), layout.l_weight < 0,
        mom_z, mom_l, mom_d, bn_eps, rate, seed_z, seed_l, kl_weight, rec, kl_z, kl_l,
    )
