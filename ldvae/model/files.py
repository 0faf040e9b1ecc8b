"""A model on disk: ``ldvae_model.json`` (hyperparameters, genes, categories, history,
versions, the weights' SHA-256), ``model_state.pt`` (a state dict read with
``weights_only=True``) and optionally ``adata.h5ad``; every field checked when read."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from ..data.contract import plain
from ..nn.module import LDVAEModule
from ..train.loop import ModelFileError, TrainState, check_history, check_weights
from ..util.checks import ExistingModelError, ModelNotFoundError
from ..util.io import atomic_torch_save, atomic_write_json, file_in_the_way
from .params import INIT_PARAMS, check_init_params, module_config

logger = logging.getLogger(__name__)

MODEL_JSON = "ldvae_model.json"
MODEL_WEIGHTS = "model_state.pt"
ADATA_FILE = "adata.h5ad"
FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "validation", "test")
SCVI_MODEL_FILE = "model.pt"
LEGACY_WEIGHTS = "model_params.pt"  # scvi-tools' layout before 0.15: with attr.pkl and var_names.csv


def check_model_dir(dir_path: str | os.PathLike, *, overwrite: bool) -> Path:
    """``dir_path`` if a model may be saved there: a new or empty directory, a non-empty one
    only with ``overwrite``, never one under a file."""
    d = Path(dir_path)
    blocking = file_in_the_way(d)
    if blocking is not None:
        raise ExistingModelError(f"{blocking} is a file, so a model cannot be saved into {d}. "
                                 "Choose another directory.")
    if d.exists() and any(d.iterdir()) and not overwrite:
        raise ExistingModelError(f"{d} already exists and is not empty. Pass overwrite=True to replace it.")
    return d


def model_dir(dir_path: str | os.PathLike, *, overwrite: bool) -> Path:
    """The directory a model is saved into (:func:`check_model_dir`), made if missing."""
    d = check_model_dir(dir_path, overwrite=overwrite)
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_model(model, dir_path: str | os.PathLike, prefix: str | None, *, overwrite: bool, save_anndata: bool) -> None:
    """Write ``model`` (a ``LinearSCVI``) into ``dir_path``: each file atomically, the JSON last."""
    with saving(dir_path, prefix, overwrite=overwrite, save_anndata=save_anndata, adata=model.adata) as d:
        _write_model(model, d, prefix or "")


def holds_model(dir_path: str | os.PathLike, prefix: str | None = None) -> bool:
    """Whether ``dir_path`` holds a saved model: ldvae's, scvi-tools', or scvi-tools' older layout."""
    d, p = Path(dir_path), prefix or ""
    return any((d / f"{p}{name}").is_file() for name in (MODEL_JSON, SCVI_MODEL_FILE, LEGACY_WEIGHTS))


@contextlib.contextmanager
def saving(dir_path: str | os.PathLike, prefix: str | None, *, overwrite: bool, save_anndata: bool, adata):
    """The directory a model is saved into, with its AnnData written first when asked (the
    likeliest write to fail) and an earlier save's AnnData removed when not, so that a load
    never pairs the model with other cells (an AnnData that no save wrote is the user's, and
    stays). A directory this call made is removed again if
    the block fails."""
    made = not os.path.lexists(dir_path)
    d = model_dir(dir_path, overwrite=overwrite)
    try:
        target = d / f"{prefix or ''}{ADATA_FILE}"
        if save_anndata:
            _write_h5ad_untouched(adata, target)
        elif target.exists():
            if holds_model(d, prefix):
                target.unlink()  # an earlier save's
            else:
                logger.warning("%s was not written by a save; it is left as it is, and LinearSCVI.load(%r) without "
                               "adata= will read it with this model.", target, str(d))
        yield d
    except BaseException:
        if made:
            shutil.rmtree(d, ignore_errors=True)
        raise


def _write_model(model, d: Path, p: str) -> None:
    st = model.train_state_
    meta = {
        "format": "ldvae-model",
        "format_version": FORMAT_VERSION,
        "ldvae_version": __version__,
        "torch_version": torch.__version__,
        "init_params": model.init_params_,
        "setup": plain(model.setup_),
        "var_names": list(model.var_names_),
        "n_cells": int(model.adata.n_obs),
        "is_trained": bool(model.is_trained_),
        "split": {name: [int(i) for i in getattr(model, f"{name}_indices_")] for name in SPLIT_NAMES},
        "train_state": None
        if st is None
        else {"epoch": st.epoch, "step": st.step, "warmup_steps": st.warmup_steps, "history": st.history},
        "frozen": frozen_record(getattr(model, "frozen_", None)),
    }
    state = {k: v.detach().cpu() for k, v in model.module.state_dict().items()}
    atomic_torch_save(state, d / f"{p}{MODEL_WEIGHTS}")
    # torch's zip container does not check the tensor bytes: a checksum in the JSON,
    # written last, catches corruption that would otherwise load as wrong weights.
    meta["weights_sha256"] = _sha256(d / f"{p}{MODEL_WEIGHTS}")
    atomic_write_json(d / f"{p}{MODEL_JSON}", meta)


