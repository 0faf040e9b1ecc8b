"""Reading count files, downloading them when missing, and the embedded demo dataset.

One entry point, :func:`read_counts`, picks the scanpy/anndata reader from the path:

=====================================  ===========================================
path                                   reader
=====================================  ===========================================
``*.h5ad``                             ``anndata.read_h5ad``
``*.h5`` (10x Cell Ranger)             ``scanpy.read_10x_h5``
a directory (10x ``matrix.mtx(.gz)``)  ``scanpy.read_10x_mtx``
``*.loom``                             ``anndata.read_loom`` (needs ``loompy``)
``*.mtx``, ``*.mtx.gz``                ``scanpy.read_mtx`` (cells × genes as stored)
``*.csv``, ``*.csv.gz``                ``anndata.read_csv`` (cells in rows)
=====================================  ===========================================

With ``backup_url`` a missing file is downloaded first (:func:`download`): to a
temporary name beside the target, checked for truncation and for being what was asked
for (the given SHA-256, or else a complete file of the format its name says), and only
then renamed into place, so a failed download never leaves a file that a later run
would mistake for a cached copy.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zlib
from pathlib import Path

from ..util.io import atomic_path

logger = logging.getLogger(__name__)

DEMO_FILE = Path(__file__).parent / "pbmc3k_demo.h5ad"
DEMO_ATTRIBUTION = "Data: 10x Genomics, CC BY 4.0 (3k PBMCs from a Healthy Donor)"
FORMATS = ("h5ad", "10x-h5", "10x-mtx", "loom", "mtx", "csv")


class ReadError(ValueError):
    """A count file is missing, of an unknown format, unreadable, or could not be downloaded."""


def default_cache_dir() -> Path:
    """``$LDVAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/ldvae``, else ``~/.cache/ldvae``."""
    if os.environ.get("LDVAE_CACHE_DIR"):
        return Path(os.environ["LDVAE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ldvae"


def detect_format(path: str | os.PathLike) -> str:
    """The format of ``path``, one of :data:`FORMATS`, from its name (a directory: 10x mtx)."""
    p = Path(path)
    if p.is_dir():
        return "10x-mtx"
    name = p.name.lower()
    for suffix, fmt in (
        (".h5ad", "h5ad"),
        (".h5", "10x-h5"),
        (".loom", "loom"),
        (".mtx", "mtx"),
        (".mtx.gz", "mtx"),
        (".csv", "csv"),
        (".csv.gz", "csv"),
    ):
        if name.endswith(suffix):
            return fmt
    raise ReadError(
        f"Cannot tell the format of {str(path)!r} from its name; ldvae reads .h5ad, 10x .h5, a 10x matrix "
        "directory, .loom, .mtx(.gz) and .csv(.gz). Rename the file to the matching suffix."
    )


def _read(path: Path, fmt: str):
    import scanpy as sc

    try:
        from anndata.io import read_csv, read_h5ad, read_loom
    except ImportError:  # anndata < 0.11
        from anndata import read_csv, read_h5ad, read_loom

    if fmt == "h5ad":
        return read_h5ad(path)
    if fmt == "10x-h5":
        return sc.read_10x_h5(path)
    if fmt == "10x-mtx":
        return sc.read_10x_mtx(path)
    if fmt == "loom":
        return read_loom(path)
    if fmt == "mtx":
        return sc.read_mtx(path)
    return read_csv(path)


def read_file(path: str | os.PathLike):
    """Read one local count file into an AnnData (format from the name, see the module docs).

    Raises
    ------
    ReadError
        The file does not exist, its format is unknown, or the reader failed on it.
    """
    p = Path(path)
    if not p.exists():
        raise ReadError(f"Input file {str(p)!r} does not exist. Check the path, or pass --backup-url to download it.")
    fmt = detect_format(p)
    try:
        with warnings.catch_warnings():  # repeated names are reported below, with what is done about them
            warnings.filterwarnings("ignore", message="(Variable|Observation) names are not unique")
            adata = _read(p, fmt)
    except ImportError as err:
        raise ReadError(f"Reading {fmt} file {str(p)!r} needs a package that is not installed ({err}).") from err
    except Exception as err:  # the readers raise many types; the user needs the one line
        detail = str(err).splitlines()[0] if str(err) else ""
        if "unable to lock file" in str(err):  # HDF5's lock: another process has the file open for writing
            raise ReadError(f"Could not read {str(p)!r}: another process has it open for writing (HDF5's file "
                            "lock). Wait for that process to finish, then run again.") from err
        raise ReadError(
            f"Could not read {str(p)!r} as {fmt} ({type(err).__name__}: {detail}). Is it a complete {fmt} file?"
        ) from err
    repeated = adata.var_names[adata.var_names.duplicated()].unique()
    if len(repeated):
        adata.var_names_make_unique()
        logger.warning("%d gene names of %s occur more than once (first: %r); the repeats are named %r, %r, ... "
                       "as scanpy's var_names_make_unique does.", len(repeated), p, repeated[0],
                       f"{repeated[0]}-1", f"{repeated[0]}-2")
    again = adata.obs_names.duplicated()
    if again.any():
        logger.warning("%s has %d repeated cell names (first: %r); they stay as they are. Make them unique "
                       "(adata.obs_names_make_unique()) to tell those cells apart in the results.", p,
                       int(again.sum()), adata.obs_names[again][0])
    logger.info("read %s: %d cells x %d genes (%s)", p, adata.n_obs, adata.n_vars, fmt)
    return adata


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    progress_bar: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` with a progress bar; nothing is left at ``dest`` on failure.

    The bytes go to a temporary file beside ``dest`` and are renamed only when the
    transfer is complete (as many bytes as the server announced) and what arrived is
    what was asked for: the given ``sha256``, or else a file of the format its name says
    (:func:`check_file`). On any failure or interrupt (an exception of any kind, also
    ``KeyboardInterrupt`` and ``SystemExit``) the temporary file and the folders this call
    created are removed. Temporary files left beside ``dest`` by downloads of processes
    that no longer run are removed first.

    Raises
    ------
    ReadError
        On an HTTP or network error, a truncated transfer, a checksum mismatch or a file
        that is not of its format.
    """
    dest = Path(dest)
    if urllib.parse.urlparse(url).scheme not in ("http", "https", "ftp", "file"):
        raise ReadError(f"backup_url={url!r} is not an http(s), ftp or file URL.")
    created = _make_parents(dest.parent)
    try:
        _sweep_stale_temporaries(dest)
        received = _fetch(url, dest, sha256=sha256, progress_bar=progress_bar, timeout=timeout)
    except BaseException:
        for folder in reversed(created):  # innermost first; only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    logger.info("downloaded %s to %s (%d bytes)", url, dest, received)
    return dest


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # made meanwhile by another process: not ours to remove
            continue
        created.append(folder)
    return created


