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

This file imports only torch and never sees AnnData or NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .likelihoods import nb_log_prob, poisson_log_prob, zinb_log_prob

Dispersion = Literal["gene", "gene-batch", "gene-label", "gene-cell"]
GeneLikelihood = Literal["nb", "zinb", "poisson"]
LatentDistribution = Literal["normal", "ln"]

# scvi-tools' FCLayers use these batch-norm settings; keeping them keeps fits comparable.
BN_MOMENTUM = 0.01
BN_EPS = 1e-3
VAR_EPS = 1e-4


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
    def n_covariate_columns(self) -> int:
        """Decoder input columns after z: one-hot batch, one-hot categorical covariates,
        continuous covariates. A factor with a single category adds no column (as in scvi-tools)."""
        cats = [self.n_batch, *self.n_cats_per_cov]
        return sum(n for n in cats if n > 1) + self.n_continuous_cov


@dataclass(frozen=True)
class CountBatch:
    """A minibatch on the compute device. ``x`` dense; the nonzeros also as coordinates."""

    x: Tensor  # (n_cells, n_genes) counts
    row: Tensor  # (nnz,) cell within the batch
    col: Tensor  # (nnz,) gene
    flat: Tensor  # (nnz,) row * n_genes + col
    val: Tensor  # (nnz,) count
    batch: Tensor  # (n_cells,) batch code
    label: Tensor  # (n_cells,) label code
    cat_covs: Tensor | None  # (n_cells, n_cat_covs) codes
    cont_covs: Tensor | None  # (n_cells, n_cont_covs)
    log_total: Tensor  # (n_cells,) log of the cell's total count
    lgamma_x1: Tensor  # (n_cells,) sum_g lgamma(x + 1), the parameter-free likelihood term

    @property
    def n_cells(self) -> int:
        return self.x.shape[0]


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
        self.mean = nn.Linear(n_hidden, n_out)
        self.var = nn.Linear(n_hidden, n_out)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.after_first_linear(self.trunk[0](h))

    def after_first_linear(self, h1: Tensor) -> tuple[Tensor, Tensor]:
        """The rest of the encoder, from the output of its first Linear (see
        ``LDVAEModule.inference``, which computes that layer for both encoders at once)."""
        for layer in self.trunk[1:]:
            h1 = layer(h1)
        return self.mean(h1), self.var(h1).exp() + VAR_EPS


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

    # --- covariates -----------------------------------------------------------------
    def covariate_columns(self, b: CountBatch) -> Tensor | None:
        """The decoder's covariate inputs, (n_cells, n_covariate_columns), or None."""
        c = self.config
        parts = []
        if c.n_batch > 1:
            parts.append(F.one_hot(b.batch, c.n_batch).float())
        for j, n in enumerate(c.n_cats_per_cov):
            if n > 1:
                parts.append(F.one_hot(b.cat_covs[:, j], n).float())
        if c.n_continuous_cov:
            parts.append(b.cont_covs)
        return torch.cat(parts, dim=1) if parts else None

    # --- the three steps ------------------------------------------------------------
    def inference(self, b: CountBatch, *, n_samples: int = 1, use_mean: bool = False) -> Inference:
        """q(z | x) and q(l | x); one reparameterized sample unless ``use_mean``."""
        h = torch.log1p(b.x)  # (n_cells, G)
        if self.l_encoder is None:
            qz_m, qz_v = self.z_encoder(h)
            z = qz_m if use_mean else qz_m + qz_v.sqrt() * torch.randn_like(qz_m)
            return Inference(qz_m, qz_v, z, None, None, b.log_total)
        # Both encoders read log1p(x): their first layers run as one (G -> 2H) matmul, the
        # costliest product of a step, with the two parameter sets kept separate.
        first_z, first_l = self.z_encoder.trunk[0], self.l_encoder.trunk[0]
        weight = torch.cat([first_z.weight, first_l.weight])  # (H_z + H_l, G)
        bias = torch.cat([first_z.bias, first_l.bias])
        h_z, h_l = F.linear(h, weight, bias).split([first_z.out_features, first_l.out_features], dim=1)
        qz_m, qz_v = self.z_encoder.after_first_linear(h_z)
        z = qz_m if use_mean else qz_m + qz_v.sqrt() * torch.randn_like(qz_m)
        ql_m, ql_v = self.l_encoder.after_first_linear(h_l)
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
        log_theta = None
        if c.gene_likelihood != "poisson":
            if c.dispersion == "gene":
                log_theta = self.px_r  # (G,)
            elif c.dispersion == "gene-batch":
                log_theta = torch.index_select(self.px_r.t(), 0, batch)  # (n_cells, G)
            elif c.dispersion == "gene-label":
                log_theta = torch.index_select(self.px_r.t(), 0, label)
            else:
                log_theta = self.px_r_regressor(zc)
        return Generative(log_rho, log_mu, log_theta, zi_logits)

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
        prior_m = self.library_log_means[b.batch]
        prior_v = self.library_log_vars[b.batch]
        kl_l = 0.5 * ((prior_v / inf.ql_v).log() + (inf.ql_v + (inf.ql_m - prior_m).square()) / prior_v - 1.0)
        return kl_z, kl_l

    def loss(self, b: CountBatch, kl_weight: float = 1.0) -> LossOutput:
        """mean over cells of -log p(x|z,l) + kl_weight * KL_z + KL_l (scvi-tools' objective)."""
        inf = self.inference(b)
        gen = self.generative(inf.z, inf.library, self.covariate_columns(b), b.batch, b.label)
        reconstruction = b.lgamma_x1 - self.log_likelihood(b, gen)
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
