"""The LDVAE as plain torch: ``inference`` -> ``generative`` -> ``loss``.

Names follow Svensson, Gayoso, Yosef & Pachter (Bioinformatics 2020), "Interpretable
factor models of single-cell RNA-seq via variational autoencoders":

- ``z`` the K latent factors of a cell, prior N(0, I) (``latent_distribution="ln"``:
  the decoder sees softmax(z));
- ``library`` the log library size log l_n, learned (its own encoder and a per-batch
  Normal prior) or observed (log of the cell's total count);
- ``rho`` the normalized expression: softmax over genes of a bias-free linear map of
  [z, covariates] followed by batch normalization over genes; mean ``mu = l * rho``;
- ``theta`` the negative binomial inverse dispersion; ``pi`` the zero-inflation.

This file imports only torch (and the likelihoods beside it) and never sees AnnData or
NumPy. Compiled CPU kernels for the encoder's first block and the decoder's batch norm +
softmax + NB likelihood are handed in from above (``use_compiled``, called by
``ldvae.cpu.fused``); without them every step takes the torch path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .likelihoods import nb_log_prob, nb_log_prob_softmax, poisson_log_prob, zinb_log_prob

Dispersion = Literal["gene", "gene-batch", "gene-label", "gene-cell"]
GeneLikelihood = Literal["nb", "zinb", "poisson"]
LatentDistribution = Literal["normal", "ln"]

# scvi-tools' FCLayers use these batch-norm settings; keeping them keeps fits comparable.
BN_MOMENTUM = 0.01
BN_EPS = 1e-3
VAR_EPS = 1e-4


class CompiledKernels(Protocol):
    """What ``use_compiled`` hands the module: each ``*_applies`` says whether its kernel
    handles the tensors at hand (else the torch path runs); see ``ldvae.cpu.fused``."""

    def encoder_applies(self, weight: Tensor, bn: nn.Module, dropout: nn.Module) -> bool: ...

    def encoder_block(self, linear, bn, dropout, row_start: Tensor, col: Tensor, log1p_val: Tensor) -> Tensor: ...

    def applies(self, h: Tensor, bn: nn.Module | None, log_theta: Tensor | None) -> bool: ...

    def bn_softmax_nb(self, h, bn, library, log_theta, row_start, col, val) -> Tensor: ...


_compiled: CompiledKernels | None = None


def use_compiled(kernels: CompiledKernels | None) -> None:
    """Route the encoder's first block and the NB decoder through ``kernels`` where they
    apply (None: torch everywhere). The same values and gradients to float32 rounding."""
    global _compiled
    _compiled = kernels


LOG_VARIATIONAL = True  # the encoders read log1p(counts), as scvi-tools' default
ENCODE_COVARIATES = False  # the encoders read no batch or covariates; the decoder does


@dataclass(frozen=True)
class ModuleConfig:
    n_genes: int
    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = 1
    dropout_rate: float = 0.1
    n_batch: int = 1
    n_labels: int = 1
    n_cats_per_cov: tuple[int, ...] = ()
    n_continuous_cov: int = 0
    dispersion: Dispersion = "gene"
    gene_likelihood: GeneLikelihood = "nb"
    latent_distribution: LatentDistribution = "normal"
    use_observed_lib_size: bool = False
    use_batch_norm: bool = True
    bias: bool = False

    @property
    def one_hot_widths(self) -> tuple[int, ...]:
        """Columns of each one-hot block after z: the batch's, then each categorical
        covariate's; 0 for a factor with a single category, which adds no column (as in
        scvi-tools). The compiled step lays its columns out from these too."""
        return tuple(n if n > 1 else 0 for n in (self.n_batch, *self.n_cats_per_cov))

    @property
    def n_covariate_columns(self) -> int:
        """Decoder input columns after z: the one-hot blocks, then the continuous covariates."""
        return sum(self.one_hot_widths) + self.n_continuous_cov


@dataclass(frozen=True)
class GeneOrder:
    """A minibatch's nonzeros grouped by gene (stable within a gene): what the encoder's
    first layer needs for its weight gradient, X^T @ grad, as a sum over each gene's cells."""

    row: Tensor  # (nnz,) cell of each nonzero, in gene order
    log1p_val: Tensor  # (nnz,) log1p(count), in gene order
    gene_start: Tensor  # (n_genes,) position of each gene's first nonzero


