"""What `ldvae run` does to the user's files when things go wrong: --overwrite replaces
only ldvae's own output directories, Ctrl-C / SIGTERM / SIGHUP / a full disk leave nothing
behind and end with one line, and every option that can be checked before the fit is."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import ldvae
from ldvae.cli import app as cli

FAST = ["--n-top-genes", "40", "--n-latent", "4", "--max-epochs", "2", "--check-val-every-n-epoch", "1",
        "--n-neighbors", "10", "--no-progress-bar", "--stability-seeds", "0"]
ROOT = Path(__file__).resolve().parent.parent


def _write_counts(path: Path, n_cells: int = 300, n_genes: int = 60) -> Path:
    import anndata

    sim = ldvae.simulate(n_cells, n_genes, 3, seed=3)
    anndata.AnnData(X=sp.csr_matrix(sim.layers["counts"], dtype=np.float32),
                    obs=pd.DataFrame(index=sim.obs_names), var=pd.DataFrame(index=sim.var_names)).write_h5ad(path)
    return path


@pytest.fixture
def counts(tmp_path) -> Path:
    return _write_counts(tmp_path / "mydata.h5ad")


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    """The one error line, which must end stderr."""
    errors = [line for line in err.splitlines() if line.startswith("ldvae: ")]
    assert len(errors) == 1, err
    assert err.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in err
    return errors[0]


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# --- --overwrite ----------------------------------------------------------------------------------


def test_overwrite_refuses_a_directory_holding_the_input_and_other_files(tmp_path, capsys):
    p = tmp_path / "p"
    p.mkdir()
    _write_counts(p / "mydata.h5ad")
    (p / "notes.txt").write_text("x")
    before = _tree(tmp_path)
    code, _, err = _run(capsys, "run", p / "mydata.h5ad", "--out-dir", p, "--overwrite", *FAST)
    assert code == 1
    assert re.fullmatch(rf"ldvae: error: Refusing to replace '{re.escape(str(p))}' \(--overwrite\): it holds the "
                        rf"input '.*mydata.h5ad'\. Choose a new --out-dir, e.g\. '.*ldvae_out'\.", _error_line(err))
    assert _tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["p"]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("below", [False, True])
def test_an_out_dir_that_is_or_lies_under_a_file_is_named_as_such(counts, tmp_path, capsys, overwrite, below):
    (tmp_path / "f").write_text("mine")
    out = tmp_path / "f" / "sub" if below else tmp_path / "f"
    code, _, err = _run(capsys, "run", counts, "--out-dir", out, *overwrite, *FAST)
    assert code == 1 and (tmp_path / "f").read_text() == "mine"
    assert _error_line(err) == (f"ldvae: error: Output path {str(tmp_path / 'f')!r} is a file, not a directory; "
                                "choose another --out-dir.")


def test_saving_a_model_onto_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("mine")
    adata = ldvae.simulate(50, 10, 2, seed=0)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    model = ldvae.LinearSCVI(adata, n_latent=2)
    for target in (tmp_path / "f", tmp_path / "f" / "m"):
        with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'f'))} is a file, so a model cannot be saved"):
            model.save(target)
    assert (tmp_path / "f").read_text() == "mine"


def test_overwrite_refuses_a_directory_ldvae_did_not_write(counts, tmp_path, capsys):
    p = tmp_path / "p"
    p.mkdir()
    (p / "notes.txt").write_text("x")
    code, _, err = _run(capsys, "run", counts, "--out-dir", p, "--overwrite", *FAST)
    assert code == 1
    assert _error_line(err).endswith(
        "it is not empty and was not written by ldvae (no .ldvae-output.json in it). "
        f"Choose a new --out-dir, e.g. {str(p / 'ldvae_out')!r}.")
    assert (p / "notes.txt").read_text() == "x" and os.listdir(p) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["mydata.h5ad", "p"]


def test_overwrite_replaces_an_output_dir_only_while_it_holds_nothing_else(counts, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(capsys, "run", counts, "--out-dir", out, *FAST)[0] == 0
    assert (out / ".ldvae-output.json").is_file()
    (out / "figures" / "my_notes.txt").write_text("mine")
    before = _tree(out)
    code, _, err = _run(capsys, "run", counts, "--out-dir", out, "--overwrite", *FAST)
    assert code == 1
    assert "it holds files that ldvae did not write (first: 'figures/my_notes.txt')" in _error_line(err)
    assert _tree(out) == before
    (out / "figures" / "my_notes.txt").unlink()
    (out / "report.html").write_text("old")
    assert _run(capsys, "run", counts, "--out-dir", out, "--overwrite", *FAST)[0] == 0
    assert (out / "report.html").read_text() != "old"
    assert sorted(os.listdir(tmp_path)) == ["mydata.h5ad", "out"]  # no .out.old-* or .out.partial-* left


@pytest.mark.parametrize("where", ["root", "home", "current"])
def test_overwrite_refuses_root_home_and_current_directory(where, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    out, why = {"root": ("/", "it is the root of the file system"), "home": ("~", "it is your home directory"),
                "current": (".", "it is, or holds, the current directory")}[where]
    before = sorted(os.listdir(tmp_path))
    code, _, err = _run(capsys, "run", tmp_path / "missing.h5ad", "--out-dir", out, "--overwrite", *FAST)
    assert code == 1
    assert f"(--overwrite): {why}." in _error_line(err)  # refused before the input is read
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(home) == [] and os.listdir(here) == []


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")


@pytest.fixture
def mounts():
    mounted = []
    yield lambda path, options: (_mount_tmpfs(path, options), mounted.append(path))
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_overwrite_refuses_a_mount_point(counts, tmp_path, capsys, mounts):
    mnt = tmp_path / "mnt"
    mounts(mnt, "size=1m")
    code, _, err = _run(capsys, "run", counts, "--out-dir", mnt, "--overwrite", *FAST)
    assert code == 1
    assert "(--overwrite): it is a mount point." in _error_line(err)
    assert os.listdir(mnt) == [] and sorted(os.listdir(tmp_path)) == ["mnt", "mydata.h5ad"]


# --- places that cannot be written, found before any work ---------------------------------------------


def test_unwritable_parent_fails_before_reading(tmp_path, capsys, mounts):
    parent = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes through permissions: use a read-only file system
        mounts(parent, "size=1m,ro")
    else:
        parent.mkdir()
        parent.chmod(0o555)
    code, _, err = _run(capsys, "run", tmp_path / "missing.h5ad", "--out-dir", parent / "out", *FAST)
    assert code == 1
    assert re.fullmatch(rf"ldvae: error: Cannot write the output directory '{re.escape(str(parent / 'out'))}': "
                        rf"creating a directory in '{re.escape(str(parent))}' failed \((Read-only file system|"
                        r"Permission denied)\)\. Choose another --out-dir\.", _error_line(err))
    assert os.listdir(parent) == []


def test_failed_run_removes_the_parents_it_made(tmp_path, capsys):
    code, _, err = _run(capsys, "run", tmp_path / "missing.h5ad", "--out-dir", tmp_path / "a" / "b" / "out", *FAST)
    assert code == 1 and "missing.h5ad" in _error_line(err)
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_of_dead_runs_are_swept(counts, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from ldvae.util.io import _host_tag

    stale = [tmp_path / f".out.partial-{dead.pid}-0123abcd", tmp_path / f".out.old-{dead.pid}.{_host_tag()}-4567cdef"]
    for d in stale:
        d.mkdir()
        (d / ".results.h5ad.1.tmp").write_bytes(b"truncated")
    # a live run's, one whose owner is unknown, and one of another host (container) sharing the folder,
    # whose process ids this one cannot see
    kept = [tmp_path / f".out.partial-{os.getpid()}-live0000", tmp_path / ".out.partial-noowner",
            tmp_path / f".out.partial-{dead.pid}.0ther0-89abcdef"]
    for d in kept:
        d.mkdir()
    code, _, err = _run(capsys, "run", counts, "--out-dir", tmp_path / "out", *FAST)
    assert code == 0, err[-2000:]
    assert not any(d.exists() for d in stale)
    assert all(d.is_dir() for d in kept)


# --- numeric options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, match",
    [
        ("--lr", "nan", r"lr must be a positive finite number, got nan \(--lr\)\."),
        ("--lr", "inf", r"lr must be a positive finite number, got inf \(--lr\)\."),
        ("--leiden-resolution", "nan", r"leiden_resolution must be a positive finite number, got nan"),
        ("--target-sum", "inf", r"target_sum must be a positive finite number, got inf \(--target-sum\)\."),
        ("--umap-min-dist", "nan", r"umap_min_dist must be a finite number in \[0, 1\], got nan"),
        ("--umap-min-dist", "1.5", r"umap_min_dist must be a finite number in \[0, 1\], got 1.5"),
        ("--n-neighbors", "1", r"n_neighbors must be an integer >= 2, got 1 \(--n-neighbors\)\."),
        ("--n-top-loadings", "100000", r"n_top_loadings=100000 is more than the 40 genes modelled \(n_top_genes\)"),
        ("--seed", "-1", r"seed must be an integer in \[0, 4294967295\], got -1 \(--seed\)\."),
        ("--n-threads", "0", r"n_threads must be a positive integer, got 0 \(--n-threads\)\."),
        ("--stability-seeds", "-2", r"stability_seeds must be an integer >= 0, got -2"),
    ],
)
def test_bad_numbers_fail_before_reading(option, value, match, tmp_path, capsys):
    # the input does not exist: an option error proves the check comes first
    code, _, err = _run(capsys, "run", tmp_path / "missing.h5ad", "--out-dir", tmp_path / "out", *FAST, option, value)
    assert code == 1
    assert re.search(match, _error_line(err)), err
    assert os.listdir(tmp_path) == []


def test_demo_checks_numbers_before_training(tmp_path, capsys):
    code, _, err = _run(capsys, "demo", "--out-dir", tmp_path / "demo", "--lr", "nan", "--no-progress-bar")
    assert code == 1 and _error_line(err).startswith("ldvae: error: lr must be a positive finite number, got nan")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "argv, match",
    [
        (["stability", "IN", "--lr", "nan"], r"lr must be a positive finite number, got nan \(--lr\)"),
        (["stability", "IN", "--threshold", "inf"], r"threshold must be a finite number in \(0, 1\], got inf"),
        (["stability", "IN", "--seeds", "0", "-1"], r"seeds must be an integer in \[0, 4294967295\], got -1"),
        (["stability", "IN", "--n-latent", "0"], r"n_latent must be a positive integer, got 0"),
        (["select-k", "IN", "--n-latents", "5", "0"], r"n_latents must be a positive integer, got 0"),
        (["select-k", "IN", "--n-mc-samples", "0"], r"n_mc_samples must be a positive integer, got 0"),
        (["select-k", "IN", "--batch-size", "0"], r"batch_size must be a positive integer, got 0"),
        (["factors", "IN", "--min-size", "0"], r"min_size must be a positive integer, got 0 \(--min-size\)"),
        (["factors", "IN", "--min-size", "9", "--max-size", "3"], r"max_size \(--max-size\) must be at least"),
    ],
)
def test_interpretation_commands_check_numbers_before_reading(argv, match, tmp_path, capsys):
    argv = [str(tmp_path / "missing") if a == "IN" else a for a in argv]
    code, _, err = _run(capsys, *argv, "--out-dir", tmp_path / "out")
    assert code == 1
    assert re.search(match, _error_line(err)), err
    assert os.listdir(tmp_path) == []


# --- a full disk ---------------------------------------------------------------------------------------


class _FillsUp:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, file, room: int):
        self._file, self._room = file, room

    def write(self, data):
        self._room -= len(data)
        if self._room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def test_full_disk_while_writing_results_is_one_line_and_leaves_nothing(counts, tmp_path, capfd, monkeypatch):
    from ldvae.util import io

    real = io._open_binary
    monkeypatch.setattr(io, "_open_binary", lambda path: _FillsUp(real(path), 20_000))
    code = cli.main([str(a) for a in ("run", counts, "--out-dir", tmp_path / "out", *FAST)])
    err = capfd.readouterr().err  # fd level: HDF5 prints its own errors there
    assert code == 1
    assert _error_line(err) == (
        f"ldvae: error: No space left on the device holding {str(tmp_path / 'out')!r} while writing results.h5ad; "
        "nothing was written. Free some space or choose another --out-dir.")
    assert "HDF5" not in err and "Exception ignored" not in err
    assert sorted(os.listdir(tmp_path)) == ["mydata.h5ad"]


def test_full_file_system_is_one_line_and_leaves_nothing(tmp_path, mounts):
    small = tmp_path / "small"
    mounts(small, "size=1500k")
    counts = _write_counts(tmp_path / "big.h5ad", n_cells=3000, n_genes=2000)  # results.h5ad > 1.5 MB
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, "plain", "run", str(counts), "--out-dir",
                           str(small / "out"), *FAST], capture_output=True, text=True, timeout=600,
                          env=_env(), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert re.fullmatch(rf"ldvae: error: No space left on the device holding '{re.escape(str(small / 'out'))}' "
                        r"while writing \S+; nothing was written\. Free some space or choose another --out-dir\.",
                        _error_line(proc.stderr))
    assert "HDF5" not in proc.stderr
    assert os.listdir(small) == []


def test_a_full_file_system_under_a_query_or_a_save_raises_disk_full(tmp_path, mounts):
    """A memory-mapped result is reserved before it is filled (filling it on a full disk would
    end the process with SIGBUS) and torch's short write is named: DiskFullError, nothing left."""
    from ldvae.util.io import DiskFullError

    small = tmp_path / "small"
    mounts(small, "size=64k")
    a = ldvae.simulate(200, 300, 3, seed=1)
    ldvae.LinearSCVI.setup_anndata(a, layer="counts")
    m = ldvae.LinearSCVI(a, n_latent=3, n_hidden=32)
    m.train(1, progress_bar=False, threads=1)
    with pytest.raises(DiskFullError, match=r"No space left on device while writing .*rho\.npy"):
        m.get_normalized_expression(out=small / "rho.npy")  # 240 kB
    with pytest.raises(DiskFullError, match=r"No space left on device while writing .*model_state\.pt"):
        m.save(small / "m")  # about 160 kB of weights
    with pytest.raises(DiskFullError, match=r"No space left on device while writing .*checkpoint\.pt"):
        m.train(1, progress_bar=False, threads=1, checkpoint_dir=small / "ck", checkpoint_every_n_epochs=1)
    assert [p for p in small.rglob("*") if p.is_file()] == []


