"""The ``ldvae`` command end to end: outputs valid, downloads from a local HTTP server
(cached, and nothing partial on failure), one clear line on bad input, help with defaults."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import re
import threading

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import ldvae
from ldvae.cli import app as cli
from ldvae.data.readers import ReadError, download, read_counts, read_file
from ldvae.workflow.checks import FACTOR_SEEDS

FAST = ["--n-top-genes", "40", "--n-latent", "4", "--max-epochs", "3", "--check-val-every-n-epoch", "1",
        "--n-neighbors", "10", "--no-progress-bar"]


def _counts(n_cells: int = 300, n_genes: int = 60, seed: int = 3):
    import anndata

    sim = ldvae.simulate(n_cells, n_genes, 3, seed=seed)
    return anndata.AnnData(X=sp.csr_matrix(sim.layers["counts"], dtype=np.float32),
                           obs=pd.DataFrame(index=sim.obs_names), var=pd.DataFrame(index=sim.var_names))


class _Server:
    """Serves ``files`` (name -> bytes) on 127.0.0.1; names in ``truncate`` announce their full
    length but send half; every request path is recorded in ``requests``."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append(name)
                if name not in server.files:
                    self.send_error(404, "Not Found")
                    return
                body = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if name in server.truncate else body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def h5ad_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "counts.h5ad"
    _counts().write_h5ad(path)
    return path.read_bytes()


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, server, h5ad_bytes):
    """``ldvae run`` once, with the input downloaded via --backup-url into a cache directory."""
    server.files["pbmc.h5ad"] = h5ad_bytes
    root = tmp_path_factory.mktemp("cli")
    out = root / "out"
    code = cli.main(["run", str(root / "cache" / "pbmc.h5ad"), "--backup-url", f"{server.url}/pbmc.h5ad",
                     "--out-dir", str(out), "--figure-formats", "png", "pdf", *FAST])
    return code, root, out


# --- end to end -------------------------------------------------------------------------------


def test_cli_run_writes_valid_outputs(cli_run):
    import anndata

    code, root, out = cli_run
    assert code == 0
    assert (root / "cache" / "pbmc.h5ad").is_file()
    res = anndata.read_h5ad(out / "results.h5ad")
    assert res.shape == (300, 40) and res.raw.shape == (300, 60)
    assert res.obsm["X_ldvae"].shape == (300, 4) and res.obsm["X_umap"].shape == (300, 2)
    assert res.varm["ldvae_loadings"].shape == (40, 4) and np.isfinite(res.varm["ldvae_loadings"]).all()
    assert {f"Z_{i}" for i in range(4)} | {"leiden"} <= set(res.obs.columns)
    assert {"ldvae", "ldvae_setup", "ldvae_workflow", "neighbors", "umap", "leiden"} <= set(res.uns)
    assert pd.read_csv(out / "loadings.csv", index_col=0).shape == (40, 4)
    assert len(pd.read_csv(out / "top_genes.csv")) == 40
    assert (out / "model" / "ldvae_model.json").is_file()


def test_cli_figures_are_valid_images(cli_run):
    import matplotlib.image

    _, _, out = cli_run
    pngs = sorted((out / "figures").glob("*.png"))
    # the default run fits 3 more seeds: the stability and reproducible-factor figures too
    assert {p.stem for p in pngs} == {"training_curves", "latent_pairs", "loadings_heatmap", "top_genes", "umap_clusters",
                                      "umap_factors", "factor_stability", "umap_reproducible_factors"}
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(png)
        assert img.shape[0] > 200 and img.shape[1] > 200, png.name
        assert img[..., :3].std() > 0.05, f"{png.name} is blank"
        assert (out / "figures" / f"{png.stem}.pdf").read_bytes()[:5] == b"%PDF-"


def test_cli_report_is_self_contained(cli_run):
    _, _, out = cli_run
    html = (out / "report.html").read_text(encoding="utf-8")
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs
    for ref in refs:
        assert ref.startswith(("data:image/png;base64,", "#")) or (out / ref).exists(), ref[:60]
    assert html.count("data:image/png;base64,") >= 6  # the workflow's figures, and any extra sections'
    for heading in ("Data", "Training settings", "Figures", "Top loadings by magnitude"):
        assert f"<h2>{heading}</h2>" in html
    assert "max_epochs" in html and "highly variable genes modelled" in html


