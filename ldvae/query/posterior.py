"""Posterior queries of a trained ``LinearSCVI``, as scvi-tools answers them.

Every query streams over cells in minibatches gathered on the model's device, so no
dense cells x genes tensor larger than a minibatch exists unless the result itself is
dense (normalized expression, likelihood parameters, correlation matrices). When the
counts stay on disk (a backed ``.h5ad`` or ``.zarr``, see ``ldvae.data.backed``) the same
minibatches are read from disk one ahead, and the dense results can be written to disk
with ``out=``, so neither the counts nor a cells x genes result need fit in memory. Each
public function except the latent representation's draws (``give_mean=False``) runs under
a fixed random seed (``ldvae.settings.seed``), so calling it twice gives the same answer;
change the seed for fresh draws.

Notation (Svensson et al. 2020): ``rho`` the normalized expression (sums to 1 over genes),
``l`` the library size, ``mu = l * rho`` the likelihood mean, ``theta`` the inverse
dispersion, ``pi`` the zero-inflation probability.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import Tensor

from ..data.contract import CountData
from ..nn.module import CountBatch, Generative, Inference, latent_estimate
from .cells import Output, SparseOutput, fill, minibatches_of
from ..util.checks import positive_int
from .target import Fitted, batch_codes, gene_mask, obs_names, query_batch_size, querying, start


_LOG_2PI = math.log(2.0 * math.pi)


# --- shared helpers --------------------------------------------------------------------------


def sample_latents(inf: Inference, n_samples: int) -> tuple[Tensor, Tensor]:
    """Draws from q(z | x) and q(l | x): z (n_samples, n_cells, K), log library (n_samples, n_cells)."""
    z = inf.qz_m + inf.qz_v.sqrt() * torch.randn((n_samples, *inf.qz_m.shape), device=inf.qz_m.device)
    if inf.ql_m is None:
        library = inf.library.expand(n_samples, -1)
    else:
        library = inf.ql_m + inf.ql_v.sqrt() * torch.randn((n_samples, *inf.ql_m.shape), device=inf.ql_m.device)
    return z, library


def tile(b: CountBatch, reps: int) -> CountBatch:
    """``reps`` copies of a minibatch stacked along cells (copy r holds rows r*n ... r*n + n - 1)."""
    n, g, nnz = b.n_cells, b.n_genes, b.row.shape[0]
    offsets = torch.arange(reps, device=b.row.device).repeat_interleave(nnz) * n  # (reps * nnz,)
    row = b.row.repeat(reps) + offsets
    col = b.col.repeat(reps)

    def rep(t):
        return None if t is None else t.repeat(reps, *([1] * (t.dim() - 1)))

    return CountBatch(
        row=row, col=col, flat=row * g + col, val=b.val.repeat(reps),
        batch=rep(b.batch), label=rep(b.label), cat_covs=rep(b.cat_covs), cont_covs=rep(b.cont_covs),
        log_total=rep(b.log_total), lgamma_x1=rep(b.lgamma_x1), n_genes=g,
    )


def decode(fitted: Fitted, b: CountBatch, z: Tensor, library: Tensor, code: int | None = None) -> Generative:
    """p(x | z, l) for a minibatch ``b`` whose cells are repeated along z's leading rows.

    ``z`` (m * n_cells, K) and ``library`` (m * n_cells,) hold m draws per cell, draw-major;
    ``code`` replaces every cell's batch (counterfactual decoding) when not None."""
    reps = z.shape[0] // b.n_cells
    bt = tile(b, reps) if reps > 1 else b
    if code is not None:
        bt = replace(bt, batch=torch.full_like(bt.batch, code))
    return fitted.module.generative(z, library, fitted.module.covariate_columns(bt), bt.batch, bt.label)


def theta_of(gen: Generative, shape: torch.Size) -> Tensor | None:
    return None if gen.log_theta is None else gen.log_theta.exp().expand(shape)


# --- latent representation --------------------------------------------------------------------


