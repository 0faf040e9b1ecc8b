"""The training loop: one function, read top to bottom.

seed -> per epoch: shuffle, a training pass (minibatches gathered on the device),
optionally a ``no_grad`` validation pass -> history -> early stopping / checkpoint.

Randomness is re-seeded at every epoch from (seed, epoch), so continuing a fit, or
resuming it from a checkpoint written at an epoch boundary, replays exactly the
same random numbers as an uninterrupted fit (on CPU, bit for bit).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from ..cpu import fused
from ..data.contract import CountData
from ..nn.module import CountBatch, LDVAEModule
from .optim import adam
from ..util.prefetch import prefetched

logger = logging.getLogger(__name__)

HISTORY_KEYS = (
    "train_loss",
    "elbo_train",
    "reconstruction_loss_train",
    "kl_local_train",
    "kl_weight",
    "validation_loss",
    "elbo_validation",
    "reconstruction_loss_validation",
    "kl_local_validation",
)


class NonFiniteLossError(FloatingPointError):
    """The loss or its gradient became NaN/inf, or an update would have made a parameter
    NaN/inf; the model keeps its last good parameters."""


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
    check_val_every_n_epoch: int | None = None
    early_stopping: bool = False
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    progress_bar: bool = True
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every_n_epochs: int = 10
    # Batch-norm momentum while training; None keeps the module's (0.01, as scvi-tools).
    # Larger values let eval-mode statistics follow the parameters with few steps per epoch.
    batch_norm_momentum: float | None = None
    # Intra-op CPU threads during the fit; None: one when a step is small (see _fit_threads).
    threads: int | None = None


@dataclass
class TrainState:
    """Everything a fit carries from one ``train`` call (or checkpoint) to the next."""

    optimizer_state: dict | None = None
    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    warmup_steps: int = 0  # KL weight reaches 1 after this many steps (0: no warm-up)
    history: dict[str, list[list[float]]] = field(default_factory=dict)  # key -> [[epoch, value], ...]
    best_val: float = math.inf
    epochs_since_best: int = 0
    interrupted: bool = False

    def record(self, key: str, epoch: int, value: float) -> None:
        self.history.setdefault(key, []).append([epoch, float(value)])


def split_indices(n: int, train_size: float, validation_size: float | None, seed: int):
    """scvi-tools' split: the first ``n_val`` cells of a seeded permutation validate, the
    next ``n_train`` train. With the same seed both packages validate on the same cells."""
    if not 0.0 < train_size <= 1.0:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
    n_train = math.ceil(train_size * n)
    if validation_size is None:
        n_val = n - n_train
    else:
        if not 0.0 <= validation_size < 1.0 or train_size + validation_size > 1.0:
            raise ValueError(
                f"validation_size must be in [0, 1) with train_size + validation_size <= 1, "
                f"got train_size={train_size}, validation_size={validation_size}."
            )
        n_val = math.floor(validation_size * n)
    perm = np.random.RandomState(seed).permutation(n)
    return perm[n_val : n_val + n_train], perm[:n_val]


def minibatches(perm: Tensor, batch_size: int) -> list[Tensor]:
    """Split a permutation into batches; a last batch of one cell joins the previous one
    (batch normalization needs two cells)."""
    parts = list(torch.split(perm, batch_size))
    if len(parts) > 1 and parts[-1].shape[0] == 1:
        last = parts.pop()
        parts[-1] = torch.cat([parts[-1], last])
    return parts


class InMemorySource:
    """Minibatches of an in-memory ``CountData``: a seeded shuffle of the training cells per
    epoch, gathered on the device. Out-of-core and distributed sources offer the same four
    members (``n_train``, ``n_val``, ``steps_per_epoch``, ``train_batches``, ``val_batches``)."""

    def __init__(self, data: CountData, train_idx: np.ndarray, val_idx: np.ndarray, batch_size: int):
        self.data = data
        self.device = data.device
        self.batch_size = batch_size
        self.train_rows = torch.as_tensor(np.asarray(train_idx), dtype=torch.int64, device=data.device)
        self.val_rows = torch.as_tensor(np.asarray(val_idx), dtype=torch.int64, device=data.device)
        self.n_train = len(self.train_rows)
        self.n_val = len(self.val_rows)
        self.steps_per_epoch = len(minibatches(torch.arange(self.n_train), batch_size))

    # Group each training batch's nonzeros by gene; fit sets it from the module
    # (LDVAEModule.needs_gene_order): only the torch encoder's gradient uses the grouping.
    by_gene = True

    def epoch_rows(self, generator: torch.Generator) -> list[Tensor]:
        """An epoch's minibatches as cell indices: a seeded shuffle of the training cells."""
        perm = self.train_rows[torch.randperm(self.n_train, generator=generator).to(self.device)]
        return minibatches(perm, self.batch_size)

    def train_batches(self, generator: torch.Generator) -> Iterator[CountBatch]:
        parts = self.epoch_rows(generator)
        if self.device.type != "cpu" or len(parts) < 2 or not self.by_gene:
            for rows in parts:
                yield self.data.gather(rows, by_gene=self.by_gene)
            return

        # With the gene grouping (autograd's path) a CPU batch costs ~0.3 ms to gather, done
        # in a background thread (the second core) while this one trains: the same batches
        # in the same order. Without it the compiled gather (~0.08 ms) is cheaper than the
        # hand-over between threads.
        def produce(stop):
            for rows in parts:
                if stop.is_set():
                    return
                yield self.data.gather(rows, by_gene=self.by_gene)

        yield from prefetched(produce, depth=2)

    def val_batches(self) -> Iterator[CountBatch]:
        for rows in torch.split(self.val_rows, max(self.batch_size, 1024)):
            yield self.data.gather(rows)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63 - 1)


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


