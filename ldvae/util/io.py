"""Files: every file the package writes goes to a temporary name beside its final
name and is renamed into place, so a crash never leaves a truncated file there.

A full disk surfaces as one :class:`DiskFullError` naming the file, whatever wrote it
(HDF5, torch, matplotlib). Temporary directories carry their owner's process id in
their name, so that a later run can remove those of processes that died
(:func:`owned_dir_name`, :func:`sweep_stale`) and never touch a live run's.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import torch

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")
_SHORT_WRITE_TEXT = ("unexpected pos", "file write failed")


class OutputError(OSError):
    """An output cannot be written where asked; the message says where, why and what to do."""


class DiskFullError(OutputError):
    """The file system ran out of space (or quota) while writing ``path``."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` reports a full disk or quota (h5py and torch raise it without an errno)."""
    if isinstance(err, DiskFullError):
        return True
    if isinstance(err, OSError) and err.errno in _DISK_FULL:
        return True
    return isinstance(err, (OSError, RuntimeError)) and any(t in str(err) for t in _DISK_FULL_TEXT)


def _short_write_on_full_disk(err: BaseException, path: Path) -> bool:
    """torch's writer reports a full disk only as a short write ("unexpected pos ...")."""
    if not (isinstance(err, RuntimeError) and any(t in str(err) for t in _SHORT_WRITE_TEXT)):
        return False
    try:
        return shutil.disk_usage(path.parent).free < (1 << 20)
    except OSError:
        return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an unused temporary path beside ``path`` for the caller to write; on success
    flush it to disk and rename it to ``path``, on any failure (KeyboardInterrupt too)
    remove it. A full disk raises :class:`DiskFullError`.

    The temporary file is created by the writer, so it gets the usual permissions (umask);
    ``os.replace`` is atomic on POSIX and Windows, so ``path`` holds either the old or the
    complete new content, never a part.
    """
    path = Path(path)
    tmp_path = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, path)
    except BaseException as err:
        full = is_disk_full(err) or _short_write_on_full_disk(err, path)  # before the space is freed
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)
        if full and not isinstance(err, DiskFullError):
            raise DiskFullError(f"No space left on device while writing {path}.", path) from err
        raise
    _fsync_dir(path.parent)


def _fsync(path: Path) -> None:
    # Without it a power loss soon after the rename can leave an empty file on some file systems.
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); not possible, nor needed, on Windows."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def probe_writable(directory: str | os.PathLike) -> None:
    """Make ``directory`` (and its parents) if missing and write and remove a file there;
    raises the ``OSError`` met (unwritable, read-only, a file in the way)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".ldvae-write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def refuse_existing(path: str | os.PathLike, what: str = "out") -> None:
    """Refuse to write a new result over anything at ``path`` (before any work is done)."""
    if os.path.lexists(path):
        raise FileExistsError(f"{what}={str(path)!r} exists; results are never written over a file. Remove it "
                              "or choose another path (nothing was computed).")


def new_npy(path: str | os.PathLike, shape: tuple[int, ...]) -> None:
    """A float32 ``.npy`` of ``shape`` at ``path``, every block of it allocated on disk
    (:func:`reserve`), ready to be filled through a memory map."""
    import numpy as np

    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape).flush()
    reserve(path)


