"""``convert_legacy_save``: a model saved in the older scvi-tools layout (``model_params.pt``,
``attr.pkl``, ``var_names.csv``, optionally ``adata.h5ad``) rewritten as ldvae's files. The
pickle is read with an allow-list of plain data types (``ldvae.util.safe_pickle``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from ..train.loop import ModelFileError
from ..util.checks import ExistingModelError, ModelNotFoundError
from ..util.io import atomic_torch_save, atomic_write_json
from ..util.safe_pickle import RefusedPickle, safe_loads
from .files import ADATA_FILE, FORMAT_VERSION, LEGACY_WEIGHTS, MODEL_JSON, MODEL_WEIGHTS, SPLIT_NAMES, read_model
from .files import _sha256

NEEDED = ("init_params_", "setup_")


def convert_legacy_save(dir_path: str | os.PathLike, output_dir_path: str | os.PathLike, *, overwrite: bool,
                        prefix: str | None) -> None:
    """Rewrite the older layout in ``dir_path`` as ldvae's model files in ``output_dir_path``
    (the same directory is allowed with ``overwrite``); every file is checked on the way by
    reading the result back."""
    src, out, p = Path(dir_path), Path(output_dir_path), prefix or ""
    weights_path, attr_path, names_path = (src / f"{p}{name}" for name in (LEGACY_WEIGHTS, "attr.pkl", "var_names.csv"))
    for path in (weights_path, attr_path, names_path):
        if not path.exists():
            raise ModelNotFoundError(f"{path} does not exist; {src} does not hold a model in the older layout.")
    if (out / f"{p}{MODEL_JSON}").exists() and not overwrite:
        raise ExistingModelError(f"{out} already holds a model. Pass overwrite=True to replace it.")
    try:
        attrs = safe_loads(attr_path.read_bytes())
    except RefusedPickle as err:
        raise ModelFileError(f"{attr_path}: {err}.") from err
    if not isinstance(attrs, dict) or any(k not in attrs for k in NEEDED):
        raise ModelFileError(f"{attr_path} lacks {[k for k in NEEDED if k not in attrs]}: it was not written by ldvae "
                             "(scvi-tools' own models load with LinearSCVI.load).")
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    var_names = [line.strip() for line in names_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    history = attrs.get("train_history_") or {}
    meta = {
        "format": "ldvae-model", "format_version": FORMAT_VERSION, "ldvae_version": __version__,
        "torch_version": torch.__version__, "init_params": dict(attrs["init_params_"]), "setup": dict(attrs["setup_"]),
        "var_names": var_names, "n_cells": _n_cells(attrs), "is_trained": bool(attrs.get("is_trained_", False)),
        "split": {name: [int(i) for i in np.asarray(attrs.get(f"{name}_indices_", []))] for name in SPLIT_NAMES},
        "train_state": None if not history else {"epoch": int(max(r[0] for rows in history.values() for r in rows)) + 1,
                                                 "step": 0, "warmup_steps": 0, "history": history},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, out / f"{p}{MODEL_WEIGHTS}")
    meta["weights_sha256"] = _sha256(out / f"{p}{MODEL_WEIGHTS}")
    if (src / f"{p}{ADATA_FILE}").exists() and src.resolve() != out.resolve():
        shutil.copyfile(src / f"{p}{ADATA_FILE}", out / f"{p}{ADATA_FILE}")
    atomic_write_json(out / f"{p}{MODEL_JSON}", meta)
    read_model(out, prefix)  # every field and weight checked, as load will
    if src.resolve() == out.resolve():
        for path in (weights_path, attr_path, names_path):
            path.unlink()


def _n_cells(attrs: dict) -> int:
    cells = [np.asarray(attrs.get(f"{name}_indices_", [])) for name in SPLIT_NAMES]
    return int(max((c.max() + 1 for c in cells if c.size), default=0))
