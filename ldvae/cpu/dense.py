"""The small dense products of the compiled training step (numba): the encoders' mean and
variance heads and the decoder's product h = [z, covariates] W^T (+ b), forward and backward.
Each works on whichever rows of the minibatch it is given (``step`` splits cells over threads).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from ..nn.module import VAR_EPS  # q's variance is exp(.) + VAR_EPS
from .kernels import _JIT


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
