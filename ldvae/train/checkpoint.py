"""Checkpoints: a plain dict of module weights, training state and config, written
atomically and checked field by field before any of it is applied."""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from ..nn.module import LDVAEModule
from ..util.checks import SetupError
from ..util.io import atomic_torch_save, probe_writable
from .config import ModelFileError, TrainConfig, TrainState

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1


def check_checkpoint_dir(directory: Path, state: TrainState) -> None:
    """Before a fit's first epoch: ``directory`` can take its checkpoints, and holds none of
    another fit (a new fit would replace it; one that continues or resumed has taken steps)."""
    try:
        probe_writable(directory)
    except OSError as err:
        raise SetupError(f"checkpoint_dir={str(directory)!r} cannot take checkpoints: {err.strerror or err}.") from None
    if state.step == 0 and (directory / CHECKPOINT_NAME).exists():
        raise SetupError(f"checkpoint_dir={str(directory)!r} holds the checkpoint of another fit, which this new fit "
                         f"would replace. Pass resume_from={str(directory)!r} (ldvae.distributed: --resume-from) to continue it, "
                         "or another checkpoint_dir.")


def save_checkpoint(directory: Path, module: LDVAEModule, state: TrainState, config: TrainConfig) -> Path:
    """Write model, optimizer, history and counters atomically to ``directory/checkpoint.pt``."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": "ldvae-checkpoint",
        "format_version": CHECKPOINT_VERSION,
        "module_state": module.state_dict(),
        "train_state": {k: v for k, v in asdict(state).items()},
        "train_config": asdict(config),
    }
    path = directory / CHECKPOINT_NAME
    atomic_torch_save(payload, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by ``save_checkpoint`` (weights only, no pickled objects)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist. Pass the checkpoint_dir of an earlier train(..., checkpoint_dir=...) "
            f"call or the {CHECKPOINT_NAME} in it."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's message would suggest the unsafe weights_only=False
        raise ModelFileError(f"{path} is not an ldvae checkpoint: it holds pickled objects or is not a torch file, "
                             "and ldvae loads tensors and plain data only.") from err
    except Exception as err:  # truncated or corrupted file
        raise ModelFileError(f"{path} is not a readable ldvae checkpoint ({type(err).__name__}: {err}).") from err
    if not isinstance(payload, dict) or payload.get("format") != "ldvae-checkpoint":
        raise ModelFileError(f"{path} is not an ldvae checkpoint.")
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise ModelFileError(
            f"{path} was written in checkpoint format version {version!r}; this ldvae reads up to version "
            f"{CHECKPOINT_VERSION}. Resume it with the ldvae version that wrote it."
        )
    _check_checkpoint(payload, path)
    return payload


_CHECKPOINT_KEYS = {"format", "format_version", "module_state", "train_state", "train_config"}


def _named_tensors(value) -> bool:
    """A dict of tensors by name: the weights, and a fit's parameter average."""
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())


def _check_checkpoint(payload: dict, path: Path) -> None:
    """Every field of a checkpoint, before any of it is applied (ModelFileError naming it)."""

    def bad(field: str, value, want: str):
        shown = repr(value) if not isinstance(value, (dict, list, Tensor)) else type(value).__name__
        return ModelFileError(f"{path} is damaged: {field} must be {want}, got {shown[:80]}.")

    if set(payload) != _CHECKPOINT_KEYS:
        extra, missing = sorted(set(payload) - _CHECKPOINT_KEYS), sorted(_CHECKPOINT_KEYS - set(payload))
        raise ModelFileError(f"{path} is damaged: unexpected keys {extra}, missing keys {missing}.")
    weights = payload["module_state"]
    if not _named_tensors(weights):
        raise bad("module_state", weights, "a dict of named tensors")
    ts = payload["train_state"]
    fields = {f.name for f in TrainState.__dataclass_fields__.values()}
    if isinstance(ts, dict):  # written before fits kept a parameter average
        ts.setdefault("average", None)
    if not isinstance(ts, dict) or set(ts) != fields:
        got = sorted(ts) if isinstance(ts, dict) else ts
        raise ModelFileError(f"{path} is damaged: train_state has the keys {got}, expected {sorted(fields)}.")
    for key in ("epoch", "step", "warmup_steps", "epochs_since_best"):
        if isinstance(ts[key], bool) or not isinstance(ts[key], int) or ts[key] < 0:
            raise bad(f"train_state[{key!r}]", ts[key], "an integer >= 0")
    if not isinstance(ts["best_val"], (int, float)) or isinstance(ts["best_val"], bool) or math.isnan(ts["best_val"]):
        raise bad("train_state['best_val']", ts["best_val"], "a number")
    if not isinstance(ts["interrupted"], bool):
        raise bad("train_state['interrupted']", ts["interrupted"], "True or False")
    check_history(ts["history"], lambda field, value, want: bad(f"train_state[{field}]", value, want))
    if ts["optimizer_state"] is not None and not isinstance(ts["optimizer_state"], dict):
        raise bad("train_state['optimizer_state']", ts["optimizer_state"], "None or a dict")
    if ts["average"] is not None and not _named_tensors(ts["average"]):
        raise bad("train_state['average']", ts["average"], "None or a dict of named tensors")
    config = payload["train_config"]
    known = set(TrainConfig.__dataclass_fields__)
    if not isinstance(config, dict) or not set(config) <= known:
        got = sorted(set(config) - known) if isinstance(config, dict) else config
        raise ModelFileError(f"{path} is damaged: train_config has unknown keys {got}.")
    for key in ("seed", "split_seed"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad(f"train_config[{key!r}]", value, "an integer")
    data = config.get("data")
    if data is not None and not (isinstance(data, dict) and isinstance(data.get("var_names"), list)
                                 and isinstance(data.get("setup"), dict)):
        raise bad("train_config['data']", type(data).__name__, "None or a dict with var_names and setup")


def check_history(history, bad) -> None:
    """A training history as saved: ``{metric: [[epoch, value], ...]}``; ``bad(field, value,
    want)`` makes the error to raise."""
    if not isinstance(history, dict):
        raise bad("'history'", history, "a dict")
    for key, rows in history.items():
        if not isinstance(key, str) or not isinstance(rows, list):
            raise bad(f"'history'][{key!r}", rows, "a list of [epoch, value] pairs")
        for row in rows:
            if not (isinstance(row, (list, tuple)) and len(row) == 2
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)):
                raise bad(f"'history'][{key!r}", row, "[epoch, value] pairs of numbers")


def check_weights(state: dict, reference: dict[str, Tensor], fail) -> None:
    """That ``state`` (a loaded state dict) has exactly the keys, shapes and dtypes of
    ``reference`` (a module's, possibly on the meta device) and finite values; ``fail(key,
    detail)`` makes the error to raise."""
    missing = [k for k in reference if k not in state]
    extra = [k for k in state if k not in reference]
    if missing or extra:
        raise fail(None, f"missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
    for key, want in reference.items():
        got = state[key]
        if not isinstance(got, Tensor):
            raise fail(key, f"{key} is a {type(got).__name__}, not a tensor")
        if got.shape != want.shape:
            raise fail(key, f"{key} has shape {tuple(got.shape)}, the model's has {tuple(want.shape)}")
        if got.dtype != want.dtype:
            raise fail(key, f"{key} has dtype {got.dtype}, the model's has {want.dtype}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            n = int((~torch.isfinite(got)).sum())
            raise fail(key, f"{key} holds {n} non-finite values (NaN or inf)")
