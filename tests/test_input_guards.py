"""Hostile input is refused with one clear line and leaves nothing behind: bad batch columns
and gene sets too small for the HVG fit (refused before scanpy, whose loess crashes the
process), downloads that are truncated, HTML pages or interrupted, dense counts on disk,
and user strings that matplotlib would read as mathtext."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import ldvae
from ldvae.cli import app as cli
from ldvae.data.contract import SetupError
from ldvae.data.readers import ReadError, download, read_counts
from ldvae.workflow.pipeline import MIN_VARYING_GENES, prepare

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--n-top-genes", "20", "--n-latent", "3", "--max-epochs", "2", "--check-val-every-n-epoch", "1",
        "--n-neighbors", "10", "--no-progress-bar", "--stability-seeds", "0"]


def _counts(n_cells: int = 200, n_genes: int = 40, seed: int = 3) -> ad.AnnData:
    sim = ldvae.simulate(n_cells, n_genes, 3, seed=seed)
    return ad.AnnData(X=sp.csr_matrix(sim.layers["counts"], dtype=np.float32),
                      obs=pd.DataFrame(index=sim.obs_names), var=pd.DataFrame(index=sim.var_names))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("ldvae: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- batch columns and the HVG fit ------------------------------------------------------------


@pytest.fixture
def no_scanpy_hvg(monkeypatch):
    """scanpy's HVG step must not be reached: its loess crashes the process on these inputs."""
    import scanpy as sc

    def refuse(*args, **kwargs):
        raise AssertionError("scanpy's highly_variable_genes was called")

    monkeypatch.setattr(sc.pp, "highly_variable_genes", refuse)


def _with_batches(values) -> ad.AnnData:
    adata = _counts(len(values))
    adata.obs["plate"] = pd.Series(values, index=adata.obs_names, dtype=object)
    return adata


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (["p1"] * 199 + ["p2"],
         r"batch_key='plate': 1 batch\(es\) of adata.obs\['plate'\] have a single cell "
         r"\(first: 'p2'\).*needs at least 2\. Merge or drop those cells, or leave out batch_key"),
        ([np.nan] * 200, r"batch_key='plate': 200 cells have a missing value in adata.obs\['plate'\] "
                         r"\(first: cell 'cell0'\)\. Fill or drop them\."),
        (["p1"] * 7 + [None] + ["p2"] * 190 + [np.nan, "p1"],
         r"batch_key='plate': 2 cells have a missing value in adata.obs\['plate'\] \(first: cell 'cell7'\)"),
    ],
    ids=["one-cell batch", "all missing", "some missing"],
)
def test_bad_batch_column_is_refused_before_scanpy(no_scanpy_hvg, values, match):
    adata = _with_batches(values)
    before = adata.copy()
    with pytest.raises(SetupError, match=match):
        prepare(adata, n_top_genes=10, batch_key="plate")
    assert adata.obs.equals(before.obs) and (adata.X != before.X).nnz == 0 and not adata.uns


def test_absent_batch_column_is_refused(no_scanpy_hvg):
    with pytest.raises(SetupError, match=r"batch_key='plate' is not a column of adata.obs \(columns: none\)"):
        prepare(_counts(), n_top_genes=10, batch_key="plate")


def test_setup_anndata_refuses_missing_batches_naming_the_first_cell():
    adata = _with_batches(["a"] * 50 + [np.nan] + ["b"] * 149)
    with pytest.raises(SetupError, match=r"batch_key='plate': 1 cells have a missing value .*first: cell 'cell50'"):
        ldvae.LinearSCVI.setup_anndata(adata, batch_key="plate")
    assert "ldvae_setup" not in adata.uns


@pytest.mark.parametrize("n_genes", [2, 3, MIN_VARYING_GENES - 1])
def test_too_few_varying_genes_for_the_loess_are_refused_before_scanpy(no_scanpy_hvg, n_genes):
    adata = _counts(100)[:, :n_genes].copy()
    with pytest.raises(SetupError, match=rf"hvg_flavor='seurat_v3' fits a loess curve .* at least "
                                         rf"{MIN_VARYING_GENES} genes whose counts vary across the cells; only "
                                         rf"{n_genes} do\. Pass more genes, or hvg_flavor='seurat'"):
        prepare(adata, n_top_genes=n_genes)