def reserve(path: str | os.PathLike) -> None:
    """Allocate every block of the file at ``path`` (as long as it is) on disk now, so that
    filling a memory map of it cannot meet a full disk (which kills the process with
    SIGBUS); a full disk raises here instead. Where the OS has no such call, nothing."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_h5ad(adata, path: str | os.PathLike, **dataset_kwargs) -> None:
    with atomic_path(path) as tmp:
        write_h5ad(adata, tmp, **dataset_kwargs)


class _FirstError:
    """An unbuffered file for h5py that keeps the first write error and then discards writes,
    so that HDF5 can still close the file (on a failed write it otherwise floods stderr with
    errors from every open object and may crash at exit)."""

    def __init__(self, file):
        self._file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while self.error is None and len(view):
            try:
                view = view[self._file.write(view):]  # h5py ignores short writes: finish them here
            except OSError as err:
                self.error = err
        return size

    def __getattr__(self, name):  # read, seek, tell, truncate, flush
        return getattr(self._file, name)


def _open_binary(path: Path):
    return open(path, "w+b", buffering=0)


def write_h5ad(adata, path: str | os.PathLike, **dataset_kwargs) -> None:
    """``adata.write_h5ad(path, **dataset_kwargs)``, except that ``adata`` is left as it was
    (anndata's writer turns string columns into categoricals in place; here that happens to
    copies of obs and var), pandas' nullable strings (pandas 3's default) are written, and a
    failed write raises its ``OSError`` once and cleanly (``path`` is then incomplete; the
    caller removes it)."""
    import h5py

    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem

    if adata.isbacked:
        raise ValueError("write_h5ad writes an AnnData in memory; this one is backed by a file.")
    out = writable_copy(adata)
    with _open_binary(Path(path)) as raw, nullable_strings_allowed():
        sink = _FirstError(raw)
        try:
            with h5py.File(sink, "w") as f:
                write_elem(f, "/", out, dataset_kwargs=dict(dataset_kwargs))
        except Exception:
            if sink.error is not None:
                raise sink.error from None
            raise
        if sink.error is not None:
            raise sink.error


def writable_copy(adata):
    """An AnnData sharing ``adata``'s matrices, with its own obs and var (and raw var), their
    string columns made categorical as anndata's writer does, so that the file reads back as
    an ``adata.write_h5ad`` file would and ``adata`` itself is not changed."""
    import anndata

    out = anndata.AnnData(
        X=adata.X, obs=adata.obs.copy(), var=adata.var.copy(), uns=dict(adata.uns), obsm=dict(adata.obsm),
        varm=dict(adata.varm), layers=dict(adata.layers), obsp=dict(adata.obsp), varp=dict(adata.varp),
    )
    if adata.raw is not None:
        out.raw = anndata.AnnData(X=adata.raw.X, obs=out.obs[[]], var=adata.raw.var.copy(), varm=dict(adata.raw.varm))
        out.strings_to_categoricals(out.raw.var)
    out.strings_to_categoricals()
    return out


def nullable_strings_allowed():
    """A context in which anndata writes pandas' nullable string columns and indexes (under
    ``pd.options.future.infer_string``, pandas 3's default, every string is one), which
    anndata 0.12 refuses unless told; a plain context where anndata has no such setting."""
    import anndata

    settings = getattr(anndata, "settings", None)
    if settings is None or not hasattr(settings, "allow_write_nullable_strings"):
        return contextlib.nullcontext()
    return settings.override(allow_write_nullable_strings=True)


# --- temporary directories of a process ---------------------------------------------------------


def file_in_the_way(directory: str | os.PathLike) -> Path | None:
    """The file at ``directory`` or at one of its parents, which keeps it from being a
    directory; None when there is none."""
    d = Path(directory)
    return next((p for p in (d, *d.parents) if p.exists() and not p.is_dir()), None)


def owned_dir_name(stem: str) -> str:
    """``<stem><pid>.<host>-<random>``: a temporary directory name that says which process
    owns it; ``<host>`` tells this machine's (this container's) process ids from those of
    another sharing the folder, which this one cannot see."""
    return f"{stem}{os.getpid()}.{_host_tag()}-{uuid.uuid4().hex[:8]}"


@functools.lru_cache(maxsize=1)
def _host_tag() -> str:
    """A short tag of the host name and the process-id namespace (which differ between
    containers and machines that share a temporary folder)."""
    import hashlib
    import socket

    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:6]


def _owner(name: str, stem: str) -> int | None:
    """The process id in an entry's name, if the process is one of this host's (an entry of
    another host, or without an id, has none that can be checked here)."""
    pid, _, tag = name[len(stem):].partition("-")[0].partition(".")
    if not pid.isdigit() or (tag and tag != _host_tag()):
        return None
    return int(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale(directory: str | os.PathLike, stem: str) -> list[Path]:
    """Remove the entries ``<stem><pid>[.<host>]-*`` of ``directory`` whose process ``pid``
    is no longer running (left by a run that was killed); returns what was removed. Entries
    without a process id in their name, or of another host, are left alone."""
    removed = []
    try:
        names = [n for n in os.listdir(directory) if n.startswith(stem)]
    except OSError:
        return removed
    for name in names:
        entry = Path(directory) / name
        pid = _owner(name, stem)
        if pid is None or _alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        if not entry.exists():
            removed.append(entry)
    return removed
