"""Data-parallel training on several GPUs or machines with ``torch.distributed``.

Launch one process per GPU (or CPU worker) with ``torchrun``::

    torchrun --nproc_per_node=4 -m ldvae.distributed atlas.h5ad run/ --batch-key batch --max-epochs 20

Each rank streams its own contiguous block of cells from the file (``ldvae.data.backed``);
after every backward pass the gradients, and the batch-norm running statistics, are
averaged over ranks with one ``all_reduce``, so all ranks take the same optimizer step
and keep identical parameters. Training and validation sums are added over ranks before
they enter the history, so every rank sees the same metrics (and stops early together).
Only rank 0 writes checkpoints, the saved model and the history. The backend is NCCL
when CUDA is available (each rank on GPU ``LOCAL_RANK``), gloo otherwise.

Why not ``DistributedDataParallel``: it synchronizes inside ``forward()``, while the
training loop calls ``module.loss`` and validates each rank's own cells with a different
number of batches; the model's gradients are about a megabyte, so one coalesced
``all_reduce`` per step costs what DDP's bucketed reduction would.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .cli.options import (
    HelpFormatter,
    add_batch_key,
    add_batch_size,
    add_check_val,
    add_layer,
    add_lr,
    add_max_epochs,
    add_n_latent,
    add_overwrite,
    add_seed,
)
from .data import backed
from .util.checks import SetupError
from .util.io import OutputError, new_npy, probe_writable

logger = logging.getLogger(__name__)

_CURRENT: "Communicator | None" = None


def _memory_order(t: Tensor) -> Tensor:
    """A 1-D view of ``t`` in its memory order where it has one: the encoders' gene-major
    first-layer weights (and their gradients) are transposed, and flattening them in logical
    order would copy. Every rank has the same layouts, so memory order lines ranks up."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 2 and t.t().is_contiguous():
        return t.t().view(-1)
    return t.reshape(-1)  # another layout: a logical-order copy, written back by the caller