@dataclass(frozen=True)
class CountBatch:
    """A minibatch on the compute device, held as its nonzeros (CSR order: by cell, then
    gene). The dense counts ``x`` and the per-gene grouping are built on first use."""

    row: Tensor  # (nnz,) cell within the batch, non-decreasing
    col: Tensor  # (nnz,) gene
    flat: Tensor  # (nnz,) row * n_genes + col
    val: Tensor  # (nnz,) count
    batch: Tensor  # (n_cells,) batch code
    label: Tensor  # (n_cells,) label code
    cat_covs: Tensor | None  # (n_cells, n_cat_covs) codes
    cont_covs: Tensor | None  # (n_cells, n_cont_covs)
    log_total: Tensor  # (n_cells,) log of the cell's total count
    lgamma_x1: Tensor  # (n_cells,) sum_g lgamma(x + 1), the parameter-free likelihood term
    n_genes: int
    row_start: Tensor | None = None  # (n_cells,) position of each cell's first nonzero
    log1p_values: Tensor | None = None  # (nnz,) log1p(val), the encoder's input
    gene_order: GeneOrder | None = None
    dense: Tensor | None = None  # (n_cells, n_genes) counts
    row_pointer: Tensor | None = None  # (n_cells + 1,) CSR row pointer
    # mean and variance of q(z | x), (n_cells, K) each, stored for cells whose counts were
    # dropped (a minified AnnData); log_total is then the observed library
    posterior: tuple[Tensor, Tensor] | None = None

    @property
    def n_cells(self) -> int:
        return self.log_total.shape[0]

    def _cache(self, name: str, value):
        object.__setattr__(self, name, value)  # a cache on a frozen dataclass: same values
        return value

    @property
    def x(self) -> Tensor:
        """Dense counts (n_cells, n_genes), built from the nonzeros on first use."""
        if self.dense is not None:
            return self.dense
        x = self.val.new_zeros(self.n_cells * self.n_genes).index_put_((self.flat,), self.val)
        return self._cache("dense", x.view(self.n_cells, self.n_genes))

    @property
    def starts(self) -> Tensor:
        """Position of each cell's first nonzero, (n_cells,)."""
        if self.row_start is not None:
            return self.row_start
        counts = torch.bincount(self.row, minlength=self.n_cells)
        return self._cache("row_start", torch.cumsum(counts, 0) - counts)

    @property
    def indptr(self) -> Tensor:
        """CSR row pointer, (n_cells + 1,): cell i's nonzeros are [indptr[i], indptr[i + 1])."""
        if self.row_pointer is not None:
            return self.row_pointer
        starts = self.starts
        return self._cache("row_pointer", torch.cat([starts, starts.new_full((1,), self.val.shape[0])]))

    @property
    def log1p_val(self) -> Tensor:
        if self.log1p_values is not None:
            return self.log1p_values
        return self._cache("log1p_values", torch.log1p(self.val))

    @property
    def by_gene(self) -> GeneOrder:
        if self.gene_order is not None:
            return self.gene_order
        return self._cache("gene_order", gene_order(self.row, self.col, self.log1p_val, self.n_genes))


def gene_order(
    row: Tensor, col: Tensor, log1p_val: Tensor, n_genes: int, order: Tensor | None = None
) -> GeneOrder:
    """Nonzeros grouped by gene; ``order`` a stable argsort of ``col`` if the caller has a
    faster one (``data.CountData.gather`` uses NumPy's radix sort on CPU)."""
    if order is None:
        order = torch.sort(col, stable=True).indices
    counts = torch.bincount(col, minlength=n_genes)
    return GeneOrder(
        torch.index_select(row, 0, order), torch.index_select(log1p_val, 0, order), torch.cumsum(counts, 0) - counts
    )