def test_a_batch_with_too_few_varying_genes_is_named(no_scanpy_hvg):
    adata = _with_batches(["big"] * 196 + ["tiny"] * 4)
    adata.X[196:] = 0
    adata.X[196:, :3] = np.array([[1], [2], [3], [4]])  # 3 genes vary in batch 'tiny'
    adata.X = sp.csr_matrix(adata.X)
    with pytest.raises(SetupError, match=r"vary across the cells of batch 'tiny' \(batch_key='plate'\); only 3 do\. "
                                         r"Merge that batch with another"):
        prepare(adata, n_top_genes=10, batch_key="plate")


def test_smallest_fittable_gene_set_and_two_cell_batch_pass():
    out = prepare(_counts(100)[:, :MIN_VARYING_GENES].copy(), n_top_genes=MIN_VARYING_GENES)
    assert out.n_vars == MIN_VARYING_GENES
    out = prepare(_with_batches(["a", "a"] + ["b"] * 198), n_top_genes=10, batch_key="plate")
    assert out.n_vars == 10


def test_cli_one_cell_batch_is_one_line_and_input_intact(tmp_path, capsys):
    adata = _with_batches(["p1"] * 199 + ["p2"])
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    digest = _digest(path)
    code, err = _run(capsys, "run", path, "--out-dir", tmp_path / "out", "--batch-key", "plate", *FAST)
    assert code == 1
    assert re.search(r"ldvae: error: batch_key='plate': 1 batch\(es\) .* single cell \(first: 'p2'\)",
                     _one_error_line(err))
    assert _digest(path) == digest and sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


