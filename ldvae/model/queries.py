"""The queries of :class:`ldvae.LinearSCVI`: each checks that the model is trained and
forwards, by keyword, to :mod:`ldvae.query` with the model's :class:`~ldvae.query.target.Fitted`."""

from __future__ import annotations

import os
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from ..query import de, deviance, posterior, target


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
        *,
        out: str | os.PathLike | None = None,
    ):
        """Latent factors per cell, (n_cells, n_latent).

        ``give_mean``: the posterior mean (for ``latent_distribution="ln"``, the Monte Carlo
        mean of softmax(z) over ``mc_samples``); otherwise one sample. ``return_dist``:
        return ``(mean, variance)`` of q(z|x) instead. ``out``: a ``.npy`` path; the result
        is written there (complete, or not at all) and returned as a read-only memory map.
        Counts on disk (backed ``.h5ad``, ``.zarr``) are read minibatch by minibatch.
        """
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
        s = self.setup_
        names = []
        if self.n_batch > 1:
            names += [f"{s['batch_key']}:{c}" for c in s["batch_categories"]]
        for k in s.get("categorical_covariate_keys", []):
            cats = s["categorical_covariate_categories"][k]
            if len(cats) > 1:
                names += [f"{k}:{c}" for c in cats]
        names += list(s.get("continuous_covariate_keys", []))
        return names

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
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        *,
        out: str | os.PathLike | None = None,
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
        filter_outlier_cells: bool = False,
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
        filter_outlier_cells
            Drop latent-space outliers of each group (elliptic envelope) first.
        **kwargs
            ``n_samples_overall`` (5000 draws per group), ``use_permutation``,
            ``m_permutation``, ``pseudocounts``, ``threshold_counts``, ``test_mode``,
            ``cred_interval_lvls``, as in scvi-tools.

        Returns
        -------
        One row per gene and comparison, sorted by ``proba_de`` (change) or ``bayes_factor``
        (vanilla), with ``comparison``, ``group1`` and ``group2`` columns for group queries.
        """
        return de.differential_expression(
            self._fitted(), adata=adata, groupby=groupby, group1=group1, group2=group2, idx1=idx1, idx2=idx2,
            mode=mode, delta=delta, batch_size=batch_size, all_stats=all_stats, batch_correction=batch_correction,
            batchid1=batchid1, batchid2=batchid2, fdr_target=fdr_target, silent=silent,
            filter_outlier_cells=filter_outlier_cells, **kwargs,
        )

    def get_elbo(self, adata=None, indices=None, batch_size: int | None = None, *, return_mean: bool = True):
        """The evidence lower bound per cell, E_q[log p(x | z, l)] - KL(q || prior), averaged
        over cells (one posterior draw per cell). Not negated: higher is better."""
        return posterior.get_elbo(
            self._fitted(), adata=adata, indices=indices, batch_size=batch_size, return_mean=return_mean,
        )

    def get_reconstruction_error(
        self, adata=None, indices=None, batch_size: int | None = None, *, return_mean: bool = True
    ) -> dict:
        """``{"reconstruction_loss": value}``: log p(x | z, l) at one posterior draw, averaged over
        cells (per cell with ``return_mean=False``). As scvi-tools 1.0/1.1 and its docstring say,
        not negated: higher is better, so it is minus the training history's reconstruction loss."""
        return posterior.get_reconstruction_error(
            self._fitted(), adata=adata, indices=indices, batch_size=batch_size, return_mean=return_mean,
        )

    def get_marginal_ll(
        self, adata=None, indices=None, n_mc_samples: int = 1000, batch_size: int | None = None, *,
        return_mean: bool = True,
    ):
        """Importance-sampled log p(x): log of the mean over ``n_mc_samples`` draws from q of
        p(x, z, l) / q(z, l | x), averaged over cells. A tighter bound than the ELBO that rises
        towards log p(x) as ``n_mc_samples`` grows. Higher is better."""
        return posterior.get_marginal_ll(
            self._fitted(), adata=adata, indices=indices, n_mc_samples=n_mc_samples, batch_size=batch_size,
            return_mean=return_mean,
        )

    def posterior_predictive_sample(
        self, adata=None, indices=None, n_samples: int = 1, gene_list: Sequence[str] | None = None,
        batch_size: int | None = None, *, out: str | os.PathLike | None = None,
    ):
        """Counts drawn from p(x | z, l) with (z, l) drawn from the posterior, as a sparse matrix.

        Returns a ``scipy.sparse.csr_matrix`` (n_cells, n_genes) for ``n_samples=1``, else a
        3-D ``scipy.sparse.coo_array`` (n_cells, n_genes, n_samples) (scvi-tools returns a
        ``sparse.GCXS`` of the same shape). With ``out`` (an ``.h5ad`` path,
        ``n_samples=1``) the counts are appended minibatch by minibatch to the ``X`` of an
        AnnData written there (cell and gene names as obs and var) and that ``X`` is
        returned left on disk (an anndata CSR dataset; slice it to read rows).
        """
        return posterior.posterior_predictive_sample(
            self._fitted(), adata=adata, indices=indices, n_samples=n_samples, gene_list=gene_list,
            batch_size=batch_size, out=out,
        )

    def get_likelihood_parameters(
        self, adata=None, indices=None, n_samples: int = 1, give_mean: bool = False, batch_size: int | None = None,
        *, out: str | os.PathLike | None = None,
    ) -> dict[str, np.ndarray]:
        """Parameters of p(x | z, l) at posterior draws: ``"mean"`` (mu), ``"dispersions"``
        (theta; NB and ZINB) and ``"dropout"`` (pi, ZINB), each (n_cells, n_genes), or
        (n_samples, n_cells, n_genes) for ``n_samples > 1`` unless ``give_mean``. With
        ``out`` (a directory) each is written to ``out/<key>.npy`` minibatch by minibatch
        and returned as a read-only memory map."""
        return posterior.get_likelihood_parameters(
            self._fitted(), adata=adata, indices=indices, n_samples=n_samples, give_mean=give_mean,
            batch_size=batch_size, out=out,
        )

    def get_latent_library_size(
        self, adata=None, indices=None, give_mean: bool = True, batch_size: int | None = None
    ) -> np.ndarray:
        """Library size l per cell, (n_cells, 1): the posterior mean exp(m + v/2) of q(l | x), or
        with ``give_mean=False`` one draw (the observed total count when the library is observed)."""
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

    # --- results into AnnData ---------------------------------------------------------------
    def write_results(self, adata=None, *, key_added: str = "ldvae", obs_columns: bool = False, copy: bool = False):
        """Write latent means, loadings and parameters into ``adata`` (scanpy style).

        See :func:`ldvae.data.results.write_results` for the fields written.
        """
        from ..data.results import write_results

        return write_results(self, adata, key_added=key_added, obs_columns=obs_columns, copy=copy)