class Communicator:
    """What ``train.fit`` and the streaming passes need from the process group.

    Parameters
    ----------
    device
        Where collectives run: the rank's GPU for NCCL, the CPU for gloo.
    check_sync
        After every step, verify that all ranks hold bit-identical parameters (two more
        small ``all_reduce`` calls per step; for tests and debugging).
    """

    def __init__(self, device: torch.device, *, check_sync: bool = False):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device
        self.check_sync = check_sync
        self.steps_checked = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sync(self, params: list[Tensor], buffers: list[Tensor]) -> None:
        """Average gradients and floating-point buffers (batch-norm running statistics)
        over ranks, in place, with one ``all_reduce``."""
        if self.check_sync:
            self._check_identical(params)
        grads = [p.grad for p in params if p.grad is not None]
        tensors = grads + [b for b in buffers if b.is_floating_point()]
        flat = torch.cat([_memory_order(t) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            chunk = flat[offset : offset + t.numel()]
            view = _memory_order(t)
            if view.data_ptr() == t.data_ptr():  # a view of t: write through it
                view.copy_(chunk)
            else:
                t.copy_(chunk.view_as(t))
            offset += t.numel()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over ranks, in place."""
        dist.all_reduce(tensor)
        return tensor

    def all_reduce_sum_numpy(self, array: np.ndarray) -> np.ndarray:
        """The sum over ranks of a float64 array (through the collective device)."""
        t = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float64), device=self.device)
        dist.all_reduce(t)
        return t.cpu().numpy()

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers to every rank (identical initial state)."""
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)

    def max_difference(self, module: torch.nn.Module) -> float:
        """Largest absolute difference of any parameter or buffer between ranks."""
        flat = torch.cat([t.detach().reshape(-1).double() for t in (*module.parameters(), *module.buffers())])
        high, low = flat.clone(), flat.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        return float((high - low).abs().max())

    def _check_identical(self, params: list[Tensor]) -> None:
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        high, low = flat.clone(), flat.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        if not torch.equal(high, low):
            raise RuntimeError(
                f"Ranks hold different parameters before step {self.steps_checked + 1} "
                f"(largest difference {float((high - low).abs().max()):.3g})."
            )
        self.steps_checked += 1


def init(*, check_sync: bool = False, backend: str | None = None) -> Communicator:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...) and make it the one ``ldvae.data.backed`` shards over.

    Returns the communicator; its ``device`` is this rank's GPU (``LOCAL_RANK``) with
    NCCL, or the CPU with gloo.
    """
    global _CURRENT
    if "RANK" not in os.environ and not dist.is_initialized():
        raise RuntimeError(
            "ldvae.distributed needs the environment torchrun sets up; launch with "
            "`torchrun --nproc_per_node=N -m ldvae.distributed ...`."
        )
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    _CURRENT = Communicator(device, check_sync=check_sync)
    backed.use_communicator(_CURRENT)
    return _CURRENT


def current() -> Communicator | None:
    """The communicator of the running job (``None`` in a single process)."""
    global _CURRENT
    if _CURRENT is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        _CURRENT = Communicator(device)
        backed.use_communicator(_CURRENT)
    return _CURRENT


def shutdown() -> None:
    """Leave the process group."""
    global _CURRENT
    _CURRENT = None
    backed.use_communicator(None)
    if dist.is_initialized():
        dist.destroy_process_group()


def fit_distributed(
    path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    model_kwargs: dict | None = None,
    train_kwargs: dict | None = None,
    latent_out: str | os.PathLike | None = None,
    check_sync: bool = False,
    overwrite: bool = False,
):
    """Fit a ``LinearSCVI`` on the counts of ``path`` (``.h5ad`` or ``.zarr``) with all
    ranks of a ``torchrun`` job; call it on every rank.

    Setup validation, the library-size prior and training all stream each rank's block of
    cells. Rank 0 saves the model (weights, settings and history) into ``out_dir``; with
    ``latent_out`` every rank writes the latent means of its block into one ``.npy``
    (filled under a temporary name that rank 0 renames when all ranks are done).

    Returns the fitted model (the same parameters on every rank).
    """
    from .model import LinearSCVI
    from .model.files import check_model_dir

    if out_dir is not None:  # on every rank, before any work: all refuse alike, none waits for another
        check_model_dir(out_dir, overwrite=overwrite)
    if latent_out is not None and os.path.lexists(latent_out) and not overwrite:
        raise FileExistsError(f"{latent_out} already exists. Pass --overwrite (overwrite=True) to replace it.")
    train_kwargs = dict(train_kwargs or {})
    comm = init(check_sync=check_sync)
    # Rank 0 writes the checkpoints and the latent file: it checks their places, and every rank
    # refuses with its answer, before any work.
    problem = [_unwritable(train_kwargs.get("checkpoint_dir"), latent_out) if comm.is_main else None]
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise OutputError(problem[0])
    adata = backed.read_backed(path, layer=layer)
    if adata.n_obs < 2 * comm.world_size:
        raise SetupError(f"{comm.world_size} ranks but {adata.n_obs} cells: each rank trains on cells of its own. "
                         "Start fewer processes (--nproc_per_node).")
    LinearSCVI.setup_anndata(adata, layer=layer, batch_key=batch_key, labels_key=labels_key)
    model = LinearSCVI(adata, **(model_kwargs or {}))
    comm.broadcast_module(model.module)
    if not comm.is_main:
        train_kwargs["progress_bar"] = False
        train_kwargs.pop("checkpoint_dir", None)
    accelerator = "gpu" if comm.device.type == "cuda" else "cpu"
    model.train(accelerator=accelerator, devices=comm.device.index if comm.device.type == "cuda" else "auto",
                **train_kwargs)
    if model.train_state_.interrupted:  # Ctrl-C reaches every rank: none writes a model that looks finished
        raise KeyboardInterrupt
    diff = comm.max_difference(model.module)
    if comm.is_main:
        steps = model.train_state_.step
        msg = f"{comm.world_size} ranks, {steps} steps: largest parameter difference between ranks {diff:.3g}"
        if check_sync:
            msg += f" (identical before each of {comm.steps_checked} steps)"
        logger.info(msg)
    # The latent first, under one name for all ranks (not ldvae.util.io.atomic_path's per-process
    # one), then the model, then the latent's rename: an interrupt before the end leaves neither.
    tmp = None if latent_out is None else Path(latent_out).parent / f".{Path(latent_out).name}.ranks.tmp"
    try:
        if tmp is not None:
            _write_latent(model, adata, comm, tmp)
        if comm.is_main and out_dir is not None:
            model.save(out_dir, overwrite=overwrite)
        if tmp is not None:
            dist.barrier()
            if comm.is_main:
                os.replace(tmp, latent_out)
    except BaseException:
        if comm.is_main and tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return model


def _unwritable(checkpoint_dir, latent_out) -> str | None:
    """Why rank 0 cannot write checkpoints into ``checkpoint_dir`` or the latent file beside
    ``latent_out`` (their folders are made if missing), or None."""
    for what, folder in (("checkpoint_dir", checkpoint_dir),
                         ("latent_out", None if latent_out is None else Path(latent_out).parent)):
        if folder is not None:
            try:
                probe_writable(folder)
            except OSError as err:
                return f"{what}: {str(folder)!r} cannot be written ({err.strerror or err})."
    return None


def _write_latent(model, adata, comm: Communicator, tmp: Path) -> None:
    """Every rank's latent means of its own block of cells, into rank 0's file ``tmp``."""
    if comm.is_main:
        new_npy(tmp, (adata.n_obs, model.init_params_["n_latent"]))  # a full disk fails here, not while ranks fill it
    dist.barrier()
    start, stop = backed.shard_rows(adata.n_obs, comm.rank, comm.world_size)
    z = model.get_latent_representation(adata, np.arange(start, stop))
    target = np.load(tmp, mmap_mode="r+")
    target[start:stop] = z
    target.flush()
    del target


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m ldvae.distributed``, built with ``ldvae run``'s builders."""
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node=N -m ldvae.distributed",
        description="Fit LinearSCVI with distributed data parallel on counts in an .h5ad or .zarr store.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("data", help=".h5ad file or .zarr directory with raw counts (CSR)")
    parser.add_argument("out_dir", help="directory for the saved model (rank 0)")
    add_layer(parser, help="read counts from this layer instead of X")
    add_batch_key(parser)
    parser.add_argument("--labels-key", default=None)
    add_n_latent(parser)
    parser.add_argument("--n-hidden", type=int, default=128)
    add_max_epochs(parser, default=None)
    add_batch_size(parser, help="cells per minibatch on each rank")
    add_lr(parser)
    parser.add_argument("--train-size", type=float, default=0.9)
    add_check_val(parser, default=None)
    parser.add_argument("--early-stopping", action="store_true")
    add_seed(parser)
    parser.add_argument("--checkpoint-dir", default=None, help="rank 0 writes a checkpoint here")
    parser.add_argument("--checkpoint-every-n-epochs", type=int, default=10)
    parser.add_argument("--resume-from", default=None,
                        help="continue an interrupted fit from this checkpoint (file or --checkpoint-dir)")
    parser.add_argument("--latent-out", default=None, help=".npy path for the latent means of all cells")
    parser.add_argument("--check-sync", action="store_true",
                        help="verify every step that all ranks hold identical parameters")
    add_overwrite(parser, help="replace an existing model directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``torchrun ... -m ldvae.distributed DATA OUT_DIR [options]``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .model import settings

    settings.seed = args.seed
    try:
        fit_distributed(
            args.data,
            args.out_dir,
            layer=args.layer,
            batch_key=args.batch_key,
            labels_key=args.labels_key,
            model_kwargs={"n_latent": args.n_latent, "n_hidden": args.n_hidden},
            train_kwargs={
                "max_epochs": args.max_epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "train_size": args.train_size,
                "check_val_every_n_epoch": args.check_val_every_n_epoch,
                "early_stopping": args.early_stopping,
                "seed": args.seed,
                "checkpoint_dir": args.checkpoint_dir,
                "checkpoint_every_n_epochs": args.checkpoint_every_n_epochs,
                "resume_from": args.resume_from,
                "progress_bar": False,
            },
            latent_out=args.latent_out,
            check_sync=args.check_sync,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError, RuntimeError) as err:
        print(f"ldvae.distributed (rank {os.environ.get('RANK', '?')}): {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ldvae.distributed (rank {os.environ.get('RANK', '?')}): interrupted; no model or latent file was "
              "written (checkpoints already in --checkpoint-dir stay).", file=sys.stderr)
        return 130
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    # Run the imported module's main, so that one module object holds the communicator it sets.
    from ldvae.distributed import main as _main

    sys.exit(_main())