def test_cli_loess_failure_in_a_small_batch_names_it(tmp_path):
    """A 20-cell batch of real data passes the counts-only checks, but its genes share too few
    distinct means for the loess; the run (in a child process: a crash there would not take the
    test run down) ends with the batch named."""
    demo = ldvae.read_demo()
    demo.obs["plate"] = ["small"] * 20 + ["big"] * (demo.n_obs - 20)
    path = tmp_path / "in.h5ad"
    demo.write_h5ad(path)
    digest = _digest(path)
    code = ("import sys; from ldvae import cli; "
            f"sys.exit(cli.main(['run', {str(path)!r}, '--out-dir', {str(tmp_path / 'out')!r}, "
            f"'--batch-key', 'plate', *{FAST!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = _one_error_line(proc.stderr)
    assert re.search(r"hvg_flavor='seurat_v3': the loess fit of gene variance on gene mean failed for batch "
                     r"'small' of batch_key='plate' \(20 cells\): too many genes share the same mean.*"
                     r"Drop rare genes first", line), line
    assert _digest(path) == digest and sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


def test_a_loess_failure_that_no_batch_explains_still_says_what_failed(monkeypatch):
    """scanpy's loess can fail where a float64 refit of each batch succeeds (its float32
    variances differ: the first 400 demo cells do this); the error then still names the step
    and the fixes, not skmisc's bare message."""
    import scanpy as sc

    namespace: dict = {}
    exec(compile("def fit(*a, **k):\n    raise ValueError(b'reciprocal condition number  9.8667e-15')\n",
                 "_loess.pyx", "exec"), namespace)  # raised where skmisc's compiled loess raises it
    monkeypatch.setattr(sc.pp, "highly_variable_genes", namespace["fit"])
    with pytest.raises(SetupError, match=r"hvg_flavor='seurat_v3': scanpy's loess fit of gene variance on gene mean "
                                         r"failed \(reciprocal condition number 9.8667e-15\), as it can on few cells "
                                         r".* Drop rare genes first"):
        prepare(_counts(200), n_top_genes=20)


# --- downloads ----------------------------------------------------------------------------------


class _Server:
    """Serves ``files`` (name -> bytes) on 127.0.0.1 without Content-Length (the body ends when
    the connection closes). ``mode[name]``: "cut" sends half the bytes, "html" an HTML error
    page with status 200, "stall" the first 64 kB and then waits for ``release``."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.mode: dict[str, str] = {}
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                body = server.files[name]
                mode = server.mode.get(name)
                if mode == "html":
                    body = b"<!DOCTYPE html><html><body><h1>Service unavailable</h1></body></html>"
                self.send_response(200)
                self.end_headers()
                if mode == "stall":
                    self.wfile.write(body[: 1 << 16])
                    self.wfile.flush()
                    server.release.wait(60)
                    return
                self.wfile.write(body[: len(body) // 2] if mode == "cut" else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def payloads(tmp_path_factory) -> dict[str, bytes]:
    """The same counts as .h5ad, .csv.gz, .csv and .mtx."""
    import scipy.io

    d = tmp_path_factory.mktemp("payloads")
    adata = _counts(100, 30)
    adata.write_h5ad(d / "x.h5ad")
    with gzip.open(d / "x.csv.gz", "wt") as fh:
        adata.to_df().to_csv(fh)
    adata.to_df().to_csv(d / "x.csv")
    scipy.io.mmwrite(d / "x.mtx", adata.X)
    return {suffix: (d / f"x{suffix}").read_bytes() for suffix in (".h5ad", ".csv.gz", ".csv", ".mtx")}


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("suffix", [".h5ad", ".csv.gz", ".csv", ".mtx"])
@pytest.mark.parametrize("mode", ["cut", "html"])
def test_bad_download_is_not_cached_and_a_later_good_one_is(server, payloads, tmp_path, suffix, mode):
    name = f"{mode}{suffix}"
    server.files[name] = payloads[suffix]
    server.mode[name] = mode
    (tmp_path / "keep.txt").write_text("mine")
    target = tmp_path / "cache" / "sub" / name
    expected = {".h5ad": r"not readable as HDF5", ".csv.gz": r"not a complete gzip stream",
                ".csv": r"its last line is cut short", ".mtx": r"\d+ entries of the \d+ its size line announces"}
    if mode == "html":
        expected = dict.fromkeys(expected, r"HTML")
    with pytest.raises(ReadError, match=rf"^Download of {re.escape(server.url)}/{name} is not a complete \w+ file "
                                        rf"\(.*{expected[suffix]}.*\)\. Nothing was kept; check the URL"):
        read_counts(target, backup_url=f"{server.url}/{name}", progress_bar=False)
    assert _files_under(tmp_path) == ["keep.txt"]  # no file, no temporary, no folder made for it
    server.mode.pop(name)  # the server is fixed
    adata = read_counts(target, backup_url=f"{server.url}/{name}", progress_bar=False)
    assert adata.shape == (100, 30) and target.is_file()


def test_cut_file_is_refused_by_its_checksum(server, payloads, tmp_path):
    server.files["sum.mtx"] = payloads[".mtx"]
    server.mode["sum.mtx"] = "cut"
    digest = hashlib.sha256(payloads[".mtx"]).hexdigest()
    with pytest.raises(ReadError, match=rf"has SHA-256 [0-9a-f]{{64}}, expected {digest}\. Nothing was kept"):
        download(f"{server.url}/sum.mtx", tmp_path / "a" / "sum.mtx", sha256=digest, progress_bar=False)
    assert _files_under(tmp_path) == []


def test_cached_copy_that_fails_the_checksum_is_downloaded_again(server, payloads, tmp_path, caplog):
    server.files["good.h5ad"] = payloads[".h5ad"]
    target = tmp_path / "good.h5ad"
    target.write_bytes(b"<html>old poisoned copy</html>")
    digest = hashlib.sha256(payloads[".h5ad"]).hexdigest()
    adata = read_counts(target, backup_url=f"{server.url}/good.h5ad", sha256=digest, progress_bar=False)
    assert adata.shape == (100, 30) and _digest(target) == digest
    assert re.search(rf"has SHA-256 [0-9a-f]{{64}}, expected {digest}; downloading it again", caplog.text)
    # without a checksum, a cached copy that is not a complete file of its format is fetched again too
    target.write_bytes(payloads[".h5ad"][:5000])
    assert read_counts(target, backup_url=f"{server.url}/good.h5ad", progress_bar=False).shape == (100, 30)
    assert _digest(target) == digest and _files_under(tmp_path) == ["good.h5ad"]


def test_local_file_with_wrong_checksum_is_refused(payloads, tmp_path):
    path = tmp_path / "mine.h5ad"
    path.write_bytes(payloads[".h5ad"])
    with pytest.raises(ReadError, match=r"'.*mine.h5ad' has SHA-256 [0-9a-f]{64}, expected 0{64}\. Pass the file"):
        read_counts(path, sha256="0" * 64)
    assert path.read_bytes() == payloads[".h5ad"]


def test_failed_download_removes_only_the_folders_it_made(server, tmp_path):
    (tmp_path / "existing").mkdir()
    with pytest.raises(ReadError, match=r"HTTP 404|failed"):
        download(f"{server.url}/absent.h5ad", tmp_path / "existing" / "new" / "deeper" / "x.h5ad",
                 progress_bar=False)
    assert _files_under(tmp_path) == ["existing"]


def test_interrupt_during_download_leaves_nothing(server, payloads, tmp_path, monkeypatch):
    """An exception of any kind (as SIGTERM becomes under the CLI) raised while reading the
    response removes the temporary file and the folders made for it."""
    import http.client

    server.files["big.h5ad"] = payloads[".h5ad"]
    read = http.client.HTTPResponse.read

    def read_then_stop(self, *args):
        if any(p.suffix == ".tmp" for p in (tmp_path / "new").glob(".*")):
            raise SystemExit(143)
        return read(self, *args)

    monkeypatch.setattr(http.client.HTTPResponse, "read", read_then_stop)
    with pytest.raises(SystemExit):
        download(f"{server.url}/big.h5ad", tmp_path / "new" / "big.h5ad", progress_bar=False)
    assert _files_under(tmp_path) == []


def test_sigterm_during_download_leaves_nothing(server, payloads, tmp_path):
    """A child process whose SIGTERM handler raises SystemExit (as the CLI's does) is stopped
    while the server stalls mid-body: no temporary file, no folder made for it."""
    server.files["slow.h5ad"] = payloads[".h5ad"] * 4
    server.mode["slow.h5ad"] = "stall"
    target = tmp_path / "made" / "slow.h5ad"
    code = textwrap.dedent(f"""
        import signal, sys
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
        from ldvae.data.readers import download
        download({server.url + '/slow.h5ad'!r}, {str(target)!r}, progress_bar=False)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(target.parent.glob(".slow.h5ad.*.tmp")):  # opened once the headers came
            assert time.monotonic() < deadline and child.poll() is None, child.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        time.sleep(0.2)  # into the read of the stalled body
        child.send_signal(signal.SIGTERM)
        assert child.wait(60) == 143
    finally:
        if child.poll() is None:
            child.kill()
        server.release.set()
    assert _files_under(tmp_path) == []


def test_temporaries_of_dead_downloads_are_swept(server, payloads, tmp_path):
    server.files["s.h5ad"] = payloads[".h5ad"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".s.h5ad.{dead.pid}.0123456789ab.tmp"
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / f".s.h5ad.{os.getpid()}.0123456789ab.tmp"  # a download of a running process
    live.write_bytes(b"y")
    other = tmp_path / f".other.h5ad.{dead.pid}.0123456789ab.tmp"  # another file's: not this download's
    other.write_bytes(b"z")
    download(f"{server.url}/s.h5ad", tmp_path / "s.h5ad", progress_bar=False)
    assert _files_under(tmp_path) == sorted([live.name, other.name, "s.h5ad"])


# --- dense counts on disk -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_and_sparse_stores(tmp_path_factory):
    """The same 600 cells x 30 genes (2 batches) with counts in X: CSR .h5ad, dense .h5ad and
    dense .zarr; the dense reads come in slabs of 7 rows (a chunk spans several)."""
    d = tmp_path_factory.mktemp("dense")
    adata = ldvae.simulate(600, 30, 3, n_batches=2, seed=5)
    del adata.layers["counts"]
    adata.X = sp.csr_matrix(adata.X)
    adata.write_h5ad(d / "sparse.h5ad")
    dense = adata.copy()
    dense.X = adata.X.toarray()
    dense.write_h5ad(d / "dense.h5ad")
    dense.write_zarr(d / "dense.zarr")
    return d


@pytest.mark.parametrize("name", ["dense.h5ad", "dense.zarr"])
def test_dense_counts_on_disk_train_and_scan_as_sparse(dense_and_sparse_stores, name, monkeypatch):
    from ldvae.data import backed as stream

    monkeypatch.setattr(stream.DiskDense, "SLAB_VALUES", 7 * 30)
    monkeypatch.setattr(stream, "CHUNK_SIZE", 64)
    d = dense_and_sparse_stores
    digest = {p: _digest(p) for p in d.rglob("*") if p.is_file()}

    def fit(path):
        adata = ad.read_h5ad(path, backed="r") if name.endswith(".h5ad") else stream.read_backed(path)
        assert stream.counts_on_disk(adata, {})
        ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")
        stats = stream.scan_counts(adata, genes=True, batch=pd.Categorical(adata.obs["batch"]).codes, n_batch=2)
        hvg = stream.highly_variable_genes(adata, 10, batch_key="batch", inplace=False)
        model = ldvae.LinearSCVI(adata, n_latent=2)
        model.train(max_epochs=2, batch_size=50, progress_bar=False, accelerator="cpu", seed=0)
        return adata, stats, hvg, model

    _, s_stats, s_hvg, s_model = fit(d / "sparse.h5ad")
    dense, d_stats, d_hvg, d_model = fit(d / name)
    assert d_stats.n_empty == s_stats.n_empty
    np.testing.assert_array_equal(d_stats.gene_sum, s_stats.gene_sum)
    np.testing.assert_array_equal(d_stats.log_total_sum, s_stats.log_total_sum)
    pd.testing.assert_frame_equal(d_hvg, s_hvg)
    np.testing.assert_array_equal(d_model.history["elbo_train"].to_numpy(), s_model.history["elbo_train"].to_numpy())
    np.testing.assert_array_equal(d_model.get_latent_representation(), s_model.get_latent_representation())
    # a query without a streaming path reads the dense counts into memory
    pd.testing.assert_frame_equal(d_model.get_factor_deviance(dense), s_model.get_factor_deviance())
    assert {p: _digest(p) for p in d.rglob("*") if p.is_file()} == digest


def test_dense_counts_on_disk_are_validated_naming_the_cell(tmp_path):
    x = np.ones((50, 6), dtype=np.float32)
    x[37, 4] = 0.5
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(50)]),
                       var=pd.DataFrame(index=[f"g{i}" for i in range(6)]))
    adata.write_h5ad(tmp_path / "bad.h5ad")
    backed = ad.read_h5ad(tmp_path / "bad.h5ad", backed="r")
    with pytest.raises(SetupError, match=r"non-integer values \(first: 0.5 at cell 'c37', gene 'g4'\)"):
        ldvae.LinearSCVI.setup_anndata(backed)
    assert "ldvae_setup" not in backed.uns