def test_a_full_temporary_folder_is_named_as_such(tmp_path, mounts, monkeypatch):
    """The seeds' worker processes get the data through the temporary folder: when that is
    full, the error names it (not the output directory, which may have room)."""
    import tempfile

    from ldvae.factors.stability import fit_seeds
    from ldvae.util.io import DiskFullError

    small = tmp_path / "tmp"
    mounts(small, "size=64k")
    monkeypatch.setattr(tempfile, "tempdir", str(small))
    a = ldvae.simulate(600, 200, 3, seed=1)
    ldvae.LinearSCVI.setup_anndata(a, layer="counts")
    with pytest.raises(DiskFullError, match=r"No space left in the temporary folder '.*tmp' \(TMPDIR\)"):
        fit_seeds(a, [0, 1], train_kwargs={"max_epochs": 1}, n_latent=2, n_jobs=2)
    assert os.listdir(small) == []


# --- signals --------------------------------------------------------------------------------------------


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
                OMP_NUM_THREADS="1")


# Runs the CLI; with "report" or "h5ad", the writing of the outputs stops (after a partial
# file, for "h5ad") and says WRITING, so that a signal lands while the outputs are written.
_SCRIPT = """
import sys, time
from pathlib import Path
from ldvae.cli import app as cli
from ldvae.util import io
from ldvae.workflow import pipeline as workflow

def stall(*args, **kwargs):
    if sys.argv[1] == "h5ad":
        Path(args[1]).write_bytes(b"partial")
    print("WRITING", file=sys.stderr, flush=True)
    time.sleep(300)

if sys.argv[1] == "nohup":  # as `nohup ldvae run ...` starts it
    import signal
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
if sys.argv[1] == "report":
    workflow.build_report = stall
elif sys.argv[1] == "h5ad":
    io.write_h5ad = stall
sys.exit(cli.main(sys.argv[2:]))
"""


