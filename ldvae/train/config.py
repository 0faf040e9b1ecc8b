"""What a fit is told (``TrainConfig``), what it carries on (``TrainState``) and how it fails."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

HISTORY_KEYS = (
    "train_loss",
    "elbo_train",
    "reconstruction_loss_train",
    "kl_local_train",
    "kl_global_train",
    "kl_weight",
    "validation_loss",
    "elbo_validation",
    "reconstruction_loss_validation",
    "kl_local_validation",
    "kl_global_validation",
)


class NonFiniteLossError(FloatingPointError):
    """The loss or its gradient became NaN/inf, or an update would have made a parameter
    NaN/inf; the model is back at the end of its last completed epoch (or its untrained start)."""


class ModelFileError(ValueError):
    """A saved model or checkpoint is damaged, foreign, or disagrees with itself or with
    the model it is loaded into; nothing was changed."""


@dataclass
class TrainConfig:
    max_epochs: int
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    n_epochs_kl_warmup: int | None = 400
    n_steps_kl_warmup: int | None = None
    shorten_kl_warmup: bool = True  # a warm-up longer than half the fit ends by mid-training
    # The KL weight rises from min_kl_weight to max_kl_weight over the warm-up (scvi-tools').
    max_kl_weight: float = 1.0
    min_kl_weight: float = 0.0
    check_val_every_n_epoch: int | None = None
    early_stopping: bool = False
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    early_stopping_monitor: str = "elbo_validation"  # any history key
    early_stopping_mode: str = "min"  # "max": a larger value is better
    early_stopping_warmup_epochs: int = 0  # epochs before early stopping may end the fit
    optimizer: str = "Adam"  # or "AdamW" (decoupled weight decay)
    # scvi-tools' reduce_lr_on_plateau: lr *= lr_factor when lr_scheduler_metric has not
    # improved by more than lr_threshold (absolute) for lr_patience epochs; never below lr_min.
    reduce_lr_on_plateau: bool = False
    lr_factor: float = 0.6
    lr_patience: int = 30
    lr_threshold: float = 0.0
    lr_scheduler_metric: str = "elbo_validation"
    lr_min: float = 0.0
    # Parameters held fixed, by name: a boolean mask (the parameter's shape) fixes only its
    # True entries, None the whole tensor. Batch norm then runs on its running statistics,
    # which stay as they are (query mapping onto a trained model).
    frozen: dict | None = None
    progress_bar: bool = True
    seed: int = 0
    split_seed: int | None = None  # the training/validation split's seed (None: seed); recorded for resuming
    checkpoint_dir: str | None = None
    checkpoint_every_n_epochs: int = 10
    # Batch-norm momentum while training; None keeps the module's (0.01, as scvi-tools).
    # Larger values let eval-mode statistics follow the parameters with few steps per epoch.
    batch_norm_momentum: float | None = None
    # Parameter averaging (ldvae.train.averaging): a moving average of the parameters with
    # this decay per epoch, which validation reads and the finished fit keeps. None: off.
    ema_decay: float | None = None
    # CPU threads during the fit: torch's and the compiled step's. None: the compiled step uses
    # every usable CPU (fused.default_threads) but one per background reader of a streamed
    # source, torch one when a step is small (_fit_threads).
    threads: int | None = None
    # The data the fit trains on ({"var_names", "setup", "n_cells"}), set by LinearSCVI.train;
    # its checkpoints carry it, so that a resume onto other genes or categories is refused.
    data: dict | None = None

    def __post_init__(self):
        # NumPy's numbers (lr=np.logspace(...)[i], max_epochs=np.int64(...)) as Python's: the
        # checkpoints and saved models that carry them hold plain values only
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.generic):
                setattr(self, f.name, value.item())


@dataclass
class TrainState:
    """Everything a fit carries from one ``train`` call (or checkpoint) to the next."""

    optimizer_state: dict | None = None
    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    warmup_steps: int = 0  # KL weight reaches max_kl_weight after this many steps (0: no warm-up)
    history: dict[str, list[list[float]]] = field(default_factory=dict)  # key -> [[epoch, value], ...]
    best_val: float = math.inf
    epochs_since_best: int = 0
    interrupted: bool = False
    # the parameter average of a fit under way (ema_decay), kept for its checkpoints; None after the fit
    average: dict | None = None

    def record(self, key: str, epoch: int, value: float) -> None:
        self.history.setdefault(key, []).append([epoch, float(value)])