# --- strings that look like mathtext in figures --------------------------------------------------

# Malformed mathtext ("$\frac{$") fails to draw unless shown as plain text; the others would be typeset.
MATH_LIKE = ["$\\alpha$", "a$b$c", "$\\frac{$", "cost $5", "$x$ and $", "$"]


@pytest.fixture(scope="module")
def mathy():
    """A model fitted on genes, batches and obs columns named with '$', its results written."""
    adata = ldvae.simulate(300, 30, 3, n_batches=2, seed=2)
    adata.var_names = MATH_LIKE + list(adata.var_names[len(MATH_LIKE):])
    adata.obs["batch"] = pd.Categorical(np.where(pd.Categorical(adata.obs["batch"]).codes == 0, "$b_0$", "b$1"))
    adata.obs["type $t$"] = pd.Categorical(np.where(np.arange(300) % 2, "$\\frac{$", "a$b$c"))
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ldvae.LinearSCVI(adata, n_latent=3)
    model.train(max_epochs=2, progress_bar=False, accelerator="cpu")
    model.write_results(adata, obs_columns=True)
    adata.obsm["X_umap"] = np.random.default_rng(0).normal(size=(300, 2))
    return model, adata


def _texts(fig) -> set[str]:
    from matplotlib.text import Text

    return {t.get_text() for t in fig.findobj(Text)}