class _Cli:
    """The CLI in a subprocess of its own process group (as a terminal runs it), stderr collected."""

    def __init__(self, mode: str, argv: list, cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, mode, *map(str, argv)], cwd=cwd, env=_env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.err = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            self.err += chunk

    def wait_for(self, text: str, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while text.encode() not in self.err:
            assert self.proc.poll() is None, self.err.decode(errors="replace")[-3000:]
            assert time.monotonic() < end, f"no {text!r} in time"
            time.sleep(0.1)

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code, self.err.decode(errors="replace")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"  # exited
    except OSError:
        return True


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes in /proc")
def test_ctrl_c_during_training_with_refits_exits_130_and_leaves_nothing(counts, tmp_path):
    run = _Cli("plain", ["run", counts, "--out-dir", tmp_path / "out", *FAST, "--max-epochs", "3000",
                         "--stability-seeds", "1", "--progress-bar"], tmp_path)
    run.wait_for("Training")
    workers = _children(run.proc.pid)
    assert workers, "the refit worker should be running beside the main fit"
    os.killpg(run.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    code, err = run.finish()
    assert code == 130, err[-3000:]
    assert _error_line(err) == "ldvae: interrupted; no output directory was written."
    assert "Training interrupted after" in err and "failed in its worker process" not in err
    assert sorted(os.listdir(tmp_path)) == ["mydata.h5ad"]
    assert all(_gone(pid) for pid in workers)
    assert not [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"ldvae-fits-{run.proc.pid}.")]


@pytest.mark.parametrize("signum, stall", [(signal.SIGTERM, "report"), (signal.SIGHUP, "h5ad")])
def test_sigterm_and_sighup_while_writing_leave_nothing(signum, stall, counts, tmp_path):
    run = _Cli(stall, ["run", counts, "--out-dir", tmp_path / "out", *FAST], tmp_path)
    run.wait_for("WRITING")
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out.partial-")]  # it was writing
    os.kill(run.proc.pid, signum)
    code, err = run.finish()
    assert code == 128 + signum, err[-3000:]
    assert _error_line(err) == f"ldvae: stopped by {signal.Signals(signum).name}; no output directory was written."
    assert sorted(os.listdir(tmp_path)) == ["mydata.h5ad"]


def test_a_run_started_with_hang_ups_ignored_survives_one(counts, tmp_path):
    """nohup: the terminal's closing (SIGHUP) must not end the run."""
    run = _Cli("nohup", ["run", counts, "--out-dir", tmp_path / "out", *FAST, "--max-epochs", "300",
                         "--progress-bar"], tmp_path)
    run.wait_for("Training")
    os.kill(run.proc.pid, signal.SIGHUP)
    code, err = run.finish(timeout=300)
    assert code == 0, err[-3000:]
    assert (tmp_path / "out" / "results.h5ad").exists()


# --- saving a model ------------------------------------------------------------------------------


def _small_model(adata=None):
    adata = ldvae.simulate(60, 12, 2, seed=0) if adata is None else adata
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    model = ldvae.LinearSCVI(adata, n_latent=2)
    model.train(1, progress_bar=False)
    return model


def test_saving_a_backed_anndata_leaves_it_on_its_own_file(tmp_path):
    import anndata

    ldvae.simulate(60, 12, 2, seed=0).write_h5ad(tmp_path / "live.h5ad")
    backed = anndata.read_h5ad(tmp_path / "live.h5ad", backed="r")
    model = _small_model(backed)
    model.save(tmp_path / "m", save_anndata=True)
    assert Path(backed.filename) == tmp_path / "live.h5ad" and backed.isbacked
    assert model.get_latent_representation().shape == (60, 2)  # the model's AnnData still reads
    assert ldvae.LinearSCVI.load(tmp_path / "m").adata.n_obs == 60
    copied = model.write_results(copy=True)  # a copy in memory, the backed AnnData as it was
    assert not copied.isbacked and copied.obsm["X_ldvae"].shape == (60, 2) and "X_ldvae" not in backed.obsm


def test_a_save_without_the_anndata_removes_an_earlier_saves(tmp_path):
    _small_model().save(tmp_path / "m", save_anndata=True)
    other = _small_model(ldvae.simulate(40, 12, 2, seed=1))
    other.save(tmp_path / "m", overwrite=True)
    assert not (tmp_path / "m" / "adata.h5ad").exists()  # a load must not pair this model with the other cells
    with pytest.raises(ValueError, match="No adata given"):
        ldvae.LinearSCVI.load(tmp_path / "m")


def test_a_save_without_the_anndata_keeps_an_anndata_no_save_wrote(tmp_path, caplog):
    d = tmp_path / "m"
    d.mkdir()
    (d / "adata.h5ad").write_bytes(b"the user's own file")
    (d / "notes.txt").write_text("notes")
    with caplog.at_level("WARNING", logger="ldvae"):
        _small_model().save(d, overwrite=True)
    assert (d / "adata.h5ad").read_bytes() == b"the user's own file" and (d / "notes.txt").exists()
    assert "adata.h5ad was not written by a save; it is left as it is" in caplog.text


def test_a_failed_save_leaves_no_directory(tmp_path, monkeypatch):
    from ldvae.model import files

    model = _small_model()

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "simulated write failure")

    monkeypatch.setattr(files, "atomic_torch_save", fail)
    for save_anndata in (False, True):
        with pytest.raises(OSError, match="simulated write failure"):
            model.save(tmp_path / "m", save_anndata=save_anndata)
        assert not (tmp_path / "m").exists()


