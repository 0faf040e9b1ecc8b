"""Fit the same model with several seeds, in parallel worker processes on CPU.

``fit_seeds`` returns the fitted models (minibatch order and sampling follow the seed; by
default every fit starts from the same weights and holds out the same cells);
:class:`BackgroundFits` starts such fits in worker processes and lets this process keep
working (the workflow's refits beside its own fit).
Each worker trains with one torch thread; results come back as saved weights and training
state, which the parent loads into models on its own AnnData. Used by ``ldvae.factors.stability``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..util import progress
from ..util.settings import child_env, usable_cpus

if TYPE_CHECKING:
    from ..model import LinearSCVI

logger = logging.getLogger(__name__)

FITS_DIR_STEM = "ldvae-fits-"
#: Seed of the training/validation split of every fit unless ``train_kwargs`` says otherwise.
SPLIT_SEED = 0


def _train_defaults(train_kwargs: dict | None) -> dict:
    """The fits' ``train`` options: every fit starts from the principal components of the
    counts and holds out the cells of ``SPLIT_SEED`` unless ``init`` and ``split_seed`` say
    otherwise (see :func:`fit_seeds`)."""
    return {"init": "pca", "split_seed": SPLIT_SEED, **dict(train_kwargs or {})}


def _fit_one(adata, model_kwargs: dict, train_kwargs: dict, seed: int) -> LinearSCVI:
    from ..model import LinearSCVI, settings

    previous = settings.seed
    settings.seed = int(seed)  # the weights' initialization follows the seed too
    try:
        model = LinearSCVI(adata, **model_kwargs)
    finally:
        settings.seed = previous
    model.train(**{**train_kwargs, "seed": int(seed), "progress_bar": False})
    if model.train_state_.interrupted:  # Ctrl-C stops the fits, not only this one
        raise KeyboardInterrupt
    return model


def _exit_with(parent: int) -> None:
    """Exit when the process ``parent`` is gone (killed): nobody would read the result."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _worker_main(directory: str, jobs: list[int], parent: int) -> None:
    """Entry point of a worker process: fit the jobs ``jobs`` described in ``directory``,
    one after another (one interpreter start and one read of the data for all of them), for
    the process ``parent`` that launched it (given, not read: it may be gone already)."""
    import anndata

    # Ctrl-C is the parent's to handle: it stops the workers (they run detached from the terminal).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    d = Path(directory)
    adata = None
    for job in jobs:
        spec = json.loads((d / f"job{job}.json").read_text(encoding="utf-8"))
        torch.set_num_threads(spec["threads"])
        adata = anndata.read_h5ad(d / "adata.h5ad") if adata is None else adata
        model = _fit_one(adata, spec["model_kwargs"], spec["train_kwargs"], spec["seed"])
        model.save(d / f"model{job}", overwrite=True)
        ts = model.train_state_
        payload = {  # what the saved model leaves out: the optimizer's state and the split
            "train_state": {f.name: getattr(ts, f.name) for f in fields(ts)},
            "train_indices": torch.as_tensor(np.asarray(model.train_indices_)),
            "validation_indices": torch.as_tensor(np.asarray(model.validation_indices_)),
        }
        torch.save(payload, d / f"result{job}.pt")


def _rebuild(adata, path: Path) -> LinearSCVI:
    """The model a worker fitted: loaded (and checked) as ``LinearSCVI.load`` loads any saved
    model, then given the training state and split that the worker wrote beside it."""
    from ..model import LinearSCVI
    from ..model.surface import SCVI_CODE_COLUMNS
    from ..train.loop import TrainState

    job = path.stem.removeprefix("result")
    written = [c for c in SCVI_CODE_COLUMNS.values() if c not in adata.obs]
    model = LinearSCVI.load(path.parent / f"model{job}", adata=adata, accelerator="cpu")
    adata.obs.drop(columns=[c for c in written if c in adata.obs], inplace=True)  # as a fit in this process leaves it
    model._reset_surface()  # its registry names the user's columns again
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.train_state_ = TrainState(**payload["train_state"])
    model.train_indices_ = payload["train_indices"].numpy()
    model.validation_indices_ = payload["validation_indices"].numpy()
    return model


def uses_gpu(accelerator: str = "auto") -> bool:
    """Whether training with ``accelerator`` runs on a CUDA GPU."""
    return torch.cuda.is_available() and str(accelerator).lower() != "cpu"


def _default_n_jobs(n_fits: int, train_kwargs: dict) -> int:
    if uses_gpu(train_kwargs.get("accelerator", "auto")):
        return 1  # one GPU: fits run one after another on it
    return max(1, min(n_fits, usable_cpus()))


