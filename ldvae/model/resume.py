"""Continuing a fit from a checkpoint written by ``train(checkpoint_dir=...)``."""

from __future__ import annotations

import logging
import math
import os

from ..data.contract import plain
from ..nn.module import LDVAEModule
from ..train.averaging import averaged_tensors
from ..train.loop import ModelFileError, TrainState, check_weights
from ..train.optim import check_state_dict, optimized_parameters

logger = logging.getLogger(__name__)

# Settings a resumed fit should share with the checkpoint's to be the uninterrupted fit.
RESUMED_SETTINGS = ("batch_size", "lr", "weight_decay", "eps", "optimizer", "n_epochs_kl_warmup", "n_steps_kl_warmup",
                    "max_kl_weight", "min_kl_weight", "batch_norm_momentum", "ema_decay", "seed", "split_seed")


def data_record(var_names, setup: dict, n_cells: int) -> dict:
    """What a fit trains on, as ``TrainConfig.data`` records it for its checkpoints."""
    return {"var_names": [str(g) for g in var_names], "setup": plain(setup), "n_cells": int(n_cells)}


def check_resume(payload: dict, config, resume_from, epochs_done: int, max_epochs: int) -> None:
    """Refuse a checkpoint written for other genes or setup (categories, layer, keys) than
    ``config.data``; warn when other settings or another number of cells make the resumed
    fit differ from the uninterrupted one, and when ``max_epochs`` leaves nothing to train."""
    saved = payload["train_config"]
    old, new = saved.get("data"), config.data
    if old is not None and new is not None:
        if old["var_names"] != new["var_names"]:
            pairs = zip(old["var_names"], new["var_names"])
            first = next((f"{a!r} where the data has {b!r}" for a, b in pairs if a != b),
                         f"{len(old['var_names'])} genes where the data has {len(new['var_names'])}")
            raise ModelFileError(f"The checkpoint {resume_from} was written for other genes (first: {first}). "
                                 "Resume on the genes, in the order, it was trained on.")
        if old["setup"] != new["setup"]:
            key = next(k for k in sorted(set(old["setup"]) | set(new["setup"]))
                       if old["setup"].get(k) != new["setup"].get(k))
            raise ModelFileError(f"The checkpoint {resume_from} was written for another setup ({key}: "
                                 f"{old['setup'].get(key)!r}, here {new['setup'].get(key)!r}). Resume on the "
                                 "AnnData, set up as, it was trained on.")
    changed = [f"{k} {getattr(config, k)!r}, was {saved[k]!r}" for k in RESUMED_SETTINGS
               if k in saved and saved[k] != getattr(config, k)]
    if old is not None and new is not None and old.get("n_cells") != new.get("n_cells"):
        changed.append(f"{new.get('n_cells')} cells, was {old.get('n_cells')}")
    if changed:
        logger.warning("Resuming %s with other settings or data than it was written with (%s): the fit goes on, "
                       "but is not the fit it would have been uninterrupted.", resume_from, "; ".join(changed))
    if epochs_done >= max_epochs:
        logger.warning("The checkpoint %s has %d epochs already; max_epochs=%d leaves nothing to train.",
                       resume_from, epochs_done, max_epochs)


def continued_state(state: TrainState | None) -> TrainState:
    """The state a new ``train`` call continues from: the model's, with early stopping's
    record started afresh (each call watches its own epochs, as each of scvi-tools' Trainers
    does); a resumed checkpoint keeps its record instead (:func:`resume_state`)."""
    if state is None:
        return TrainState()
    state.best_val, state.epochs_since_best = math.inf, 0
    return state


def resume_state(module: LDVAEModule, payload: dict, resume_from: str | os.PathLike, config,
                 max_epochs: int) -> TrainState:
    """Load the checkpoint ``payload`` into ``module`` and return its training state, for the
    fit ``config`` (a ``TrainConfig``) of ``max_epochs`` in all.

    Every check comes first (:func:`check_resume`, then the weights, the average and the
    optimizer's state): a checkpoint that does not fit leaves the module as it was."""
    check_resume(payload, config, resume_from, int(payload["train_state"]["epoch"]), max_epochs)
    frozen = config.frozen

    def mismatch(key, detail):
        return ModelFileError(
            f"The checkpoint {resume_from} was written by a model with other settings or genes "
            f"({detail}). Resume with the LinearSCVI settings and data it was trained with."
        )

    check_weights(payload["module_state"], module.state_dict(), mismatch)
    resumed = TrainState(**payload["train_state"])
    if resumed.average is not None:
        check_weights(resumed.average, averaged_tensors(module), mismatch)
    if resumed.optimizer_state is not None:
        try:
            check_state_dict(resumed.optimizer_state, optimized_parameters(module, frozen))
        except ValueError as err:
            raise ModelFileError(f"The checkpoint {resume_from} is damaged: {err}.") from err
    module.load_state_dict(payload["module_state"])
    resumed.interrupted = False
    logger.info("Resuming from epoch %d (%d steps) of %s.", resumed.epoch, resumed.step, resume_from)
    return resumed
