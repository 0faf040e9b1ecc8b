"""``LinearSCVI``: the user-facing model. It owns the AnnData contract (genes,
categories and setup recorded at construction) and delegates the math to
``LDVAEModule`` and the fitting to ``train.fit``."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch

from ._version import __version__
from .data.contract import (
    CountData,
    SetupError,
    check_not_view,
    get_counts,
    get_setup,
    library_prior,
    plain,
    read_covariates,
    to_csr,
    validate_counts,
)
from .data.setup import setup_anndata
from .nn.module import LDVAEModule, ModuleConfig
from .data.backed import counts_on_disk, is_on_disk, library_prior_on_disk, read_into_memory
from .train.streaming import StreamingSource
from .train.optim import check_state_dict
from .train.loop import (
    InMemorySource,
    ModelFileError,
    TrainConfig,
    TrainState,
    check_history,
    check_weights,
    fit,
    load_checkpoint,
    split_indices,
)

logger = logging.getLogger(__name__)

MODEL_JSON = "ldvae_model.json"
MODEL_WEIGHTS = "model_state.pt"
ADATA_FILE = "adata.h5ad"
FORMAT_VERSION = 1


class NotTrainedError(RuntimeError):
    """A query was made on a model that has not been trained."""


class Settings:
    """Package-wide defaults, as ``scvi.settings``: ``ldvae.settings.seed = 0``."""

    seed: int = 0


settings = Settings()

_CHOICES = {
    "dispersion": ("gene", "gene-batch", "gene-label", "gene-cell"),
    "gene_likelihood": ("nb", "zinb", "poisson"),
    "latent_distribution": ("normal", "ln"),
}


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_number(name: str, value, *, zero_allowed: bool = False) -> None:
    """A finite real number > 0 (>= 0 with ``zero_allowed``)."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(value)
        and (value > 0 or (zero_allowed and value == 0))
    )
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>=' if zero_allowed else '>'} 0, got {value!r}.")


def _check_plan(plan: dict) -> None:
    """The optimizer and KL warm-up settings of ``train``, before any step uses them."""
    for name in ("lr", "eps"):
        if name in plan:
            _check_number(name, plan[name])
    if "weight_decay" in plan:
        _check_number("weight_decay", plan["weight_decay"], zero_allowed=True)
    for name in ("n_epochs_kl_warmup", "n_steps_kl_warmup"):
        value = plan.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
            raise ValueError(f"{name} must be None or an integer >= 0, got {value!r}.")


_BOOL_PARAMS = ("use_observed_lib_size", "use_batch_norm", "bias")


def _check_init_params(params: dict) -> None:
    """The constructor's settings (those present in ``params``): a ValueError naming the
    first invalid one."""
    for name in ("n_hidden", "n_latent", "n_layers"):
        if name in params:
            _check_positive_int(name, params[name])
    if "dropout_rate" in params:
        rate = params["dropout_rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) or not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {rate!r}.")
    for name, allowed in _CHOICES.items():
        if name in params and params[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {params[name]!r}.")
    for name in _BOOL_PARAMS:
        if name in params and not isinstance(params[name], bool):
            raise ValueError(f"{name} must be True or False, got {params[name]!r}.")


def resolve_device(accelerator: str = "auto", device: int | str | None = None) -> torch.device:
    """'auto' -> the first CUDA GPU when there is one, else CPU; 'gpu'/'cuda' or 'cpu' force it."""
    acc = accelerator.lower()
    if acc not in ("auto", "cpu", "gpu", "cuda"):
        raise ValueError(f"accelerator must be 'auto', 'cpu', 'gpu' or 'cuda', got {accelerator!r}.")
    if acc == "cpu":
        return torch.device("cpu")
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"accelerator={accelerator!r} but no CUDA GPU is available; use accelerator='cpu'.")
    if torch.cuda.is_available():
        index = device if isinstance(device, int) else 0
        return torch.device("cuda", index)
    return torch.device("cpu")