def _renders(fig) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_show_math_like_names_as_written(mathy):
    from ldvae.workflow import plotting

    model, adata = mathy
    figures = {
        "heatmap": (plotting.loadings_heatmap(adata, n_genes=15), MATH_LIKE),
        "bars": (plotting.top_genes_bars(adata, n_genes=15), MATH_LIKE),
        "umap": (plotting.umap(adata, color=["type $t$", "batch"]), ["type $t$", "$\\frac{$", "a$b$c", "$b_0$", "b$1"]),
        "pairs": (plotting.latent_pairs(adata, color="type $t$"), ["type $t$", "$\\frac{$", "a$b$c"]),
        "curves": (plotting.training_curves(model.history), ["Training curves"]),
    }
    for name, (fig, strings) in figures.items():
        _renders(fig)
        missing = set(strings) - _texts(fig)
        assert not missing, f"{name}: {missing}"


def test_numeric_tick_labels_keep_mathtext_on_log_axes():
    from matplotlib.figure import Figure

    from ldvae.workflow.plotting import plain_text

    fig = Figure()
    ax = fig.subplots()
    ax.plot([1, 10, 100], [1, 2, 3])
    ax.set_xscale("log")
    ax.set_title("a$b$c")
    plain_text(fig)
    _renders(fig)
    assert not ax.title.get_parse_math()
    assert all(t.get_parse_math() for t in ax.get_xticklabels())


