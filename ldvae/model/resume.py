"""Continuing a fit from a checkpoint written by ``train(checkpoint_dir=...)``."""

from __future__ import annotations

import logging
import os

from ..nn.module import LDVAEModule
from ..train.averaging import averaged_tensors
from ..train.loop import ModelFileError, TrainState, check_weights
from ..train.optim import check_state_dict, optimized_parameters

logger = logging.getLogger(__name__)


def resume_state(module: LDVAEModule, payload: dict, resume_from: str | os.PathLike,
                 frozen: dict | None = None) -> TrainState:
    """Load the checkpoint ``payload`` into ``module`` and return its training state
    (``frozen``: the parameters held fixed, as ``TrainConfig.frozen``).

    Every check comes first: a checkpoint that does not fit leaves the module as it was."""

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
