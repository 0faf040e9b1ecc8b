"""Float32 exp and log that the compiler vectorizes, and the lgamma and digamma series the
NB kernels use (numba): the numerical building blocks of ``kernels`` and ``encoder``.

exp and log are polynomials with relative error below 3.1e-7 and 1.3e-7 (float32 rounding:
6e-8). Numba comes with scanpy; the kernels compile once per machine (cached beside this
file, or in numba's user cache when that is read-only) on first use.
"""

from __future__ import annotations

import math
import types

import numba as nb
import numpy as np

f32 = np.float32


def _numba_can_cache() -> bool:
    """Whether numba finds a folder to cache this package's compiled code in: beside these
    files, numba's user cache or ``NUMBA_CACHE_DIR``. Where none is writable (a read-only
    install and home), the kernels compile in every process instead of failing to import."""
    try:
        nb.njit(cache=True)(_numba_can_cache)
        return True
    except RuntimeError:
        import warnings

        warnings.warn("numba has no writable folder to cache ldvae's compiled training step in (the package "
                      "folder and the user cache are read-only), so every process compiles it again (about a "
                      "minute). Set NUMBA_CACHE_DIR to a writable folder to keep it.", RuntimeWarning, stacklevel=2)
        return False


_JIT = dict(nogil=True, fastmath=True, cache=_numba_can_cache(), error_model="numpy")


def twins(fn, parallel: bool = True, **threaded_globals):
    """``fn`` compiled twice, each under its own name (numba caches each apart): for one
    thread, named ``fn``'s name without its leading underscore, and for several, that name
    plus ``_threaded``. The threaded twin is compiled in parallel (its ``prange`` loops run
    on numba's threads; in the other they run in order) and reads the globals
    ``threaded_globals`` (the threaded twins of what it calls) in place of ``fn``'s. Each
    compiles on its first call, so a fit on one thread never compiles the threaded one."""
    def copy(name, namespace):
        twin = types.FunctionType(fn.__code__, namespace, name, fn.__defaults__, fn.__closure__)
        twin.__qualname__ = name
        return twin

    name = fn.__name__.lstrip("_")
    threaded = copy(name + "_threaded", {**fn.__globals__, **threaded_globals})
    return nb.njit(**_JIT)(copy(name, fn.__globals__)), nb.njit(parallel=parallel, **_JIT)(threaded)


@nb.njit(inline="always", **_JIT)
def part(n, parts, t):
    """Bounds (start, stop) of part t of n items split into ``parts`` contiguous parts: the
    split of every ``prange`` over parts in the threaded twins."""
    return t * n // parts, (t + 1) * n // parts


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
    vectorize)."""
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