def _fit_many(adata, jobs: list[tuple[dict, int]], n_jobs: int | None, train_kwargs: dict) -> list[LinearSCVI]:
    from ..data.contract import get_setup

    get_setup(adata)  # fail here, once, if setup_anndata was not run
    n_jobs = _default_n_jobs(len(jobs), train_kwargs) if n_jobs is None else n_jobs
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1:
        raise ValueError(f"n_jobs must be a positive integer or None (automatic), got {n_jobs!r}.")
    n_jobs = min(int(n_jobs), len(jobs))
    if n_jobs == 1:
        fits = []
        for kw, seed in jobs:
            fits.append(_fit_one(adata, kw, train_kwargs, seed))
            _note_done(len(jobs), len(fits), seed)
        return fits
    threads = max(1, usable_cpus() // n_jobs)
    compile_once()
    logger.info("Fitting %d models in %d worker processes (%d thread(s) each).", len(jobs), n_jobs, threads)
    # Fresh interpreters started by path, not multiprocessing: no fork of torch's thread
    # pools, and scripts need no `if __name__ == "__main__"` guard. Worker w fits jobs
    # w, w + n_jobs, ... (fits of one call cost about the same).
    with _fits_dir() as tmp:
        d = Path(tmp)
        _write_jobs(d, adata, jobs, train_kwargs, threads)
        env = _worker_env(threads)
        shares = [list(range(w, len(jobs), n_jobs)) for w in range(n_jobs)]
        procs = [_launch(d, share, env) for share in shares]
        try:
            running, done = set(range(n_jobs)), set()
            while running:
                for w in list(running):
                    if procs[w].poll() is not None:
                        running.discard(w)
                        _check_exit(d, jobs, shares[w], procs[w])
                for i in sorted(set(range(len(jobs))) - done):
                    if (d / f"result{i}.pt").exists():
                        done.add(i)
                        _note_done(len(jobs), len(done), jobs[i][1])
                time.sleep(0.05)
        finally:
            _kill(procs)
        return [_rebuild(adata, d / f"result{i}.pt") for i in range(len(jobs))]


def _note_done(n_fits: int, done: int, seed: int) -> None:
    progress.note(logger, "Fits of %d seeds: %d done (seed %d).", n_fits, done, seed)


def compile_once() -> None:
    """Fill numba's cache with the CPU training step before worker processes start, so that
    on the first use after an install they load it instead of each compiling it at once (on
    a 2-core machine the cold demo took 98 s that way)."""
    from ..cpu import fused

    fused.ensure_compiled(1)


def warm_up(threads: int) -> None:
    """A tiny fit on ``threads`` threads and its queries: what compiles (and caches) the CPU
    kernels they use; run in a child process by ``ldvae.cpu.fused.ensure_compiled``."""
    from ..data.simulate import simulate
    from ..model import LinearSCVI

    tiny = simulate(64, 8, 2, seed=0)
    LinearSCVI.setup_anndata(tiny, layer="counts")
    model = LinearSCVI(tiny, n_latent=2, n_hidden=8)
    model.train(2, batch_size=32, check_val_every_n_epoch=1, progress_bar=False, threads=threads,
                plan_kwargs={"n_epochs_kl_warmup": 1})  # no note on warm-up
    model.get_latent_representation()
    model.get_elbo()
    model.get_normalized_expression()


def _fits_dir() -> tempfile.TemporaryDirectory:
    """The workers' files; named by this process's id, so a later run removes them if it is killed."""
    from ..util.io import owned_dir_name, sweep_stale

    sweep_stale(tempfile.gettempdir(), FITS_DIR_STEM)
    return tempfile.TemporaryDirectory(prefix=owned_dir_name(FITS_DIR_STEM))


def _write_jobs(d: Path, adata, jobs: list[tuple[dict, int]], train_kwargs: dict, threads: int) -> None:
    specs = []
    for kw, seed in jobs:
        spec = {"model_kwargs": kw, "train_kwargs": train_kwargs, "seed": int(seed), "threads": threads}
        try:
            specs.append(json.dumps(spec))
        except TypeError as err:
            raise TypeError(
                f"model and training arguments must be plain values (numbers, strings, lists, dicts) to "
                f"reach worker processes ({err}); pass n_jobs=1 to fit in this process."
            ) from err
    from ..util.io import DiskFullError, is_disk_full, write_h5ad

    try:
        write_h5ad(adata, d / "adata.h5ad")
        for i, text in enumerate(specs):
            (d / f"job{i}.json").write_text(text, encoding="utf-8")
    except OSError as err:
        if not is_disk_full(err):
            raise
        raise DiskFullError(f"No space left in the temporary folder {str(d.parent)!r} (TMPDIR) for the data of the "
                            "seeds' worker processes. Free some space there, set TMPDIR to a folder with room, or fit "
                            "in this process (n_jobs=1).", d / "adata.h5ad") from err


def _worker_env(threads: int) -> dict:
    return child_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))


def _launch(d: Path, share: list[int], env: dict) -> subprocess.Popen:
    code = f"from ldvae.factors.seeds import _worker_main; _worker_main({str(d)!r}, {share!r}, {os.getpid()})"
    with open(d / f"worker{share[0]}.log", "wb") as log:
        # Detached from the terminal: its Ctrl-C or hang-up reaches the parent only,
        # which then stops the workers itself (see _kill).
        return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=log,
                                start_new_session=True)


