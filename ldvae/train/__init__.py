"""Training: the loop, its batch sources, the optimizer and checkpoints."""

from .loop import (
    InMemorySource,
    ModelFileError,
    NonFiniteLossError,
    TrainConfig,
    TrainState,
    evaluate,
    fit,
    load_checkpoint,
    minibatches,
    save_checkpoint,
    split_indices,
)

__all__ = ["InMemorySource", "ModelFileError", "NonFiniteLossError", "TrainConfig", "TrainState", "evaluate",
           "fit", "load_checkpoint", "minibatches", "save_checkpoint", "split_indices"]
