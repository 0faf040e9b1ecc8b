"""The members that scvi-tools' base model gives ``LinearSCVI`` and ldvae answers the same way:
the setup as a read-only registry (``adata_manager``, ``registry_``, ``summary_stats``), the
split's indices, the training status and summary, moving to a device, and the setup views.

ldvae records a setup as one plain dict in ``adata.uns["ldvae_setup"]`` and reads the user's
own columns. ``LinearSCVI.setup_anndata`` also writes scvi-tools' code columns
``obs["_scvi_batch"]`` and ``obs["_scvi_labels"]`` (:func:`write_scvi_codes`), as scvi-tools
does, and the registry points to them where they exist, to the user's column otherwise."""

from __future__ import annotations

import logging
import os
import uuid

import numpy as np
import torch

from ..util.checks import SetupError

logger = logging.getLogger(__name__)

MINIFIED_KEY = "_scvi_adata_minify_type"  # scvi-tools' marker of a minified AnnData
LATENT_POSTERIOR = "latent_posterior_parameters"  # the counts dropped
LATENT_POSTERIOR_WITH_COUNTS = "latent_posterior_parameters_with_counts"  # the counts kept
MINIFIED_FIELDS = "ldvae_minified"  # uns: where a minified AnnData keeps q(z | x) and the library
LIBRARY_KEY = "observed_lib_size"  # obs column of the observed library, as scvi-tools


SCVI_CODE_COLUMNS = {"batch": "_scvi_batch", "labels": "_scvi_labels"}  # obs columns scvi-tools writes


def write_scvi_codes(adata, setup: dict, cov=None) -> None:
    """Write scvi-tools' integer code columns of the batch and the labels into ``adata.obs``
    (0 for every cell where the setup has no such key), as scvi-tools' setup does; ``cov``:
    the covariates already read under ``setup``, else read here."""
    from ..data.contract import read_covariates

    if cov is None:
        cov = read_covariates(adata, setup)  # fails, naming the column, before anything is written
    adata.obs[SCVI_CODE_COLUMNS["batch"]] = cov.batch.astype(np.int64)
    adata.obs[SCVI_CODE_COLUMNS["labels"]] = cov.label.astype(np.int64)


def coded_fields(adata) -> set[str]:
    """The fields whose scvi-tools code column ``adata`` has."""
    return {f for f, col in SCVI_CODE_COLUMNS.items() if adata is not None and col in adata.obs}


def minified_fields(adata) -> dict | None:
    """The obsm keys of q(z | x) of a minified AnnData (with or without its counts)."""
    if adata is None or adata.uns.get(MINIFIED_KEY) not in (LATENT_POSTERIOR, LATENT_POSTERIOR_WITH_COUNTS):
        return None
    return dict(adata.uns.get(MINIFIED_FIELDS, {"qzm_key": "X_latent_qzm", "qzv_key": "X_latent_qzv"}))


def counts_dropped(adata) -> bool:
    """Whether ``adata`` is minified without its counts."""
    return adata is not None and adata.uns.get(MINIFIED_KEY) == LATENT_POSTERIOR