def read_model(dir_path: str | os.PathLike, prefix: str | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The checked JSON and state dict of a model saved in ``dir_path`` (ModelFileError
    naming the field, its value and the file)."""
    d = Path(dir_path)
    p = prefix or ""
    json_path = d / f"{p}{MODEL_JSON}"
    if not json_path.exists() and (d / f"{p}{LEGACY_WEIGHTS}").exists():
        raise ModelFileError(
            f"{d} holds a model in the older layout ({p}{LEGACY_WEIGHTS}, {p}attr.pkl, {p}var_names.csv). Convert "
            f"it first: LinearSCVI.convert_legacy_save({str(d)!r}, new_dir, prefix={prefix!r})."
        )
    meta = _read_model_json(json_path)
    state = _read_weights(d / f"{p}{MODEL_WEIGHTS}", meta, json_path)
    return meta, state


def read_saved_adata(dir_path: str | os.PathLike, prefix: str | None, *, backup_url: str | None = None):
    """The ``adata.h5ad`` saved beside the model (downloaded from ``backup_url`` when missing)."""
    path = Path(dir_path) / f"{prefix or ''}{ADATA_FILE}"
    if not path.exists() and backup_url is not None:
        from ..data.readers import download

        download(backup_url, path)
    if not path.exists():
        raise ValueError(f"No adata given and {path} does not exist (save with save_anndata=True).")
    import anndata

    return anndata.read_h5ad(path)


def split_of(meta: dict) -> tuple[np.ndarray, ...]:
    """The training, validation and test cells saved with the model (empty when not saved)."""
    split = meta.get("split") or {}
    return tuple(np.asarray(split.get(name, []), dtype=np.int64) for name in SPLIT_NAMES)


def frozen_record(frozen: dict | None) -> dict | None:
    """A mapped model's fixed parameters (``TrainConfig.frozen``) as JSON: per name, null (the
    whole tensor) or its mask as nested lists of booleans."""
    if frozen is None:
        return None
    return {name: None if mask is None else torch.as_tensor(mask, dtype=torch.bool).cpu().tolist()
            for name, mask in frozen.items()}


def frozen_of(meta: dict, module, path) -> dict | None:
    """The fixed parameters a saved mapped model trains with, checked against its module."""
    record = meta.get("frozen")
    if record is None:
        return None
    params = dict(module.named_parameters())
    if not isinstance(record, dict) or not set(record) <= set(params):
        raise ModelFileError(f"{path} is damaged: frozen must name the model's parameters. Save the model again.")
    frozen = {}
    for name, mask in record.items():
        frozen[name] = None if mask is None else torch.as_tensor(mask, dtype=torch.bool)
        if mask is not None and frozen[name].shape != params[name].shape:
            raise ModelFileError(f"{path} is damaged: the mask of frozen {name} has shape {tuple(frozen[name].shape)}, "
                                 f"the parameter {tuple(params[name].shape)}. Save the model again.")
    return frozen


def train_state_of(meta: dict) -> TrainState | None:
    ts = meta.get("train_state")
    return None if ts is None else TrainState(**ts)


def _write_h5ad_untouched(adata, path: Path) -> None:
    """Write ``adata`` to ``path`` atomically without changing it (anndata's writer turns
    string columns of obs and var into categoricals in place)."""
    from ..util.io import atomic_path, atomic_write_h5ad, nullable_strings_allowed

    if adata.isbacked:  # its matrices stay on disk: write with the columns as they are
        if not Path(adata.filename).exists():
            raise FileNotFoundError(f"The model's AnnData is backed by {adata.filename}, which no longer exists; "
                                    "reopen it, or save without save_anndata=True.")
        try:  # the function, as the method would point the caller's AnnData at the new file
            from anndata.io import write_h5ad
        except ImportError:  # anndata < 0.11
            from anndata._io.h5ad import write_h5ad

        with atomic_path(path) as tmp, nullable_strings_allowed():
            write_h5ad(tmp, adata, convert_strings_to_categoricals=False)
        return
    atomic_write_h5ad(adata, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_model_json(path: Path) -> dict:
    """The model JSON written by ``save``, every field checked (ModelFileError naming it)."""
    if not path.exists():
        raise ModelNotFoundError(f"{path} does not exist; is {path.parent} a directory written by model.save()?")
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
              "n_cells", "is_trained", "train_state", "weights_sha256", "split", "frozen"}
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
    if not isinstance(params, dict) or set(params) != set(INIT_PARAMS):
        got = sorted(params) if isinstance(params, dict) else params
        raise _damaged(path, "init_params", got, f"the keys {sorted(INIT_PARAMS)}")
    try:
        check_init_params(params)
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
    split = meta.get("split")
    if split is not None:
        if not isinstance(split, dict) or not set(split) <= set(SPLIT_NAMES):
            raise _damaged(path, "split", split if not isinstance(split, dict) else sorted(split),
                           f"a dict with the keys {list(SPLIT_NAMES)}")
        for name, cells in split.items():
            if not isinstance(cells, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < max(n_cells, 1) for i in cells):
                raise _damaged(path, f"split.{name}", cells if not isinstance(cells, list) else "a list",
                               f"a list of cell positions in 0..{n_cells - 1}")
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
    config = module_config(meta["setup"], len(meta["var_names"]), params)
    n_batch = config.n_batch
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