class LinearSCVI:
    """Linearly decoded VAE (Svensson et al. 2020) with the API of scvi-tools' ``LinearSCVI``.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`setup_anndata`.
    n_hidden
        Hidden units of the encoders.
    n_latent
        Number of latent factors K.
    n_layers
        Hidden layers of the z encoder.
    dropout_rate
        Dropout in the encoders.
    dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``.
    gene_likelihood
        ``"nb"``, ``"zinb"`` or ``"poisson"``.
    use_observed_lib_size
        Use log total counts as the library instead of learning it.
    latent_distribution
        ``"normal"`` or ``"ln"`` (logistic normal: the decoder sees softmax(z)).
    use_batch_norm
        Batch normalization in the decoder (the loadings fold its scale in).
    bias
        A per-gene bias in the decoder's linear map.
    """

    def __init__(
        self,
        adata,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        gene_likelihood: Literal["nb", "zinb", "poisson"] = "nb",
        use_observed_lib_size: bool = False,
        latent_distribution: Literal["normal", "ln"] = "normal",
        use_batch_norm: bool = True,
        bias: bool = False,
        **model_kwargs,
    ):
        if model_kwargs:
            raise TypeError(f"LinearSCVI got unexpected keyword arguments: {sorted(model_kwargs)}.")
        _check_init_params(dict(
            n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate,
            dispersion=dispersion, gene_likelihood=gene_likelihood, latent_distribution=latent_distribution,
        ))
        self.init_params_ = dict(
            n_hidden=int(n_hidden),
            n_latent=int(n_latent),
            n_layers=int(n_layers),
            dropout_rate=float(dropout_rate),
            dispersion=dispersion,
            gene_likelihood=gene_likelihood,
            use_observed_lib_size=bool(use_observed_lib_size),
            latent_distribution=latent_distribution,
            use_batch_norm=bool(use_batch_norm),
            bias=bool(bias),
        )
        self.adata = adata
        self.setup_ = get_setup(adata)
        if dispersion == "gene-label" and "labels_key" not in self.setup_:
            raise ValueError("dispersion='gene-label' needs labels: run setup_anndata(..., labels_key=...).")
        self.var_names_ = pd.Index(adata.var_names.astype(str))
        self._data_cache: tuple[int, CountData] | None = None
        if counts_on_disk(adata, self.setup_):  # backed AnnData: one streaming pass (ldvae.data.stream)
            means, variances = library_prior_on_disk(adata, self.setup_, self.n_batch)
        else:
            csr, cov = self._read(adata)
            means, variances = library_prior(csr, cov.batch, self.n_batch)
        torch.manual_seed(settings.seed)
        self.module = LDVAEModule(self._module_config(), torch.as_tensor(means), torch.as_tensor(variances))
        self.module.eval()
        self.device = torch.device("cpu")
        self.train_state_: TrainState | None = None
        self.is_trained_ = False

    # --- the AnnData contract ---------------------------------------------------------------
    @staticmethod
    def setup_anndata(
        adata,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
    ) -> None:
        """Check raw counts and covariates; record the choices in ``adata.uns["ldvae_setup"]``.

        See :func:`ldvae.data.contract.setup_anndata` for the fields written.
        """
        setup_anndata(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            categorical_covariate_keys=list(categorical_covariate_keys) if categorical_covariate_keys else None,
            continuous_covariate_keys=list(continuous_covariate_keys) if continuous_covariate_keys else None,
        )

    @property
    def n_batch(self) -> int:
        return len(self.setup_.get("batch_categories", ["0"]))

    @property
    def n_labels(self) -> int:
        return len(self.setup_.get("label_categories", ["0"]))

    def _module_config(self) -> ModuleConfig:
        s = self.setup_
        cats = s.get("categorical_covariate_categories", {})
        return ModuleConfig(
            n_genes=len(self.var_names_),
            n_batch=self.n_batch,
            n_labels=self.n_labels,
            n_cats_per_cov=tuple(len(cats[k]) for k in s.get("categorical_covariate_keys", [])),
            n_continuous_cov=len(s.get("continuous_covariate_keys", [])),
            **self.init_params_,
        )

    def _check_genes(self, adata) -> None:
        names = pd.Index(adata.var_names.astype(str))
        if len(names) != len(self.var_names_) or not names.equals(self.var_names_):
            n = min(len(names), len(self.var_names_))
            diff = np.flatnonzero(names[:n] != self.var_names_[:n])
            where = (
                f"first mismatch at position {diff[0]}: model has {self.var_names_[diff[0]]!r}, "
                f"adata has {names[diff[0]]!r}"
                if diff.size
                else f"model has {len(self.var_names_)} genes, adata has {len(names)}"
            )
            raise SetupError(
                f"adata's genes differ from the model's ({where}). Subset adata to the model's genes: "
                "adata[:, model.var_names_]."
            )

    def _read(self, adata):
        """Validated CSR counts and covariates of ``adata`` under the model's setup."""
        self._check_genes(adata)
        layer = self.setup_.get("layer")
        mat = get_counts(adata, layer)
        if is_on_disk(mat):  # a query without a streaming path loads the counts
            mat = read_into_memory(mat)
        validate_counts(adata, mat, layer)
        csr = to_csr(mat)
        empty = int((np.diff(csr.indptr) == 0).sum())
        if empty:
            raise SetupError(
                f"{empty} of {adata.n_obs} cells have zero total counts. Filter them first: "
                "sc.pp.filter_cells(adata, min_counts=1)."
            )
        return csr, read_covariates(adata, self.setup_)

    def _data(self, adata=None) -> CountData:
        """Counts of ``adata`` (default: the training data) on the model's device."""
        if adata is None or adata is self.adata:
            key = id(self.adata)
            if self._data_cache is None or self._data_cache[0] != key or self._data_cache[1].device != self.device:
                csr, cov = self._read(self.adata)
                self._data_cache = (key, CountData(csr, cov, self.device))
            return self._data_cache[1]
        csr, cov = self._read(adata)
        return CountData(csr, cov, self.device)

    def _check_trained(self) -> None:
        if not self.is_trained_:
            raise NotTrainedError(
                "This LinearSCVI model is not trained yet. Call model.train() before querying it."
            )

    # --- training ------------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | str = "auto",
        train_size: float = 0.9,
        validation_size: float | None = None,
        batch_size: int = 128,
        early_stopping: bool = False,
        check_val_every_n_epoch: int | None = None,
        plan_kwargs: dict | None = None,
        *,
        lr: float | None = None,
        progress_bar: bool = True,
        seed: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every_n_epochs: int = 10,
        resume_from: str | os.PathLike | None = None,
        early_stopping_patience: int = 45,
        batch_norm_momentum: float | None = None,
        threads: int | None = None,
        **trainer_kwargs,
    ) -> None:
        """Fit the model; calling it again continues training and appends to the history.

        Parameters
        ----------
        max_epochs
            Epochs to run; default ``min(400, round(20000 / n_cells * 400))`` as scvi-tools.
        accelerator, devices
            ``"auto"`` uses a CUDA GPU when present; ``devices`` may name a GPU index.
        train_size, validation_size
            Fractions of cells for training and validation (scvi-tools' split, seeded).
        batch_size
            Cells per minibatch, at least 2 (batch normalization needs two cells); a last
            minibatch of one cell joins the one before it.
        early_stopping
            Stop when ``elbo_validation`` has not improved for ``early_stopping_patience`` epochs.
        check_val_every_n_epoch
            Validation frequency; default: the last epoch only (every epoch with early stopping).
        plan_kwargs
            ``lr``, ``weight_decay``, ``eps``, ``n_epochs_kl_warmup``, ``n_steps_kl_warmup``.
        lr
            Shortcut for ``plan_kwargs={"lr": ...}``.
        progress_bar
            Show a progress bar when stderr is a terminal, else log a line (epoch, ELBO) every
            tenth of the epochs; False: neither (``enable_progress_bar=False`` is accepted too).
        seed
            Random seed of splitting and training; default ``ldvae.settings.seed``.
        checkpoint_dir, checkpoint_every_n_epochs
            Write a checkpoint every N epochs (and at the end) into this directory.
        resume_from
            A checkpoint file or directory to continue from (same data and model settings);
            ``max_epochs`` counts the checkpoint's epochs, and ``seed`` defaults to the
            checkpoint's. With the same settings the result equals an uninterrupted fit
            (on CPU, exactly).
        batch_norm_momentum
            Momentum of the batch-norm running statistics during this fit (default: the
            model's 0.01, as scvi-tools). With few steps per epoch (large batches, fast
            settings) 0.05-0.1 keeps eval-mode outputs and validation up to date.
        threads
            CPU threads for torch during the fit (restored after). Default: one when a
            minibatch is small (batch_size x genes up to 4M: faster, and robust on a busy
            machine), else torch's current setting.
        """
        progress_bar = bool(trainer_kwargs.pop("enable_progress_bar", progress_bar))
        if trainer_kwargs:
            raise TypeError(f"train got unexpected keyword arguments: {sorted(trainer_kwargs)}.")
        plan = dict(plan_kwargs or {})
        unknown = set(plan) - {"lr", "weight_decay", "eps", "n_epochs_kl_warmup", "n_steps_kl_warmup", "optimizer"}
        if unknown:
            raise TypeError(f"plan_kwargs has unknown keys: {sorted(unknown)}.")
        if plan.pop("optimizer", "Adam") != "Adam":
            raise ValueError("Only optimizer='Adam' is supported.")
        if lr is not None:
            plan["lr"] = lr
        _check_plan(plan)
        _check_positive_int("batch_size", batch_size)
        if batch_size < 2:
            raise ValueError(
                f"batch_size must be at least 2, got {batch_size}: batch normalization computes each "
                "minibatch's mean and variance over its cells, which one cell cannot give."
            )
        _check_positive_int("early_stopping_patience", early_stopping_patience)
        if check_val_every_n_epoch is not None:
            _check_positive_int("check_val_every_n_epoch", check_val_every_n_epoch)
        n = self.adata.n_obs
        if max_epochs is None:
            max_epochs = int(min(400, round(20000 / n * 400)))
        _check_positive_int("max_epochs", max_epochs)
        _check_positive_int("checkpoint_every_n_epochs", checkpoint_every_n_epochs)
        if threads is not None:
            _check_positive_int("threads", threads)
        if batch_norm_momentum is not None and not 0.0 < float(batch_norm_momentum) <= 1.0:
            raise ValueError(f"batch_norm_momentum must be in (0, 1], got {batch_norm_momentum!r}.")
        payload = None if resume_from is None else load_checkpoint(resume_from)
        if seed is None and payload is not None:
            seed = payload["train_config"].get("seed")  # the same split and random stream as before
        seed = settings.seed if seed is None else int(seed)
        self.device = resolve_device(accelerator, devices if isinstance(devices, int) else None)
        train_idx, val_idx = split_indices(n, train_size, validation_size, seed)
        if len(train_idx) < 2:
            raise SetupError(
                f"LDVAE needs at least 2 training cells (batch normalization); adata has {n} cells and "
                f"train_size={train_size} leaves {len(train_idx)}."
            )
        if len(train_idx) < batch_size:
            logger.warning(
                "batch_size=%d is larger than the %d training cells; each epoch is one minibatch of %d cells.",
                batch_size, len(train_idx), len(train_idx),
            )
        config = TrainConfig(
            max_epochs=max_epochs,
            batch_size=batch_size,
            early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience,
            check_val_every_n_epoch=check_val_every_n_epoch,
            progress_bar=progress_bar,
            seed=seed,
            checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
            checkpoint_every_n_epochs=checkpoint_every_n_epochs,
            batch_norm_momentum=batch_norm_momentum,
            threads=threads,
            **plan,
        )
        state = self.train_state_ or TrainState()
        if payload is not None:
            # every check first: a checkpoint that does not fit leaves the model as it was
            def mismatch(key, detail):
                return ModelFileError(
                    f"The checkpoint {resume_from} was written by a model with other settings or genes "
                    f"({detail}). Resume with the LinearSCVI settings and data it was trained with."
                )

            check_weights(payload["module_state"], self.module.state_dict(), mismatch)
            resumed = TrainState(**payload["train_state"])
            if resumed.optimizer_state is not None:
                try:
                    check_state_dict(resumed.optimizer_state, [p for p in self.module.parameters() if p.requires_grad])
                except ValueError as err:
                    raise ModelFileError(f"The checkpoint {resume_from} is damaged: {err}.") from err
            self.module.load_state_dict(payload["module_state"])
            state = resumed
            state.interrupted = False
            config.max_epochs = max(max_epochs - state.epoch, 0)
            logger.info("Resuming from epoch %d (%d steps) of %s.", state.epoch, state.step, resume_from)
        self.module.to(self.device)
        if counts_on_disk(self.adata, self.setup_):  # backed AnnData: stream chunks (ldvae.data.stream)
            source = StreamingSource.from_adata(self.adata, self.setup_, train_idx, val_idx, batch_size,
                                                device=self.device)
        else:
            source = InMemorySource(self._data(), train_idx, val_idx, batch_size)
        try:
            fit(self.module, source, config, state)
        finally:
            # Also on NonFiniteLossError: the module holds the last good parameters, and the
            # history so far stays readable.
            self.train_state_ = state
            self.train_indices_, self.validation_indices_ = train_idx, val_idx
            self.is_trained_ = state.step > 0

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch metrics, scvi-tools' keys, each a DataFrame indexed by epoch."""
        if self.train_state_ is None:
            return {}
        out = {}
        for key, rows in self.train_state_.history.items():
            arr = np.asarray(rows, dtype=float).reshape(-1, 2)
            out[key] = pd.DataFrame({key: arr[:, 1]}, index=pd.Index(arr[:, 0].astype(int), name="epoch"))
        return out

    # --- queries -------------------------------------------------------------------------------
    def _query_batch_size(self, batch_size: int | None) -> int:
        if batch_size is not None:
            _check_positive_int("batch_size", batch_size)
            return int(batch_size)
        # Large batches under no_grad: about 8M dense entries per batch.
        return int(np.clip(8_000_000 // max(len(self.var_names_), 1), 128, 16384))

    def _rows(self, data: CountData, indices) -> torch.Tensor:
        if indices is None:
            return torch.arange(data.n_cells, device=self.device)
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < -data.n_cells or idx.max() >= data.n_cells):
            raise IndexError(f"indices out of range for {data.n_cells} cells.")
        return torch.as_tensor(idx % max(data.n_cells, 1), device=self.device)

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
        from .query.posterior import get_latent_representation

        return get_latent_representation(self, adata, indices, give_mean, mc_samples, batch_size, return_dist,
                                         out=out)

    def _decoder_scale(self) -> torch.Tensor:
        """Per-gene factor that batch normalization (eval mode) multiplies the linear map by."""
        bn = self.module.factor_bn
        if bn is None:
            return torch.ones(len(self.var_names_))
        return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().cpu()

    def get_loadings(self) -> pd.DataFrame:
        """Loadings W: genes x ``Z_0 … Z_{K-1}``, batch-norm scale gamma/sqrt(var + eps) folded in.

        Decoding z + e_k minus decoding z, in unnormalized log-rate space, equals column k.
        Covariate columns are in :meth:`get_covariate_coefficients`.
        """
        K = self.init_params_["n_latent"]
        w = self.module.factor_regressor.weight.detach().cpu()[:, :K] * self._decoder_scale()[:, None]
        return pd.DataFrame(w.numpy(), index=self.var_names_.copy(), columns=[f"Z_{i}" for i in range(K)])

    def get_gene_intercepts(self) -> pd.Series:
        """Per-gene intercept of the unnormalized log rate (batch-norm shift and bias), at z = 0."""
        bn = self.module.factor_bn
        lin = self.module.factor_regressor
        bias = lin.bias.detach().cpu() if lin.bias is not None else torch.zeros(len(self.var_names_))
        if bn is None:
            value = bias
        else:
            scale = self._decoder_scale()
            value = (bias - bn.running_mean.detach().cpu()) * scale + bn.bias.detach().cpu()
        return pd.Series(value.numpy(), index=self.var_names_.copy(), name="intercept")

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
        K = self.init_params_["n_latent"]
        w = self.module.factor_regressor.weight.detach().cpu()[:, K:] * self._decoder_scale()[:, None]
        return pd.DataFrame(w.numpy(), index=self.var_names_.copy(), columns=self.covariate_column_names())

    # --- posterior queries (ldvae/posterior.py, ldvae/de.py) ---
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
        from .query.posterior import get_normalized_expression

        return get_normalized_expression(
            self, adata, indices, transform_batch, gene_list, library_size, n_samples, n_samples_overall,
            batch_size, return_mean, return_numpy, out=out,
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
        from .query.de import differential_expression

        return differential_expression(
            self, adata, groupby, group1, group2, idx1, idx2, mode, delta, batch_size, all_stats,
            batch_correction, batchid1, batchid2, fdr_target, silent, filter_outlier_cells, **kwargs,
        )

    def get_elbo(self, adata=None, indices=None, batch_size: int | None = None, *, return_mean: bool = True):
        """The evidence lower bound per cell, E_q[log p(x | z, l)] - KL(q || prior), averaged
        over cells (one posterior draw per cell). Not negated: higher is better."""
        from .query.posterior import get_elbo

        return get_elbo(self, adata, indices, batch_size, return_mean)

    def get_reconstruction_error(
        self, adata=None, indices=None, batch_size: int | None = None, *, return_mean: bool = True
    ) -> dict:
        """``{"reconstruction_loss": value}``: log p(x | z, l) at one posterior draw, averaged over
        cells (per cell with ``return_mean=False``). As scvi-tools 1.0/1.1 and its docstring say,
        not negated: higher is better, so it is minus the training history's reconstruction loss."""
        from .query.posterior import get_reconstruction_error

        return get_reconstruction_error(self, adata, indices, batch_size, return_mean)

    def get_marginal_ll(
        self, adata=None, indices=None, n_mc_samples: int = 1000, batch_size: int | None = None, *,
        return_mean: bool = True,
    ):
        """Importance-sampled log p(x): log of the mean over ``n_mc_samples`` draws from q of
        p(x, z, l) / q(z, l | x), averaged over cells. A tighter bound than the ELBO that rises
        towards log p(x) as ``n_mc_samples`` grows. Higher is better."""
        from .query.posterior import get_marginal_ll

        return get_marginal_ll(self, adata, indices, n_mc_samples, batch_size, return_mean)

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
        from .query.posterior import posterior_predictive_sample

        return posterior_predictive_sample(self, adata, indices, n_samples, gene_list, batch_size, out=out)

    def get_likelihood_parameters(
        self, adata=None, indices=None, n_samples: int = 1, give_mean: bool = False, batch_size: int | None = None,
        *, out: str | os.PathLike | None = None,
    ) -> dict[str, np.ndarray]:
        """Parameters of p(x | z, l) at posterior draws: ``"mean"`` (mu), ``"dispersions"``
        (theta; NB and ZINB) and ``"dropout"`` (pi, ZINB), each (n_cells, n_genes), or
        (n_samples, n_cells, n_genes) for ``n_samples > 1`` unless ``give_mean``. With
        ``out`` (a directory) each is written to ``out/<key>.npy`` minibatch by minibatch
        and returned as a read-only memory map."""
        from .query.posterior import get_likelihood_parameters

        return get_likelihood_parameters(self, adata, indices, n_samples, give_mean, batch_size, out=out)

    def get_latent_library_size(
        self, adata=None, indices=None, give_mean: bool = True, batch_size: int | None = None
    ) -> np.ndarray:
        """Library size l per cell, (n_cells, 1): the posterior mean exp(m + v/2) of q(l | x), or
        with ``give_mean=False`` one draw (the observed total count when the library is observed)."""
        from .query.posterior import get_latent_library_size

        return get_latent_library_size(self, adata, indices, give_mean, batch_size)

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
        from .query.posterior import get_feature_correlation_matrix

        return get_feature_correlation_matrix(
            self, adata, indices, n_samples, batch_size, rna_size_factor, transform_batch, correlation_type
        )

    def get_factor_deviance(self, adata=None, indices=None, *, batch_size: int | None = None) -> pd.DataFrame:
        """Deviance explained per factor on the count scale, factors ordered by it, with the
        sign that makes each factor's largest loading positive. See
        :func:`ldvae.factors.interpret.factor_deviance`; the loadings are not changed."""
        from .factors.interpret import factor_deviance

        return factor_deviance(self, adata, indices, batch_size=batch_size)

    # --- results into AnnData ---------------------------------------------------------------
    def write_results(self, adata=None, *, key_added: str = "ldvae", obs_columns: bool = False, copy: bool = False):
        """Write latent means, loadings and parameters into ``adata`` (scanpy style).

        See :func:`ldvae.data.results.write_results` for the fields written.
        """
        from .data.results import write_results

        return write_results(self, adata, key_added=key_added, obs_columns=obs_columns, copy=copy)

    # --- save / load -----------------------------------------------------------------------------
    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
    ) -> None:
        """Save to ``dir_path``: ``ldvae_model.json`` (settings, genes, categories, history,
        versions, the SHA-256 of the weights), ``model_state.pt`` (weights) and, with
        ``save_anndata``, ``adata.h5ad``. Each file is written atomically; the JSON last."""
        from .util.io import atomic_torch_save, atomic_write_json

        d = Path(dir_path)
        p = prefix or ""
        if d.exists() and any(d.iterdir()) and not overwrite:
            raise FileExistsError(f"{d} already exists and is not empty. Pass overwrite=True to replace it.")
        d.mkdir(parents=True, exist_ok=True)
        st = self.train_state_
        meta = {
            "format": "ldvae-model",
            "format_version": FORMAT_VERSION,
            "ldvae_version": __version__,
            "torch_version": torch.__version__,
            "init_params": self.init_params_,
            "setup": plain(self.setup_),
            "var_names": list(self.var_names_),
            "n_cells": int(self.adata.n_obs),
            "is_trained": bool(self.is_trained_),
            "train_state": None
            if st is None
            else {"epoch": st.epoch, "step": st.step, "warmup_steps": st.warmup_steps, "history": st.history},
        }
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        atomic_torch_save(state, d / f"{p}{MODEL_WEIGHTS}")
        # torch's zip container does not check the tensor bytes: a checksum in the JSON,
        # written last, catches corruption that would otherwise load as wrong weights.
        meta["weights_sha256"] = _sha256(d / f"{p}{MODEL_WEIGHTS}")
        if save_anndata:
            _write_h5ad_untouched(self.adata, d / f"{p}{ADATA_FILE}")
        atomic_write_json(d / f"{p}{MODEL_JSON}", meta)

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata=None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
    ) -> "LinearSCVI":
        """Load a model saved with :meth:`save`. ``adata`` must have the model's genes (in order)
        and only known categories; without ``adata`` the saved ``adata.h5ad`` is used.

        Every field of the JSON and the stored weights' keys, shapes and values are checked
        before anything is built (a ModelFileError naming the field, its value and the file);
        ``adata.uns["ldvae_setup"]`` is written only when the whole load succeeded."""
        d = Path(dir_path)
        p = prefix or ""
        json_path = d / f"{p}{MODEL_JSON}"
        meta = _read_model_json(json_path)
        weights = d / f"{p}{MODEL_WEIGHTS}"
        state = _read_weights(weights, meta, json_path)
        target = resolve_device(accelerator, device if isinstance(device, int) else None)
        if adata is None:
            path = d / f"{p}{ADATA_FILE}"
            if not path.exists():
                raise ValueError(f"No adata given and {path} does not exist (save with save_anndata=True).")
            import anndata

            adata = anndata.read_h5ad(path)
        saved_setup = meta["setup"]
        record_setup = "ldvae_setup" not in adata.uns
        if record_setup:
            check_not_view(adata, "LinearSCVI.load")
        model = cls.__new__(cls)
        model.init_params_ = meta["init_params"]
        model.adata = adata
        model.setup_ = saved_setup
        model.var_names_ = pd.Index(meta["var_names"])
        model._data_cache = None
        model._check_genes(adata)
        read_covariates(adata, saved_setup)  # unknown categories fail here, naming the first
        n_batch = model.n_batch
        model.module = LDVAEModule(model._module_config(), torch.zeros(n_batch), torch.ones(n_batch))
        model.module.load_state_dict(state)  # keys, shapes and dtypes checked by _read_weights
        model.module.eval()
        model.device = target
        model.module.to(model.device)
        ts = meta.get("train_state")
        model.train_state_ = None if ts is None else TrainState(**ts)
        model.is_trained_ = bool(meta.get("is_trained"))
        if record_setup:  # only once everything succeeded: a failed load leaves adata untouched
            adata.uns["ldvae_setup"] = saved_setup
        return model

    def __repr__(self) -> str:
        p = self.init_params_
        status = "trained" if self.is_trained_ else "not trained"
        return (
            f"LinearSCVI(n_latent={p['n_latent']}, n_hidden={p['n_hidden']}, gene_likelihood={p['gene_likelihood']!r}, "
            f"dispersion={p['dispersion']!r}) on {len(self.var_names_)} genes, {self.n_batch} batch(es); {status}"
        )