class _SparseLinear(torch.autograd.Function):
    """``log1p(x) @ weight.T + bias`` from a minibatch's nonzeros: a per-cell weighted sum of
    rows of weight.T forward, a per-gene weighted sum of gradient rows backward: arithmetic
    in proportion to the nonzeros, and log1p(x) is never built dense.
    Fastest with ``weight`` stored gene-major (``weight.t()`` contiguous, see GaussianEncoder)."""

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor, b: CountBatch) -> Tensor:
        ctx.b = b
        out = F.embedding_bag(b.col, weight.t().contiguous(), b.starts, mode="sum", per_sample_weights=b.log1p_val)
        return out.add_(bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        order = ctx.b.by_gene
        grad_weight_t = F.embedding_bag(
            order.row, grad.contiguous(), order.gene_start, mode="sum", per_sample_weights=order.log1p_val
        )  # (G, H): gene-major, the layout of the weight
        return grad_weight_t.t(), grad.sum(0), None


def sparse_linear(weight: Tensor, bias: Tensor, b: CountBatch) -> Tensor:
    """``F.linear(log1p(b.x), weight, bias)``, computed from the nonzeros, (n_cells, H)."""
    return _SparseLinear.apply(weight, bias, b)


@dataclass(frozen=True)
class Inference:
    qz_m: Tensor  # (n_cells, K) posterior mean of z (untransformed for "ln")
    qz_v: Tensor  # (n_cells, K) posterior variance
    z: Tensor  # (n_cells, K) sample (untransformed)
    ql_m: Tensor | None  # (n_cells,) posterior mean of log library, None when observed
    ql_v: Tensor | None
    library: Tensor  # (n_cells,) log library used by the decoder


@dataclass(frozen=True)
class Generative:
    log_rho: Tensor  # (n_cells, G) log normalized expression
    log_mu: Tensor  # (n_cells, G) log mean
    log_theta: Tensor | None  # (G,) or (n_cells, G); None for Poisson
    zi_logits: Tensor | None  # (n_cells, G) for ZINB


@dataclass(frozen=True)
class LossOutput:
    loss: Tensor  # scalar, the minimized objective (mean over cells)
    reconstruction: Tensor  # (n_cells,) -log p(x | z, l), lgamma(x+1) included
    kl_z: Tensor  # (n_cells,)
    kl_l: Tensor  # (n_cells,) zero when the library is observed

    @property
    def elbo(self) -> Tensor:
        """Per-cell negative ELBO (unweighted KL), (n_cells,)."""
        return self.reconstruction + self.kl_z + self.kl_l


def _fc_stack(n_in: int, n_hidden: int, n_layers: int, dropout_rate: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers += [
            nn.Linear(n_in if i == 0 else n_hidden, n_hidden),
            nn.BatchNorm1d(n_hidden, momentum=BN_MOMENTUM, eps=BN_EPS),
            nn.ReLU(),
            nn.Dropout(dropout_rate),
        ]
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """log1p(x) -> [Linear -> BatchNorm -> ReLU -> Dropout] x n_layers -> mean, variance."""

    def __init__(self, n_in: int, n_out: int, n_hidden: int, n_layers: int, dropout_rate: float):
        super().__init__()
        self.trunk = _fc_stack(n_in, n_hidden, n_layers, dropout_rate)
        # The first weight (n_hidden, n_genes) is stored gene-major: the sparse first layer
        # reads one gene's row of weight.T per nonzero, and its gradient comes out gene-major,
        # so neither direction needs a transposing copy.
        first = self.trunk[0]
        first.weight = nn.Parameter(first.weight.detach().t().contiguous().t())
        self.mean = nn.Linear(n_hidden, n_out)
        self.var = nn.Linear(n_hidden, n_out)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self._rest(self.trunk[0](h), 1)

    @property
    def compiled_first_block(self) -> bool:
        """Whether ``from_counts`` runs the first block (Linear, BatchNorm, ReLU, Dropout) as
        one compiled pass (``CompiledKernels.encoder_block``: CPU, float32), which needs no
        gene grouping."""
        first, bn, _, dropout = self.trunk[:4]
        return _compiled is not None and _compiled.encoder_applies(first.weight, bn, dropout)

    def from_counts(self, b: CountBatch) -> tuple[Tensor, Tensor]:
        """Mean and variance from a minibatch's nonzeros (log1p of the counts as input)."""
        first, bn, _, dropout = self.trunk[:4]
        if b.n_cells > 1 and self.compiled_first_block:
            return self._rest(_compiled.encoder_block(first, bn, dropout, b.indptr, b.col, b.log1p_val), 4)
        return self._rest(sparse_linear(first.weight, first.bias, b), 1)

    def _rest(self, h: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """The trunk from layer ``start`` on, then the mean and variance heads."""
        for layer in self.trunk[start:]:
            h = layer(h)
        return self.mean(h), self.var(h).exp() + VAR_EPS


class LDVAEModule(nn.Module):
    """The LDVAE. ``library_log_means`` / ``library_log_vars`` (n_batch,) are the
    per-batch mean and variance of log total counts, the learned library's prior."""

    def __init__(self, config: ModuleConfig, library_log_means: Tensor, library_log_vars: Tensor):
        super().__init__()
        c = config
        self.config = c
        self.z_encoder = GaussianEncoder(c.n_genes, c.n_latent, c.n_hidden, c.n_layers, c.dropout_rate)
        self.l_encoder = (
            None
            if c.use_observed_lib_size
            else GaussianEncoder(c.n_genes, 1, c.n_hidden, 1, c.dropout_rate)
        )
        n_dec_in = c.n_latent + c.n_covariate_columns
        # The decoder's linear map: columns [0, K) are the loadings, the rest covariate effects.
        self.factor_regressor = nn.Linear(n_dec_in, c.n_genes, bias=c.bias)
        self.factor_bn = (
            nn.BatchNorm1d(c.n_genes, momentum=BN_MOMENTUM, eps=BN_EPS) if c.use_batch_norm else None
        )
        if c.gene_likelihood == "zinb":
            self.zi_regressor = nn.Linear(n_dec_in, c.n_genes, bias=c.bias)
            self.zi_bn = (
                nn.BatchNorm1d(c.n_genes, momentum=BN_MOMENTUM, eps=BN_EPS) if c.use_batch_norm else None
            )
        if c.gene_likelihood != "poisson":
            if c.dispersion == "gene":
                self.px_r = nn.Parameter(torch.randn(c.n_genes))
            elif c.dispersion == "gene-batch":
                self.px_r = nn.Parameter(torch.randn(c.n_genes, c.n_batch))
            elif c.dispersion == "gene-label":
                self.px_r = nn.Parameter(torch.randn(c.n_genes, c.n_labels))
            elif c.dispersion == "gene-cell":
                self.px_r_regressor = nn.Linear(n_dec_in, c.n_genes)
            else:
                raise ValueError(f"unknown dispersion {c.dispersion!r}")
        self.register_buffer("library_log_means", library_log_means.reshape(-1).float())
        self.register_buffer("library_log_vars", library_log_vars.reshape(-1).float())
        if self.l_encoder is not None:
            # Start q(l | x) at the prior's scale (log total counts, ~7-14), not at 0: from 0 the
            # first steps see rates e^7 to e^14 too small, whose huge gradients overshoot
            # (NaN with large lr) or take many epochs to climb. The model is unchanged.
            with torch.no_grad():
                self.l_encoder.mean.bias.fill_(float(self.library_log_means.mean()))

    # scvi-tools' module attributes, read from the config, for code written against its module
    n_input = property(lambda self: self.config.n_genes, doc="Genes modelled.")
    n_latent = property(lambda self: self.config.n_latent, doc="Latent factors K.")
    n_batch = property(lambda self: self.config.n_batch, doc="Batches.")
    n_labels = property(lambda self: self.config.n_labels, doc="Labels.")
    dispersion = property(lambda self: self.config.dispersion, doc="Where the dispersion varies.")
    gene_likelihood = property(lambda self: self.config.gene_likelihood, doc="Count likelihood.")
    latent_distribution = property(lambda self: self.config.latent_distribution, doc="normal or ln.")
    use_observed_lib_size = property(lambda self: self.config.use_observed_lib_size,
                                     doc="Whether the library is the observed total count.")
    log_variational = property(lambda self: LOG_VARIATIONAL, doc="The encoders read log1p of the counts.")
    encode_covariates = property(lambda self: ENCODE_COVARIATES, doc="The encoders read no covariates.")

    @property
    def needs_gene_order(self) -> bool:
        """Whether training uses minibatches' nonzeros grouped by gene (``CountBatch.by_gene``):
        only the torch path of an encoder's first layer does, for its weight gradient."""
        encoders = [self.z_encoder] + ([] if self.l_encoder is None else [self.l_encoder])
        return not all(e.compiled_first_block for e in encoders)

    # --- covariates -----------------------------------------------------------------
    def covariate_columns(self, b: CountBatch) -> Tensor | None:
        """The decoder's covariate inputs, (n_cells, n_covariate_columns), or None."""
        c = self.config
        batch_width, *cat_widths = c.one_hot_widths
        parts = [] if not batch_width else [F.one_hot(b.batch, batch_width).float()]
        for j, width in enumerate(cat_widths):
            if width:
                parts.append(F.one_hot(b.cat_covs[:, j], width).float())
        if c.n_continuous_cov:
            parts.append(b.cont_covs)
        return torch.cat(parts, dim=1) if parts else None

    # --- the three steps ------------------------------------------------------------
    def inference(self, b: CountBatch, *, n_samples: int = 1, use_mean: bool = False) -> Inference:
        """q(z | x) and q(l | x); one reparameterized sample unless ``use_mean``. A batch that
        carries its stored posterior (minified data) gives that, with its observed library."""
        if b.posterior is not None:
            qz_m, qz_v = b.posterior
            z = qz_m if use_mean else qz_m + qz_v.sqrt() * torch.randn_like(qz_m)
            return Inference(qz_m, qz_v, z, None, None, b.log_total)
        qz_m, qz_v = self.z_encoder.from_counts(b)
        z = qz_m if use_mean else qz_m + qz_v.sqrt() * torch.randn_like(qz_m)
        if self.l_encoder is None:
            return Inference(qz_m, qz_v, z, None, None, b.log_total)
        ql_m, ql_v = self.l_encoder.from_counts(b)
        ql_m, ql_v = ql_m.squeeze(-1), ql_v.squeeze(-1)
        library = ql_m if use_mean else ql_m + ql_v.sqrt() * torch.randn_like(ql_m)
        return Inference(qz_m, qz_v, z, ql_m, ql_v, library)

    def decoder_input(self, z: Tensor, covariates: Tensor | None) -> Tensor:
        if self.config.latent_distribution == "ln":
            z = torch.softmax(z, dim=-1)
        return z if covariates is None else torch.cat([z, covariates], dim=-1)

    def decode_logits(self, zc: Tensor) -> Tensor:
        """Unnormalized log rate BN(W [z, covariates]), (n_cells, G): linear in z in eval mode."""
        h = self.factor_regressor(zc)
        return h if self.factor_bn is None else self.factor_bn(h)

    def generative(
        self, z: Tensor, library: Tensor, covariates: Tensor | None, batch: Tensor, label: Tensor
    ) -> Generative:
        """p(x | z, l): log rho = log_softmax(BN(W [z, covariates])), log mu = log l + log rho."""
        c = self.config
        zc = self.decoder_input(z, covariates)  # (n_cells, K + C)
        log_rho = torch.log_softmax(self.decode_logits(zc), dim=-1)
        log_mu = library.unsqueeze(-1) + log_rho
        zi_logits = None
        if c.gene_likelihood == "zinb":
            zi_logits = self.zi_regressor(zc)
            if self.zi_bn is not None:
                zi_logits = self.zi_bn(zi_logits)
        log_theta = self.log_theta(zc, batch, label)
        return Generative(log_rho, log_mu, log_theta, zi_logits)

    def log_theta(self, zc: Tensor, batch: Tensor, label: Tensor) -> Tensor | None:
        """log inverse dispersion: (G,) per gene, (n_cells, G) otherwise; None for Poisson."""
        c = self.config
        if c.gene_likelihood == "poisson":
            return None
        if c.dispersion == "gene":
            return self.px_r  # (G,)
        if c.dispersion == "gene-batch":
            return torch.index_select(self.px_r.t(), 0, batch)  # (n_cells, G)
        if c.dispersion == "gene-label":
            return torch.index_select(self.px_r.t(), 0, label)
        return self.px_r_regressor(zc)

    def log_likelihood(self, b: CountBatch, gen: Generative) -> Tensor:
        """log p(x | z, l) per cell, lgamma(x + 1) excluded, (n_cells,)."""
        lik = self.config.gene_likelihood
        if lik == "nb":
            return nb_log_prob(gen.log_mu, gen.log_theta, b.row, b.col, b.flat, b.val)
        if lik == "zinb":
            return zinb_log_prob(gen.log_mu, gen.log_theta, gen.zi_logits, b.row, b.col, b.flat, b.val)
        return poisson_log_prob(gen.log_mu, b.row, b.flat, b.val)

    def kl_divergences(self, b: CountBatch, inf: Inference) -> tuple[Tensor, Tensor]:
        """KL(q(z|x) || N(0, I)) and KL(q(l|x) || N(mean_s, var_s)), each (n_cells,)."""
        kl_z = 0.5 * (inf.qz_v + inf.qz_m.square() - 1.0 - inf.qz_v.log()).sum(-1)
        if inf.ql_m is None:
            return kl_z, torch.zeros_like(kl_z)
        prior_m = torch.index_select(self.library_log_means, 0, b.batch)
        prior_v = torch.index_select(self.library_log_vars, 0, b.batch)
        kl_l = 0.5 * ((prior_v / inf.ql_v).log() + (inf.ql_v + (inf.ql_m - prior_m).square()) / prior_v - 1.0)
        return kl_z, kl_l

    def loss(self, b: CountBatch, kl_weight: float = 1.0) -> LossOutput:
        """mean over cells of -log p(x|z,l) + kl_weight * KL_z + KL_l (scvi-tools' objective)."""
        inf = self.inference(b)
        covariates = self.covariate_columns(b)
        if self.config.gene_likelihood == "nb":
            # The same value as generative + log_likelihood, with the softmax and the NB
            # likelihood fused into one hand-written backward (likelihoods._SoftmaxNB).
            zc = self.decoder_input(inf.z, covariates)
            log_theta = self.log_theta(zc, b.batch, b.label)
            h = self.factor_regressor(zc)
            if _compiled is not None and _compiled.applies(h, self.factor_bn, log_theta):
                ll = _compiled.bn_softmax_nb(h, self.factor_bn, inf.library, log_theta, b.indptr, b.col, b.val)
            else:
                t = h if self.factor_bn is None else self.factor_bn(h)
                ll = nb_log_prob_softmax(t, inf.library, log_theta, b.row, b.col, b.flat, b.val)
        else:
            ll = self.log_likelihood(b, self.generative(inf.z, inf.library, covariates, b.batch, b.label))
        reconstruction = b.lgamma_x1 - ll
        kl_z, kl_l = self.kl_divergences(b, inf)
        loss = (reconstruction + kl_weight * kl_z + kl_l).mean()
        return LossOutput(loss, reconstruction, kl_z, kl_l)


def latent_estimate(qz_m: Tensor, qz_v: Tensor, *, give_mean: bool, mc_samples: int, ln: bool) -> Tensor:
    """A cell's latent value as the queries report it, (n_cells, K): the posterior mean;
    for ``ln`` the Monte Carlo mean of softmax(z) over ``mc_samples``; with
    ``give_mean=False`` one sample (softmax-transformed for ``ln``)."""
    if give_mean and not ln:
        return qz_m
    if give_mean:
        samples = qz_m + qz_v.sqrt() * torch.randn((mc_samples, *qz_m.shape), device=qz_m.device)
        return torch.softmax(samples, dim=-1).mean(0)
    z = qz_m + qz_v.sqrt() * torch.randn_like(qz_m)
    return torch.softmax(z, dim=-1) if ln else z
