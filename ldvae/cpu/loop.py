"""Many training steps in one compiled call (numba): gather, step, check, Adam.

``train_steps`` runs what a one-step-at-a-time training step does per minibatch -- gather
the cells' nonzeros, ``cpu_step.train_step_flat``, stop on a non-finite loss or gradient
before touching the parameters, Adam (undone if it makes a parameter non-finite) -- for a
run of consecutive minibatches, so that Python and torch see one call per run instead of
a score of operator calls per step. ``fused.StepRunner`` is its torch-side caller: it draws
each step's noise with ``fused.draw_step_noise``, as the per-step path does, so both paths
train the same.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .kernels import _JIT, gather_nonzeros_parts, gather_nonzeros_threaded
from .special import part, twins
from .step import train_step_flat, train_step_flat_threaded

f32 = np.float32


@nb.njit(**_JIT)
def _largest_bits(a):
    """The bits of the largest |a[i]| of a float32 array: a positive float's bits order as
    its value does, and inf and NaN come above every finite value. An integer maximum
    (unlike a float one) vectorizes, and fastmath cannot fold it away."""
    bits = a.view(np.int32)
    top = np.int32(0)
    for i in range(bits.shape[0]):
        b = bits[i] & 0x7FFFFFFF
        top = b if b > top else top
    return top


@nb.njit(**_JIT)
def _float_of_bits(bits):
    return float(np.array([bits], np.int32).view(np.float32)[0])


@nb.njit(**_JIT)
def _largest(a):
    """The largest |a[i]| of a finite float32 array, as float64."""
    return _float_of_bits(_largest_bits(a))


def _largest_bits_parts(a, parts):
    """``_largest_bits`` of ``a`` over ``parts`` contiguous slices, one per numba thread in the
    threaded twin."""
    n = a.shape[0]
    tops = np.zeros(parts, np.int32)
    for t in nb.prange(parts):
        lo, hi = part(n, parts, t)
        tops[t] = _largest_bits(a[lo:hi])
    return tops.max()


largest_bits_parts, largest_bits_threaded = twins(_largest_bits_parts)


@nb.njit(**_JIT)
def _largest_gradient(loss, top):
    """The largest |gradient| (float64) from ``top``, the bits of the gradients' largest
    |value| (``_largest_bits``), or -1.0 when loss[0] (float64) or a gradient is not finite."""
    if (loss.view(np.int64)[0] & 0x7FF0000000000000) == 0x7FF0000000000000:
        return -1.0
    return -1.0 if top >= 0x7F800000 else _float_of_bits(top)


@nb.njit(**_JIT)
def _adam_unchecked(params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """``_adam`` for an update known to stay finite (see ``update_bounds``): no copies, no check."""
    bias1 = 1.0 - beta1**step
    bias2_sqrt = math.sqrt(1.0 - beta2**step)
    step_size = f32(lr / bias1)
    inv_bias2_sqrt = f32(1.0 / bias2_sqrt)
    b2, e, wd = f32(beta2), f32(eps), f32(weight_decay)
    c1, c2 = f32(1.0 - beta1), f32(1.0 - beta2)
    for i in range(params.shape[0]):
        g = grads[i] + wd * params[i]
        m = exp_avg[i] + c1 * (g - exp_avg[i])
        v = b2 * exp_avg_sq[i] + c2 * g * g
        exp_avg[i] = m
        exp_avg_sq[i] = v
        params[i] -= step_size * m / (np.sqrt(v) * inv_bias2_sqrt + e)


def _adam_parts(params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, parts):
    """``_adam_unchecked`` over ``parts`` contiguous slices of the parameters, one per numba
    thread in the threaded twin (each element's update is the same either way)."""
    n = params.shape[0]
    for t in nb.prange(parts):
        a, b = part(n, parts, t)
        _adam_unchecked(params[a:b], grads[a:b], exp_avg[a:b], exp_avg_sq[a:b], step, lr, beta1, beta2, eps,
                        weight_decay)


adam_parts, adam_parts_threaded = twins(_adam_parts)


@nb.njit(**{**_JIT, "fastmath": False})  # scalar; its comparisons must see inf as inf
def update_bounds(largest_p, largest_m, largest_v, largest_g, step, lr, beta1, beta2, eps, weight_decay):
    """Upper bounds on the largest |parameter|, |exp_avg| and exp_avg_sq after an Adam step,
    from bounds before it: with g = grad + wd * p, |m'| <= beta1 |m| + (1 - beta1) |g|,
    v' <= beta2 v + (1 - beta2) g^2, and the update is at most lr / (1 - beta1^step) |m'| / eps.
    In float64. The first of the four results is False when one could come near float32's
    largest value (3.4e38)."""
    limit = 1e37  # a wide margin for float32 rounding
    g = largest_g + weight_decay * largest_p
    m = beta1 * largest_m + (1.0 - beta1) * g
    v = beta2 * largest_v + (1.0 - beta2) * g * g
    ratio = m / eps
    p = largest_p + lr / (1.0 - beta1**step) * ratio
    return g < 1e18 and m < limit and v < limit and ratio < limit and p < limit, p, m, v


# fastmath without its finite-math flags: with them the compiler may assume the new values
# are never inf or NaN and fold the check away
@nb.njit(**{**_JIT, "fastmath": {"nsz", "arcp", "contract", "afn", "reassoc"}})
def _adam(params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, old_p, old_m, old_v):
    """One Adam step (torch.optim.Adam's update, L2 weight decay) over flat float32 arrays;
    ``step`` counts this one (1 for the first). Returns False when the update made a
    parameter non-finite: params, exp_avg and exp_avg_sq are then put back as before.

    The check, and the copies into the scratch arrays ``old_p``, ``old_m`` and ``old_v`` that
    it restores from, ride in the update's own loop: no extra pass over the parameters."""
    bias1 = 1.0 - beta1**step
    bias2_sqrt = math.sqrt(1.0 - beta2**step)
    step_size = f32(lr / bias1)
    inv_bias2_sqrt = f32(1.0 / bias2_sqrt)
    b1, b2, e, wd = f32(beta1), f32(beta2), f32(eps), f32(weight_decay)
    c1, c2 = f32(1.0 - beta1), f32(1.0 - beta2)
    largest = f32(np.finfo(np.float32).max)
    ok = True
    for i in range(params.shape[0]):
        p = params[i]
        g = grads[i] + wd * p
        m = exp_avg[i] + c1 * (g - exp_avg[i])
        v = b2 * exp_avg_sq[i] + c2 * g * g
        old_m[i] = exp_avg[i]
        old_v[i] = exp_avg_sq[i]
        old_p[i] = p
        exp_avg[i] = m
        exp_avg_sq[i] = v
        new = p - step_size * m / (np.sqrt(v) * inv_bias2_sqrt + e)
        params[i] = new
        ok &= abs(new) <= largest  # False for inf and NaN
    if not ok:
        params[:] = old_p
        exp_avg[:] = old_m
        exp_avg_sq[:] = old_v
    return ok


@nb.njit(**_JIT)
def _covariate_columns(cells, batch, widths, cat, cont, width):
    """The decoder's covariate inputs of cells ``cells`` (n, width), laid out as
    ``LDVAEModule.covariate_columns``: the one-hot blocks of ``ModuleConfig.one_hot_widths``
    (batch, then each categorical covariate; width 0: no block), then the continuous ones."""
    n = cells.shape[0]
    cv = np.zeros((n, width), np.float32)
    for i in range(n):
        r = cells[i]
        c = 0
        if widths[0] > 0:
            cv[i, c + batch[r]] = 1.0
            c += widths[0]
        for j in range(cat.shape[1]):
            if widths[j + 1] > 0:
                cv[i, c + cat[r, j]] = 1.0
                c += widths[j + 1]
        for j in range(cont.shape[1]):
            cv[i, c + j] = cont[r, j]
    return cv


def _train_steps(
    indptr, indices, values, log_total, lgamma_x1, batch, cat, one_hot_widths, cont, prior_means, prior_vars,
    rows, bounds, noise_z, noise_l, seeds, kl_weights, momenta,
    params, grads, layout, rmz, rvz, rml, rvl, rmd, rvd, bn_eps, rate,
    exp_avg, exp_avg_sq, adam, rec, kl_z, kl_l, losses, failure, threads,
):
    """Train on minibatch j = 0, 1, ... of cells ``rows[bounds[j]:bounds[j + 1]]``.

    Whole-dataset inputs: the CSR counts (indptr, indices, values) and per-cell log_total,
    lgamma_x1, batch code, categorical covariate codes ``cat`` (n_cells, n_cat_covs) and
    continuous covariates ``cont``; the decoder's one-hot columns are made per minibatch,
    ``one_hot_widths`` (``ModuleConfig.one_hot_widths``) wide.
    Per step j: noise rows bounds[j]:bounds[j + 1] of noise_z (cells, K) and noise_l,
    dropout seeds ``seeds[j]`` (z, l), ``kl_weights[j]`` and batch-norm ``momenta[j]``
    (z, l, decoder). ``adam``: (lr, beta1, beta2, eps, weight_decay, steps taken so far).
    Parameters, gradients and ``train_step_flat``'s other arguments as there; exp_avg and
    exp_avg_sq laid out as ``params``. ``threads``: the parts each step splits its cells into,
    one per numba thread (the caller sets them) in the twin ``train_steps_threaded``.

    Writes the per-cell terms (rec, kl_z, kl_l at the same rows as the noise) and each
    step's loss. Returns the number of steps completed: fewer than len(bounds) - 1 when
    step j's loss or gradient is not finite (``failure[0]`` = 1) or its update would make a
    parameter non-finite (``failure[0]`` = 2); then the parameters, Adam's moments and the
    running statistics are those from before step j."""
    lr, beta1, beta2, eps, weight_decay, taken = adam[0], adam[1], adam[2], adam[3], adam[4], adam[5]
    saved = (rmz.copy(), rvz.copy(), rml.copy(), rvl.copy(), rmd.copy(), rvd.copy())
    old_p, old_m, old_v = np.empty_like(params), np.empty_like(exp_avg), np.empty_like(exp_avg_sq)
    largest_p, largest_m, largest_v = _largest(params), _largest(exp_avg), _largest(exp_avg_sq)
    live = (rmz, rvz, rml, rvl, rmd, rvd)
    for j in range(bounds.shape[0] - 1):
        a, b = bounds[j], bounds[j + 1]
        cells = rows[a:b]
        ptr, col, val, log1p = gather_nonzeros_parts(indptr, indices, values, cells, threads)
        n = b - a
        lt = np.empty(n, np.float32)
        lg = np.empty(n, np.float32)
        bt = np.empty(n, np.int64)
        for i in range(n):
            r = cells[i]
            lt[i] = log_total[r]
            lg[i] = lgamma_x1[r]
            bt[i] = batch[r]
        cv = _covariate_columns(cells, batch, one_hot_widths, cat, cont,
                                 layout.n_columns - layout.n_latent)
        for s in range(6):
            saved[s][:] = live[s]
        loss = train_step_flat(
            ptr, col, val, log1p, cv, lg, bt, prior_means, prior_vars, lt, noise_z[a:b], noise_l[a:b],
            params, grads, layout, rmz, rvz, rml, rvl, rmd, rvd,
            momenta[j, 0], momenta[j, 1], momenta[j, 2], bn_eps, rate, seeds[j, 0], seeds[j, 1],
            kl_weights[j], rec[a:b], kl_z[a:b], kl_l[a:b], threads,
        )
        losses[j] = loss
        failure[0] = 0
        largest_g = _largest_gradient(losses[j : j + 1], largest_bits_parts(grads, threads))
        step = taken + j + 1
        if largest_g < 0.0:
            failure[0] = 1
        else:
            bounded, bound_p, bound_m, bound_v = update_bounds(largest_p, largest_m, largest_v, largest_g, step, lr, beta1,
                                                       beta2, eps, weight_decay)
            if bounded:  # surely finite: the plain update, and the bounds carried forward
                adam_parts(params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, threads)
                largest_p, largest_m, largest_v = bound_p, bound_m, bound_v
            elif _adam(params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
                       old_p, old_m, old_v):  # could overflow: checked element by element, exact maxima again
                largest_p, largest_m, largest_v = _largest(params), _largest(exp_avg), _largest(exp_avg_sq)
            else:
                failure[0] = 2
        if failure[0]:
            for s in range(6):
                live[s][:] = saved[s]
            return j
    return bounds.shape[0] - 1


train_steps, train_steps_threaded = twins(
    _train_steps, parallel=False, gather_nonzeros_parts=gather_nonzeros_threaded, train_step_flat=train_step_flat_threaded,
    largest_bits_parts=largest_bits_threaded, adam_parts=adam_parts_threaded,
)


def _stamp_caches() -> None:
    """numba's on-disk cache keys a function on its own source file only, so a change to a
    kernel (or to the parameter layout) in another file would leave the cached step and loop
    functions that inline it stale. Key every cached function of those files on all of them."""
    import hashlib
    import sys
    from pathlib import Path

    from . import dense, encoder, kernels, layout, special, step

    modules = (special, kernels, encoder, dense, layout, step, sys.modules[__name__])
    digest = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in modules)).hexdigest()
    for module in modules:
        for obj in vars(module).values():
            cache_file = getattr(getattr(obj, "_cache", None), "_cache_file", None)
            if cache_file is not None and hasattr(cache_file, "_source_stamp"):  # numba's internals
                cache_file._source_stamp = (cache_file._source_stamp, digest)


_stamp_caches()