def _grad_norm(params: list[Tensor]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if hasattr(torch, "_foreach_norm") and len({(g.device, g.dtype) for g in grads}) == 1:
        # one kernel for all tensors: 4x less than nn.utils.get_total_norm's grouping (~0.15 ms a step)
        return torch.stack(torch._foreach_norm(grads)).norm()
    return torch.stack([g.norm() for g in grads]).norm()


@torch.no_grad()
def evaluate(module: LDVAEModule, source, kl_weight: float) -> dict[str, float]:
    """Validation metrics over the source's validation cells in eval mode (running
    batch-norm statistics, no dropout, one sample of z per cell), per cell as in scvi-tools."""
    was_training = module.training
    module.eval()
    comm = getattr(source, "comm", None)  # a shard of a distributed job (ldvae.distributed)
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
        "elbo_validation": elbo,
        "validation_loss": loss,
    }


def fit(module: LDVAEModule, source, config: TrainConfig, state: TrainState | None = None) -> TrainState:
    """Train ``module`` for ``config.max_epochs`` more epochs on ``source`` (e.g.
    ``InMemorySource``), continuing ``state``.

    Returns the updated state (also on interrupt). Raises NonFiniteLossError with the
    last good parameters left in ``module``.
    """
    from tqdm.auto import tqdm

    state = state or TrainState()
    state.interrupted = False  # set again below if this call is interrupted
    device = source.device
    # A shard of a distributed job (ldvae.distributed) averages gradients and adds metrics over ranks.
    comm = getattr(source, "comm", None)
    if state.step == 0 and state.warmup_steps == 0:
        state.warmup_steps = _warmup_steps(config, source.steps_per_epoch)

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = adam(params, config)
    compiled_step = fused.TrainStep.for_module(module)  # None: autograd
    if compiled_step is not None and hasattr(optimizer, "use_flat"):
        optimizer.use_flat(compiled_step.flat, compiled_step.flat_grad)
    if hasattr(source, "by_gene"):
        source.by_gene = module.needs_gene_order
    if state.optimizer_state is not None:
        optimizer.load_state_dict(state.optimizer_state)
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"], group["eps"] = config.lr, config.weight_decay, config.eps
    # Runs of steps in one compiled call where the data are in memory on the CPU and no
    # other rank must see each step (the same steps as one call per step).
    runner = fused.StepRunner.for_fit(compiled_step, optimizer, source) if comm is None else None
    # Every buffer (batch-norm running statistics and their step counters) goes back to the
    # last good step when a step fails or is interrupted.
    buffers = list(module.buffers())
    last_good_buffers = [b.clone() for b in buffers]
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    if config.batch_norm_momentum is not None:
        for m in norms:
            m.momentum = config.batch_norm_momentum

    previous_threads = torch.get_num_threads()
    threads = _fit_threads(config, device, module.config.n_genes, previous_threads)
    if threads != previous_threads:
        torch.set_num_threads(threads)

    first_epoch = state.epoch
    last_epoch = first_epoch + config.max_epochs
    val_every = config.check_val_every_n_epoch or (1 if config.early_stopping else None)
    module.train()
    # A bar redrawn on every update suits a terminal; in a log file (CI, a batch job) it is
    # thousands of lines, so there progress is a log line every tenth of the fit.
    on_terminal = _stderr_is_terminal()
    bar = tqdm(
        total=config.max_epochs,
        desc="Training",
        unit="epoch",
        disable=not (config.progress_bar and on_terminal),
        dynamic_ncols=True,
    )
    log_every = max(config.max_epochs // 10, 1) if config.progress_bar and not on_terminal else 0
    guard = _DeferredInterrupt()
    in_step = False  # True between the buffer snapshot and the end of an optimizer step
    try:
        with guard:
            for epoch in range(first_epoch, last_epoch):
                seed = _epoch_seed(config.seed, epoch)
                if device.type == "cpu":
                    torch.default_generator.manual_seed(seed)  # torch.manual_seed also queues CUDA seeding
                else:
                    torch.manual_seed(seed)
                gen = torch.Generator(device="cpu").manual_seed(seed)
                per_step = []  # detached per-cell terms; summed once per epoch (fewer ops per step)
                kl_weight = 1.0
                if runner is not None:  # runs of up to runner.chunk steps, one compiled call each
                    parts = source.epoch_rows(gen)
                    for start in range(0, len(parts), runner.chunk):
                        if guard.requested:
                            raise KeyboardInterrupt
                        chunk = parts[start : start + runner.chunk]
                        weights = [_kl_weight(state.step + j, state.warmup_steps) for j in range(len(chunk))]
                        torch._foreach_copy_(last_good_buffers, buffers)
                        in_step = True
                        done, terms, failed = runner(chunk, weights)
                        state.step += done
                        in_step = False
                        per_step.append(terms)
                        kl_weight = weights[done - 1] if done else kl_weight
                        if failed is not None:  # the runner left the state of the last good step
                            raise NonFiniteLossError(
                                _nonfinite_message(module, failed, epoch, start + done, config))
                else:
                    for i, batch in enumerate(source.train_batches(gen)):
                        if guard.requested:
                            raise KeyboardInterrupt
                        kl_weight = _kl_weight(state.step, state.warmup_steps)
                        torch._foreach_copy_(last_good_buffers, buffers)
                        in_step = True
                        if compiled_step is not None:  # the same loss and gradients, one compiled call
                            out = compiled_step(batch, kl_weight)
                        else:
                            out = module.loss(batch, kl_weight)
                            optimizer.zero_grad(set_to_none=True)
                            out.loss.backward()
                        if comm is not None:
                            comm.sync(params, buffers)
                        norm = _grad_norm(params) if compiled_step is None else compiled_step.grad_norm()
                        if not bool(torch.isfinite(out.loss + norm)):
                            torch._foreach_copy_(buffers, last_good_buffers)
                            what = "loss" if not bool(torch.isfinite(out.loss)) else "gradient"
                            raise NonFiniteLossError(_nonfinite_message(module, what, epoch, i, config))
                        if not optimizer.step():  # refused: parameters and Adam's state as before it
                            torch._foreach_copy_(buffers, last_good_buffers)
                            raise NonFiniteLossError(_nonfinite_message(module, "update", epoch, i, config))
                        state.step += 1
                        in_step = False
                        per_step.append((out.reconstruction.detach(), out.kl_z.detach(), out.kl_l.detach(),
                                         out.loss.detach().double() * out.reconstruction.shape[0]))
                state.epoch = epoch + 1
                sums = _epoch_sums(per_step, device)
                if comm is not None:
                    comm.all_reduce_sum(sums)
                rec, kl, elbo, loss = (sums / source.n_train).tolist()
                for key, value in (
                    ("reconstruction_loss_train", rec),
                    ("kl_local_train", kl),
                    ("elbo_train", elbo),
                    ("train_loss", loss),
                    ("kl_weight", kl_weight),
                ):
                    state.record(key, epoch, value)
                postfix = {"elbo_train": f"{elbo:.1f}"}
                is_last = epoch + 1 == last_epoch
                if source.n_val and ((val_every and (epoch + 1) % val_every == 0) or is_last):
                    metrics = evaluate(module, source, kl_weight)
                    for key, value in metrics.items():
                        state.record(key, epoch, value)
                    postfix["elbo_val"] = f"{metrics['elbo_validation']:.1f}"
                    if config.early_stopping and _should_stop(state, metrics["elbo_validation"], config):
                        logger.info(
                            "Early stopping at epoch %d: elbo_validation did not improve by %g for %d epochs.",
                            epoch + 1, config.early_stopping_min_delta, config.early_stopping_patience,
                        )
                        is_last = True
                bar.set_postfix(postfix)
                bar.update(1)
                done_epochs = epoch + 1 - first_epoch
                if log_every and (done_epochs % log_every == 0 or is_last):
                    logger.info("Training: epoch %d of %d, %s.", done_epochs, config.max_epochs,
                                ", ".join(f"{k}={v}" for k, v in postfix.items()))
                writes = comm is None or comm.is_main
                if config.checkpoint_dir and writes and (state.epoch % config.checkpoint_every_n_epochs == 0 or is_last):
                    state.optimizer_state = optimizer.state_dict()
                    save_checkpoint(Path(config.checkpoint_dir), module, state, config)
                if is_last:
                    break
            if guard.requested:  # Ctrl-C after the last step: still report it
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if in_step:  # interrupted inside a step: batch-norm statistics may be half-updated
            torch._foreach_copy_(buffers, last_good_buffers)
        state.interrupted = True
        logger.warning(
            "Training interrupted after %d completed steps (epoch %d); the model keeps the parameters "
            "of the last completed step and the history so far.", state.step, state.epoch,
        )
    finally:
        bar.close()
        state.optimizer_state = optimizer.state_dict()
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        if torch.get_num_threads() != previous_threads:
            torch.set_num_threads(previous_threads)
        module.eval()
    return state


SMALL_STEP = 1 << 22  # cells x genes per minibatch below which one CPU thread is fastest


def _fit_threads(config: TrainConfig, device: torch.device, n_genes: int, current: int) -> int:
    """Intra-op threads for the training loop. A step of the tutorial's size (128 cells x
    1000 genes) is ~300 small kernels: more OpenMP threads add synchronization, not speed
    (on an idle 2-core machine: one thread 4.8 ms per step, two 11.2 ms, as the batch
    gathering thread then competes for the second core; 21-26 ms with another process on
    the cores)."""
    if config.threads is not None:
        return max(int(config.threads), 1)
    if device.type == "cpu" and config.batch_size * n_genes <= SMALL_STEP:
        return 1
    return current


def _warmup_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    if config.n_steps_kl_warmup is not None:
        return max(int(config.n_steps_kl_warmup), 0)
    if not config.n_epochs_kl_warmup:
        return 0
    epochs = config.n_epochs_kl_warmup
    if epochs > config.max_epochs // 2:
        # Never leave the KL weight below 1 for the whole fit: finish warm-up by mid-training.
        shortened = max(config.max_epochs // 2, 1)
        logger.info(
            "KL warm-up shortened from n_epochs_kl_warmup=%d to %d epochs so the KL weight reaches 1 "
            "within max_epochs=%d.", epochs, shortened, config.max_epochs,
        )
        epochs = shortened
    return epochs * steps_per_epoch


def _kl_weight(step: int, warmup_steps: int) -> float:
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def _should_stop(state: TrainState, value: float, config: TrainConfig) -> bool:
    if value < state.best_val - config.early_stopping_min_delta:
        state.best_val = value
        state.epochs_since_best = 0
        return False
    state.epochs_since_best += config.check_val_every_n_epoch or 1
    return state.epochs_since_best >= config.early_stopping_patience


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def _nonfinite_message(module: LDVAEModule, what: str, epoch: int, step: int, config: TrainConfig) -> str:
    """``what``: ``"loss"``, ``"gradient"`` or ``"update"`` (an optimizer step that would make
    a parameter non-finite)."""
    hints = [f"lower the learning rate (lr={config.lr:g})"]
    if what != "update" and not module.config.use_observed_lib_size:
        hints.insert(0, "use_observed_lib_size=True (a learned library size is the usual cause on data "
                        "with extreme library sizes)")
    subject = "parameters after the optimizer's update" if what == "update" else f"training {what}"
    return (
        f"The {subject} became non-finite at epoch {epoch + 1}, step {step + 1} of that epoch. "
        f"The model keeps the parameters of the last good step. Try: {'; or '.join(hints)}; and check the "
        "input for extreme counts."
    )


# --- checkpoints ------------------------------------------------------------------------

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1


def save_checkpoint(directory: Path, module: LDVAEModule, state: TrainState, config: TrainConfig) -> Path:
    """Write model, optimizer, history and counters atomically to ``directory/checkpoint.pt``."""
    from ..util.io import atomic_torch_save

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
    except Exception as err:  # truncated or corrupted file, or one holding pickled objects
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


def _check_checkpoint(payload: dict, path: Path) -> None:
    """Every field of a checkpoint, before any of it is applied (ModelFileError naming it)."""

    def bad(field: str, value, want: str):
        shown = repr(value) if not isinstance(value, (dict, list, Tensor)) else type(value).__name__
        return ModelFileError(f"{path} is damaged: {field} must be {want}, got {shown[:80]}.")

    if set(payload) != _CHECKPOINT_KEYS:
        extra, missing = sorted(set(payload) - _CHECKPOINT_KEYS), sorted(_CHECKPOINT_KEYS - set(payload))
        raise ModelFileError(f"{path} is damaged: unexpected keys {extra}, missing keys {missing}.")
    weights = payload["module_state"]
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                for k, v in weights.items()):
        raise bad("module_state", weights, "a dict of named tensors")
    ts = payload["train_state"]
    fields = {f.name for f in TrainState.__dataclass_fields__.values()}
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
    config = payload["train_config"]
    known = set(TrainConfig.__dataclass_fields__)
    if not isinstance(config, dict) or not set(config) <= known:
        got = sorted(set(config) - known) if isinstance(config, dict) else config
        raise ModelFileError(f"{path} is damaged: train_config has unknown keys {got}.")
    seed = config.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("train_config['seed']", seed, "an integer")


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
