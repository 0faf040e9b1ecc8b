"""scvi-tools' saved ``LinearSCVI`` directories: ``{prefix}model.pt`` (``torch.save`` of
``{"model_state_dict", "var_names", "attr_dict"}``) and optionally ``{prefix}adata.h5ad``,
as written by scvi-tools 1.x ``model.save``.

:func:`read_scvi_model` turns one into ldvae's ``(meta, state)``, the pair
:func:`ldvae.model.files.read_model` returns, checked in the same way;
:func:`write_scvi_model` writes an ldvae model in that layout, which scvi-tools'
``LinearSCVI.load`` reads (checked with scvi-tools 1.4.2 and 1.5.1).

``attr_dict`` holds pandas DataFrames (the history), NumPy arrays and a ``defaultdict``,
which ``torch.load(weights_only=True)`` cannot rebuild; the file is read by an allow-list
unpickler (:func:`ldvae.util.safe_pickle.safe_torch_load`) that builds tensors and the
plain types in :data:`SCVI_GLOBALS` only, and refuses any other global without running it.

The module's tensors map one to one (:data:`KEY_PREFIXES`). scvi-tools' module also keeps
tensors that its LinearSCVI never uses under some settings: the library encoder when the
library is observed, the zero-inflation decoder unless ``gene_likelihood="zinb"``, the
dispersion under Poisson. Read, they are dropped; written, they are neutral (zero weights,
batch norms at their initial state).
"""

from __future__ import annotations

import os
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._version import __version__
from ..nn.module import LDVAEModule, ModuleConfig
from ..train.checkpoint import check_weights
from ..train.config import ModelFileError
from ..util.checks import ModelNotFoundError, SetupError
from ..util.io import atomic_torch_save
from ..util.safe_pickle import ALLOWED, RefusedPickle, safe_torch_load
from ..util.settings import own_rng
from .files import FORMAT_VERSION, LEGACY_WEIGHTS, MODEL_JSON, SCVI_MODEL_FILE, SPLIT_NAMES, _check_meta, saving
from .params import check_model_kwargs, module_config

SCVI_VERSION = "1.4.2"  # the registry's version stamp on files ldvae writes
# What scvi-tools' model.pt pickles besides tensors: NumPy arrays and dtypes (var_names,
# categories, split indices), builtins and collections (the registry is a defaultdict,
# the state dict an OrderedDict, bytes come as _codecs.encode in pickle protocol 2), and
# the pandas classes a history DataFrame is rebuilt from. None of them runs code of the file.
SCVI_GLOBALS = ALLOWED | {
    ("builtins", "bytes"), ("_codecs", "encode"), ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("pandas.core.frame", "DataFrame"), ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.base", "_new_Index"), ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas.core.internals.managers", "BlockManager"), ("pandas._libs.internals", "_unpickle_block"),
}
# ldvae's tensor name prefixes and scvi-tools' (the encoders' hidden layers are added per
# layer by key_table: ldvae's trunk is [Linear, BatchNorm, ReLU, Dropout] per layer,
# scvi-tools' "Layer i" is [Linear, BatchNorm, LayerNorm, ReLU, Dropout]).
KEY_PREFIXES = (
    ("z_encoder.mean.", "z_encoder.mean_encoder."), ("z_encoder.var.", "z_encoder.var_encoder."),
    ("l_encoder.mean.", "l_encoder.mean_encoder."), ("l_encoder.var.", "l_encoder.var_encoder."),
    ("factor_regressor.", "decoder.factor_regressor.fc_layers.Layer 0.0."),
    ("factor_bn.", "decoder.factor_regressor.fc_layers.Layer 0.1."),
    ("zi_regressor.", "decoder.px_dropout_decoder.fc_layers.Layer 0.0."),
    ("zi_bn.", "decoder.px_dropout_decoder.fc_layers.Layer 0.1."),
)
LIBRARY_BUFFERS = ("library_log_means", "library_log_vars")  # ldvae (n_batch,), scvi-tools (1, n_batch)
# LinearSCVI's constructor settings as scvi-tools saves them, with its defaults.
SCVI_INIT_DEFAULTS = {"n_hidden": 128, "n_latent": 10, "n_layers": 1, "dropout_rate": 0.1, "dispersion": "gene",
                      "gene_likelihood": "nb", "use_observed_lib_size": False, "latent_distribution": "normal"}
ATTRS_READ = {"init_params_", "registry_", "history_", "is_trained_", "train_indices_", "validation_indices_",
              "test_indices_"}