def test_report_figures_show_math_like_names_as_written(mathy, tmp_path, monkeypatch):
    from ldvae.workflow import interpret_report
    from ldvae.factors.stability import factor_stability

    model, _ = mathy
    drawn = []
    real = interpret_report.plain_text
    monkeypatch.setattr(interpret_report, "plain_text", lambda fig: drawn.append(fig) or real(fig))
    loadings = model.get_loadings()
    top = list(loadings.iloc[:, 0].nlargest(8).index)  # enriched on factor 0, so the figure shows the sets
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("".join(f"set {name}\tdescription\t" + "\t".join(top) + "\n" for name in MATH_LIKE))
    sections = [
        interpret_report.deviance_section(model),
        interpret_report.covariate_section(model, n_genes=30),
        interpret_report.enrichment_section(gmt, n=6)(model),
        interpret_report.stability_section(factor_stability([loadings, loadings * 1.01])),
    ]
    assert all("data:image/png;base64," in html for _, html in sections)
    covariates = _texts(drawn[1])
    assert set(MATH_LIKE) <= covariates and {"$b_0$", "b$1"} <= covariates
    assert {f"set {name}" for name in MATH_LIKE} <= _texts(drawn[2])


def test_cli_download_of_an_html_page_is_one_line_and_leaves_nothing(server, payloads, tmp_path, capsys):
    server.files["page.h5ad"] = payloads[".h5ad"]
    server.mode["page.h5ad"] = "html"
    code, err = _run(capsys, "run", tmp_path / "cache" / "page.h5ad", "--backup-url", f"{server.url}/page.h5ad",
                     "--out-dir", tmp_path / "out", *FAST)
    assert code == 1
    line = _one_error_line(err)
    assert line.startswith(f"ldvae: error: Download of {server.url}/page.h5ad is not a complete h5ad file (")
    assert "HTML" in line and _files_under(tmp_path) == []


def test_cli_run_with_math_like_gene_names_draws_every_figure(tmp_path, capsys):
    adata = _counts(200, 40)
    adata.var_names = MATH_LIKE + list(adata.var_names[len(MATH_LIKE):])
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    code, err = _run(capsys, "run", path, "--out-dir", tmp_path / "out", *FAST, "--n-top-genes", "40")
    assert code == 0, err
    loadings = pd.read_csv(tmp_path / "out" / "loadings.csv", index_col=0)
    assert set(MATH_LIKE) <= set(loadings.index)
    assert len(list((tmp_path / "out" / "figures").glob("*.png"))) == 7  # with the reproducible factors (one fit, rotated)


# --- the model's AnnData changed, malformed matrices, category names -------------------------------


def _small(n_cells: int = 300, n_genes: int = 40) -> ad.AnnData:
    a = _counts(n_cells, n_genes, seed=1)
    a.obs["ct"] = np.where(np.arange(n_cells) % 3 == 0, "A", "B")
    return a


def _fit(a: ad.AnnData, **setup) -> ldvae.LinearSCVI:
    ldvae.LinearSCVI.setup_anndata(a, **setup)
    model = ldvae.LinearSCVI(a, n_latent=3, n_hidden=16)
    model.train(max_epochs=2, progress_bar=False)
    return model


def test_model_reads_its_anndata_again_after_an_in_place_filter():
    import scanpy as sc

    a = _small()
    model = _fit(a)
    sc.pp.filter_cells(a, min_counts=float(np.median(np.asarray(a.X.sum(axis=1)))))  # in place: the same object
    assert model.get_latent_representation().shape == (a.n_obs, 3) and a.n_obs < 300
    ldvae.settings.seed = 0
    kept = model.differential_expression(groupby="ct", group1="A")
    ldvae.settings.seed = 0
    fresh = model.differential_expression(a.copy(), groupby="ct", group1="A")
    pd.testing.assert_series_equal(kept["raw_mean1"], fresh["raw_mean1"])