def _write_h5ad_untouched(adata, path: Path) -> None:
    """Write ``adata`` to ``path`` atomically without changing it: anndata's writer turns
    string columns of obs and var into categoricals in place, so it writes an AnnData that
    shares the matrices but holds its own copies of obs and var."""
    import anndata

    from .util.io import atomic_path

    if adata.isbacked:  # its matrices stay on disk: write with the columns as they are
        with atomic_path(path) as tmp:
            adata.write_h5ad(tmp, convert_strings_to_categoricals=False)
        return
    out = anndata.AnnData(
        X=adata.X, obs=adata.obs.copy(), var=adata.var.copy(), uns=dict(adata.uns), obsm=dict(adata.obsm),
        varm=dict(adata.varm), layers=dict(adata.layers), obsp=dict(adata.obsp), varp=dict(adata.varp),
    )
    if adata.raw is not None:
        out.raw = anndata.AnnData(X=adata.raw.X, obs=out.obs[[]], var=adata.raw.var.copy(), varm=dict(adata.raw.varm))
    with atomic_path(path) as tmp:
        out.write_h5ad(tmp)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_model_json(path: Path) -> dict:
    """The model JSON written by ``save``, every field checked (ModelFileError naming it)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; is {path.parent} a directory written by model.save()?")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path} is not a valid ldvae model file (corrupted or truncated JSON: {err}).") from err
    if not isinstance(meta, dict) or meta.get("format") != "ldvae-model":
        raise ModelFileError(f"{path} is not an ldvae model file.")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written in model format version {version!r}; this ldvae ({__version__}) reads "
            f"up to version {FORMAT_VERSION}. Upgrade ldvae to load it."
        )
    missing = [k for k in ("init_params", "setup", "var_names") if not isinstance(meta.get(k), (dict, list))]
    if missing:
        raise ModelFileError(f"{path} is not a valid ldvae model file (corrupted: missing or invalid {missing}).")
    _check_meta(meta, path)
    return meta


_META_KEYS = {"format", "format_version", "ldvae_version", "torch_version", "init_params", "setup", "var_names",
              "n_cells", "is_trained", "train_state", "weights_sha256"}
_INIT_PARAMS = {"n_hidden", "n_latent", "n_layers", "dropout_rate", *_CHOICES, *_BOOL_PARAMS}
_TRAIN_STATE_KEYS = {"epoch", "step", "warmup_steps", "history"}


def _damaged(path: Path, field: str, value, want: str) -> ModelFileError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ModelFileError(f"{path} is damaged: {field} must be {want}, got {shown}. Save the model again.")


def _is_str_list(value, *, nonempty: bool = False) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value) and (bool(value) or not nonempty)


def _check_meta(meta: dict, path: Path) -> None:
    extra = sorted(set(meta) - _META_KEYS)
    if extra:
        raise _damaged(path, "the top level", extra, f"only the keys {sorted(_META_KEYS)}")
    params = meta["init_params"]
    if not isinstance(params, dict) or set(params) != _INIT_PARAMS:
        got = sorted(params) if isinstance(params, dict) else params
        raise _damaged(path, "init_params", got, f"the keys {sorted(_INIT_PARAMS)}")
    try:
        _check_init_params(params)
    except ValueError as err:  # the constructor's message, naming the setting and its value
        raise ModelFileError(f"{path} is damaged: init_params.{err} Save the model again.") from err
    setup = meta["setup"]
    if not isinstance(setup, dict):
        raise _damaged(path, "setup", setup, "a dict")
    _check_setup(setup, path)
    if params["dispersion"] == "gene-label" and "labels_key" not in setup:
        raise _damaged(path, "init_params.dispersion", "gene-label", "labels recorded in setup")
    if not _is_str_list(meta["var_names"], nonempty=True):
        raise _damaged(path, "var_names", meta["var_names"], "a non-empty list of gene names")
    n_cells = meta.get("n_cells", 0)
    if isinstance(n_cells, bool) or not isinstance(n_cells, int) or n_cells < 0:
        raise _damaged(path, "n_cells", n_cells, "an integer >= 0")
    if not isinstance(meta.get("is_trained", False), bool):
        raise _damaged(path, "is_trained", meta["is_trained"], "true or false")
    for key in ("ldvae_version", "torch_version"):
        if not isinstance(meta.get(key, ""), str):
            raise _damaged(path, key, meta[key], "a version string")
    digest = meta.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        raise _damaged(path, "weights_sha256", digest, "null or a SHA-256 hex digest")
    ts = meta.get("train_state")
    if ts is not None:
        if not isinstance(ts, dict) or set(ts) != _TRAIN_STATE_KEYS:
            got = sorted(ts) if isinstance(ts, dict) else ts
            raise _damaged(path, "train_state", got, f"null or the keys {sorted(_TRAIN_STATE_KEYS)}")
        for key in ("epoch", "step", "warmup_steps"):
            if isinstance(ts[key], bool) or not isinstance(ts[key], int) or ts[key] < 0:
                raise _damaged(path, f"train_state.{key}", ts[key], "an integer >= 0")
        check_history(ts["history"], lambda field, value, want: _damaged(path, f"train_state[{field}]", value, want))


def _check_setup(setup: dict, path: Path) -> None:
    """``setup_anndata``'s record as saved: the keys it writes, with their types."""
    known = {"layer", "batch_key", "batch_categories", "labels_key", "label_categories",
             "categorical_covariate_keys", "categorical_covariate_categories", "continuous_covariate_keys"}
    extra = sorted(set(setup) - known)
    if extra:
        raise _damaged(path, "setup", extra, f"only the keys {sorted(known)}")
    for key in ("layer", "batch_key", "labels_key"):
        if key in setup and not isinstance(setup[key], str):
            raise _damaged(path, f"setup.{key}", setup[key], "a string")
    for key, categories in (("batch_key", "batch_categories"), ("labels_key", "label_categories")):
        if (key in setup) != (categories in setup):
            raise _damaged(path, "setup", sorted(setup), f"{key} and {categories} together")
        if categories in setup and not _is_str_list(setup[categories], nonempty=True):
            raise _damaged(path, f"setup.{categories}", setup[categories], "a non-empty list of strings")
    for key in ("categorical_covariate_keys", "continuous_covariate_keys"):
        if key in setup and not _is_str_list(setup[key]):
            raise _damaged(path, f"setup.{key}", setup[key], "a list of obs column names")
    cats = setup.get("categorical_covariate_categories", {})
    keys = setup.get("categorical_covariate_keys", [])
    if not isinstance(cats, dict) or sorted(cats) != sorted(keys) or not all(
        _is_str_list(v, nonempty=True) for v in cats.values()
    ):
        raise _damaged(path, "setup.categorical_covariate_categories", cats,
                       "a non-empty list of strings for each of categorical_covariate_keys")