class Attrdict(dict):
    """A dict whose keys read as attributes too (scvi-tools' ``attrdict``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def registry_of(setup: dict, var_names, n_cells: int, coded: set[str] = frozenset()) -> dict:
    """scvi-tools' registry layout for ``setup_anndata``'s record ``setup``; the fields in
    ``coded`` are read from scvi-tools' code columns, the others from the user's."""
    layer = setup.get("layer")
    fields = {
        "X": {"data_registry": {"attr_name": "X" if layer is None else "layers", "attr_key": layer},
              "state_registry": {"n_obs": n_cells, "n_vars": len(var_names), "column_names": list(var_names)},
              "summary_stats": {"n_vars": len(var_names), "n_cells": n_cells}},
    }
    for field, key, cats, stat in (("batch", "batch_key", "batch_categories", "n_batch"),
                                   ("labels", "labels_key", "label_categories", "n_labels")):
        categories = setup.get(cats, ["0"])
        source = SCVI_CODE_COLUMNS[field] if field in coded else setup.get(key)
        fields[field] = {"data_registry": {"attr_name": "obs", "attr_key": source},
                         "state_registry": {"categorical_mapping": list(categories), "original_key": setup.get(key)},
                         "summary_stats": {stat: len(categories)}}
    cat_keys = setup.get("categorical_covariate_keys", [])
    if cat_keys:
        fields["extra_categorical_covs"] = {
            "data_registry": {"attr_name": "obs", "attr_key": list(cat_keys)},
            "state_registry": {"mappings": {k: list(setup["categorical_covariate_categories"][k]) for k in cat_keys},
                               "field_keys": list(cat_keys)},
            "summary_stats": {"n_extra_categorical_covs": len(cat_keys)}}
    cont_keys = setup.get("continuous_covariate_keys", [])
    if cont_keys:
        fields["extra_continuous_covs"] = {
            "data_registry": {"attr_name": "obs", "attr_key": list(cont_keys)},
            "state_registry": {"columns": list(cont_keys)},
            "summary_stats": {"n_extra_continuous_covs": len(cont_keys)}}
    args = {"batch_key": setup.get("batch_key"), "labels_key": setup.get("labels_key"), "layer": layer}
    if cat_keys:
        args["categorical_covariate_keys"] = list(cat_keys)
    if cont_keys:
        args["continuous_covariate_keys"] = list(cont_keys)
    return {"model_name": "LinearSCVI", "setup_method_name": "setup_anndata", "setup_args": args,
            "field_registries": fields}


def _as_attrdict(d: dict) -> Attrdict:
    return Attrdict({k: _as_attrdict(v) if isinstance(v, dict) else v for k, v in d.items()})


def format_registry(registry: dict, hide_state_registries: bool = False) -> str:
    """The registry as text: the setup arguments, then each field's source (and state)."""
    lines = ["Setup via `LinearSCVI.setup_anndata` with arguments:"]
    lines += [f"  {k}: {v!r}" for k, v in registry["setup_args"].items()]
    lines.append("Fields (where each is read from):")
    for name, field in registry["field_registries"].items():
        where = field["data_registry"]
        source = where["attr_name"] + (f"[{where['attr_key']!r}]" if where["attr_key"] is not None else "")
        lines.append(f"  {name}: {source}; " + ", ".join(f"{k}={v}" for k, v in field["summary_stats"].items()))
        if not hide_state_registries and name != "X":
            lines += [f"    {k}: {v}" for k, v in field["state_registry"].items()]
    return "\n".join(lines)


class SetupView:
    """A read-only stand-in for scvi-tools' ``AnnDataManager``: the AnnData and its registry."""

    def __init__(self, adata, registry: dict):
        self.adata = adata
        self.registry = registry

    @property
    def data_registry(self) -> Attrdict:
        return _as_attrdict({k: f["data_registry"] for k, f in self.registry["field_registries"].items()})

    @property
    def summary_stats(self) -> Attrdict:
        stats = {}
        for field in self.registry["field_registries"].values():
            stats.update(field["summary_stats"])
        stats.setdefault("n_extra_categorical_covs", 0)
        stats.setdefault("n_extra_continuous_covs", 0)
        return Attrdict(stats)

    def get_state_registry(self, registry_key: str) -> Attrdict:
        """A field's state in scvi-tools' types: names and categories as object arrays (so
        ``categorical_mapping[codes]`` maps codes to categories), [0] for a field without a key."""
        state = dict(self._field(registry_key)["state_registry"])
        for name in ("column_names", "columns"):
            if name in state:
                state[name] = np.asarray(state[name], dtype=object)
        if "categorical_mapping" in state:
            state["categorical_mapping"] = (np.asarray(state["categorical_mapping"], dtype=object)
                                            if state["original_key"] is not None else np.zeros(1, np.int64))
        if "mappings" in state:
            state["mappings"] = {k: np.asarray(v, dtype=object) for k, v in state["mappings"].items()}
            state["field_keys"] = tuple(state["field_keys"])
            state["n_cats_per_key"] = tuple(len(state["mappings"][k]) for k in state["field_keys"])
        return _as_attrdict(state)

    def get_from_registry(self, registry_key: str):
        """The values of a field for every cell: the counts, or category codes of batch/labels."""
        from ..data.contract import get_counts, read_covariates

        self._field(registry_key)
        setup = self.adata.uns["ldvae_setup"]
        if registry_key == "X":
            return get_counts(self.adata, setup.get("layer"))
        cov = read_covariates(self.adata, setup)
        if registry_key in ("batch", "labels"):
            return np.asarray(cov.batch if registry_key == "batch" else cov.label).reshape(-1, 1)
        raise SetupError(f"{registry_key!r} has no single column to return; read adata.obs directly.")

    def view_registry(self, hide_state_registries: bool = False) -> None:
        """Print the model's registry: the setup arguments and where each field is read from."""
        print(format_registry(self.registry, hide_state_registries))

    def _field(self, key: str) -> dict:
        fields = self.registry["field_registries"]
        if key not in fields:
            raise KeyError(f"{key!r} is not a registered field; the fields are {sorted(fields)}.")
        return fields[key]