def test_cli_prints_top_genes_and_report(tmp_path, capsys):
    path = tmp_path / "counts.h5ad"
    _counts(seed=4).write_h5ad(path)
    code, out, err = _run(capsys, "--quiet", "run", path, "--out", tmp_path / "o", *FAST)
    assert code == 0, err
    assert out.startswith("Top loadings by magnitude")
    assert out.strip().splitlines()[-1] == f"Report: {tmp_path / 'o' / 'report.html'}"


# --- downloads --------------------------------------------------------------------------------


def test_download_then_cache(server, h5ad_bytes, tmp_path):
    server.files["cached.h5ad"] = h5ad_bytes
    before = server.requests.count("cached.h5ad")
    digest = hashlib.sha256(h5ad_bytes).hexdigest()
    a = read_counts(tmp_path / "cached.h5ad", backup_url=f"{server.url}/cached.h5ad", sha256=digest,
                    progress_bar=False)
    b = read_counts(tmp_path / "cached.h5ad", backup_url=f"{server.url}/cached.h5ad", progress_bar=False)
    assert server.requests.count("cached.h5ad") == before + 1  # the second read used the cache
    assert a.shape == b.shape == (300, 60)
    # without a path: the URL's file name in cache_dir
    c = read_counts(backup_url=f"{server.url}/cached.h5ad", cache_dir=tmp_path / "cache", progress_bar=False)
    assert c.shape == (300, 60) and (tmp_path / "cache" / "cached.h5ad").is_file()


@pytest.mark.parametrize(
    ("name", "setup", "match"),
    [
        ("missing.h5ad", None, r"HTTP 404"),
        ("short.h5ad", "truncate", r"truncated: got \d+ of \d+ bytes|failed after \d+ bytes"),
        ("sum.h5ad", "checksum", r"has SHA-256 [0-9a-f]{64}, expected 0{64}"),
    ],
)
def test_failed_download_leaves_nothing(server, h5ad_bytes, tmp_path, name, setup, match):
    if setup:
        server.files[name] = h5ad_bytes
    if setup == "truncate":
        server.truncate.add(name)
    sha = "0" * 64 if setup == "checksum" else None
    with pytest.raises(ReadError, match=match):
        download(f"{server.url}/{name}", tmp_path / name, sha256=sha, progress_bar=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_failed_download_is_one_line(server, h5ad_bytes, tmp_path, capsys):
    server.files["cut.h5ad"] = h5ad_bytes
    server.truncate.add("cut.h5ad")
    code, out, err = _run(capsys, "run", tmp_path / "cache" / "cut.h5ad", "--backup-url", f"{server.url}/cut.h5ad",
                          "--out-dir", tmp_path / "out", *FAST)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("ldvae: error: Download of ")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


# --- readers ------------------------------------------------------------------------------------


def test_readers_for_each_format(tmp_path):
    import scipy.io

    adata = _counts(20, 8)
    dense = adata.X.toarray()
    adata.to_df().to_csv(tmp_path / "counts.csv")
    scipy.io.mmwrite(tmp_path / "counts.mtx", adata.X)
    tenx = tmp_path / "tenx"
    tenx.mkdir()
    # Cell Ranger 3 layout: gzipped, genes x cells
    with gzip.open(tenx / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, adata.X.T.tocoo())
    pd.DataFrame({"id": adata.var_names, "name": adata.var_names, "type": "Gene Expression"}).to_csv(
        tenx / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(adata.obs_names).to_csv(tenx / "barcodes.tsv.gz", sep="\t", header=False, index=False)
    for path in ("counts.csv", "counts.mtx", "tenx"):
        read = read_file(tmp_path / path)
        assert read.shape == (20, 8), path
        np.testing.assert_allclose(np.asarray(read.X.todense() if sp.issparse(read.X) else read.X), dense)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("nope.h5ad", None, r"Input file '.*nope.h5ad' does not exist"),
        ("counts.xyz", b"1,2", r"Cannot tell the format of '.*counts.xyz' from its name"),
        ("broken.h5ad", b"not an hdf5 file", r"Could not read '.*broken.h5ad' as h5ad \(\w+"),
    ],
)
def test_reader_errors(tmp_path, name, content, match):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ReadError, match=match):
        read_file(tmp_path / name)


