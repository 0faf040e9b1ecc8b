"""What a second CPU thread can give on this machine, apart from ldvae's step.

    .venv/bin/python bench/thread_ceiling.py --threads 2 --rounds 3

Two numba kernels, each timed on one thread and on ``--threads`` threads, alternating:

- ``vector``: a fixed amount of vectorized float32 work (exp and multiply-add over an array
  that fits in the L2 cache), split over the threads. On separate physical cores it runs
  nearly ``threads`` times faster; on hyperthreads of one core, which share its vector
  units, barely faster.
- ``chains``: one dependent scalar multiply-add chain per thread, each as long as the
  one-thread run's. Independent chains keep their one-thread time whenever each thread has
  an execution context of its own (a core or a hyperthread).

Virtual machines rarely say which of their CPUs share a physical core; the ratio of
``vector`` is the ceiling of any split of vectorized work, ldvae's step included.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba as nb
import numpy as np


@nb.njit(parallel=True, fastmath=True, cache=True)
def vector(a, repeats, parts):
    out = np.zeros(parts, np.float32)
    n = a.shape[0] // parts
    for t in nb.prange(parts):
        s = np.float32(0.0)
        for _ in range(repeats):
            for i in range(t * n, (t + 1) * n):
                s += np.exp(a[i]) * a[i]
        out[t] = s
    return out.sum()


@nb.njit(parallel=True, cache=True)
def chains(length, parts):
    out = np.zeros(parts)
    for t in nb.prange(parts):
        x = 1.0 + t
        for _ in range(length):
            x = x * 1.0000001 + 1e-9
        out[t] = x
    return out.sum()


def _seconds(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    nb.set_num_threads(min(args.threads, nb.config.NUMBA_NUM_THREADS))
    a = np.random.default_rng(0).random(8192, dtype=np.float32)
    for parts in (1, args.threads):  # compile
        vector(a, 1, parts)
        chains(10, parts)
    times = {"vector": {1: [], args.threads: []}, "chains": {1: [], args.threads: []}}
    for _ in range(args.rounds):
        for parts in (1, args.threads):
            times["vector"][parts].append(_seconds(vector, a, 2000, parts))
            times["chains"][parts].append(_seconds(chains, 100_000_000, parts))
    for name, by_parts in times.items():
        one, many = statistics.median(by_parts[1]), statistics.median(by_parts[args.threads])
        print(f"{name}: 1 thread {one * 1e3:.1f} ms, {args.threads} threads {many * 1e3:.1f} ms "
              f"(medians of {args.rounds}; ratio {one / many:.2f})")


if __name__ == "__main__":
    main()