def _sweep_stale_temporaries(dest: Path) -> None:
    """Remove ``ldvae.util.io.atomic_path`` temporaries of ``dest`` (``.NAME.PID.HEX.tmp``) whose
    process no longer runs: a download killed outright cannot remove its own."""
    prefix = f".{dest.name}."
    for tmp in dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp"):
        pid = tmp.name[len(prefix) :].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                logger.info("removed %s, left by an interrupted download", tmp)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError, OverflowError):
        return True  # another user's process, or no way to tell: keep its file
    return True


def _fetch(url: str, dest: Path, *, sha256: str | None, progress_bar: bool, timeout: float) -> int:
    """Stream ``url`` into a temporary file beside ``dest``, check it, rename it into place;
    return the number of bytes received."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    received = 0
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as fh:
                length = response.headers.get("Content-Length")
                expected = int(length) if length and length.isdigit() else None
                with tqdm(
                    total=expected, unit="B", unit_scale=True, desc=f"Downloading {dest.name}",
                    disable=not progress_bar, dynamic_ncols=True,
                ) as bar:
                    while chunk := response.read(1 << 20):
                        fh.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            if expected is not None and received != expected:
                raise ReadError(
                    f"Download of {url} was truncated: got {received} of {expected} bytes. Nothing was kept; "
                    "run again to retry."
                )
            if sha256 is not None:
                if digest.hexdigest().lower() != sha256.strip().lower():
                    raise ReadError(
                        f"Download of {url} has SHA-256 {digest.hexdigest()}, expected {sha256.strip().lower()}. "
                        "Nothing was kept; check the URL and the checksum."
                    )
            else:
                problem = check_file(tmp, detect_format(dest), name=dest.name)
                if problem is not None:
                    raise ReadError(
                        f"Download of {url} is not a complete {detect_format(dest)} file ({problem}). Nothing was "
                        "kept; check the URL, or pass --sha256 to accept exactly the file you expect."
                    )
    except ReadError:
        raise
    except urllib.error.HTTPError as err:
        raise ReadError(f"Download of {url} failed: HTTP {err.code} {err.reason}. Nothing was kept.") from err
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ReadError(f"Download of {url} failed ({reason}). Nothing was kept; run again to retry.") from err
    except Exception as err:  # http.client.HTTPException: IncompleteRead, RemoteDisconnected, ...
        raise ReadError(
            f"Download of {url} failed after {received} bytes ({type(err).__name__}). Nothing was kept; "
            "run again to retry."
        ) from err
    return received


#: Top-level HDF5 groups a file of each format has (a 10x ``.h5``: Cell Ranger 3's, or 2's
#: per-genome groups, checked apart).
_HDF5_GROUPS = {"h5ad": ("obs", "var"), "loom": ("matrix",), "10x-h5": ("matrix",)}


def check_file(path: str | os.PathLike, fmt: str, *, name: str | None = None) -> str | None:
    """Why ``path`` is not a complete file of format ``fmt`` (None if it looks like one).

    HDF5 formats (h5ad, 10x h5, loom) must open with h5py and hold their top-level groups;
    a ``.gz`` name must be a gzip stream that decompresses to its end; text formats (csv,
    mtx) must not be an HTML page; an mtx file must start with the Matrix Market header
    and hold the entries its size line announces; a csv file must end in a whole line.
    ``name`` is the file name that tells gzip (default: ``path``'s).
    """
    path = Path(path)
    name = (name or path.name).lower()
    if fmt in _HDF5_GROUPS:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                keys = set(f.keys())
                if fmt == "10x-h5" and "matrix" not in keys:
                    # Cell Ranger 2: one group per genome, each with its barcodes
                    if any(isinstance(f[k], h5py.Group) and "barcodes" in f[k] for k in keys):
                        return None
                missing = [g for g in _HDF5_GROUPS[fmt] if g not in keys]
        except Exception as err:  # h5py raises OSError, KeyError, ... on damaged files
            return f"not readable as HDF5: {_describe_start(path)}{' '.join(str(err).split())[:120]}"
        return f"no top-level {missing[0]!r} group" if missing else None
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(1024)
            start = head.lstrip()[:15].lower()
            if start.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
                return f"it is an HTML/XML page starting {head.lstrip()[:40]!r}, e.g. an error or login page"
            if fmt == "mtx" and not head.startswith(b"%%MatrixMarket"):
                return f"no Matrix Market header; it starts {head[:40]!r}"
            fh.seek(0)
            return _check_lines(fh, fmt)
    except (OSError, EOFError, zlib.error) as err:
        if opener is open:
            raise
        return f"not a complete gzip stream: {_describe_start(path)}{' '.join(str(err).split())[:120]}"


def _check_lines(fh, fmt: str) -> str | None:
    """Read a text file to its end: a Matrix Market file has the entries its size line
    announces; a csv file ends in a whole line with as many fields as its header."""
    if fmt == "mtx":
        lines = (line for line in fh if not line.startswith(b"%") and line.strip())
        size = next(lines, b"").split()
        n_lines = sum(1 for _ in lines)
        if len(size) != 3 or not size[2].isdigit():  # (rows, columns, entries) of the coordinate layout
            return None
        if n_lines != int(size[2]):
            return f"{n_lines} entries of the {int(size[2])} its size line announces"
        return None
    first = fh.readline()
    last = first
    for line in fh:
        last = line
    if not last.endswith(b"\n") or last.count(b",") != first.count(b","):
        return f"its last line is cut short ({last[-40:]!r})"
    return None


def _describe_start(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(64).lstrip()
    if head[:15].lower().startswith((b"<!doctype html", b"<html")):
        return "it is an HTML page, e.g. an error or login page; "
    return ""


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_counts(
    path: str | os.PathLike | None = None,
    *,
    backup_url: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
    progress_bar: bool = True,
):
    """Read a count file; with ``backup_url``, download it first when it is missing.

    Parameters
    ----------
    path
        The file (or 10x matrix directory). With ``backup_url`` it may be omitted: the file
        is then ``<cache_dir>/<last part of the URL>``.
    backup_url
        Where to download the file from when it does not exist yet (as ``sc.read``).
    cache_dir
        Where downloads go. Default: beside ``path``, or :func:`default_cache_dir` when
        ``path`` is omitted. An existing file there is used without downloading, unless it
        does not match ``sha256`` or (without ``sha256``) is not a complete file of its
        format: then it is downloaded again.
    sha256
        Expected SHA-256 of the file, checked on download and of an existing file (without
        ``backup_url`` a mismatch is an error).
    progress_bar
        Show the download progress bar.

    Returns
    -------
    The AnnData as read, with unique ``var_names``.
    """
    if path is None and backup_url is None:
        raise ReadError("Give a count file path, or a backup_url to download it from.")
    if path is not None and Path(path).exists():
        target = Path(path)
    elif backup_url is None:
        return read_file(path)  # raises: missing
    elif path is None:
        name = Path(urllib.parse.urlparse(backup_url).path).name
        if not name:
            raise ReadError(f"backup_url={backup_url!r} does not end in a file name; pass the file path too.")
        target = Path(cache_dir or default_cache_dir()) / name
    else:
        target = Path(cache_dir) / Path(path).name if cache_dir is not None else Path(path)
    detect_format(target)  # fail before downloading
    if target.exists():
        problem = _cached_problem(target, sha256, check_format=backup_url is not None)
        if problem is None:
            if backup_url is not None:
                logger.info("using cached %s", target)
            return read_file(target)
        if backup_url is None:
            raise ReadError(f"{problem}. Pass the file this checksum belongs to, or the right --sha256.")
        logger.warning("%s; downloading it again from %s", problem, backup_url)
    download(backup_url, target, sha256=sha256, progress_bar=progress_bar)
    return read_file(target)


def _cached_problem(path: Path, sha256: str | None, *, check_format: bool) -> str | None:
    """Why an existing ``path`` cannot be used as it is: it does not match ``sha256`` or, when
    ``check_format`` and no checksum is given, it is not a complete file of its format."""
    if not path.is_file():
        return None
    if sha256 is not None:
        got, want = file_sha256(path), sha256.strip().lower()
        return None if got == want else f"{str(path)!r} has SHA-256 {got}, expected {want}"
    if check_format:
        fmt = detect_format(path)
        problem = check_file(path, fmt)
        return None if problem is None else f"The cached {str(path)!r} is not a complete {fmt} file ({problem})"
    return None


def read_demo():
    """The embedded demo dataset: raw UMI counts of 1000 pbmc3k cells × 13656 genes.

    A random 1000-cell subset of the cells kept by the Seurat pbmc3k guided clustering
    tutorial, genes detected in at least 3 of them. ``obs["seurat_annotation"]`` holds
    that tutorial's cell-type labels, for colouring only. Data: 10x Genomics, CC BY 4.0
    ("3k PBMCs from a Healthy Donor").
    """
    import anndata

    return anndata.read_h5ad(demo_file())


def demo_file() -> Path:
    """The embedded demo file's path, checked to be there."""
    if not DEMO_FILE.exists():
        raise ReadError(f"The embedded demo file {DEMO_FILE} is missing; reinstall ldvae.")
    return DEMO_FILE