# --- bad input to the command -----------------------------------------------------------------


def _bad_input(tmp_path, kind):
    adata = _counts(200, 30)
    args = []
    if kind == "missing file":
        return tmp_path / "absent.h5ad", args, r"Input file .* does not exist"
    if kind == "unreadable format":
        path = tmp_path / "junk.h5ad"
        path.write_bytes(b"\x00" * 100)
        return path, args, r"Could not read .* as h5ad"
    if kind == "layer missing":
        args = ["--layer", "counts"]
        match = r"layer='counts' is not in adata.layers \(have: none\)"
    elif kind == "no cells":
        adata = adata[:0].copy()
        match = r"in.h5ad holds no counts to model: 0 cells x 30 genes"
    elif kind == "fewer cells than neighbours":
        adata = adata[:8].copy()
        match = r"n_neighbors=10 \(--n-neighbors\) needs more cells than that; the data has 8"
    elif kind == "not counts":
        adata.X = adata.X.multiply(0.5).tocsr()
        match = r"LDVAE models raw counts, but adata.X has non-integer values \(first: \d+\.5 at cell 'cell0'"
    else:  # too few genes
        args = ["--n-top-genes", "1000"]
        match = r"n_top_genes=1000 but only 30 of the 30 genes have any counts"
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    return path, args, match


@pytest.mark.parametrize("kind", ["missing file", "unreadable format", "layer missing", "no cells",
                                  "fewer cells than neighbours", "not counts", "too few genes"])
def test_bad_input_one_line_nothing_written(tmp_path, capsys, kind):
    path, extra, match = _bad_input(tmp_path, kind)
    before = set(tmp_path.iterdir())
    code, out, err = _run(capsys, "run", path, "--out-dir", tmp_path / "out", *FAST, *extra)
    assert code == 1
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("ldvae: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0]
    assert re.search(match, errors[0]), errors[0]
    assert set(tmp_path.iterdir()) == before  # no output directory, no staging directory


def test_refuses_existing_out_dir(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code, _, err = _run(capsys, "run", tmp_path / "whatever.h5ad", "--out-dir", tmp_path / "out")
    assert code == 1
    assert err.strip() == (f"ldvae: error: Output directory {str(tmp_path / 'out')!r} already exists. "
                           "Pass --overwrite (overwrite=True) to replace it, or choose another --out-dir.")


def test_run_needs_an_input(tmp_path, capsys):
    code, _, err = _run(capsys, "run", "--out-dir", tmp_path / "out")
    assert code == 1 and err.strip() == "ldvae: error: Give an input file, or --backup-url to download one."


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "x.h5ad", "--out-dir", "o", "--gene-likelihood", "gauss"])
    assert exc.value.code == 2
    assert "invalid choice: 'gauss'" in capsys.readouterr().err


# --- help ------------------------------------------------------------------------------------------


def _subparsers(parser):
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", [None, "run", "demo"])
def test_help_lists_every_option_with_its_default_once(command, capsys):
    parser = cli.build_parser()
    target = parser if command is None else _subparsers(parser)[command]
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"] if command is None else [command, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in target._actions:
        if action.help in (None, "==SUPPRESS==") or action.dest in ("help", "version", "command"):
            continue
        assert action.help, action.dest
        if action.default is None or "default" in action.help.lower():  # said once, or nothing to say
            assert action.help in text and f"{action.help} (default:" not in text, action.dest
        else:
            assert f"{action.help} (default: {action.default})" in text, action.dest
        for flag in action.option_strings:
            assert flag in text
    assert "(default: None)" not in text


def test_every_flag_is_a_workflow_parameter():
    import inspect

    from ldvae.workflow.pipeline import run_workflow

    params = set(inspect.signature(run_workflow).parameters)
    run = _subparsers(cli.build_parser())["run"]
    for action in run._actions:
        if action.dest in ("help", "input"):
            continue
        assert action.dest in params, action.dest
        assert "--" + action.dest.replace("_", "-") in action.option_strings


