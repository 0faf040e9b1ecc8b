"""``LinearSCVI``: the user-facing model. It owns the AnnData contract (genes,
categories and setup recorded at construction), delegates the math to ``LDVAEModule``,
the fitting to ``train.fit`` and the queries to ``ldvae.query``: it checks arguments and
forwards them by keyword."""

from __future__ import annotations

import logging
import os
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..data.contract import (
    CountData,
    SetupError,
    check_not_view,
    check_same_genes,
    counts_identity,
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
from ..train.loop import InMemorySource, TrainConfig, TrainState, fit, load_checkpoint
from ..train.batches import split_cells
from ..util.settings import float32_default, own_rng, settings
from .files import frozen_of, read_saved_adata, save_model, split_of, train_state_of
from .mapping import fits_anything
from .scvi_files import read_any_model
from .queries import Queries
from .surface import LIBRARY_KEY, ScviSurface, counts_dropped, minified_fields, write_scvi_codes
from .params import (
    check_init_params, check_model_kwargs, check_plan, check_registry, check_strategy, check_train_args, init_params_of,
    fit_and_split_seeds, module_config, resolve_device, splitter_options, train_options, warn_factor_count, with_preset,
)
from .resume import continued_state, data_record, resume_state
from .start import start_from_counts

logger = logging.getLogger(__name__)


class NotTrainedError(RuntimeError):
    """A query was made on a model that has not been trained."""


class LinearSCVI(Queries, ScviSurface):
    """Linearly decoded VAE (Svensson et al. 2020) with the API of scvi-tools' ``LinearSCVI``.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`setup_anndata`.
    registry
        scvi-tools' registry for models built without AnnData; ldvae needs ``adata``
        (a registry is accepted beside it and not used).
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
    **model_kwargs
        ``use_batch_norm`` (default True): batch normalization in the decoder (the
        loadings fold its scale in); ``bias`` (default False): a per-gene bias in the
        decoder's linear map. scvi-tools' other VAE options are accepted at the value
        ldvae's model has (e.g. ``encode_covariates=False``) and refused, saying so,
        at any other.
    """

    def __init__(
        self,
        adata=None,
        registry: dict | None = None,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        gene_likelihood: Literal["zinb", "nb", "poisson"] = "nb",
        use_observed_lib_size: bool = False,
        latent_distribution: Literal["normal", "ln"] = "normal",
        **model_kwargs,
    ):
        check_registry(adata, registry)
        extra = check_model_kwargs(model_kwargs)
        params = dict(
            n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate,
            dispersion=dispersion, gene_likelihood=gene_likelihood, latent_distribution=latent_distribution,
            use_observed_lib_size=use_observed_lib_size,
        )
        check_init_params(params)
        params.update(n_hidden=int(n_hidden), n_latent=int(n_latent), n_layers=int(n_layers),
                      dropout_rate=float(dropout_rate), use_observed_lib_size=bool(use_observed_lib_size), **extra)
        self.adata = adata
        self.setup_ = get_setup(adata)
        if dispersion == "gene-label" and "labels_key" not in self.setup_:
            raise SetupError("dispersion='gene-label' needs labels: run setup_anndata(..., labels_key=...).")
        self.var_names_ = pd.Index(adata.var_names.astype(str))
        self._data_cache: tuple[tuple, CountData] | None = None
        if counts_on_disk(adata, self.setup_):  # backed AnnData: one streaming pass (ldvae.data.backed)
            means, variances = library_prior_on_disk(adata, self.setup_, self.n_batch)
        else:
            csr, cov = self._read(adata)
            means, variances = library_prior(csr, cov.batch, self.n_batch)
        warn_factor_count(int(n_latent), len(self.var_names_))
        config = module_config(self.setup_, len(self.var_names_), params)
        with own_rng(settings.seed), float32_default():  # settings.seed's weights; the user's RNG kept
            self.module = LDVAEModule(config, torch.as_tensor(means), torch.as_tensor(variances))
        self.module.eval()
        self.device = torch.device("cpu")
        self.train_state_: TrainState | None = None
        self.is_trained_ = False
        self.train_indices_ = self.validation_indices_ = self.test_indices_ = np.zeros(0, dtype=np.int64)
        self._reset_surface()

    # --- the AnnData contract ---------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls,
        adata,
        batch_key: str | None = None,
        labels_key: str | None = None,
        layer: str | None = None,
        **kwargs,
    ) -> None:
        """Check raw counts and covariates; record the choices in ``adata.uns["ldvae_setup"]``
        and write scvi-tools' code columns ``obs["_scvi_batch"]`` and ``obs["_scvi_labels"]``.

        ``kwargs``: ``categorical_covariate_keys`` and ``continuous_covariate_keys`` (obs
        columns the decoder adds to the log rate). See :func:`ldvae.data.setup.setup_anndata`.
        """
        unknown = sorted(set(kwargs) - {"categorical_covariate_keys", "continuous_covariate_keys"})
        if unknown:
            raise TypeError(f"setup_anndata got unknown arguments {unknown}; it takes batch_key, labels_key, layer, "
                            "categorical_covariate_keys and continuous_covariate_keys.")
        cats, conts = kwargs.get("categorical_covariate_keys"), kwargs.get("continuous_covariate_keys")
        covariates = setup_anndata(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            categorical_covariate_keys=list(cats) if cats else None,
            continuous_covariate_keys=list(conts) if conts else None,
        )
        write_scvi_codes(adata, adata.uns["ldvae_setup"], covariates)

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
        check_same_genes(adata, self.var_names_)

    def _read(self, adata):
        """Validated CSR counts and covariates of ``adata`` under the model's setup."""
        self._check_genes(adata)
        if counts_dropped(adata):  # no counts: the cells carry their posterior (see _data)
            return sp.csr_matrix(adata.shape, dtype=np.float32), read_covariates(adata, self.setup_)
        layer = self.setup_.get("layer")
        mat = get_counts(adata, layer)
        if is_on_disk(mat):  # a query without a streaming path loads the counts
            mat = read_into_memory(mat)
        validate_counts(adata, mat, layer)
        return to_csr(mat), read_covariates(adata, self.setup_)

    def _data(self, adata=None) -> CountData:
        """Counts of ``adata`` (default: the training data) on the model's device; for a
        minified AnnData, its stored posterior and observed library."""
        if adata is None or adata is self.adata:
            key = counts_identity(self.adata, self.setup_.get("layer"))  # the cells and counts it holds now
            if self._data_cache is None or self._data_cache[0] != key or self._data_cache[1].device != self.device:
                self._data_cache = (key, CountData(*self._read(self.adata), self.device))
            return self._with_posterior(self.adata, self._data_cache[1])
        return self._with_posterior(adata, CountData(*self._read(adata), self.device))

    @staticmethod
    def _with_posterior(adata, data: CountData) -> CountData:
        fields = minified_fields(adata)  # read on every call: the user may have changed it
        if fields is not None:
            data.use_posterior(adata.obsm[fields["qzm_key"]], adata.obsm[fields["qzv_key"]], adata.obs[LIBRARY_KEY])
        return data

    def _check_trained(self) -> None:
        if not self.is_trained_:
            raise NotTrainedError(
                "This LinearSCVI model is not trained yet. Call model.train() before querying it."
            )

    def _cells(self, adata, streamed: bool):
        """The cells a query reads, once the model is known to be trained."""
        self._check_trained()
        target = self.adata if adata is None else adata
        self._check_genes(target)  # before any read: a view of a backed file reads its counts into memory
        if streamed and counts_on_disk(target, self.setup_):  # counts on disk stay there
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
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool = False,
        batch_size: int = 128,
        early_stopping: bool = False,
        datasplitter_kwargs: dict | None = None,
        plan_config: dict | None = None,
        plan_kwargs: dict | None = None,
        datamodule=None,
        trainer_config: dict | None = None,
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
            Fractions of cells for training and validation (scvi-tools' seeded split). With
            ``train_size=None`` (0.9), a last training minibatch of 1 or 2 cells moves to the
            validation cells (scvi-tools 1.5); otherwise it joins the minibatch before it.
        shuffle_set_split
            Split a seeded permutation of the cells (False: the cells in order).
        load_sparse_tensor
            Accepted; ldvae always keeps the counts sparse.
        batch_size
            Cells per minibatch, at least 2 (batch normalization needs two cells).
        early_stopping
            Stop when ``early_stopping_monitor`` (default ``elbo_validation``) has not improved
            by ``early_stopping_min_delta`` for ``early_stopping_patience`` epochs (45).
        datasplitter_kwargs
            ``external_indexing``: ``[train, validation, test]`` cell positions.
        plan_config, plan_kwargs
            ``lr``, ``weight_decay``, ``eps``, ``optimizer`` (Adam, AdamW), KL warm-up (``n_epochs_kl_warmup``,
            ``n_steps_kl_warmup``, ``min_kl_weight``, ``max_kl_weight``), ``reduce_lr_on_plateau`` with ``lr_factor``,
            ``lr_patience``, ``lr_threshold``, ``lr_scheduler_metric``, ``lr_min``.
        datamodule
            Not supported (ldvae reads the model's AnnData, in memory or backed on disk).
        trainer_config, **trainer_kwargs
            ``check_val_every_n_epoch`` (default: the last epoch only, every epoch with early
            stopping), ``early_stopping_patience``, ``early_stopping_monitor``,
            ``early_stopping_min_delta``, ``early_stopping_mode``, ``early_stopping_warmup_epochs``,
            ``strategy``; ldvae's ``preset="fast"`` (60 epochs, lr 2e-2, a 3-epoch KL warm-up,
            batch-norm momentum 0.05, ``ema_decay`` 0.65, where not given: on the tutorial data it
            reaches the validation ELBO of scvi-tools' 250 epochs), ``lr`` (the plan's),
            ``progress_bar`` (or ``enable_progress_bar``), ``seed`` (default ``ldvae.settings.seed``),
            ``split_seed`` (the training/validation split's; default ``seed``, as scvi-tools),
            ``checkpoint_dir`` with ``checkpoint_every_n_epochs`` (10), ``resume_from`` (a
            checkpoint; ``max_epochs`` counts its epochs; the same result as an uninterrupted
            fit), ``batch_norm_momentum`` (default the model's 0.01), ``ema_decay`` (the model keeps
            an average of its parameters, moved after each epoch with this decay, which validation
            reads; default None), ``threads`` (CPU threads; default every usable CPU for the
            compiled step, 64 cells each at least). Lightning-only options (``logger``, ...) are
            accepted and logged with what ldvae does instead.
        """
        self._refuse_if_minified("train", with_counts_too=True)
        if not fits_anything(self.module, getattr(self, "frozen_", None)):
            raise SetupError("Nothing to fit: the query adds no batch to the reference, whose encoder maps its cells "
                             "as they are (get_latent_representation works now); pass train_encoder=True to "
                             "load_query_data to fit the encoders to the query.")
        opts = train_options(trainer_kwargs, trainer_config)
        plan, max_epochs = with_preset(opts, {**dict(plan_config or {}), **dict(plan_kwargs or {})}, max_epochs)
        plan = check_plan(plan, opts["lr"])
        if datamodule is not None:
            raise SetupError("datamodule is not supported: ldvae reads the model's AnnData (in memory, or backed "
                             "on disk for data larger than memory).")
        check_strategy(opts["strategy"], devices)
        external = splitter_options(datasplitter_kwargs, self.adata.n_obs)
        n = self.adata.n_obs
        if max_epochs is None:
            max_epochs = int(min(400, round(20000 / n * 400)))
        check_train_args(
            batch_size=batch_size, max_epochs=max_epochs, early_stopping_patience=opts["early_stopping_patience"],
            check_val_every_n_epoch=opts["check_val_every_n_epoch"],
            checkpoint_every_n_epochs=opts["checkpoint_every_n_epochs"], threads=opts["threads"],
            batch_norm_momentum=opts["batch_norm_momentum"], ema_decay=opts["ema_decay"],
        )
        resume_from = opts["resume_from"]
        payload = None if resume_from is None else load_checkpoint(resume_from)
        seed, split_seed = fit_and_split_seeds(opts, payload, settings.seed)
        device = resolve_device(accelerator, devices if isinstance(devices, int) and devices >= 0 else None)
        train_idx, val_idx, test_idx = split_cells(n, train_size, validation_size, split_seed, batch_size,
                                                   shuffle=shuffle_set_split, external=external)
        config = TrainConfig(
            max_epochs=max_epochs, batch_size=batch_size, early_stopping=early_stopping,
            early_stopping_patience=opts["early_stopping_patience"],
            early_stopping_min_delta=float(opts["early_stopping_min_delta"]),
            early_stopping_monitor=opts["early_stopping_monitor"],
            early_stopping_mode=opts["early_stopping_mode"],
            early_stopping_warmup_epochs=int(opts["early_stopping_warmup_epochs"]),
            check_val_every_n_epoch=opts["check_val_every_n_epoch"],
            progress_bar=bool(opts["progress_bar"]),
            seed=seed, split_seed=split_seed,
            checkpoint_dir=None if opts["checkpoint_dir"] is None else str(opts["checkpoint_dir"]),
            checkpoint_every_n_epochs=opts["checkpoint_every_n_epochs"],
            batch_norm_momentum=opts["batch_norm_momentum"], ema_decay=opts["ema_decay"],
            threads=opts["threads"],
            frozen=getattr(self, "frozen_", None),
            data=data_record(self.var_names_, self.setup_, n),
            **plan,
        )
        state = continued_state(self.train_state_)
        if payload is not None:
            state = resume_state(self.module, payload, resume_from, config, max_epochs)
            config.max_epochs = max(max_epochs - state.epoch, 0)
        self.device = device  # the call's checks passed
        source = self._source(train_idx, val_idx, config.batch_size)  # reads and checks the counts, before the start
        start_from_counts(opts["init"], self.module, self.adata, self.setup_,
                          frozen=config.frozen, fresh=not self.is_trained_)
        self.module.to(self.device)
        try:
            fit(self.module, source, config, state)
        finally:
            # Also on NonFiniteLossError: the module is back at the end of its last completed
            # epoch, where the history ends.
            self.train_state_ = state
            self.train_indices_, self.validation_indices_, self.test_indices_ = train_idx, val_idx, test_idx
            self.is_trained_ = self.is_trained_ or state.step > 0

    def _source(self, train_idx, val_idx, batch_size: int):
        """The minibatches of a fit: streamed chunks of a backed AnnData, else counts on the device."""
        if counts_on_disk(self.adata, self.setup_):
            return StreamingSource.from_adata(self.adata, self.setup_, train_idx, val_idx, batch_size,
                                              device=self.device)
        return InMemorySource(self._data(), train_idx, val_idx, batch_size)

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

    # --- save / load -----------------------------------------------------------------------------
    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        save_kwargs: dict | None = None,
        legacy_mudata_format: bool = False,
        datamodule=None,
        *,
        format: Literal["ldvae", "scvi"] = "ldvae",
        **anndata_write_kwargs,
    ) -> None:
        """Save to ``dir_path``: ``ldvae_model.json`` (settings, genes, categories, the split's
        cells, history, versions, the SHA-256 of the weights), ``model_state.pt`` (weights)
        and, with ``save_anndata``, ``adata.h5ad``. Each file is written atomically; the JSON
        last. ``format="scvi"``: scvi-tools' layout (``model.pt``), which scvi-tools'
        ``LinearSCVI.load`` reads (see :mod:`ldvae.model.scvi_files`). ``save_kwargs`` (for
        ``torch.save``), ``legacy_mudata_format``, ``datamodule`` and ``anndata_write_kwargs``
        are accepted for scvi-tools' signature; ldvae's files need none of them."""
        if datamodule is not None:
            raise SetupError("datamodule is not supported: ldvae saves the model and, optionally, its AnnData.")
        if format == "scvi":
            from .scvi_files import write_scvi_model

            write_scvi_model(self, dir_path, prefix, overwrite=overwrite, save_anndata=save_anndata)
        elif format == "ldvae":
            save_model(self, dir_path, prefix, overwrite=overwrite, save_anndata=save_anndata)
        else:
            raise SetupError(f"format must be 'ldvae' or 'scvi', got {format!r}.")

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata=None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        backup_url: str | None = None,
        datamodule=None,
        allowed_classes_names_list: list[str] | None = None,
    ) -> "LinearSCVI":
        """Load a model saved with :meth:`save`, or by scvi-tools' ``LinearSCVI.save`` (its
        ``model.pt`` is read admitting plain data types only). ``adata`` must have the model's
        genes (in order) and only known categories; without ``adata`` the saved ``adata.h5ad``
        is used (or downloaded from ``backup_url`` when it is missing).

        Every field of the JSON and the stored weights' keys, shapes and values are checked
        before anything is built (a ModelFileError naming the field, its value and the file);
        ``adata.uns["ldvae_setup"]`` and scvi-tools' code columns are written only when the
        whole load succeeded."""
        if datamodule is not None:
            raise SetupError("datamodule is not supported: pass adata (in memory, or backed on disk).")
        meta, state = read_any_model(dir_path, prefix)
        device = resolve_device(accelerator, device)
        if adata is None:
            adata = read_saved_adata(dir_path, prefix, backup_url=backup_url)
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
        get_counts(adata, saved_setup.get("layer"))  # as does a missing counts layer, before the first query
        config = module_config(saved_setup, len(model.var_names_), meta["init_params"])
        with own_rng():  # weights drawn only to be replaced: the user's RNG kept
            model.module = LDVAEModule(config, torch.zeros(config.n_batch), torch.ones(config.n_batch))
        model.module.load_state_dict(state)  # keys, shapes and dtypes checked by read_model
        model.module.eval()
        model.device = device
        model.module.to(model.device)
        model.train_state_, model.is_trained_ = train_state_of(meta), bool(meta.get("is_trained"))
        model.frozen_ = frozen_of(meta, model.module, dir_path)  # a mapped model keeps the reference's weights
        model.train_indices_, model.validation_indices_, model.test_indices_ = split_of(meta)
        if not adata.is_view:  # only once everything succeeded: a failed load leaves adata untouched
            write_scvi_codes(adata, saved_setup)
        if record_setup:
            adata.uns["ldvae_setup"] = saved_setup
        model._reset_surface()
        return model

    # --- mapping new cells onto this model (ldvae.model.mapping) -----------------------------
    @staticmethod
    def prepare_query_anndata(adata, reference_model, return_reference_var_names: bool = False,
                              inplace: bool = False):
        """The query's cells over the reference's genes, in its order (zeros for genes the query
        lacks): a new AnnData, or the reference's genes with ``return_reference_var_names``.
        ``reference_model``: a model or its saved directory. ``inplace=True`` is refused (a
        gene axis cannot grow in place)."""
        from .mapping import prepare_query_anndata

        return prepare_query_anndata(adata, reference_model, return_reference_var_names, inplace)

    @classmethod
    def load_query_data(cls, adata, reference_model, *, train_encoder: bool = True, accelerator: str = "auto",
                        device: int | str = "auto") -> "LinearSCVI":
        """A model of the query cells ``adata`` (genes as the reference's: see
        :meth:`prepare_query_anndata`) that starts as ``reference_model`` (a model or its saved
        directory), with the query's new batch categories added. ``train()`` then fits only
        the decoder's columns of the new batches and, with ``train_encoder`` (default), the
        encoders (LDVAE's encoders do not see the batch: without them the query's factor
        values are the reference encoder's), with batch norm on its running statistics: the
        loadings, intercepts and reference batch effects stay as they were. Its queries work before ``train()`` too (the reference's
        encoder maps the cells). The reference is not changed."""
        from .mapping import query_setup, reference_of, transfer_weights

        meta, state = reference_of(reference_model)
        names = pd.Index(meta["var_names"])
        if not pd.Index(adata.var_names.astype(str)).equals(names):
            raise SetupError("The query's genes differ from the reference's; align them first: "
                             "adata = LinearSCVI.prepare_query_anndata(adata, reference).")
        setup = query_setup(adata, meta["setup"])
        params = meta["init_params"]
        model = cls(adata, **params)
        model.setup_ = setup
        model.frozen_ = transfer_weights(model.module, state, meta["setup"], setup, params["n_latent"],
                                         train_encoder=train_encoder)
        write_scvi_codes(adata, setup)
        model.is_trained_ = True  # the reference's weights: its encoder maps the query already
        model.to_device(resolve_device(accelerator, device))
        return model

    @classmethod
    def convert_legacy_save(
        cls,
        dir_path: str | os.PathLike,
        output_dir_path: str | os.PathLike,
        overwrite: bool = False,
        prefix: str | None = None,
        **save_kwargs,
    ) -> None:
        """Rewrite a model saved in the older layout (``model_params.pt``, ``attr.pkl``,
        ``var_names.csv``) as ldvae's files; ``attr.pkl`` is read admitting plain data only."""
        from .legacy import convert_legacy_save

        convert_legacy_save(dir_path, output_dir_path, overwrite=overwrite, prefix=prefix)

    def __repr__(self) -> str:
        p = self.init_params_
        status = "trained" if self.is_trained_ else "not trained"
        return (
            f"LinearSCVI(n_latent={p['n_latent']}, n_hidden={p['n_hidden']}, gene_likelihood={p['gene_likelihood']!r}, "
            f"dispersion={p['dispersion']!r}) on {len(self.var_names_)} genes, {self.n_batch} batch(es); {status}"
        )

