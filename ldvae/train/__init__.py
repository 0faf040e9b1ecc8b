"""Training: the loop (``loop``), its batch sources (``batches``), the step behind one seam
(``steps``), the optimizer (``optim``), checkpoints (``checkpoint``) and the fit's
configuration and state (``config``)."""

from .batches import InMemorySource, minibatches, n_minibatches, split_indices, validation_batch_size
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelFileError, NonFiniteLossError, TrainConfig, TrainState
from .loop import evaluate, fit

__all__ = ["InMemorySource", "ModelFileError", "NonFiniteLossError", "TrainConfig", "TrainState", "evaluate",
           "fit", "load_checkpoint", "minibatches", "n_minibatches", "save_checkpoint", "split_indices", "validation_batch_size"]
