"""The training loop: one function, read top to bottom.

seed -> per epoch: shuffle, a training pass over the step chosen once for the fit
(``steps.choose_step``), optionally a ``no_grad`` validation pass -> history -> early
stopping / checkpoint.

Randomness is re-seeded at every epoch from (seed, epoch), so continuing a fit, or
resuming it from a checkpoint written at an epoch boundary, replays exactly the
same random numbers as an uninterrupted fit (on CPU, bit for bit).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

from ..cpu import fused
from ..nn.module import LDVAEModule
from .averaging import ParameterAverage
from .batches import InMemorySource, minibatches, n_minibatches, split_indices, validation_batch_size
from .checkpoint import (
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    check_checkpoint_dir,
    check_history,
    check_weights,
    load_checkpoint,
    save_checkpoint,
)
from ..util import progress
from ..util.checks import SetupError
from ..util.settings import float32_default, own_rng, usable_cpus
from .config import HISTORY_KEYS, ModelFileError, NonFiniteLossError, TrainConfig, TrainState
from .optim import adam, optimized_parameters
from .steps import Step, choose_step

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_VERSION", "HISTORY_KEYS", "InMemorySource", "ModelFileError",
           "NonFiniteLossError", "TrainConfig", "TrainState", "check_history", "check_weights", "evaluate", "fit",
           "load_checkpoint", "minibatches", "n_minibatches", "save_checkpoint", "split_indices", "validation_batch_size"]


@float32_default()  # ldvae's tensors in float32, whatever torch's default is set to
def fit(module: LDVAEModule, source, config: TrainConfig, state: TrainState | None = None) -> TrainState:
    """Train ``module`` for ``config.max_epochs`` more epochs on ``source`` (e.g.
    ``InMemorySource``), continuing ``state``.

    Returns the updated state (also on interrupt). Raises NonFiniteLossError with ``module``
    and ``state`` back at the start of the failed epoch (the parameters of the step before the
    failed one can give non-finite losses everywhere, as a diverging fit's do).
    """
    state = state or TrainState()
    state.interrupted = False  # set again below if this call is interrupted
    if config.early_stopping and config.early_stopping_monitor.endswith("_validation") and source.n_val == 0:
        raise SetupError(f"early_stopping monitors {config.early_stopping_monitor!r}, but the fit has no validation "
                         "cells; pass train_size < 1, or early_stopping_monitor='elbo_train'.")
    if config.checkpoint_dir and (source.comm is None or source.comm.is_main):
        check_checkpoint_dir(Path(config.checkpoint_dir), state)
    state.warmup_steps = _planned_warmup(config, state, source.steps_per_epoch)
    optimizer = adam(optimized_parameters(module, config.frozen), config)
    step = choose_step(module, optimizer, source, state, config)
    average = None if config.ema_decay is None else ParameterAverage(module, config.ema_decay, state.average)
    first_epoch = state.epoch
    last_epoch = first_epoch + config.max_epochs
    progress = _Progress(config)
    plateau = _Plateau(config, optimizer)
    guard = _DeferredInterrupt()
    try:
        with guard, _fit_settings(module, config, source):
            module.train()
            if config.frozen:  # batch norm of a model being mapped onto: its statistics fixed
                for m in module.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.eval()
            for epoch in range(first_epoch, last_epoch):
                generator = _seed_epoch(config.seed, epoch, source.device)
                kl_weight = _train_epoch(module, step, source, generator, state, epoch, guard, config)
                postfix = {"elbo_train": f"{state.history['elbo_train'][-1][1]:.1f}"}
                is_last = epoch + 1 == last_epoch
                if average is not None:
                    average.update()
                with contextlib.nullcontext() if average is None else average.applied():
                    if _validate(module, source, state, epoch, kl_weight, config, is_last, postfix):
                        is_last = True
                plateau.update(state, epoch)
                progress.update(epoch + 1 - first_epoch, postfix, is_last)
                writes = source.comm is None or source.comm.is_main
                if config.checkpoint_dir and writes and (state.epoch % config.checkpoint_every_n_epochs == 0
                                                         or is_last):
                    state.optimizer_state = optimizer.state_dict()
                    state.average = None if average is None else average.state()
                    save_checkpoint(Path(config.checkpoint_dir), module, state, config)
                if is_last:
                    break
            if guard.requested:  # Ctrl-C after the last step: still report it
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        state.interrupted = True
        logger.warning(
            "Training interrupted after %d completed steps (epoch %d); the model keeps %s and the history "
            "so far.", state.step, state.epoch, "the parameters of the last completed step"
            if average is None or average.mean is None else "the parameter average over the completed epochs",
        )
    finally:
        progress.close()
        state.optimizer_state = optimizer.state_dict()
        state.average = None  # written to the checkpoints; the finished fit keeps no average
        module.eval()
    if average is not None:  # finished or interrupted (not failed): the model keeps the average
        average.apply()
    return state


def _train_epoch(module, step: Step, source, generator, state: TrainState, epoch: int, guard, config) -> float:
    """One training pass; records the epoch's training metrics and returns its last KL weight."""
    per_step = []  # detached per-cell terms; summed once per epoch (fewer ops per step)
    kl_weight, taken = 1.0, 0
    step.mark()  # a failed step puts the model back here, where its history ends
    first_step = state.step
    for chunk in step.epoch(source, generator):
        if guard.requested:
            raise KeyboardInterrupt
        weights = [_kl_weight(state.step + j, state.warmup_steps, config) for j in range(len(chunk))]
        step.snapshot()
        try:
            result = step(chunk, weights)
            state.step += result.done
        except BaseException:  # inside a step (a second Ctrl-C, a signal handler's error): back to the last count
            step.restore()
            raise
        taken += result.done
        if result.terms is not None:
            per_step.append(result.terms)
        kl_weight = weights[result.done - 1] if result.done else kl_weight
        if result.failed is not None:  # the parameters of the last good step may already give NaN: back
            step.rewind()  # to the epoch's start
            state.step = first_step
            raise NonFiniteLossError(_nonfinite_message(module, result.failed, epoch, taken, config, first_step))
    state.epoch = epoch + 1
    sums = _epoch_sums(per_step, source.device)
    if source.comm is not None:
        source.comm.all_reduce_sum(sums)
    rec, kl, elbo, loss = (sums / source.n_train).tolist()
    for key, value in (("reconstruction_loss_train", rec), ("kl_local_train", kl), ("kl_global_train", 0.0),
                       ("elbo_train", elbo), ("train_loss", loss), ("kl_weight", kl_weight)):
        state.record(key, epoch, value)
    return kl_weight


def _validate(module, source, state: TrainState, epoch: int, kl_weight: float, config: TrainConfig, is_last: bool,
              postfix: dict) -> bool:
    """The validation pass when due (every ``check_val_every_n_epoch``, at early stopping's
    pace, and after the last epoch); records it and returns whether early stopping ends the fit."""
    val_every = config.check_val_every_n_epoch or (1 if config.early_stopping else None)
    if not source.n_val or not ((val_every and (epoch + 1) % val_every == 0) or is_last):
        return False
    metrics = evaluate(module, source, kl_weight)
    for key, value in metrics.items():
        state.record(key, epoch, value)
    postfix["elbo_val"] = f"{metrics['elbo_validation']:.1f}"
    monitor = config.early_stopping_monitor
    if config.early_stopping and monitor in state.history and epoch + 1 > config.early_stopping_warmup_epochs:
        value = state.history[monitor][-1][1] * (-1.0 if config.early_stopping_mode == "max" else 1.0)
        if _should_stop(state, value, config):
            logger.info(
                "Early stopping at epoch %d: %s did not improve by %g for %d epochs.",
                epoch + 1, monitor, config.early_stopping_min_delta, config.early_stopping_patience,
            )
            return True
    return False


class _Plateau:
    """scvi-tools' ``reduce_lr_on_plateau``: after each epoch that recorded
    ``lr_scheduler_metric`` (lower is better), the learning rate is multiplied by ``lr_factor``
    (not below ``lr_min``) once the metric has not improved by more than ``lr_threshold`` for
    more than ``lr_patience`` such epochs (torch's ReduceLROnPlateau, absolute threshold)."""

    def __init__(self, config: TrainConfig, optimizer):
        self.config = config
        self.optimizer = optimizer
        self.best = math.inf
        self.bad_epochs = 0

    def update(self, state: TrainState, epoch: int) -> None:
        c = self.config
        rows = state.history.get(c.lr_scheduler_metric)
        if not c.reduce_lr_on_plateau or not rows or rows[-1][0] != epoch:
            return
        value = rows[-1][1]
        if value < self.best - c.lr_threshold:
            self.best, self.bad_epochs = value, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > c.lr_patience:
            for group in self.optimizer.param_groups:
                group["lr"] = max(group["lr"] * c.lr_factor, c.lr_min)
            self.bad_epochs = 0
            logger.info("Epoch %d: %s has not improved for %d epochs; lr reduced to %g.", epoch + 1,
                        c.lr_scheduler_metric, c.lr_patience + 1, self.optimizer.param_groups[0]["lr"])


def _seed_epoch(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """Seed torch for this epoch; returns the generator of its shuffle."""
    seed = _epoch_seed(seed, epoch)
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)  # torch.manual_seed also queues CUDA seeding
    else:
        torch.manual_seed(seed)
    return torch.Generator(device="cpu").manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63 - 1)