def test_distributed_entry_point_shares_run_defaults():
    from ldvae.distributed import build_parser

    run = _subparsers(cli.build_parser())["run"]
    dist = build_parser()
    for dest in ("lr", "batch_size", "n_latent", "seed", "layer", "batch_key"):
        assert dist.get_default(dest) == run.get_default(dest), dest


# --- the demo ---------------------------------------------------------------------------------------


def test_demo_data_is_small_and_attributed():
    from ldvae.data.readers import DEMO_FILE, read_demo

    assert DEMO_FILE.stat().st_size < 3_000_000
    demo = read_demo()
    assert demo.shape == (1000, 13656)
    assert np.all(demo.X.data == np.round(demo.X.data)) and demo.X.data.min() > 0
    assert "10x Genomics, CC BY 4.0" in demo.uns["source"]["attribution"]
    assert list(demo.obs.columns) == ["seurat_annotation"]


def test_demo_command_runs(tmp_path, capsys):
    code, out, err = _run(capsys, "--quiet", "demo", "--out-dir", tmp_path / "demo", "--max-epochs", "2",
                          "--n-top-genes", "300", "--no-progress-bar")
    assert code == 0, err
    assert out.strip().endswith(f"Report: {tmp_path / 'demo' / 'report.html'}")
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "seurat_annotation" in html and "Data: 10x Genomics, CC BY 4.0" in html
    assert "pbmc3k_demo.h5ad" in html and "AnnData in memory" not in html  # the report names what it read
    # the demo fits more seeds by default, after the demo's own: stability and the consensus factors
    assert "<h2>Factor stability across seeds</h2>" in html and "<h2>Reproducible factors</h2>" in html
    stability = pd.read_csv(tmp_path / "demo" / "factor_stability.csv", index_col="factor")
    assert len(stability) == 10 and list(stability.filter(like="match_run").columns) == [
        f"match_run_{i}" for i in range(FACTOR_SEEDS + 1)]
    factors = pd.read_csv(tmp_path / "demo" / "factors.csv")
    assert list(factors["factor"]) == [f"F_{k}" for k in range(10)]
    # the demo's labels, by --color-by: the one each factor separates best, or none below the AUC that marks
    assert factors["marks"].str.fullmatch(r"[^(]+ \(AUC \d\.\d\d\)|none \(best: [^,]+, AUC 0\.\d\d\)").all()
    assert f"Factors ({FACTOR_SEEDS + 1} fit(s);" in out


def test_repeated_names_are_reported_in_our_words(tmp_path, caplog, recwarn):
    import anndata
    import warnings

    a = anndata.AnnData(sp.csr_matrix(np.ones((4, 3), dtype=np.float32)))
    a.var_names, a.obs_names = ["g1", "g2", "g2"], ["c0", "c0", "c1", "c2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_h5ad(tmp_path / "dup.h5ad")
    recwarn.clear()
    with caplog.at_level("WARNING"):
        b = read_file(tmp_path / "dup.h5ad")
    assert list(b.var_names) == ["g1", "g2", "g2-1"]
    assert "1 gene names of" in caplog.text and "the repeats are named 'g2-1'" in caplog.text
    assert "has 1 repeated cell names (first: 'c0')" in caplog.text
    assert not [w for w in recwarn if "names are not unique" in str(w.message)]  # anndata's advice is not repeated


def test_main_called_in_a_session_leaves_its_logging_and_plot_backend(tmp_path, capsys):
    """In a notebook, a call of the command line's main must not change how figures display
    or what the ldvae logger shows afterwards."""
    import logging

    import matplotlib.pyplot as plt

    from ldvae.cli.app import main

    before = plt.get_backend()
    plt.switch_backend("svg")
    log = logging.getLogger("ldvae")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        assert main(["run", str(tmp_path / "missing.h5ad"), "--out-dir", str(tmp_path / "out")]) == 1
        assert plt.get_backend() == "svg" and log.level == logging.ERROR
    finally:
        log.setLevel(level)
        plt.switch_backend(before)