@torch.no_grad()
def get_latent_representation(
    fitted: Fitted, adata=None, indices=None, give_mean: bool = True, mc_samples: int = 5000,
    batch_size: int | None = None, return_dist: bool = False, *, out: str | Path | None = None,
):
    """See :meth:`ldvae.LinearSCVI.get_latent_representation`. The means (for ``ln``, a
    Monte Carlo mean) are seeded like every other query; with ``give_mean=False`` every call
    draws afresh from the global torch generator, as scvi-tools does."""
    if out is not None and return_dist:
        raise ValueError("out= writes the latent representation; it cannot be combined with return_dist=True.")
    data, rows, size = start(fitted, adata, indices, batch_size, streamed=True)
    shape = (rows.shape[0], fitted.config.n_latent)
    ln = fitted.config.latent_distribution == "ln"
    if return_dist:
        outputs = {"mean": Output(shape), "variance": Output(shape)}
    else:
        outputs = {"z": Output(shape, out=out)}

    def blocks():
        for b in minibatches_of(data, rows, size):
            inf = fitted.module.inference(b, use_mean=True)
            if return_dist:
                yield {"mean": inf.qz_m.cpu().numpy(), "variance": inf.qz_v.cpu().numpy()}
            else:
                z = latent_estimate(inf.qz_m, inf.qz_v, give_mean=give_mean, mc_samples=mc_samples, ln=ln)
                yield {"z": z.cpu().numpy()}

    if give_mean:
        with querying(fitted):
            result = fill(outputs, blocks())
    else:
        result = fill(outputs, blocks())
    return (result["mean"], result["variance"]) if return_dist else result["z"]


# --- normalized expression ---------------------------------------------------------------------


def expression_batches(
    fitted: Fitted, batches: Iterator[CountBatch], *, codes: list[int | None], mask: np.ndarray | None,
    library_size: float | str, n_samples: int,
) -> Iterator[np.ndarray]:
    """Normalized expression of each minibatch (no seeding): (n_samples, n_cells, n_genes)."""
    latent = library_size == "latent"
    keep = None if mask is None else torch.as_tensor(mask, device=fitted.device)
    for b in batches:
        inf = fitted.module.inference(b, use_mean=True)
        z, library = sample_latents(inf, n_samples)  # (S, n, K), (S, n)
        acc = 0.0
        for code in codes:
            gen = decode(fitted, b, z.reshape(-1, z.shape[-1]), library.reshape(-1), code)
            value = gen.log_mu.exp() if latent else gen.log_rho.exp() * float(library_size)  # (S * n, G)
            acc = acc + (value if keep is None else value[:, keep])
        yield (acc / len(codes)).reshape(n_samples, b.n_cells, -1).cpu().numpy()


def normalized_expression(
    fitted: Fitted, data: CountData, rows: Tensor, size: int, *, codes: list[int | None],
    mask: np.ndarray | None, library_size: float | str, n_samples: int,
) -> np.ndarray:
    """Core of :func:`get_normalized_expression` (no seeding), in memory: (n_samples, n_rows, n_genes)."""
    blocks = expression_batches(fitted, minibatches_of(data, rows, size), codes=codes, mask=mask,
                                library_size=library_size, n_samples=n_samples)
    return np.concatenate(list(blocks), axis=1)


def get_normalized_expression(
    fitted: Fitted,
    adata=None,
    indices=None,
    transform_batch=None,
    gene_list: Sequence[str] | None = None,
    library_size: float | Literal["latent"] = 1,
    n_samples: int = 1,
    n_samples_overall: int | None = None,
    batch_size: int | None = None,
    return_mean: bool = True,
    return_numpy: bool | None = None,
    *,
    out: str | Path | None = None,
) -> np.ndarray | pd.DataFrame:
    """See :meth:`ldvae.LinearSCVI.get_normalized_expression`."""
    n_samples = positive_int("n_samples", n_samples)
    if out is not None and return_numpy is False:
        raise ValueError(
            "out= writes the expression into a .npy file and returns it as an array; it cannot be a DataFrame. "
            "Pass return_numpy=None or True with out=."
        )
    if not (library_size == "latent" or (
        isinstance(library_size, (int, float, np.number)) and not isinstance(library_size, bool)
        and np.isfinite(library_size) and library_size > 0
    )):
        raise ValueError(f"library_size must be a positive number or 'latent', got {library_size!r}.")
    if n_samples_overall is not None:
        n_samples_overall = positive_int("n_samples_overall", n_samples_overall)
        if n_samples != 1:
            raise ValueError(
                f"n_samples_overall={n_samples_overall} draws one sample from each of that many cells; "
                f"it needs n_samples=1, got n_samples={n_samples}."
            )
    if n_samples > 1 and not return_mean:
        if return_numpy is False:
            warnings.warn(
                "return_numpy=False cannot hold n_samples > 1 with return_mean=False; returning a NumPy "
                "array of shape (n_samples, n_cells, n_genes).", UserWarning, stacklevel=3,
            )
        return_numpy = True
    codes = batch_codes(fitted, transform_batch)
    mask = gene_mask(fitted, gene_list)
    data, rows, size = start(fitted, adata, indices, batch_size, per_row=n_samples, streamed=True)
    n_genes = len(fitted.var_names) if mask is None else int(mask.sum())
    with querying(fitted):
        if n_samples_overall is not None:
            pick = torch.randint(rows.shape[0], (n_samples_overall,), device=rows.device)
            rows = rows[pick]
        blocks = expression_batches(fitted, minibatches_of(data, rows, size), codes=codes, mask=mask,
                                    library_size=library_size, n_samples=n_samples)  # (S, n, G) each
        if return_mean or n_samples == 1:
            output = Output((rows.shape[0], n_genes), out=out)
            expr = fill({"x": output}, ({"x": e.mean(0)} for e in blocks))["x"]
        else:
            output = Output((n_samples, rows.shape[0], n_genes), axis=1, out=out)
            expr = fill({"x": output}, ({"x": e} for e in blocks))["x"]
    if return_numpy or out is not None:
        return expr
    genes = fitted.var_names if mask is None else fitted.var_names[mask]
    return pd.DataFrame(expr, index=obs_names(fitted, adata, rows), columns=genes.copy())