def test_writing_an_h5ad_leaves_the_callers_columns_as_they_were(tmp_path):
    import anndata

    from ldvae.util.io import write_h5ad

    a = ldvae.simulate(30, 8, 2, seed=0)
    a.obs["donor"] = np.where(np.arange(30) % 3, "d1", "d2")
    a.raw = a.copy()
    a.raw.var["source"] = "x"
    write_h5ad(a, tmp_path / "a.h5ad")
    assert a.obs["donor"].dtype == object and a.raw.var["source"].dtype == object
    a.obs.loc[a.obs_names[0], "donor"] = "d3"  # a new value, as before the write
    back = anndata.read_h5ad(tmp_path / "a.h5ad")
    assert isinstance(back.obs["donor"].dtype, pd.CategoricalDtype) and back.raw.var["source"].iloc[0] == "x"


def _version(module) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", module.__version__)[:3])


@pytest.mark.skipif(_version(pd) < (2, 3) or _version(__import__("anndata")) < (0, 12, 7),
                    reason="pandas' future string dtype needs pandas 2.3, and anndata writes it from 0.12.7")
def test_pandas_nullable_strings_are_written(tmp_path):
    import anndata

    with pd.option_context("future.infer_string", True):
        a = ldvae.simulate(30, 8, 2, seed=0)
        a.obs_names = pd.Index([f"c{i}" for i in range(30)], dtype="string")
        a.obs["donor"] = pd.array(["d1", "d2", "d3"] * 10, dtype="string")
        model = _small_model(a)
        model.save(tmp_path / "m", save_anndata=True)
        model.posterior_predictive_sample(out=tmp_path / "ppc.h5ad")
    back = ldvae.LinearSCVI.load(tmp_path / "m")
    assert list(back.adata.obs_names[:2]) == ["c0", "c1"] and list(back.adata.obs["donor"][:3]) == ["d1", "d2", "d3"]
    assert anndata.read_h5ad(tmp_path / "ppc.h5ad", backed="r").shape == (30, 8)


def test_an_out_dir_made_by_another_run_meanwhile_is_named_so(counts, tmp_path, monkeypatch, capsys):
    from ldvae.workflow import outputs

    real = outputs.mark_output

    def another_run_finishes_first(staging):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "theirs.txt").write_text("another run's")
        real(staging)

    monkeypatch.setattr(outputs, "mark_output", another_run_finishes_first)
    code, _, err = _run(capsys, "run", counts, "--out-dir", tmp_path / "out", *FAST)
    assert code == 1
    assert "appeared while this run worked (another run writing there?)" in _error_line(err)
    assert os.listdir(tmp_path / "out") == ["theirs.txt"]