def test_de_groups_leave_out_missing_labels_of_every_column_type():
    a = _small()
    model = _fit(a)
    labels = pd.Series(a.obs["ct"].to_numpy(), index=a.obs_names, dtype="string")
    labels.iloc[:5] = pd.NA
    tables = []
    for kind in ("category", "object", "string"):
        a.obs["label"] = labels.astype(kind)
        ldvae.settings.seed = 0
        tables.append(model.differential_expression(groupby="label", group1="A", group2="B"))
    for table in tables[1:]:
        pd.testing.assert_frame_equal(table, tables[0])


def test_query_string_selects_cells_by_position_when_names_repeat():
    a = _small()
    a.obs_names = [f"c{i % 150}" for i in range(300)]  # as ad.concat without index_unique makes
    model = _fit(a)
    ldvae.settings.seed = 0
    by_query = model.differential_expression(idx1="ct == 'A'")
    ldvae.settings.seed = 0
    by_mask = model.differential_expression(idx1=(a.obs["ct"] == "A").to_numpy())
    pd.testing.assert_frame_equal(by_query, by_mask)
    with pytest.raises(ValueError, match="is not a condition on adata.obs"):
        model.differential_expression(idx1="ct")


@pytest.mark.parametrize("bad_index, found", [(40, "0..40"), (-3, "-3..39")])
@pytest.mark.parametrize("backed", [False, True])
def test_sparse_indices_outside_the_shape_are_refused(tmp_path, bad_index, found, backed):
    a = _small()
    x = a.X.copy()
    x.indices[5] = bad_index  # scipy builds this without a check; a one-based writer makes it
    a.X = x
    if backed:
        a.write_h5ad(tmp_path / "bad.h5ad")
        a = ad.read_h5ad(tmp_path / "bad.h5ad", backed="r")
    with pytest.raises(SetupError, match=rf"not a valid CSR matrix of shape 300 x 40: an index lies outside "
                                         rf"0\.\.39 \(found {re.escape(found)}\)"):
        ldvae.LinearSCVI.setup_anndata(a)
    assert "ldvae_setup" not in a.uns


@pytest.mark.parametrize("values", [pd.Categorical([1 if i % 2 else "1" for i in range(300)]),
                                    np.array([1 if i % 2 else "1" for i in range(300)], dtype=object)])
def test_distinct_batch_values_of_one_name_are_refused_and_nothing_written(values):
    a = _small()
    a.obs["b"] = values
    with pytest.raises(SetupError, match=r"distinct values of the same name '1' \(1, '1'\)"):
        ldvae.LinearSCVI.setup_anndata(a, batch_key="b")
    assert "ldvae_setup" not in a.uns and "_scvi_batch" not in a.obs


@pytest.mark.parametrize("values", [np.array([0.1, 0.2], dtype=np.float32),
                                    pd.to_datetime(["2024-01-01", "2024-02-01"]).to_numpy()])
def test_float32_and_date_batches_are_named_as_their_codes_are_read(values):
    a = _small()
    a.obs["b"] = values[np.arange(300) % 2]
    model = _fit(a, batch_key="b")
    assert len(a.uns["ldvae_setup"]["batch_categories"]) == 2
    assert np.bincount(a.obs["_scvi_batch"]).tolist() == [150, 150]
    assert model.get_latent_representation().shape == (300, 3)


def test_continuous_covariate_beyond_float32_training_is_refused_and_nothing_written():
    a = _small()
    a.obs["x"] = np.random.default_rng(0).normal(size=300) * 1e39
    with pytest.raises(SetupError, match=r"adata.obs\['x'\] reaches 3.*too large for float32 training"):
        ldvae.LinearSCVI.setup_anndata(a, continuous_covariate_keys=["x"])
    assert "ldvae_setup" not in a.uns


