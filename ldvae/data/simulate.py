"""Counts simulated from the LDVAE generative model, with the truth kept beside them.

    z_n ~ N(0, I_K),  log rho_n = log_softmax(W z_n + b + beta_{s_n}),
    l_n ~ LogNormal(log_library_mean, log_library_sd),  x_ng ~ NB(l_n rho_ng, theta_g).

Used by the tests (recovery of known loadings) and the benchmarks (large data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class SimulationTruth:
    loadings: np.ndarray  # (n_genes, K) W
    intercepts: np.ndarray  # (n_genes,) b
    batch_effects: np.ndarray  # (n_batches, n_genes) beta
    theta: np.ndarray  # (n_genes,) inverse dispersion


def make_truth(
    n_genes: int,
    n_latent: int,
    *,
    n_batches: int = 1,
    factor_scales: np.ndarray | None = None,
    genes_per_factor: int | None = None,
    batch_effect_sd: float = 0.3,
    seed: int = 0,
) -> SimulationTruth:
    """Sparse-ish loadings: each factor drives its own block of genes (+ small noise)."""
    rng = np.random.default_rng(seed)
    scales = np.ones(n_latent) if factor_scales is None else np.asarray(factor_scales, dtype=float)
    per = genes_per_factor or max(n_genes // (2 * n_latent), 5)
    w = rng.normal(0.0, 0.05, size=(n_genes, n_latent))
    order = rng.permutation(n_genes)
    for k in range(n_latent):
        block = order[k * per : (k + 1) * per] if (k + 1) * per <= n_genes else rng.choice(n_genes, per, replace=False)
        w[block, k] += rng.choice([-1.0, 1.0], size=len(block)) * rng.uniform(0.5, 1.0, size=len(block))
    w *= scales[None, :]
    intercepts = rng.normal(0.0, 1.0, size=n_genes)
    beta = rng.normal(0.0, batch_effect_sd, size=(n_batches, n_genes)) if n_batches > 1 else np.zeros((1, n_genes))
    theta = np.exp(rng.normal(np.log(5.0), 0.5, size=n_genes))
    return SimulationTruth(w, intercepts, beta, theta)


def simulate_chunks(
    truth: SimulationTruth,
    n_cells: int,
    *,
    chunk_size: int = 10000,
    log_library_mean: float = np.log(3000.0),
    log_library_sd: float = 0.3,
    seed: int = 0,
) -> Iterator[tuple[sp.csr_matrix, np.ndarray, np.ndarray]]:
    """Yield (counts CSR float32, z, batch codes) chunk by chunk: memory bounded by a chunk."""
    rng = np.random.default_rng(seed + 1)
    n_genes, k = truth.loadings.shape
    n_batches = truth.batch_effects.shape[0]
    for start in range(0, n_cells, chunk_size):
        n = min(chunk_size, n_cells - start)
        z = rng.normal(size=(n, k))
        batch = rng.integers(0, n_batches, size=n)
        logits = z @ truth.loadings.T + truth.intercepts[None, :] + truth.batch_effects[batch]
        logits -= logits.max(axis=1, keepdims=True)
        rho = np.exp(logits)
        rho /= rho.sum(axis=1, keepdims=True)
        lib = np.exp(rng.normal(log_library_mean, log_library_sd, size=(n, 1)))
        mu = lib * rho
        # NB as a Gamma-Poisson mixture
        lam = rng.gamma(shape=truth.theta[None, :], scale=mu / truth.theta[None, :])
        x = rng.poisson(lam).astype(np.float32)
        empty = x.sum(axis=1) == 0
        x[empty, rng.integers(0, n_genes, size=int(empty.sum()))] = 1.0  # no empty cells
        yield sp.csr_matrix(x), z.astype(np.float32), batch


def simulate(
    n_cells: int = 2000,
    n_genes: int = 200,
    n_latent: int = 5,
    *,
    n_batches: int = 1,
    factor_scales: np.ndarray | None = None,
    seed: int = 0,
    **truth_kwargs,
):
    """An AnnData of simulated counts in ``X`` (CSR) and ``layers["counts"]``, with the truth:
    ``obsm["true_z"]``, ``varm["true_loadings"]``, ``var["true_intercept"]``,
    ``var["true_theta"]``, ``obs["batch"]`` (categorical)."""
    import anndata as ad
    import pandas as pd

    truth = make_truth(n_genes, n_latent, n_batches=n_batches, factor_scales=factor_scales, seed=seed, **truth_kwargs)
    chunks = list(simulate_chunks(truth, n_cells, seed=seed))
    x = sp.vstack([c[0] for c in chunks]).tocsr()
    z = np.concatenate([c[1] for c in chunks])
    batch = np.concatenate([c[2] for c in chunks])
    obs = pd.DataFrame(
        {"batch": pd.Categorical([f"b{i}" for i in batch], categories=[f"b{i}" for i in range(n_batches)])},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(
        {"true_intercept": truth.intercepts, "true_theta": truth.theta},
        index=[f"gene{i}" for i in range(n_genes)],
    )
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.layers["counts"] = x.copy()
    adata.obsm["true_z"] = z
    adata.varm["true_loadings"] = truth.loadings.astype(np.float32)
    return adata


def canonical_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Canonical correlations between the column spaces of a (n, p) and b (n, q)."""
    qa, _ = np.linalg.qr(a - a.mean(0))
    qb, _ = np.linalg.qr(b - b.mean(0))
    return np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), 0.0, 1.0)
