"""The workflow's output directory: when it may be replaced, and how it is written.

The outputs are written into a staging directory beside ``out_dir`` (created before any
work, so an unwritable place fails at once), marked with the list of what they are, and
renamed into place only when complete (:func:`staged`): a failed or interrupted run leaves
nothing at ``out_dir``. An existing ``out_dir`` is replaced only with ``overwrite=True``,
and only if it holds nothing but an earlier run's outputs (:func:`check_out_dir`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

from .._version import __version__
from ..util.io import (
    DiskFullError, OutputError, atomic_write_json, file_in_the_way, is_disk_full, owned_dir_name, sweep_stale,
)

#: The file that marks a directory as written by run_workflow, with the list of what it holds.
OUTPUT_MARKER = ".ldvae-output.json"


def _refuse(path: Path, why: str) -> None:
    raise OutputError(f"Refusing to replace {str(path)!r} (--overwrite): {why}. "
                      f"Choose a new --out-dir, e.g. {str(path / 'ldvae_out')!r}.")


def _within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool, *, inputs: Sequence = ()) -> Path:
    """``out_dir`` as a Path, if the workflow may write it.

    A new directory is fine. An existing one needs ``overwrite=True``, and is then replaced
    only if it is empty or holds nothing but what an earlier run wrote there (recorded in
    its ``.ldvae-output.json``); never the file system root, the home or current
    directory, a mount point, a symbolic link, or a directory holding one of ``inputs``
    (paths the run reads). Raises FileExistsError or :class:`~ldvae.util.io.OutputError`.
    """
    path = Path(out_dir).expanduser()
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise FileExistsError(f"Output path {str(blocking)!r} is a file, not a directory; choose another --out-dir.")
    if not os.path.lexists(path):
        return path
    if not overwrite:
        raise FileExistsError(f"Output directory {str(path)!r} already exists. Pass --overwrite (overwrite=True) "
                              "to replace it, or choose another --out-dir.")
    if path.is_symlink():
        _refuse(path, "it is a symbolic link")
    real = path.resolve()
    if real.parent == real:
        _refuse(path, "it is the root of the file system")
    if real == Path.home().resolve():
        _refuse(path, "it is your home directory")
    if _within(Path.cwd().resolve(), real):
        _refuse(path, "it is, or holds, the current directory")
    if os.path.ismount(real):
        _refuse(path, "it is a mount point")
    for item in inputs:
        if item is not None and _within(Path(item).expanduser().resolve(), real):
            _refuse(path, f"it holds the input {str(item)!r}")
    entries = _entries(real)
    if next(entries, None) is None:
        return path
    try:
        written = set(json.loads((real / OUTPUT_MARKER).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        _refuse(path, f"it is not empty and was not written by ldvae (no {OUTPUT_MARKER} in it)")
    foreign = next((e for e in _entries(real) if e not in written and e != OUTPUT_MARKER), None)
    if foreign is not None:
        _refuse(path, f"it holds files that ldvae did not write (first: {foreign!r})")
    return path


def _entries(directory: Path) -> Iterator[str]:
    """Relative paths (POSIX) of everything under ``directory``, lazily; links not followed."""
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            yield Path(os.path.relpath(os.path.join(root, name), directory)).as_posix()


def staging_dir(out_dir: Path) -> tuple[Path, list[Path]]:
    """Create the directory the outputs are written into (renamed to ``out_dir`` at the end)
    now, so that an unwritable place fails before any work; also the missing parents of
    ``out_dir``, returned (deepest first) so that a failed run can remove them again."""
    parent = Path(os.path.abspath(out_dir)).parent
    made = []
    p = parent
    while not p.exists() and p.parent != p:
        made.append(p)
        p = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / owned_dir_name(f".{out_dir.name}.partial-")
        staging.mkdir()
    except OSError as err:
        remove_empty(made)
        if is_disk_full(err):
            raise DiskFullError(f"No space left on the device holding {parent}; nothing was written. "
                                "Free some space or choose another --out-dir.", parent) from err
        raise OutputError(f"Cannot write the output directory {str(out_dir)!r}: creating a directory in "
                          f"{str(parent)!r} failed ({err.strerror or err}). Choose another --out-dir.") from err
    return staging, made


def remove_empty(directories: list[Path]) -> None:
    for d in directories:  # deepest first
        with contextlib.suppress(OSError):
            d.rmdir()


def mark_output(staging: Path) -> None:
    written = sorted(_entries(staging))
    atomic_write_json(staging / OUTPUT_MARKER, {"written_by": f"ldvae {__version__}", "files": written})


def move_into_place(staging: Path, out_dir: Path, overwrite: bool, inputs: Sequence = (),
                    appeared: bool = False) -> None:
    """Rename the finished staging directory to ``out_dir``; an old one (checked again, as it
    may have changed during the run; ``appeared``: there was none when the run started) is
    moved aside first and removed only after."""
    if not os.path.lexists(out_dir):
        os.replace(staging, out_dir)
        return
    if appeared and not overwrite:
        raise FileExistsError(f"Output directory {str(out_dir)!r} appeared while this run worked (another run "
                              "writing there?); nothing of this run was written. Choose another --out-dir.")
    check_out_dir(out_dir, overwrite, inputs=inputs)
    target = Path(os.path.abspath(out_dir))
    trash = target.parent / owned_dir_name(f".{target.name}.old-")
    os.replace(out_dir, trash)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(trash, out_dir)  # put the old one back
        raise
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def staged(out_dir: Path, overwrite: bool, inputs: Sequence = ()) -> Iterator[Path]:
    """A fresh staging directory for the outputs of ``out_dir`` (already checked with
    :func:`check_out_dir`); on leaving the block without error it is marked and renamed
    into place, on any error (or interrupt) removed, with the parents it created."""
    target = Path(os.path.abspath(out_dir))
    for kind in ("partial", "old"):  # left by runs that were killed
        sweep_stale(target.parent, f".{target.name}.{kind}-")
    existed = os.path.lexists(out_dir)
    staging, made = staging_dir(out_dir)
    try:
        yield staging
        mark_output(staging)
        move_into_place(staging, out_dir, overwrite, inputs, appeared=not existed)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        remove_empty(made)
        elsewhere = isinstance(err, DiskFullError) and not Path(os.path.abspath(err.path)).is_relative_to(target.parent)
        if is_disk_full(err) and not elsewhere:  # a full disk elsewhere (the temporary folder) says where itself
            name = err.path.name if isinstance(err, DiskFullError) else "the outputs"
            raise DiskFullError(f"No space left on the device holding {str(out_dir)!r} while writing {name}; "
                                "nothing was written. Free some space or choose another --out-dir.",
                                target) from err
        raise