def test_write_results_onto_genes_named_twice():
    a = _small()
    model = _fit(a[:, :30].copy())
    full = a.copy()
    names = list(full.var_names)
    names[35] = names[36]  # a repeated symbol the model does not use
    full.var_names = names
    model.write_results(full)
    np.testing.assert_array_equal(full.varm["ldvae_loadings"][:30], model.get_loadings().to_numpy(np.float32))
    assert np.isnan(full.varm["ldvae_loadings"][30:]).all()
    np.testing.assert_allclose(full.obsm["X_ldvae"], model.get_latent_representation(), rtol=1e-6)
    names[1] = names[2] = "g_twice"
    full.var_names = names
    with pytest.warns(UserWarning, match=r"adata.var_names repeats 1 gene names \(first: 'g_twice'\)"):
        twice = _fit(full[:, :30].copy())  # a model of a matrix whose names repeat
    np.testing.assert_array_equal(twice.write_results(copy=True).varm["ldvae_loadings"],
                                  twice.get_loadings().to_numpy(np.float32))  # onto its own genes: by position
    with pytest.raises(SetupError, match="names the model's gene 'g_twice' more than once"):
        twice.write_results(full, copy=True)


@pytest.mark.parametrize("dtype", [np.complex64, "timedelta64[s]"])
def test_complex_and_time_counts_are_refused(dtype):
    a = _small()
    a.X = a.X.toarray().astype(np.int64).astype(dtype)
    with pytest.raises(SetupError, match=rf"adata.X has dtype {re.escape(str(np.dtype(dtype)))}; LDVAE needs numeric"):
        ldvae.LinearSCVI.setup_anndata(a)


def test_a_float_batch_value_is_one_transform_batch():
    a = _small()
    a.obs["b"] = np.where(np.arange(300) % 2 == 0, 1.0, 2.0)
    model = _fit(a, batch_key="b")
    np.testing.assert_array_equal(model.get_normalized_expression(transform_batch=1.0),
                                  model.get_normalized_expression(transform_batch="1.0"))


def test_non_integer_message_shows_the_digits_that_make_it_so():
    a = _small()
    x = a.X.toarray().astype(np.float64)
    x[0, 0] = 2.0000001
    a.X = x
    with pytest.raises(SetupError, match=r"non-integer values \(first: 2\.0000001 at cell"):
        ldvae.LinearSCVI.setup_anndata(a)


def test_repeated_sparse_entries_are_checked_as_their_sum():
    a = _small()
    indptr = np.r_[0, 2, np.full(299, 2)]
    a.X = sp.csr_matrix((np.array([0.5, 0.5]), np.array([3, 3]), indptr), shape=(300, 40))  # the value is 1
    ldvae.LinearSCVI.setup_anndata(a)
    a.X = sp.csr_matrix((np.array([6e8, 6e8]), np.array([3, 3]), indptr), shape=(300, 40))  # 1.2e9
    with pytest.raises(SetupError, match="values too large to be counts"):
        ldvae.LinearSCVI.setup_anndata(a)


def test_the_principal_components_start_reads_checked_counts():
    a = _small()
    ldvae.LinearSCVI.setup_anndata(a)
    model = ldvae.LinearSCVI(a, n_latent=3)
    x = a.X.copy()
    x.data[0] = -1
    a.X = x  # the counts replaced after setup
    with pytest.raises(SetupError, match="has negative values"):
        model.train(max_epochs=1, init="pca", progress_bar=False)


def test_a_layer_asked_of_a_backed_anndata_points_to_its_x(tmp_path):
    _small().write_h5ad(tmp_path / "c.h5ad")
    backed = ad.read_h5ad(tmp_path / "c.h5ad", backed="r")
    with pytest.raises(SetupError, match="counts of this backed AnnData are its X on disk: pass layer=None"):
        ldvae.LinearSCVI.setup_anndata(backed, layer="counts")


def test_an_input_another_process_is_writing_is_named_so(tmp_path):
    import subprocess
    import sys

    from ldvae.data.readers import ReadError, read_file

    path = tmp_path / "busy.h5ad"
    ldvae.simulate(50, 10, 2, seed=0).write_h5ad(path)
    writer = subprocess.Popen([sys.executable, "-c", f"import h5py, time; f = h5py.File({str(path)!r}, 'r+'); "
                               "print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        with pytest.raises(ReadError, match=r"another process has it open for writing \(HDF5's file lock\)"):
            read_file(path)
    finally:
        writer.kill()
        writer.wait()
