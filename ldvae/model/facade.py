"""``LinearSCVI``: the user-facing model. It owns the AnnData contract (genes,
categories and setup recorded at construction), delegates the math to ``LDVAEModule``,
the fitting to ``train.fit`` and the queries to ``ldvae.query``: it checks arguments and
forwards them by keyword."""

from __future__ import annotations

import logging
import os
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch

from ..data.contract import (
    CountData,
    SetupError,
    check_not_view,
    empty_cells_error,
    get_counts,
    get_setup,
    library_prior,
    read_covariates,
    to_csr,
    validate_counts,
)
from ..data.backed import counts_on_disk, is_on_disk, library_prior_on_disk, read_into_memory
from ..data.setup import setup_anndata
from ..nn.module import LDVAEModule, ModuleConfig
from ..query import target
from ..query.cells import DiskCells
from ..train.streaming import StreamingSource
from ..train.loop import InMemorySource, TrainConfig, TrainState, fit, load_checkpoint, split_indices
from ..util.settings import settings
from .files import read_model, read_saved_adata, save_model, train_state_of
from .queries import Queries
from .params import check_init_params, check_plan, check_train_args, init_params_of, module_config, resolve_device
from .resume import resume_state

logger = logging.getLogger(__name__)


class NotTrainedError(RuntimeError):
    """A query was made on a model that has not been trained."""


class LinearSCVI(Queries):
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
        params = dict(
            n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate,
            dispersion=dispersion, gene_likelihood=gene_likelihood, latent_distribution=latent_distribution,
        )
        check_init_params(params)
        params.update(
            n_hidden=int(n_hidden), n_latent=int(n_latent), n_layers=int(n_layers), dropout_rate=float(dropout_rate),
            use_observed_lib_size=bool(use_observed_lib_size), use_batch_norm=bool(use_batch_norm), bias=bool(bias),
        )
        self.adata = adata
        self.setup_ = get_setup(adata)
        if dispersion == "gene-label" and "labels_key" not in self.setup_:
            raise SetupError("dispersion='gene-label' needs labels: run setup_anndata(..., labels_key=...).")
        self.var_names_ = pd.Index(adata.var_names.astype(str))
        self._data_cache: tuple[int, CountData] | None = None
        if counts_on_disk(adata, self.setup_):  # backed AnnData: one streaming pass (ldvae.data.backed)
            means, variances = library_prior_on_disk(adata, self.setup_, self.n_batch)
        else:
            csr, cov = self._read(adata)
            means, variances = library_prior(csr, cov.batch, self.n_batch)
        torch.manual_seed(settings.seed)
        config = module_config(self.setup_, len(self.var_names_), params)
        self.module = LDVAEModule(config, torch.as_tensor(means), torch.as_tensor(variances))
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

    @property
    def config(self) -> ModuleConfig:
        """The hyperparameters and sizes of the model: the one record of them."""
        return self.module.config

    @property
    def init_params_(self) -> dict:
        """The constructor's hyperparameters (scvi-tools' attribute), read from :attr:`config`."""
        return init_params_of(self.module.config)

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
        empty = np.flatnonzero(np.diff(csr.indptr) == 0)
        if empty.size:
            raise empty_cells_error(empty.size, adata.n_obs, str(adata.obs_names[empty[0]]))
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

    def _cells(self, adata, streamed: bool):
        """The cells a query reads, once the model is known to be trained."""
        self._check_trained()
        target = self.adata if adata is None else adata
        if streamed and counts_on_disk(target, self.setup_):  # counts on disk stay there
            self._check_genes(target)
            return DiskCells(target, self.setup_, self.device)
        return self._data(adata)

    def _fitted(self) -> target.Fitted:
        """The model as queries see it (:class:`ldvae.query.target.Fitted`)."""
        return target.Fitted(module=self.module, var_names=self.var_names_, setup=self.setup_, adata=self.adata,
                             device=self.device, cells=self._cells)

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
        plan = check_plan(plan_kwargs, lr)
        n = self.adata.n_obs
        if max_epochs is None:
            max_epochs = int(min(400, round(20000 / n * 400)))
        check_train_args(
            batch_size=batch_size, max_epochs=max_epochs, early_stopping_patience=early_stopping_patience,
            check_val_every_n_epoch=check_val_every_n_epoch, checkpoint_every_n_epochs=checkpoint_every_n_epochs,
            threads=threads, batch_norm_momentum=batch_norm_momentum,
        )
        payload = None if resume_from is None else load_checkpoint(resume_from)
        if seed is None and payload is not None:
            seed = payload["train_config"].get("seed")  # the same split and random stream as before
        seed = settings.seed if seed is None else int(seed)
        self.device = resolve_device(accelerator, devices if isinstance(devices, int) else None)
        train_idx, val_idx = self._split(train_size, validation_size, seed, batch_size)
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
            state = resume_state(self.module, payload, resume_from)
            config.max_epochs = max(max_epochs - state.epoch, 0)
        self.module.to(self.device)
        source = self._source(train_idx, val_idx, batch_size)
        try:
            fit(self.module, source, config, state)
        finally:
            # Also on NonFiniteLossError: the module holds the last good parameters, and the
            # history so far stays readable.
            self.train_state_ = state
            self.train_indices_, self.validation_indices_ = train_idx, val_idx
            self.is_trained_ = state.step > 0

    def _source(self, train_idx, val_idx, batch_size: int):
        """The minibatches of a fit: streamed chunks of a backed AnnData, else counts on the device."""
        if counts_on_disk(self.adata, self.setup_):
            return StreamingSource.from_adata(self.adata, self.setup_, train_idx, val_idx, batch_size,
                                              device=self.device)
        return InMemorySource(self._data(), train_idx, val_idx, batch_size)

    def _split(self, train_size: float, validation_size: float | None, seed: int, batch_size: int):
        """Training and validation cells (scvi-tools' seeded split); at least two training cells."""
        n = self.adata.n_obs
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
        return train_idx, val_idx

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
        save_model(self, dir_path, prefix, overwrite=overwrite, save_anndata=save_anndata)

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
        meta, state = read_model(dir_path, prefix)
        device = resolve_device(accelerator, device if isinstance(device, int) else None)
        if adata is None:
            adata = read_saved_adata(dir_path, prefix)
        saved_setup = meta["setup"]
        record_setup = "ldvae_setup" not in adata.uns
        if record_setup:
            check_not_view(adata, "LinearSCVI.load")
        model = cls.__new__(cls)
        model.adata = adata
        model.setup_ = saved_setup
        model.var_names_ = pd.Index(meta["var_names"])
        model._data_cache = None
        model._check_genes(adata)
        read_covariates(adata, saved_setup)  # unknown categories fail here, naming the first
        config = module_config(saved_setup, len(model.var_names_), meta["init_params"])
        model.module = LDVAEModule(config, torch.zeros(config.n_batch), torch.ones(config.n_batch))
        model.module.load_state_dict(state)  # keys, shapes and dtypes checked by read_model
        model.module.eval()
        model.device = device
        model.module.to(model.device)
        model.train_state_ = train_state_of(meta)
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