def _check_exit(d: Path, jobs: list[tuple[dict, int]], share: list[int], proc: subprocess.Popen) -> None:
    if proc.returncode != 0:
        # the failed fit is the worker's first job without a result
        i = next((j for j in share if not (d / f"result{j}.pt").exists()), share[-1])
        if proc.returncode < 0:  # killed from outside (e.g. out of memory), not a failed fit
            raise RuntimeError(
                f"The worker process fitting seed {jobs[i][1]} was killed by "
                f"{signal.Signals(-proc.returncode).name}. Pass n_jobs=1 to fit in this process."
            )
        lines = (d / f"worker{share[0]}.log").read_text(errors="replace").strip().splitlines()
        raise RuntimeError(
            f"The fit of seed {jobs[i][1]} ({jobs[i][0]}) failed in its worker process (exit code "
            f"{proc.returncode}): {lines[-1] if lines else 'no output'}. Pass n_jobs=1 to fit "
            "in this process and see the full traceback."
        )


def _kill(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


class BackgroundFits:
    """Seeds fitted in worker processes (one per seed, all started at once) while this
    process does other work, e.g. the workflow's own fit.

    Use as a context manager: leaving it early (an error, Ctrl-C) kills the workers.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`LinearSCVI.setup_anndata` (copied to the workers now).
    seeds, train_kwargs, **model_kwargs
        As in :func:`fit_seeds`.
    threads
        Torch threads per worker.
    """

    def __init__(self, adata, seeds: Sequence[int], *, train_kwargs: dict | None = None, threads: int = 1,
                 **model_kwargs):
        from ..data.contract import get_setup

        get_setup(adata)
        self._adata = adata
        self._jobs = [(dict(model_kwargs), s) for s in check_seeds(seeds, 1)]
        train_kwargs = _train_defaults(train_kwargs)
        self._tmp = _fits_dir()
        self._dir = Path(self._tmp.name)
        self._procs: list[subprocess.Popen] = []
        if not uses_gpu(train_kwargs.get("accelerator", "auto")):
            compile_once()
        try:
            _write_jobs(self._dir, adata, self._jobs, train_kwargs, threads)
            env = _worker_env(threads)
            self._procs = [_launch(self._dir, [i], env) for i in range(len(self._jobs))]
        except BaseException:
            self.close()
            raise
        logger.info("Fitting seeds %s in %d background worker processes.", [s for _, s in self._jobs], len(self._procs))

    def result(self) -> list[LinearSCVI]:
        """Wait for every worker; the trained models in the order of ``seeds``."""
        try:
            for i, proc in enumerate(self._procs):
                proc.wait()
                _check_exit(self._dir, self._jobs, [i], proc)
            return [_rebuild(self._adata, self._dir / f"result{i}.pt") for i in range(len(self._jobs))]
        finally:
            self.close()

    def close(self) -> None:
        """Kill workers still running and remove their files."""
        _kill(self._procs)
        self._tmp.cleanup()

    def __enter__(self) -> BackgroundFits:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_seeds(seeds: Sequence[int], at_least: int) -> list[int]:
    seeds = [int(s) for s in seeds]
    if len(seeds) < at_least:
        raise ValueError(f"seeds needs at least {at_least} seeds to compare runs, got {seeds}.")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct (equal seeds give identical fits), got {seeds}.")
    return seeds


def fit_seeds(
    adata,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    *,
    n_jobs: int | None = None,
    train_kwargs: dict | None = None,
    **model_kwargs,
) -> list[LinearSCVI]:
    """Fit one :class:`ldvae.LinearSCVI` per seed.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`LinearSCVI.setup_anndata`.
    seeds
        One fit per seed; the seed sets the minibatch order and the sampling (with
        ``init="random"`` also the initial weights, with ``split_seed=None`` also the
        training/validation split).
    n_jobs
        Worker processes. Default: one per seed up to the CPU count on CPU; 1 (sequential)
        when a CUDA GPU will be used. Each worker reads a copy of ``adata`` once and fits
        its share of the seeds one after another.
    train_kwargs
        Passed to :meth:`LinearSCVI.train` (``max_epochs``, ``lr``, ``plan_kwargs``,
        ``batch_size``, ...); ``seed`` and ``progress_bar`` are set here. ``init`` defaults
        to ``"pca"``: every fit starts from the principal components of the counts
        (:mod:`ldvae.model.start`); ``init="random"`` starts each from the weights its seed
        builds. ``split_seed`` defaults to ``SPLIT_SEED`` (0): every fit trains on the same
        cells; ``split_seed=None`` gives each fit the split of its own seed (scvi-tools').
        So by default the seeds differ only in the minibatch order and the sampling, and
        the fits end on the same factors far more often (``bench/RESULTS.md``: the split
        was what moved the weakest factors most).
    **model_kwargs
        Passed to :class:`LinearSCVI` (``n_latent``, ``gene_likelihood``, ...).

    Returns
    -------
    list of LinearSCVI
        The trained models, in the order of ``seeds``.
    """
    seeds = check_seeds(seeds, 1)
    train_kwargs = _train_defaults(train_kwargs)
    return _fit_many(adata, [(dict(model_kwargs), s) for s in seeds], n_jobs, train_kwargs)