def _read_weights(weights: Path, meta: dict, json_path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``weights``, checked against the checksum in the JSON and against
    the keys, shapes and dtypes that the JSON's settings imply. The implied shapes come from
    a module on torch's meta device (no memory), built only once every size the JSON
    gives is within what the stored tensors can hold."""
    expected = meta.get("weights_sha256")
    if expected is not None and weights.is_file() and _sha256(weights) != expected:
        raise ModelFileError(
            f"{weights} does not match the checksum recorded in {json_path.name}: it is corrupted or was "
            "replaced after saving. Save the model again from a trained instance."
        )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ModelFileError(
            f"{weights} is not a readable ldvae weights file ({type(err).__name__}: {err}).") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ModelFileError(f"{weights} is not a readable ldvae weights file (not a dict of named tensors).")
    params = meta["init_params"]
    largest = max((t.numel() for t in state.values()), default=0)
    for name, bound in (("n_hidden", largest), ("n_latent", largest), ("n_layers", len(state))):
        if params[name] > bound:
            raise ModelFileError(
                f"init_params.{name}={params[name]} in {json_path} does not match the weights in {weights.name} "
                f"(their {len(state)} tensors hold at most {largest} values each). The JSON was edited or "
                "belongs to another model; save the model again."
            )
    setup = meta["setup"]
    cats = setup.get("categorical_covariate_categories", {})
    n_batch = len(setup.get("batch_categories", ["0"]))
    config = ModuleConfig(
        n_genes=len(meta["var_names"]),
        n_batch=n_batch,
        n_labels=len(setup.get("label_categories", ["0"])),
        n_cats_per_cov=tuple(len(cats[k]) for k in setup.get("categorical_covariate_keys", [])),
        n_continuous_cov=len(setup.get("continuous_covariate_keys", [])),
        **params,
    )
    means, variances = torch.zeros(n_batch), torch.ones(n_batch)  # on the CPU: the module reads their mean
    with torch.device("meta"):
        reference = LDVAEModule(config, means, variances).state_dict()
    sizes = {
        "init_params.n_hidden": config.n_hidden,
        "init_params.n_latent": config.n_latent,
        "var_names (the number of genes)": config.n_genes,
        "setup.batch_categories (the number of batches)": config.n_batch,
        "setup.label_categories (the number of labels)": config.n_labels,
    }

    def mismatch(key, detail):
        field = ""
        if key is not None and state[key].dim() == reference[key].dim():
            for got, want in zip(state[key].shape, reference[key].shape):
                name = next((n for n, v in sizes.items() if v == want), None) if got != want else None
                if name is not None:
                    field = f" {name}={want} in {json_path.name} disagrees with them;"
                    break
        return ModelFileError(
            f"{weights} does not fit {json_path} ({detail}):{field or ' the settings disagree with them;'} "
            "the files belong to different models or one was edited. Save the model again."
        )

    check_weights(state, reference, mismatch)
    return state