def _stored(name: str, convert=None, doc: str = "") -> property:
    """scvi-tools' public name for the attribute ``name`` (set through it: ``convert(value)``)."""
    def set_(self, value) -> None:
        setattr(self, name, value if convert is None else convert(value))

    return property(lambda self: getattr(self, name), set_, doc=doc)


class ScviSurface:
    """scvi-tools' base-model members of ``LinearSCVI``: the model supplies ``adata``,
    ``setup_``, ``var_names_``, ``module``, ``config``, ``init_params_``, ``device``,
    ``is_trained_`` and the ``*_indices_`` arrays."""

    get_normalized_function_name_ = "get_normalized_expression"
    trainer = None  # no Lightning Trainer: the loop is ldvae.train.loop.fit
    run_id_ = run_name_ = None

    def _reset_surface(self) -> None:
        """The registry and identifiers of a model just built or loaded."""
        self.registry_ = registry_of(self.setup_, self.var_names_, int(self.adata.n_obs), coded_fields(self.adata))
        if not hasattr(self, "id"):
            self.id = uuid.uuid4().hex

    # --- the setup, read-only -------------------------------------------------------------
    @property
    def registry(self) -> dict:
        return self.registry_

    @property
    def summary_stats(self) -> Attrdict:
        """Sizes of the setup: ``n_vars``, ``n_cells``, ``n_batch``, ``n_labels``, covariates."""
        return self.adata_manager.summary_stats

    @property
    def adata_manager(self) -> SetupView:
        """The AnnData and the registry of its setup (read-only)."""
        return SetupView(self.adata, self.registry_)

    def get_anndata_manager(self, adata, required: bool = False) -> SetupView | None:
        """The setup view of ``adata`` when it is the model's AnnData or set up like it, else
        None (``required``: a SetupError saying what to run)."""
        from ..data.contract import SETUP_KEY

        if adata is self.adata or (SETUP_KEY in adata.uns and adata.uns[SETUP_KEY] == self.setup_):
            return SetupView(adata, registry_of(self.setup_, self.var_names_, int(adata.n_obs), coded_fields(adata)))
        if required:
            raise SetupError("adata is not set up as this model's AnnData. Run model.transfer_fields(adata) first.")
        return None

    def data_registry(self, registry_key: str):
        """Where the field ``registry_key`` (e.g. ``"batch"``) is read from, as scvi-tools records it."""
        return self.adata_manager.data_registry[registry_key]

    def get_from_registry(self, adata, registry_key: str):
        """The values of the field ``registry_key`` of ``adata`` (set up as this model's)."""
        return self.get_anndata_manager(adata, required=True).get_from_registry(registry_key)

    def get_state_registry(self, registry_key: str) -> Attrdict:
        """The field's state (e.g. the batch categories in code order), as scvi-tools records it."""
        return self.adata_manager.get_state_registry(registry_key)

    def get_setup_arg(self, setup_arg: str):
        """The value ``setup_anndata`` was given for ``setup_arg`` (e.g. ``"batch_key"``)."""
        return self.registry_["setup_args"][setup_arg]

    def get_var_names(self, legacy_mudata_format: bool = False):
        """The model's genes, in the order it models them."""
        return np.asarray(self.var_names_, dtype=object)

    def transfer_fields(self, adata, **kwargs):
        """Set up ``adata`` with this model's setup (same genes, known categories; scvi-tools'
        code columns written) and return it."""
        from ..data.contract import SETUP_KEY, check_not_view

        check_not_view(adata, "transfer_fields")
        self._check_genes(adata)
        write_scvi_codes(adata, self.setup_)  # an unknown category fails here, naming it
        adata.uns[SETUP_KEY] = dict(self.setup_)
        return adata

    def view_anndata_setup(self, adata=None, hide_state_registries: bool = False) -> None:
        """Print the setup of ``adata`` (default: the model's), as scvi-tools prints it."""
        target = self.adata if adata is None else adata
        print(format_registry(self.get_anndata_manager(target, required=True).registry, hide_state_registries))

    def view_registry(self, hide_state_registries: bool = False) -> None:
        """Print the model's registry: the setup arguments and where each field is read from."""
        print(format_registry(self.registry_, hide_state_registries))

    def view_setup_method_args(self) -> None:
        """Print the arguments ``setup_anndata`` was given."""
        print(format_registry(self.registry_, hide_state_registries=True).split("\nFields")[0])

    @staticmethod
    def load_registry(dir_path: str | os.PathLike, prefix: str | None = None) -> dict:
        """The registry of a model saved in ``dir_path``."""
        from .scvi_files import read_any_model

        meta, _ = read_any_model(dir_path, prefix)
        return registry_of(meta["setup"], meta["var_names"], int(meta.get("n_cells", 0)))

    @staticmethod
    def view_setup_args(dir_path: str | os.PathLike, prefix: str | None = None) -> None:
        """Print the setup arguments of the model saved in ``dir_path``."""
        registry = ScviSurface.load_registry(dir_path, prefix)
        print(format_registry(registry, hide_state_registries=True).split("\nFields")[0])

    @classmethod
    def register_manager(cls, adata_manager) -> None:
        """Refused: ldvae keeps no AnnData managers (the error says what to do instead)."""
        raise NotImplementedError(
            "ldvae keeps no AnnData managers: LinearSCVI.setup_anndata(adata, ...) records the setup in "
            "adata.uns['ldvae_setup']."
        )

    def deregister_manager(self, adata=None) -> None:
        """Nothing to forget: ldvae keeps no AnnData managers (logged)."""
        logger.info("deregister_manager: ldvae keeps no AnnData managers; nothing to do.")

    def update_setup_method_args(self, setup_method_args: dict) -> None:
        """Refused: the setup is fixed when the model is built (the error says what to do instead)."""
        raise NotImplementedError(
            "ldvae's setup is fixed when the model is built; run LinearSCVI.setup_anndata again and build a new model."
        )

    @classmethod
    def setup_annbatch(cls, collection_path=None, paths=None, batch_key=None, labels_key=None, sample_key=None,
                       unlabeled_category="Unknown", layer=None, categorical_covariate_keys=None,
                       continuous_covariate_keys=None, rebuild=True, batch_size=4096, chunk_size=256,
                       preload_nchunks=32, preload_to_gpu=True, dataset_size="20GB", shuffle=False, var_subset=None,
                       merge=None, adatas=None, use_class_sampler=False, class_sampler_key=None, class_weights=None):
        """Refused: ldvae streams a backed .h5ad or .zarr instead of annbatch collections (the error says how)."""
        raise NotImplementedError(
            "ldvae streams counts larger than memory from a backed .h5ad or .zarr instead of annbatch collections: "
            "adata = anndata.read_h5ad(path, backed='r'); LinearSCVI.setup_anndata(adata, ...) (see docs/scale.md)."
        )

    # --- minified data --------------------------------------------------------------------
    @property
    def minified_data_type(self) -> str | None:
        """How :meth:`minify_adata` minified the model's AnnData: ``"latent_posterior_parameters"``
        (counts dropped) or ``"latent_posterior_parameters_with_counts"``; None before."""
        return self.adata.uns.get(MINIFIED_KEY) if self.adata is not None else None

    def minify_adata(self, minified_data_type: str = LATENT_POSTERIOR, use_latent_qzm_key: str = "X_latent_qzm",
                     use_latent_qzv_key: str = "X_latent_qzv") -> None:
        """Replace the model's AnnData by a minified one: the same obs (plus the observed
        library ``obs["observed_lib_size"]``), var, obsm and uns, and q(z | x) read from
        ``obsm[use_latent_qzm_key]`` (mean) and ``obsm[use_latent_qzv_key]`` (variance), e.g.
        from ``get_latent_representation(give_mean=False, return_dist=True)``.

        ``"latent_posterior_parameters"`` drops the counts (an empty sparse ``X`` and layer):
        queries that need no counts then decode from the stored posterior with the observed
        library (latent, normalized expression, differential expression, samples, likelihood
        parameters); ELBO, reconstruction error, marginal likelihood and importance weights
        need the counts and say so. ``"latent_posterior_parameters_with_counts"`` keeps them
        (and ``raw``): every query answers, from the stored posterior and the counts. Training
        is refused either way (the stored posterior would no longer be the model's). The
        original AnnData is not changed."""
        import anndata
        import scipy.sparse as sp

        from ..data.contract import get_counts

        kinds = (LATENT_POSTERIOR, LATENT_POSTERIOR_WITH_COUNTS)
        if minified_data_type not in kinds:
            raise SetupError(f"minified_data_type must be one of {kinds}, got {minified_data_type!r}.")
        if self.minified_data_type is not None:
            raise SetupError("The model's AnnData is minified already.")
        if not self.config.use_observed_lib_size:
            raise SetupError(
                "minify_adata needs a model that uses the observed library size: without the counts this "
                "model's learned library cannot be inferred. Build it with use_observed_lib_size=True.")
        source = self.adata
        n, k = source.n_obs, self.config.n_latent
        for key in (use_latent_qzm_key, use_latent_qzv_key):
            if key not in source.obsm or np.shape(source.obsm[key]) != (n, k):
                raise SetupError(
                    f"minify_adata needs adata.obsm[{key!r}] of shape ({n}, {k}); store it first: qzm, qzv = "
                    "model.get_latent_representation(give_mean=False, return_dist=True).")
        if np.any(np.asarray(source.obsm[use_latent_qzv_key]) <= 0):
            raise SetupError(f"adata.obsm[{use_latent_qzv_key!r}] must hold variances (> 0).")
        layer = self.setup_.get("layer")
        library = np.asarray(get_counts(source, layer).sum(axis=1), dtype=np.float64).ravel()
        if minified_data_type == LATENT_POSTERIOR_WITH_COUNTS:
            minified = source.to_memory() if source.isbacked else source.copy()
        else:
            empty = sp.csr_matrix((n, source.n_vars), dtype=np.float32)
            minified = anndata.AnnData(X=empty, obs=source.obs.copy(), var=source.var.copy(), obsm=dict(source.obsm),
                                       uns=dict(source.uns), layers={} if layer is None else {layer: empty.copy()})
        minified.obs[LIBRARY_KEY] = library
        minified.uns[MINIFIED_KEY] = minified_data_type
        minified.uns[MINIFIED_FIELDS] = {"qzm_key": use_latent_qzm_key, "qzv_key": use_latent_qzv_key}
        self.adata = minified
        self._data_cache = None
        self._reset_surface()
        self.registry_["minified_data_type"] = minified_data_type

    def _refuse_if_minified(self, what: str, *, with_counts_too: bool = False) -> None:
        kind = self.minified_data_type
        if kind == LATENT_POSTERIOR:
            raise SetupError(f"{what} needs the counts, and this model's AnnData is minified (no counts). Load the "
                             "full data: LinearSCVI.load(dir_path, adata=full_adata).")
        if kind is not None and with_counts_too:
            raise SetupError(f"{what} is refused on a minified AnnData: its stored posterior would no longer be the "
                             "model's. Load the full data: LinearSCVI.load(dir_path, adata=full_adata).")

    # --- status --------------------------------------------------------------------------
    is_trained = _stored("is_trained_", bool, "True once a training step completed")

    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    train_indices = _stored("train_indices_", np.asarray, "the training cells, saved with the model")
    validation_indices = _stored("validation_indices_", np.asarray, "the validation cells, saved with the model")
    test_indices = _stored("test_indices_", np.asarray, "the cells of neither split, saved with the model")
    run_id = _stored("run_id_", doc="None until set: there is no experiment tracker")
    run_name = _stored("run_name_", doc="None until set")

    @property
    def history_(self) -> dict:
        return self.history

    @property
    def get_normalized_function_name(self) -> str:
        return self.get_normalized_function_name_

    @property
    def summary_string(self) -> str:
        p = self.init_params_
        return (
            f"LinearSCVI Model with the following params: \nn_hidden: {p['n_hidden']}, n_latent: {p['n_latent']}, "
            f"n_layers: {p['n_layers']}, dropout_rate: {p['dropout_rate']}, dispersion: {p['dispersion']}, "
            f"gene_likelihood: {p['gene_likelihood']}, latent_distribution: {p['latent_distribution']}"
            f"\nTraining status: {'Trained' if self.is_trained_ else 'Not Trained'}"
        )

    def to_device(self, device: str | int | torch.device) -> None:
        """Move the model to ``device`` ('cpu', a GPU index, 'cuda:0' or a torch.device)."""
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SetupError(f"to_device({str(device)!r}): no CUDA GPU is available here; the model stays on the CPU.")
        if device.type == "cpu":
            device = torch.device("cpu")  # one CPU device: 'cpu:1' is the same memory
        self.module.to(device)
        self.device = device
        self._data_cache = None

    def _get_user_attributes(self) -> list[tuple[str, object]]:
        """The model's state as scvi-tools' legacy ``attr.pkl`` held it: plain values only."""
        history = self.train_state_.history if self.train_state_ is not None else {}
        return [("init_params_", dict(self.init_params_)), ("setup_", dict(self.setup_)),
                ("is_trained_", bool(self.is_trained_)), ("train_indices_", np.asarray(self.train_indices_)),
                ("validation_indices_", np.asarray(self.validation_indices_)),
                ("test_indices_", np.asarray(self.test_indices_)), ("train_history_", history)]