@contextlib.contextmanager
def _fit_settings(module: LDVAEModule, config: TrainConfig, source):
    """The fit's batch-norm momentum and CPU threads, put back afterwards, and the global torch
    random state, which each epoch seeds from ``(seed, epoch)``: the user's is left as it was.
    The compiled step leaves a CPU to a source that reads in the background (``source.reader_cpus``)."""
    device = source.device
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    if config.batch_norm_momentum is not None:
        for m in norms:
            m.momentum = config.batch_norm_momentum
    previous_threads = torch.get_num_threads()
    threads = _fit_threads(config, device, module.config.n_genes, previous_threads)
    if threads != previous_threads:
        torch.set_num_threads(threads)
    step_threads = config.threads
    if step_threads is None:
        step_threads = fused.default_threads(config.batch_size, getattr(source, "reader_cpus", 0))
    try:
        with fused.use_threads(step_threads), own_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        if torch.get_num_threads() != previous_threads:
            torch.set_num_threads(previous_threads)


class _Progress:
    """A bar redrawn on every epoch on a terminal or in a Jupyter notebook; in a log file (CI,
    a batch job) a bar is thousands of lines, so there progress is a log line every tenth of the fit."""

    def __init__(self, config: TrainConfig):
        from tqdm.auto import tqdm

        on_terminal = _stderr_is_terminal() or _in_notebook()
        self.total = config.max_epochs
        self.bar = tqdm(total=config.max_epochs, desc="Training", unit="epoch",
                        disable=not (config.progress_bar and on_terminal), dynamic_ncols=True)
        self.log_every = max(config.max_epochs // 10, 1) if config.progress_bar and not on_terminal else 0

    def update(self, done_epochs: int, postfix: dict, is_last: bool) -> None:
        self.bar.set_postfix(postfix)
        self.bar.update(1)
        if self.log_every and (done_epochs % self.log_every == 0 or is_last):
            progress.note(logger, "Training: epoch %d of %d, %s.", done_epochs, self.total,
                          ", ".join(f"{k}={v}" for k, v in postfix.items()))

    def close(self) -> None:
        self.bar.close()


class _DeferredInterrupt:
    """While active, Ctrl-C sets a flag that the loop honours at the next step boundary,
    so an interrupt never lands inside an optimizer step. A second Ctrl-C before that
    boundary raises KeyboardInterrupt at once (the loop then restores the buffers of the
    last completed step)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        # A process started with Ctrl-C ignored (a background job) keeps ignoring it.
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _epoch_sums(per_step: list[tuple[Tensor, Tensor, Tensor, Tensor]], device) -> Tensor:
    """Sums over an epoch's cells of reconstruction, KL, ELBO and loss (float64, (4,)), from
    (per-cell reconstruction, kl_z, kl_l, loss summed over the cells) of each step or run of steps."""
    if not per_step:
        return torch.zeros(4, device=device, dtype=torch.float64)
    rec = torch.cat([s[0] for s in per_step]).double().sum()
    kl = (torch.cat([s[1] for s in per_step]).double() + torch.cat([s[2] for s in per_step]).double()).sum()
    loss = torch.stack([s[3].double() for s in per_step]).sum()
    return torch.stack([rec, kl, rec + kl, loss])


@torch.no_grad()
def evaluate(module: LDVAEModule, source, kl_weight: float) -> dict[str, float]:
    """Validation metrics over the source's validation cells in eval mode (running
    batch-norm statistics, no dropout, one sample of z per cell), per cell as in scvi-tools."""
    was_training = module.training
    module.eval()
    comm = source.comm  # a shard of a distributed job (ldvae.distributed), or None
    sums = torch.zeros(4, device=source.device, dtype=torch.float64)
    for batch in source.val_batches():
        out = module.loss(batch, kl_weight)
        rec, kl = out.reconstruction.sum(), (out.kl_z + out.kl_l).sum()
        weighted = (out.reconstruction + kl_weight * out.kl_z + out.kl_l).sum()
        sums += torch.stack([rec, kl, rec + kl, weighted]).double()
    module.train(was_training)
    if comm is not None:
        comm.all_reduce_sum(sums)
    rec, kl, elbo, loss = (sums / max(source.n_val, 1)).tolist()
    return {
        "reconstruction_loss_validation": rec,
        "kl_local_validation": kl,
        "kl_global_validation": 0.0,  # the model has no global latent variables; logged as scvi-tools does
        "elbo_validation": elbo,
        "validation_loss": loss,
    }


SMALL_STEP = 1 << 22  # cells x genes per minibatch below which one CPU thread is fastest


def _fit_threads(config: TrainConfig, device: torch.device, n_genes: int, current: int) -> int:
    """Intra-op threads for the training loop. A small step is hundreds of small kernels:
    more OpenMP threads add synchronization, not speed, and compete with the batch
    gathering thread for the cores."""
    if config.threads is not None:  # no more than the CPUs the process may use: more only wait on each other
        return min(max(int(config.threads), 1), usable_cpus())
    if device.type == "cpu" and config.batch_size * n_genes <= SMALL_STEP:
        return 1
    return current


def _warmup_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    if config.n_steps_kl_warmup is not None:
        return max(int(config.n_steps_kl_warmup), 0)
    if not config.n_epochs_kl_warmup:
        return 0
    epochs = config.n_epochs_kl_warmup
    if epochs > config.max_epochs // 2 and config.shorten_kl_warmup:
        # Never leave the KL weight below 1 for the whole fit: finish warm-up by mid-training.
        shortened = max(config.max_epochs // 2, 1)
        logger.info(
            "KL warm-up shortened from n_epochs_kl_warmup=%d to %d epochs so the KL weight reaches %g "
            "within max_epochs=%d.", epochs, shortened, config.max_kl_weight, config.max_epochs,
        )
        epochs = shortened
    return epochs * steps_per_epoch


def _planned_warmup(config: TrainConfig, state: TrainState, steps_per_epoch: int) -> int:
    """The step at which the KL warm-up ends: planned by the first call; a later call applies a
    warm-up it is given, and ends the default one by its own middle, so that no call that
    continues a fit ends below the full KL weight."""
    first_call = state.step == 0 and state.warmup_steps == 0
    if first_call or not config.shorten_kl_warmup:  # a warm-up asked for counts from the fit's start
        return _warmup_steps(config, steps_per_epoch)
    middle = state.step + config.max_epochs * steps_per_epoch // 2
    if state.warmup_steps > middle:
        logger.info("KL warm-up ends at step %d, by the middle of this call, instead of %d.", middle,
                    state.warmup_steps)
        return middle
    return state.warmup_steps


def _kl_weight(step: int, warmup_steps: int, config: TrainConfig) -> float:
    """min_kl_weight rising linearly to max_kl_weight over the warm-up, then max_kl_weight."""
    low, high = float(config.min_kl_weight), float(config.max_kl_weight)
    return high if warmup_steps <= 0 or step >= warmup_steps else low + (high - low) * step / warmup_steps


def _should_stop(state: TrainState, value: float, config: TrainConfig) -> bool:
    if value < state.best_val - config.early_stopping_min_delta:
        state.best_val = value
        state.epochs_since_best = 0
        return False
    state.epochs_since_best += config.check_val_every_n_epoch or 1
    return state.epochs_since_best >= config.early_stopping_patience


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel, whose stderr is no terminal but shows a bar."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def _nonfinite_message(module: LDVAEModule, what: str, epoch: int, step: int, config: TrainConfig,
                       steps_before: int) -> str:
    """``what``: ``"loss"``, ``"gradient"`` or ``"update"`` (an optimizer step that would make
    a parameter non-finite)."""
    hints = [f"lower the learning rate (lr={config.lr:g})"]
    if what != "update" and not module.config.use_observed_lib_size:
        hints.insert(0, "use_observed_lib_size=True (a learned library size is the usual cause on data "
                        "with extreme library sizes)")
    subject = "parameters after the optimizer's update" if what == "update" else f"training {what}"
    return (
        f"The {subject} became non-finite at epoch {epoch + 1}, step {step + 1} of that epoch. "
        f"The model is back at {'its untrained start' if steps_before == 0 else f'the end of epoch {epoch}'}, "
        f"where its history ends. Try: {'; or '.join(hints)}; and check the input for extreme counts."
    )
