"""The queries of :class:`ldvae.LinearSCVI`: each checks that the model is trained and
forwards, by keyword, to :mod:`ldvae.query` with the model's :class:`~ldvae.query.target.Fitted`."""

from __future__ import annotations

import logging
import os
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch

from torch import Tensor

from ..query import de, deviance, posterior, target
from ..util.checks import SetupError
from ..util.settings import settings
from .params import covariate_names

logger = logging.getLogger(__name__)


class Queries:
    """Posterior queries, loadings and results of a trained model; ``LinearSCVI`` supplies
    ``_fitted()``, ``module``, ``var_names_`` and ``setup_``."""

    def get_latent_representation(
        self,
        adata=None,
        indices=None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
        dataloader=None,
        *,
        out: str | os.PathLike | None = None,
        **data_loader_kwargs,
    ):
        """Latent factors per cell, (n_cells, n_latent).

        ``give_mean``: the posterior mean (for ``latent_distribution="ln"``, the Monte Carlo
        mean of softmax(z) over ``mc_samples``); otherwise one sample. ``return_dist``:
        return ``(mean, variance)`` of q(z|x) instead. ``out``: a ``.npy`` path; the result
        is written there (complete, or not at all) and returned as a read-only memory map.
        Counts on disk (backed ``.h5ad``, ``.zarr``) are read minibatch by minibatch.
        """
        batch_size = _loader(dataloader, data_loader_kwargs, batch_size)
        return posterior.get_latent_representation(
            self._fitted(), adata=adata, indices=indices, give_mean=give_mean, mc_samples=mc_samples,
            batch_size=batch_size, return_dist=return_dist, out=out,
        )

    def get_loadings(self) -> pd.DataFrame:
        """Loadings W: genes x ``Z_0 … Z_{K-1}``, batch-norm scale gamma/sqrt(var + eps) folded in.

        Decoding z + e_k minus decoding z, in unnormalized log-rate space, equals column k.
        Covariate columns are in :meth:`get_covariate_coefficients`.
        """
        return target.factor_loadings(self.module, self.var_names_)

    def get_gene_intercepts(self) -> pd.Series:
        """Per-gene intercept of the unnormalized log rate (batch-norm shift and bias), at z = 0."""
        return target.gene_intercepts(self.module, self.var_names_)

    def covariate_column_names(self) -> list[str]:
        """The decoder's covariate columns (``batch:A``, ...), as :meth:`get_covariate_coefficients` names them."""
        return covariate_names(self.setup_)

    def get_covariate_coefficients(self) -> pd.DataFrame:
        """Decoder coefficients of batch and covariates (genes x columns such as ``batch:A``),
        on the same scale as the loadings: the log-rate effect of that category (or of one
        unit of a continuous covariate)."""
        return target.covariate_coefficients(self.module, self.var_names_, self.covariate_column_names())

    # --- posterior queries (ldvae.query.posterior, ldvae.query.de) ---
    # Each query streams over cells in minibatches, accepts ``indices`` (positions or a boolean
    # mask) and runs under ``ldvae.settings.seed``, so repeating a call repeats its draws.
    def get_normalized_expression(
        self,
        adata=None,
        indices=None,
        transform_batch=None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        weights: Literal["uniform", "importance"] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        silent: bool = True,
        dataloader=None,
        data_loader_kwargs: dict | None = None,
        *,
        out: str | os.PathLike | None = None,
        **importance_weighting_kwargs,
    ) -> np.ndarray | pd.DataFrame:
        """Normalized expression rho (sums to 1 over genes) times ``library_size``.

        Parameters
        ----------
        adata, indices
            Cells to query (default: all cells of the training AnnData).
        transform_batch
            Decode every cell as if it came from this batch category (or average over a list
            of categories); None decodes each cell in its observed batch.
        gene_list
            Return only these genes (in the model's gene order).
        library_size
            Scale of rho; ``"latent"`` returns the likelihood mean mu = l * rho with the
            cell's posterior library size.
        n_samples
            Draws of (z, l) from the posterior per cell.
        n_samples_overall
            Draw one sample from each of this many cells chosen at random (with replacement)
            among ``indices``; rows are those cells.
        batch_size
            Cells per minibatch (default: about 8M dense entries per minibatch).
        weights
            ``"uniform"`` (None): every draw counts the same; ``"importance"``: the draws are
            reweighted by :meth:`get_importance_weights` towards latent codes that explain
            many of the cells (needs ``n_samples > 1`` and ``return_mean``; keywords of
            ``get_importance_weights`` go in ``importance_weighting_kwargs``).
        return_mean
            Average over the ``n_samples`` draws.
        return_numpy
            NumPy instead of a DataFrame (cells x genes). With ``n_samples > 1`` and
            ``return_mean=False`` the result is always an array (n_samples, n_cells, n_genes).
        out
            A ``.npy`` path: the result is filled there minibatch by minibatch (under a
            temporary name, renamed when complete) and returned as a read-only memory map,
            so it need not fit in memory. With counts on disk, the counts are read the same
            way; ``return_numpy=False`` is refused.
        """
        batch_size = _loader(dataloader, data_loader_kwargs, batch_size)
        if weights == "importance" and n_samples_overall is not None:
            from ..query.importance import weighted_expression

            self._refuse_if_minified("weights='importance'")
            return weighted_expression(
                self._fitted(), adata=adata, indices=indices, transform_batch=transform_batch, gene_list=gene_list,
                library_size=library_size, n_samples_overall=n_samples_overall, batch_size=batch_size,
                return_numpy=return_numpy, **importance_weighting_kwargs)
        if weights == "importance":  # as scvi-tools: the weights choose among draws of n_samples_overall
            weights = "uniform"
        if weights not in (None, "uniform"):
            raise ValueError(f"weights must be 'uniform', 'importance' or None, got {weights!r}.")
        if importance_weighting_kwargs:
            raise TypeError(f"get_normalized_expression got unknown arguments {sorted(importance_weighting_kwargs)}.")
        return posterior.get_normalized_expression(
            self._fitted(), adata=adata, indices=indices, transform_batch=transform_batch, gene_list=gene_list,
            library_size=library_size, n_samples=n_samples, n_samples_overall=n_samples_overall,
            batch_size=batch_size, return_mean=return_mean, return_numpy=return_numpy, out=out,
        )

    def differential_expression(
        self,
        adata=None,
        groupby: str | None = None,
        group1=None,
        group2=None,
        idx1=None,
        idx2=None,
        mode: Literal["vanilla", "change"] = "vanilla",
        delta: float | None = 0.25,
        batch_size: int | None = None,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1=None,
        batchid2=None,
        fdr_target: float = 0.05,
        silent: bool = False,
        weights: Literal["uniform", "importance"] | None = "uniform",
        filter_outlier_cells: bool = False,
        importance_weighting_kwargs: dict | None = None,
        dataloader=None,
        **kwargs,
    ) -> pd.DataFrame:
        """Bayesian differential expression between two groups of cells (see :mod:`ldvae.query.de`).

        Parameters
        ----------
        adata
            AnnData holding the cells and ``groupby`` (default: the training AnnData).
        groupby, group1, group2
            An ``adata.obs`` column and its groups: ``group1`` one group or a list (default:
            every group, one at a time); ``group2`` None compares with all other cells.
        idx1, idx2
            Instead of groups: boolean masks, cell positions or ``adata.obs.query`` strings.
        mode
            ``"vanilla"`` (Bayes factor of rho_1 > rho_2) or ``"change"`` (posterior
            probability that |log2 fold change| >= ``delta``, with FDR calls).
        delta
            LFC threshold of ``"change"`` mode; None estimates it from the LFC distribution.
        batch_size
            Cells per minibatch.
        all_stats
            Add per-group ``raw_mean``, ``non_zeros_proportion``, ``raw_normalized_mean``.
        batch_correction, batchid1, batchid2
            Decode each draw in every batch (or in ``batchid1``/``batchid2``) and pair draws
            decoded in the same batch.
        fdr_target
            Posterior expected FDR of the ``is_de_fdr_<fdr_target>`` calls (``"change"`` mode).
        silent
            No log line per comparison.
        weights, importance_weighting_kwargs
            ``"importance"``: each group's draws reweighted as in ``get_normalized_expression``.
        filter_outlier_cells
            Drop latent-space outliers of each group (elliptic envelope) first.
        dataloader
            Not supported; pass ``adata`` (and groups or cell indices).
        **kwargs
            ``n_samples_overall`` (5000 draws per group), ``use_permutation``,
            ``m_permutation``, ``pseudocounts``, ``threshold_counts``, ``test_mode``,
            ``cred_interval_lvls``, as in scvi-tools.

        Returns
        -------
        One row per gene and comparison, sorted by ``proba_de`` (change) or ``bayes_factor``
        (vanilla), with ``comparison``, ``group1`` and ``group2`` columns for group queries.
        """
        _loader(dataloader, None, None)
        if weights not in (None, "uniform", "importance"):
            raise ValueError(f"weights must be 'uniform', 'importance' or None, got {weights!r}.")
        if weights == "importance":
            kwargs["importance"] = dict(importance_weighting_kwargs or {})
        return de.differential_expression(
            self._fitted(), adata=adata, groupby=groupby, group1=group1, group2=group2, idx1=idx1, idx2=idx2,
            mode=mode, delta=delta, batch_size=batch_size, all_stats=all_stats, batch_correction=batch_correction,
            batchid1=batchid1, batchid2=batchid2, fdr_target=fdr_target, silent=silent,
            filter_outlier_cells=filter_outlier_cells, **kwargs,
        )

    def get_elbo(
        self, adata=None, indices=None, batch_size: int | None = None, dataloader=None, return_mean: bool = True,
        data_loader_kwargs: dict | None = None, **kwargs,
    ) -> Tensor:
        """The evidence lower bound E_q[log p(x | z, l)] - KL(q || prior), one posterior draw per
        cell: a 0-d tensor of its mean over cells, or per cell (``return_mean=False``). Not
        negated: higher is better (as scvi-tools)."""
        self._refuse_if_minified("get_elbo")
        batch_size = _loader(dataloader, data_loader_kwargs, batch_size, kwargs)
        return posterior.get_elbo(
            self._fitted(), adata=adata, indices=indices, batch_size=batch_size, return_mean=return_mean,
        )

    def get_reconstruction_error(
        self, adata=None, indices=None, batch_size: int | None = None, dataloader=None, return_mean: bool = True,
        data_loader_kwargs: dict | None = None, **kwargs,
    ) -> dict[str, Tensor]:
        """``{"reconstruction_loss": value}``: -log p(x | z, l) at one posterior draw, a 0-d
        tensor of its mean over cells (per cell with ``return_mean=False``). A loss, lower is
        better, as scvi-tools >= 1.2 returns it (and as the training history records it)."""
        self._refuse_if_minified("get_reconstruction_error")
        batch_size = _loader(dataloader, data_loader_kwargs, batch_size, kwargs)
        return posterior.get_reconstruction_error(
            self._fitted(), adata=adata, indices=indices, batch_size=batch_size, return_mean=return_mean,
        )

    def get_marginal_ll(
        self, adata=None, indices=None, n_mc_samples: int = 1000, batch_size: int | None = None,
        return_mean: bool = True, dataloader=None, data_loader_kwargs: dict | None = None, **kwargs,
    ) -> float | Tensor:
        """Importance-sampled log p(x): log of the mean over ``n_mc_samples`` draws from q of
        p(x, z, l) / q(z, l | x); its mean over cells as a float, or a tensor per cell. A
        tighter bound than the ELBO that rises towards log p(x) with ``n_mc_samples``. Higher
        is better. ``n_mc_samples_per_pass`` is accepted; ldvae sizes its passes by memory."""
        self._refuse_if_minified("get_marginal_ll")
        kwargs.pop("n_mc_samples_per_pass", None)
        batch_size = _loader(dataloader, data_loader_kwargs, batch_size, kwargs)
        return posterior.get_marginal_ll(
            self._fitted(), adata=adata, indices=indices, n_mc_samples=n_mc_samples, batch_size=batch_size,
            return_mean=return_mean,
        )

    def posterior_predictive_sample(
        self, adata=None, indices=None, transform_batch=None, n_samples: int = 1,
        gene_list: Sequence[str] | None = None, batch_size: int | None = None, dataloader=None, silent: bool = True,
        *, out: str | os.PathLike | None = None, **data_loader_kwargs,
    ):
        """Counts drawn from p(x | z, l) with (z, l) drawn from the posterior, as a sparse array
        (n_cells, n_genes), or (n_cells, n_genes, n_samples) for ``n_samples > 1``;
        ``transform_batch``: decoded as if every cell came from that batch.

        The array is a ``sparse.GCXS`` (as scvi-tools) when the ``sparse`` package is
        installed, else a ``scipy.sparse.csr_matrix`` (2-D) or ``coo_array`` (3-D). With ``out`` (an ``.h5ad`` path,
        ``n_samples=1``) the counts are appended minibatch by minibatch to the ``X`` of an
        AnnData written there (cell and gene names as obs and var) and that ``X`` is
        returned left on disk (an anndata CSR dataset; slice it to read rows).
        """
        batch_size = _loader(dataloader, data_loader_kwargs, batch_size)
        return posterior.posterior_predictive_sample(
            self._fitted(), adata=adata, indices=indices, transform_batch=transform_batch, n_samples=n_samples,
            gene_list=gene_list, batch_size=batch_size, out=out,
        )

    def get_likelihood_parameters(
        self, adata=None, indices=None, n_samples: int = 1, give_mean: bool = False, batch_size: int | None = None,
        dataloader=None, *, out: str | os.PathLike | None = None, **data_loader_kwargs,
    ) -> dict[str, np.ndarray]:
        """Parameters of p(x | z, l) at posterior draws: ``"mean"`` (mu), ``"dispersions"``
        (theta; NB and ZINB) and ``"dropout"`` (pi, ZINB), each (n_cells, n_genes), or
        (n_samples, n_cells, n_genes) for ``n_samples > 1`` unless ``give_mean``. With
        ``out`` (a directory) each is written to ``out/<key>.npy`` minibatch by minibatch
        and returned as a read-only memory map."""
        batch_size = _loader(dataloader, data_loader_kwargs, batch_size)
        return posterior.get_likelihood_parameters(
            self._fitted(), adata=adata, indices=indices, n_samples=n_samples, give_mean=give_mean,
            batch_size=batch_size, out=out,
        )

    def get_latent_library_size(
        self, adata=None, indices=None, give_mean: bool = True, batch_size: int | None = None, dataloader=None,
        **data_loader_kwargs,
    ) -> np.ndarray:
        """Library size l per cell, (n_cells, 1): the posterior mean exp(m + v/2) of q(l | x), or
        with ``give_mean=False`` one draw (the observed total count when the library is observed)."""
        batch_size = _loader(dataloader, data_loader_kwargs, batch_size)
        return posterior.get_latent_library_size(
            self._fitted(), adata=adata, indices=indices, give_mean=give_mean, batch_size=batch_size,
        )

    def get_feature_correlation_matrix(
        self,
        adata=None,
        indices=None,
        n_samples: int = 10,
        batch_size: int = 64,
        rna_size_factor: int = 1000,
        transform_batch=None,
        correlation_type: Literal["spearman", "pearson"] = "spearman",
        silent: bool = True,
    ) -> pd.DataFrame:
        """Gene x gene correlation of denoised expression: the Gamma part of the NB at library
        ``rna_size_factor`` (the rate itself for Poisson), over cells and ``n_samples`` draws;
        averaged over the batches of ``transform_batch``. Dense (n_cells * n_samples, n_genes)
        draws are held while it computes."""
        return posterior.get_feature_correlation_matrix(
            self._fitted(), adata=adata, indices=indices, n_samples=n_samples, batch_size=batch_size,
            rna_size_factor=rna_size_factor, transform_batch=transform_batch, correlation_type=correlation_type,
        )

    def get_factor_deviance(self, adata=None, indices=None, *, batch_size: int | None = None) -> pd.DataFrame:
        """Deviance explained per factor on the count scale, factors ordered by it, with the
        sign that makes each factor's largest loading positive. See
        :func:`ldvae.query.deviance.factor_deviance`; the loadings are not changed."""
        return deviance.factor_deviance(self._fitted(), adata=adata, indices=indices, batch_size=batch_size)

    # --- aggregated posterior and differential abundance ---
    def get_aggregated_posterior(
        self, adata=None, indices=None, batch_size: int | None = None, dof: float | None = 3.0,
    ) -> torch.distributions.Distribution:
        """The aggregated posterior of the cells ``indices``: an equal-weight mixture over cells
        of q(z | x) with each cell's mean and scale (standard deviation), as Student-t
        components with ``dof`` degrees of freedom (None: normal components)."""
        mean, var = self.get_latent_representation(adata, indices, return_dist=True, batch_size=batch_size)
        loc = torch.as_tensor(mean, dtype=torch.float32)
        scale = torch.as_tensor(var, dtype=torch.float32).sqrt()
        components = torch.distributions.Normal(loc, scale) if dof is None else torch.distributions.StudentT(
            dof, loc, scale)
        return torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(logits=torch.zeros(loc.shape[0])),
            torch.distributions.Independent(components, 1),
        )

    def differential_abundance(
        self, adata=None, adata_sub=None, sample_key: str | None = None, batch_size: int = 128,
        num_cells_posterior: int | None = None, dof: float | None = None, dataloader=None,
    ) -> pd.DataFrame:
        """Log density of each cell of ``adata_sub`` (default ``adata``) under the aggregated
        posterior of each sample (``adata.obs[sample_key]``; at most ``num_cells_posterior``
        random cells per sample): cells x samples, also written to ``adata_sub.obsm["da_log_probs"]``."""
        _loader(dataloader, None, None)
        full = self.adata if adata is None else adata
        sub = full if adata_sub is None else adata_sub
        if sample_key is None or sample_key not in full.obs:
            raise SetupError(f"sample_key must name a column of adata.obs, got {sample_key!r}.")
        z = torch.as_tensor(self.get_latent_representation(sub, batch_size=batch_size), dtype=torch.float32)
        rng = np.random.default_rng(settings.seed)
        samples = full.obs[sample_key]
        names = list(pd.unique(samples))
        columns = {}
        for name in names:
            cells = np.flatnonzero((samples == name).to_numpy())
            if num_cells_posterior is not None and num_cells_posterior < cells.size:
                cells = np.sort(rng.choice(cells, num_cells_posterior, replace=False))
            ap = self.get_aggregated_posterior(full, cells, batch_size=batch_size, dof=dof)
            columns[name] = torch.cat([ap.log_prob(chunk) for chunk in z.split(batch_size)]).numpy()
        table = pd.DataFrame(columns, index=sub.obs_names.copy())
        sub.obsm["da_log_probs"] = table
        return table

    # --- importance weights (ldvae.query.importance) ---
    def get_importance_weights(
        self, adata, indices, qz, px, zs, max_cells: int = 1024, truncation: bool = False, n_mc_samples: int = 500,
        n_mc_samples_per_pass: int = 250, **data_loader_kwargs,
    ) -> np.ndarray:
        """Self-normalized importance weights of posterior draws ``zs`` ((n_samples, n_cells, K)
        or (n_draws, K)) for the cells ``indices`` of ``adata``: draws that explain many of the
        cells weigh more (see :mod:`ldvae.query.importance`). ``qz``: a
        ``torch.distributions.Normal`` of q(z | x) of those cells; ``px``: their
        :class:`~ldvae.query.importance.CountDistribution` (from
        :func:`ldvae.query.importance.draw`). ``n_mc_samples`` draws estimate each anchor's
        log p(x); ``n_mc_samples_per_pass`` is accepted (ldvae sizes passes by memory)."""
        from ..query.importance import importance_weights

        self._refuse_if_minified("get_importance_weights")
        _loader(None, data_loader_kwargs, None)
        fitted = self._fitted()
        n_cells = (self.adata if adata is None else adata).n_obs
        cells = np.arange(n_cells) if indices is None else np.asarray(indices)
        zs = torch.as_tensor(zs)
        with target.querying(fitted):
            return importance_weights(
                fitted, adata, cells, qz.loc, qz.scale.square(), px, zs.reshape(-1, zs.shape[-1]),
                max_cells=max_cells, truncation=truncation, n_mc_samples=n_mc_samples,
                rng=np.random.default_rng(settings.seed))

    # --- results into AnnData ---------------------------------------------------------------
    def write_results(self, adata=None, *, key_added: str = "ldvae", obs_columns: bool = False, copy: bool = False):
        """Write latent means, loadings and parameters into ``adata`` (scanpy style).

        See :func:`ldvae.data.results.write_results` for the fields written.
        """
        from ..data.results import write_results

        return write_results(self, adata, key_added=key_added, obs_columns=obs_columns, copy=copy)


def _loader(dataloader, data_loader_kwargs: dict | None, batch_size: int | None, forward_kwargs: dict | None = None):
    """scvi-tools' data-loader arguments of a query: ldvae reads cells from AnnData, so a
    ``dataloader`` is refused; ``data_loader_kwargs``' ``batch_size`` is used, the rest logged.
    Returns the batch size."""
    if dataloader is not None:
        raise SetupError("dataloader is not supported: ldvae reads the cells from AnnData; pass adata= and indices=.")
    if forward_kwargs:
        raise TypeError(f"unknown arguments {sorted(forward_kwargs)}: ldvae's module takes no forward options.")
    kwargs = dict(data_loader_kwargs or {})
    batch_size = kwargs.pop("batch_size", batch_size)
    if kwargs:
        logger.info("data loader options %s are not used: ldvae gathers minibatches on the device itself.",
                    sorted(kwargs))
    return batch_size