# --- ELBO, reconstruction error, marginal likelihood -------------------------------------------


def _per_cell(fitted: Fitted, adata, indices, batch_size, fn) -> np.ndarray:
    data, rows, size = start(fitted, adata, indices, batch_size, streamed=True)
    out, at = np.empty(rows.shape[0]), 0
    with querying(fitted):
        for b in minibatches_of(data, rows, size):  # written into one array: nothing small kept per batch
            out[at : at + b.n_cells] = fn(b).double().cpu().numpy()
            at += b.n_cells
    return out


def get_elbo(fitted: Fitted, adata=None, indices=None, batch_size=None, return_mean: bool = True) -> Tensor:
    """See :meth:`ldvae.LinearSCVI.get_elbo`."""
    elbo = torch.from_numpy(-_per_cell(fitted, adata, indices, batch_size, lambda b: fitted.module.loss(b).elbo))
    return elbo.mean() if return_mean else elbo


def get_reconstruction_error(
    fitted: Fitted, adata=None, indices=None, batch_size=None, return_mean: bool = True
) -> dict[str, Tensor]:
    """See :meth:`ldvae.LinearSCVI.get_reconstruction_error`."""
    nll = torch.from_numpy(_per_cell(fitted, adata, indices, batch_size, lambda b: fitted.module.loss(b).reconstruction))
    return {"reconstruction_loss": nll.mean() if return_mean else nll}