ATTRS_IGNORED = {"run_id_", "run_name_", "get_normalized_function_name_"}  # bookkeeping with no model content


def is_scvi_model(dir_path: str | os.PathLike, prefix: str | None = None) -> bool:
    """Whether ``dir_path`` holds a model saved by scvi-tools (``{prefix}model.pt``) rather
    than by ldvae (whose ``{prefix}ldvae_model.json`` wins when both are there)."""
    d, p = Path(dir_path), prefix or ""
    return (d / f"{p}{SCVI_MODEL_FILE}").is_file() and not (d / f"{p}{MODEL_JSON}").exists()


def read_any_model(dir_path: str | os.PathLike, prefix: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, state)`` of a model saved by ldvae or by scvi-tools, told apart by their files."""
    from .files import read_model

    return read_scvi_model(dir_path, prefix) if is_scvi_model(dir_path, prefix) else read_model(dir_path, prefix)


def key_table(n_layers: int) -> tuple[tuple[str, str], ...]:
    """(ldvae prefix, scvi-tools prefix) of every tensor name, for a z encoder of ``n_layers``."""
    trunk = tuple(
        (f"{enc}.trunk.{4 * i + j}.", f"{enc}.encoder.fc_layers.Layer {i}.{j}.")
        for enc, layers in (("z_encoder", n_layers), ("l_encoder", 1)) for i in range(layers) for j in (0, 1)
    )
    return trunk + KEY_PREFIXES


def scvi_key(key: str, table: tuple[tuple[str, str], ...]) -> str:
    """scvi-tools' name of ldvae's tensor ``key`` (names without a prefix in ``table`` are shared)."""
    for ours, theirs in table:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def _scvi_module(config: ModuleConfig, device: str) -> LDVAEModule:
    """An ldvae module holding every tensor scvi-tools' LDVAE keeps for ``config``: its library
    encoder, zero-inflation decoder and dispersion whether used or not; neutral values."""
    full = replace(config, gene_likelihood="zinb", use_observed_lib_size=False)
    means, variances = torch.zeros(config.n_batch), torch.ones(config.n_batch)  # on the CPU: the module reads them
    with torch.device(device), own_rng():  # weights set below: the user's RNG kept
        module = LDVAEModule(full, means, variances)
    with torch.no_grad():
        for part in module.modules():
            if isinstance(part, nn.Linear):
                part.weight.zero_()
                if part.bias is not None:
                    part.bias.zero_()
        module.px_r.zero_()
    return module


def _refuse_unsupported(config: ModuleConfig, setup: dict, what: str) -> None:
    if config.dispersion == "gene-cell":
        raise SetupError(f"{what}: scvi-tools' LinearSCVI cannot use dispersion='gene-cell' (its linear decoder "
                         "gives no per-cell dispersion). Use 'gene', 'gene-batch' or 'gene-label'.")
    covariates = [k for k in ("categorical_covariate_keys", "continuous_covariate_keys") if setup.get(k)]
    if covariates:
        raise SetupError(
            f"{what}: the model was set up with {', '.join(f'{k}={setup[k]!r}' for k in covariates)}, but scvi-tools' "
            "LinearSCVI.setup_anndata takes only batch_key, labels_key and layer, so scvi-tools cannot load it. "
            "Save it with model.save(), or train without covariates to share it with scvi-tools."
        )


# --- reading ---------------------------------------------------------------------------------
def read_scvi_model(dir_path: str | os.PathLike, prefix: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """ldvae's checked ``(meta, state)`` of the scvi-tools ``LinearSCVI`` saved in ``dir_path``.

    Parameters
    ----------
    dir_path
        A directory written by scvi-tools' ``model.save``.
    prefix
        The ``prefix`` it was saved with.

    Returns
    -------
    The model's JSON record (settings, genes, categories, split, history) and its state
    dict, as :func:`ldvae.model.files.read_model` returns them.

    Raises
    ------
    ModelFileError
        The file names a global outside :data:`SCVI_GLOBALS` (nothing of it was run), holds
        another scvi-tools model, a setting or a tensor ldvae's LinearSCVI has no place for,
        or tensors that do not fit its settings; the message names it.
    """
    path = Path(dir_path) / f"{prefix or ''}{SCVI_MODEL_FILE}"
    if not path.is_file():
        raise ModelNotFoundError(f"{path} does not exist; is {Path(dir_path)} a directory saved by scvi-tools?")
    try:
        saved = safe_torch_load(path, SCVI_GLOBALS)
    except RefusedPickle as err:
        raise ModelFileError(f"{path} cannot be read as a scvi-tools model: {err}.") from err
    except Exception as err:  # truncated, corrupted, or not torch.save's layout
        raise ModelFileError(f"{path} is not a readable scvi-tools model file ({type(err).__name__}: {err}).") from err
    if not isinstance(saved, dict) or not {"model_state_dict", "var_names", "attr_dict"} <= set(saved):
        raise ModelFileError(f"{path} is not a scvi-tools model file: it lacks model_state_dict, var_names or "
                             "attr_dict, which scvi-tools 0.15 and later save.")
    try:
        meta = _meta(saved["attr_dict"], saved["var_names"], path)
    except ModelFileError:
        raise
    except (AttributeError, TypeError, KeyError, ValueError) as err:  # a field of another type than scvi-tools writes
        raise ModelFileError(f"{path}: attr_dict is damaged ({type(err).__name__}: {err}).") from err
    _check_meta(meta, path)
    return meta, _state(saved["model_state_dict"], meta, path)


def _meta(attrs, var_names, path: Path) -> dict:
    if not isinstance(attrs, dict):
        raise ModelFileError(f"{path}: attr_dict is a {type(attrs).__name__}, not a dict.")
    unknown = sorted(set(attrs) - ATTRS_READ - ATTRS_IGNORED)
    if unknown:
        raise ModelFileError(f"{path}: attr_dict holds {unknown}, which ldvae cannot map (it reads "
                             f"{sorted(ATTRS_READ)}).")
    missing = [k for k in ("init_params_", "registry_") if k not in attrs]
    if missing:
        raise ModelFileError(f"{path}: attr_dict lacks {missing}; the file is damaged or not a model.")
    setup, n_cells = _setup(attrs["registry_"], path)
    params = _init_params(attrs["init_params_"], path)
    history = _history(attrs.get("history_") or {}, path)
    epochs = [int(row[0]) for rows in history.values() for row in rows]
    return {
        "format": "ldvae-model", "format_version": FORMAT_VERSION, "ldvae_version": __version__,
        "torch_version": torch.__version__, "init_params": params, "setup": setup,
        "var_names": [str(v) for v in np.asarray(var_names).ravel()], "n_cells": n_cells,
        "is_trained": bool(attrs.get("is_trained_", False)),
        "split": {name: [int(i) for i in np.asarray(attrs.get(f"{name}_indices_", [])).ravel()]
                  for name in SPLIT_NAMES},
        # scvi-tools keeps no step count nor warm-up length: a later train() starts a new warm-up
        "train_state": None if not history
        else {"epoch": max(epochs, default=-1) + 1, "step": 0, "warmup_steps": 0, "history": history},
        "weights_sha256": None,
    }


def _setup(registry, path: Path) -> tuple[dict, int]:
    """ldvae's setup record and the number of cells from scvi-tools' registry."""
    name = registry.get("model_name") if isinstance(registry, dict) else None
    if name != "LinearSCVI":
        raise ModelFileError(f"{path} holds a scvi-tools {name or 'unknown'} model; ldvae reads LinearSCVI "
                             "models only.")
    method = registry.get("setup_method_name", "setup_anndata")
    if method != "setup_anndata":
        raise ModelFileError(f"{path}: the data were registered with {method}; ldvae maps setup_anndata's only.")
    fields, args = registry.get("field_registries", {}), registry.get("setup_args", {})
    unknown = sorted(set(fields) - {"X", "batch", "labels"}) + sorted(set(args) - {"layer", "batch_key", "labels_key"})
    if unknown:
        raise ModelFileError(f"{path}: the registry holds {unknown}, which ldvae cannot map (it maps setup_anndata's "
                             "layer, batch_key and labels_key; a minified AnnData adds fields: save it unminified).")
    setup: dict = {}
    if args.get("layer") is not None:
        setup["layer"] = str(args["layer"])
    for arg, field, categories in (("batch_key", "batch", "batch_categories"),
                                   ("labels_key", "labels", "label_categories")):
        if args.get(arg) is not None:
            setup[arg] = str(args[arg])
            mapping = fields.get(field, {}).get("state_registry", {}).get("categorical_mapping")
            setup[categories] = [str(c) for c in np.asarray(mapping if mapping is not None else []).ravel()]
    n_cells = fields.get("X", {}).get("state_registry", {}).get("n_obs", 0)
    return setup, int(n_cells)


def _init_params(init, path: Path) -> dict:
    """ldvae's ``init_params`` from scvi-tools' ``init_params_``: nested as
    ``{"non_kwargs": {...}, "kwargs": {"model_kwargs": {...}}}``, or flat as older versions wrote it."""
    if not isinstance(init, dict):
        raise ModelFileError(f"{path}: init_params_ is a {type(init).__name__}, not a dict.")
    if "non_kwargs" in init:
        given, groups = dict(init["non_kwargs"]), init.get("kwargs", {})
    else:
        given = {k: v for k, v in init.items() if not isinstance(v, dict) and k != "use_cuda"}
        groups = {k: v for k, v in init.items() if isinstance(v, dict)}
    model_kwargs = {k: v for group in groups.values() for k, v in group.items()}
    for name in ("registry", "datamodule"):  # scvi-tools 1.5 records these; None for a model built from AnnData
        if given.get(name, None) is None:
            given.pop(name, None)
    unknown = sorted(set(given) - set(SCVI_INIT_DEFAULTS))
    if unknown:
        raise ModelFileError(f"{path}: init_params_ has {unknown}, which ldvae's LinearSCVI does not take.")
    params = {**SCVI_INIT_DEFAULTS, **{k: v.item() if isinstance(v, np.generic) else v for k, v in given.items()}}
    model_kwargs.pop("n_labels", None)  # the gene-label dispersion's size; its tensor's shape is checked
    try:
        params.update(check_model_kwargs(model_kwargs))
    except (SetupError, TypeError) as err:
        raise ModelFileError(f"{path}: init_params_ model_kwargs cannot be mapped: {err}") from err
    return params


def _history(history, path: Path) -> dict[str, list[list[float]]]:
    """scvi-tools' ``history_`` ({key: DataFrame indexed by epoch}) as ldvae's {key: [[epoch, value], ...]}."""
    out = {}
    for key, frame in dict(history).items():
        if not isinstance(frame, pd.DataFrame) or frame.shape[1] != 1:
            raise ModelFileError(f"{path}: history_[{key!r}] is not a one-column DataFrame indexed by epoch.")
        out[str(key)] = [[int(epoch), float(value)] for epoch, value in zip(frame.index, frame.iloc[:, 0])]
    return out


def _state(saved: dict, meta: dict, path: Path) -> dict[str, torch.Tensor]:
    """ldvae's state dict from scvi-tools' ``model_state_dict``, every tensor placed or refused."""
    config = module_config(meta["setup"], len(meta["var_names"]), meta["init_params"])
    try:
        _refuse_unsupported(config, meta["setup"], str(path))
    except SetupError as err:
        raise ModelFileError(str(err)) from err
    if not isinstance(saved, dict):
        raise ModelFileError(f"{path}: model_state_dict is a {type(saved).__name__}, not a dict of named tensors.")
    store = saved.get("pyro_param_store")
    if store is not None and (not isinstance(store, dict) or any(store.values())):
        raise ModelFileError(f"{path}: model_state_dict holds Pyro parameters, which a LinearSCVI has none of.")
    means, variances = torch.zeros(config.n_batch), torch.ones(config.n_batch)
    with torch.device("meta"):
        reference = LDVAEModule(config, means, variances).state_dict()
    table = key_table(config.n_layers)
    known = {scvi_key(k, table) for k in _scvi_module(config, "meta").state_dict()} | {"pyro_param_store"}
    extra = [k for k in saved if k not in known]
    if extra:
        raise ModelFileError(f"{path}: model_state_dict holds {extra[:5]}, which ldvae's LinearSCVI with these "
                             f"settings has no place for (n_layers={config.n_layers}).")
    state: dict[str, torch.Tensor] = {}
    for key in reference:
        name = scvi_key(key, table)
        if key in LIBRARY_BUFFERS and config.use_observed_lib_size:  # scvi-tools keeps no prior then
            state[key] = torch.zeros(config.n_batch) if key == "library_log_means" else torch.ones(config.n_batch)
            continue
        if name not in saved:
            raise ModelFileError(f"{path}: model_state_dict lacks {name!r}, which a LinearSCVI with these settings "
                                 "has.")
        value = saved[name]
        if key in LIBRARY_BUFFERS and isinstance(value, torch.Tensor) and value.dim() == 2 and len(value) == 1:
            value = value.reshape(-1)
        state[key] = value

    def mismatch(key, detail):
        where = f" ({scvi_key(key, table)!r} in scvi-tools' names)" if key is not None else ""
        return ModelFileError(f"{path} does not fit its own settings{where}: {detail}.")

    check_weights(state, reference, mismatch)
    return state


# --- writing ---------------------------------------------------------------------------------
def write_scvi_model(model, dir_path: str | os.PathLike, prefix: str | None = None, *, overwrite: bool = False,
                     save_anndata: bool = False) -> None:
    """Save ``model`` (an ldvae ``LinearSCVI``) as scvi-tools saves a ``LinearSCVI``, for
    ``scvi.model.LinearSCVI.load``.

    Parameters
    ----------
    model
        The model to write.
    dir_path
        The directory to write ``{prefix}model.pt`` (and ``{prefix}adata.h5ad``) into.
    prefix
        A prefix for the file names.
    overwrite
        Replace the files when ``dir_path`` is not empty.
    save_anndata
        Also write the model's AnnData.

    Raises
    ------
    SetupError
        The model uses what scvi-tools' LinearSCVI has not: covariates, or
        ``dispersion="gene-cell"``.
    FileExistsError
        ``dir_path`` is not empty and ``overwrite`` is False.
    """
    config, setup = model.config, model.setup_
    _refuse_unsupported(config, setup, "write_scvi_model")
    p = prefix or ""
    own = {k: v.detach().cpu() for k, v in model.module.state_dict().items()}
    table = key_table(config.n_layers)
    state = OrderedDict()
    for key, neutral in _scvi_module(config, "cpu").state_dict().items():
        if key in LIBRARY_BUFFERS:
            if not config.use_observed_lib_size:  # scvi-tools registers the prior only when it is used
                state[key] = own[key].reshape(1, -1)
            continue
        state[scvi_key(key, table)] = own.get(key, neutral)
    state["pyro_param_store"] = {"params": {}, "constraints": {}}
    attrs = {
        "init_params_": _scvi_init_params(model),
        "registry_": _registry(setup, model.var_names_, int(model.adata.n_obs)),
        "history_": model.history,
        "is_trained_": bool(model.is_trained_),
        **{f"{name}_indices_": np.asarray(getattr(model, f"{name}_indices_"), dtype=np.int64) for name in SPLIT_NAMES},
    }
    var_names = np.asarray(model.var_names_.astype(str), dtype=object)
    with saving(dir_path, prefix, overwrite=overwrite, save_anndata=save_anndata, adata=model.adata) as d:
        atomic_torch_save({"model_state_dict": state, "var_names": var_names, "attr_dict": attrs},
                          d / f"{p}{SCVI_MODEL_FILE}")


def _scvi_init_params(model) -> dict:
    params = model.init_params_
    model_kwargs = {"use_batch_norm": params["use_batch_norm"], "bias": params["bias"]}
    if params["dispersion"] == "gene-label":  # scvi-tools' LinearSCVI sizes px_r by this, default 0
        model_kwargs["n_labels"] = model.n_labels
    return {"non_kwargs": {k: params[k] for k in SCVI_INIT_DEFAULTS}, "kwargs": {"model_kwargs": model_kwargs}}


def _registry(setup: dict, var_names: pd.Index, n_cells: int) -> dict:
    """scvi-tools' registry of ``LinearSCVI.setup_anndata`` with the same choices."""
    genes = np.asarray(var_names.astype(str), dtype=object)
    layer = setup.get("layer")
    fields = defaultdict(dict, {"X": {
        "data_registry": {"attr_name": "X" if layer is None else "layers", "attr_key": layer},
        "state_registry": {"n_obs": n_cells, "n_vars": len(genes), "column_names": genes},
        "summary_stats": {"n_vars": len(genes), "n_cells": n_cells},
    }})
    for arg, field, categories, count in (("batch_key", "batch", "batch_categories", "n_batch"),
                                          ("labels_key", "labels", "label_categories", "n_labels")):
        key = setup.get(arg, f"_scvi_{field}")  # without a key scvi-tools registers one category, 0
        mapping = np.asarray(setup[categories], dtype=object) if arg in setup else np.zeros(1, dtype=np.int64)
        fields[field] = {
            "data_registry": {"attr_name": "obs", "attr_key": f"_scvi_{field}"},
            "state_registry": {"categorical_mapping": mapping, "original_key": key},
            "summary_stats": {count: len(mapping)},
        }
    return {
        "scvi_version": SCVI_VERSION, "model_name": "LinearSCVI", "setup_method_name": "setup_anndata",
        "setup_args": {"batch_key": setup.get("batch_key"), "labels_key": setup.get("labels_key"), "layer": layer},
        "field_registries": fields, "_scvi_uuid": str(uuid.uuid4()),
    }