def _normal_log_prob(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    return -0.5 * (_LOG_2PI + var.log() + (x - mean).square() / var)


def _log_weights(fitted: Fitted, b: CountBatch, inf: Inference, reps: int) -> Tensor:
    """log p(x, z, l) - log q(z, l | x) for ``reps`` draws per cell, (reps, n_cells)."""
    module = fitted.module
    z, library = sample_latents(inf, reps)  # (reps, n, K), (reps, n)
    bt = tile(b, reps) if reps > 1 else b
    gen = module.generative(z.reshape(-1, z.shape[-1]), library.reshape(-1), module.covariate_columns(bt),
                            bt.batch, bt.label)
    log_px = (module.log_likelihood(bt, gen) - bt.lgamma_x1).view(reps, -1)
    log_pz = _normal_log_prob(z, torch.zeros_like(z), torch.ones_like(z)).sum(-1)
    log_qz = _normal_log_prob(z, inf.qz_m, inf.qz_v).sum(-1)
    log_w = log_px + log_pz - log_qz
    if inf.ql_m is not None:
        prior_m = module.library_log_means[b.batch]
        prior_v = module.library_log_vars[b.batch]
        log_w = log_w + _normal_log_prob(library, prior_m, prior_v) - _normal_log_prob(library, inf.ql_m, inf.ql_v)
    return log_w


def get_marginal_ll(
    fitted: Fitted, adata=None, indices=None, n_mc_samples: int = 1000, batch_size=None, return_mean: bool = True
):
    """See :meth:`ldvae.LinearSCVI.get_marginal_ll`."""
    n_mc_samples = positive_int("n_mc_samples", n_mc_samples)
    budget = query_batch_size(None, fitted.n_genes) * len(fitted.var_names)  # dense entries per decode

    def per_batch(b: CountBatch) -> Tensor:
        inf = fitted.module.inference(b, use_mean=True)
        chunk = int(np.clip(budget // (b.n_cells * b.n_genes), 1, n_mc_samples))
        parts = []
        for done in range(0, n_mc_samples, chunk):
            parts.append(_log_weights(fitted, b, inf, min(chunk, n_mc_samples - done)))
        log_w = torch.cat(parts).double()  # (n_mc_samples, n)
        # log (1/S) sum_s w_s, the importance-sampled estimate of log p(x)
        return torch.logsumexp(log_w, 0) - math.log(n_mc_samples)

    ll = _per_cell(fitted, adata, indices, batch_size, per_batch)
    return float(ll.mean()) if return_mean else torch.from_numpy(ll)


# --- likelihood parameters, samples, library -------------------------------------------------


def likelihood_batches(
    fitted: Fitted, batches: Iterator[CountBatch], keys: list[str], n_samples: int
) -> Iterator[dict[str, np.ndarray]]:
    """Parameters ``keys`` of p(x | z, l) at posterior draws, per minibatch (no seeding):
    each (n_samples, n_cells, n_genes)."""
    for b in batches:
        z, library = sample_latents(fitted.module.inference(b, use_mean=True), n_samples)
        gen = decode(fitted, b, z.reshape(-1, z.shape[-1]), library.reshape(-1))
        mean = gen.log_mu.exp()
        values = {"mean": mean, "dispersions": theta_of(gen, mean.shape),
                  "dropout": None if gen.zi_logits is None else torch.sigmoid(gen.zi_logits)}
        yield {k: values[k].reshape(n_samples, b.n_cells, -1).cpu().numpy() for k in keys}


def get_likelihood_parameters(
    fitted: Fitted, adata=None, indices=None, n_samples: int = 1, give_mean: bool = False, batch_size=None,
    *, out: str | Path | None = None,
) -> dict[str, np.ndarray]:
    """See :meth:`ldvae.LinearSCVI.get_likelihood_parameters`."""
    n_samples = positive_int("n_samples", n_samples)
    lik = fitted.config.gene_likelihood
    data, rows, size = start(fitted, adata, indices, batch_size, per_row=n_samples, streamed=True)
    keys = ["mean"] + (["dispersions"] if lik != "poisson" else []) + (["dropout"] if lik == "zinb" else [])
    per_draw = n_samples > 1 and not give_mean
    shape = (n_samples, rows.shape[0], len(fitted.var_names)) if per_draw else (rows.shape[0], len(fitted.var_names))
    if out is not None:
        if Path(out).suffix:
            raise ValueError(f"out must be a directory (it receives {', '.join(k + '.npy' for k in keys)}), "
                             f"got {str(out)!r}.")
        Path(out).mkdir(parents=True, exist_ok=True)
    outputs = {k: Output(shape, axis=1 if per_draw else 0, out=None if out is None else Path(out) / f"{k}.npy")
               for k in keys}
    with querying(fitted):
        blocks = likelihood_batches(fitted, minibatches_of(data, rows, size), keys, n_samples)
        if not per_draw:  # (S, n, G) -> (n, G)
            blocks = ({k: v[0] if n_samples == 1 else v.mean(0) for k, v in block.items()} for block in blocks)
        return fill(outputs, blocks)


def _scipy_version() -> tuple[int, int]:
    import scipy

    major, minor = scipy.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


LARGEST_RATE = 2.0**53  # above it a draw is no exact count (and torch.poisson's int64 draw overflows at 2^63)


def _poisson(rate: Tensor) -> Tensor:
    too_large = ~(rate <= LARGEST_RATE)  # NaN too
    if bool(too_large.any()):
        raise ValueError(
            f"A posterior predictive draw needs a Poisson rate of {rate[too_large][0].item():.3g}, beyond any count "
            f"({LARGEST_RATE:.1e}): the model's expected counts diverged for some cells (see model.history and "
            "get_likelihood_parameters()). Refit with a lower learning rate, or use_observed_lib_size=True.")
    return torch.poisson(rate)


def sample_counts(gen: Generative) -> Tensor:
    """One draw of x ~ p(x | z, l) per row: NB as a Gamma-Poisson mixture, ZINB, or Poisson."""
    mu = gen.log_mu.exp()
    if gen.log_theta is None:
        return _poisson(mu)
    theta = gen.log_theta.exp().expand_as(mu)
    rate = torch.distributions.Gamma(theta, theta / mu).sample()
    x = _poisson(rate)
    if gen.zi_logits is not None:
        x = torch.where(torch.rand_like(x) < torch.sigmoid(gen.zi_logits), torch.zeros_like(x), x)
    return x


def sample_batches(
    fitted: Fitted, batches: Iterator[CountBatch], mask: np.ndarray | None, n_samples: int, code: int | None = None
) -> Iterator[Tensor]:
    """Posterior predictive counts per minibatch (no seeding): (n_samples, n_cells, n_genes) on
    the device; ``code``: decoded as if every cell came from that batch."""
    keep = None if mask is None else torch.as_tensor(mask, device=fitted.device)
    for b in batches:
        z, library = sample_latents(fitted.module.inference(b, use_mean=True), n_samples)
        x = sample_counts(decode(fitted, b, z.reshape(-1, z.shape[-1]), library.reshape(-1), code))  # (S * n, G)
        yield (x if keep is None else x[:, keep]).view(n_samples, b.n_cells, -1)


def _to_csr(x: Tensor) -> sp.csr_matrix:
    """A dense (n_cells, n_genes) tensor as SciPy CSR, found on the tensor's device."""
    row, col = x.nonzero(as_tuple=True)  # row-major order: CSR order
    indptr = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
    indptr[1:] = torch.bincount(row, minlength=x.shape[0]).cumsum(0)
    return sp.csr_matrix((x[row, col].cpu().numpy(), col.cpu().numpy(), indptr.cpu().numpy()), shape=tuple(x.shape))


def posterior_predictive_sample(
    fitted: Fitted, adata=None, indices=None, transform_batch=None, n_samples: int = 1, gene_list=None,
    batch_size=None, *, out: str | Path | None = None,
):
    """See :meth:`ldvae.LinearSCVI.posterior_predictive_sample`."""
    n_samples = positive_int("n_samples", n_samples)
    codes = batch_codes(fitted, transform_batch)
    if len(codes) != 1:
        raise ValueError(f"transform_batch must be one batch category (or None), got {transform_batch!r}.")
    code = codes[0]
    mask = gene_mask(fitted, gene_list)
    if out is not None and n_samples > 1:
        raise ValueError(
            f"out= writes one sample of counts as the X of an AnnData; got n_samples={n_samples}. Pass "
            "n_samples=1 and call once per sample, changing ldvae.settings.seed between calls."
        )
    if n_samples > 1 and not _has_sparse() and _scipy_version() < (1, 15):
        raise RuntimeError(
            f"posterior_predictive_sample with n_samples > 1 returns a 3-D sparse array, which needs scipy >= 1.15 "
            f"(this is {_scipy_version()}). Upgrade scipy, or call it n_samples times with n_samples=1."
        )
    data, rows, size = start(fitted, adata, indices, batch_size, per_row=n_samples, streamed=True)
    genes = fitted.var_names if mask is None else fitted.var_names[mask]
    if out is not None:
        output = SparseOutput(out, obs_names(fitted, adata, rows), genes)
        with querying(fitted):
            draws = sample_batches(fitted, minibatches_of(data, rows, size), mask, 1, code)
            return fill({"X": output}, ({"X": _to_csr(x[0])} for x in draws))["X"]
    n_genes = len(genes)
    width = n_genes * n_samples  # each cell's row: gene-major, then sample
    counts: list[np.ndarray] = []
    columns: list[np.ndarray] = []
    values: list[np.ndarray] = []
    with querying(fitted):
        for x in sample_batches(fitted, minibatches_of(data, rows, size), mask, n_samples, code):
            cells = x.permute(1, 2, 0).reshape(x.shape[1], width)  # (cells, genes * samples)
            r, k = cells.nonzero(as_tuple=True)  # row-major: each row's columns in order
            counts.append(torch.bincount(r, minlength=cells.shape[0]).cpu().numpy())
            columns.append(k.to(torch.int32 if width < 2**31 else torch.int64).cpu().numpy())
            values.append(cells[r, k].cpu().numpy())
            del cells, r, k, x
    indptr = np.zeros(sum(len(c) for c in counts) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(counts) if counts else np.zeros(0, np.int64), out=indptr[1:])
    indices = np.concatenate(columns) if columns else np.zeros(0, np.int32)
    columns.clear()
    val = np.concatenate(values) if values else np.zeros(0, np.float32)
    values.clear()
    done = len(indptr) - 1
    shape = (done, n_genes) if n_samples == 1 else (done, n_genes, n_samples)
    if _has_sparse():  # scvi-tools' type: pydata/sparse's GCXS, compressed along the cells
        import sparse

        return sparse.GCXS((val, indices, indptr), shape=shape, compressed_axes=(0,))
    if n_samples == 1:
        return sp.csr_matrix((val, indices, indptr), shape=shape)
    cell = np.repeat(np.arange(done), np.diff(indptr))
    return sp.coo_array((val, (cell, indices // n_samples, indices % n_samples)), shape=shape)


def _has_sparse() -> bool:
    import importlib.util

    return importlib.util.find_spec("sparse") is not None


def get_latent_library_size(fitted: Fitted, adata=None, indices=None, give_mean: bool = True, batch_size=None):
    """See :meth:`ldvae.LinearSCVI.get_latent_library_size`."""
    if give_mean and fitted.config.use_observed_lib_size:
        raise RuntimeError(
            "This model uses the observed library size (use_observed_lib_size=True), so it has no posterior "
            "over the library to average. Pass give_mean=False to get the observed library sizes."
        )

    def per_batch(b):
        inf = fitted.module.inference(b, use_mean=True)
        if give_mean:
            return torch.exp(inf.ql_m + 0.5 * inf.ql_v)  # mean of LogNormal(ql_m, ql_v)
        return sample_latents(inf, 1)[1][0].exp()

    return _per_cell(fitted, adata, indices, batch_size, per_batch).astype(np.float32)[:, None]  # (n_cells, 1)


def get_feature_correlation_matrix(
    fitted: Fitted,
    adata=None,
    indices=None,
    n_samples: int = 10,
    batch_size: int = 64,
    rna_size_factor: int = 1000,
    transform_batch=None,
    correlation_type: Literal["spearman", "pearson"] = "spearman",
) -> pd.DataFrame:
    """See :meth:`ldvae.LinearSCVI.get_feature_correlation_matrix`."""
    from scipy.stats import rankdata

    n_samples = positive_int("n_samples", n_samples)
    if correlation_type not in ("spearman", "pearson"):
        raise ValueError(f"correlation_type must be 'spearman' or 'pearson', got {correlation_type!r}.")
    if not rna_size_factor > 0:
        raise ValueError(f"rna_size_factor must be positive, got {rna_size_factor!r}.")
    codes = batch_codes(fitted, transform_batch)
    data, rows, size = start(fitted, adata, indices, batch_size, streamed=True)
    log_size = math.log(rna_size_factor)
    mats = []
    with querying(fitted):
        for code in codes:
            draws = []
            for b in minibatches_of(data, rows, size):
                z, _ = sample_latents(fitted.module.inference(b, use_mean=True), n_samples)
                library = torch.full(z.shape[:2], log_size, device=z.device).reshape(-1)
                gen = decode(fitted, b, z.reshape(-1, z.shape[-1]), library, code)
                rate = gen.log_mu.exp()  # rna_size_factor * rho, (S * n, G)
                if gen.log_theta is not None:  # the Gamma part of the NB: denoised expression
                    theta = gen.log_theta.exp().expand_as(rate)
                    rate = torch.distributions.Gamma(theta, theta / rate).sample()
                draws.append(rate.view(n_samples, b.n_cells, -1).cpu())
            flat = torch.cat(draws, dim=1).reshape(-1, len(fitted.var_names)).double().numpy()  # (S * n, G)
            del draws
            if correlation_type == "spearman":  # gene by gene, in place: rankdata(axis=0)'s temporaries
                for g in range(flat.shape[1]):  # are several times the draws
                    flat[:, g] = rankdata(flat[:, g])
            with np.errstate(invalid="ignore", divide="ignore"):
                mats.append(np.corrcoef(flat, rowvar=False))
    corr = np.mean(mats, axis=0)
    return pd.DataFrame(corr, index=fitted.var_names.copy(), columns=fitted.var_names.copy())
