"""The tutorial workflow as one function: read → prepare → fit → interpret → show → write.

:func:`run_workflow` is what ``ldvae run`` and ``ldvae demo`` call. Its steps are
public functions too (:func:`prepare`, :func:`fit`, :func:`interpret`,
:func:`write_outputs`), so a notebook can run them one by one.

The output directory is built under a temporary name beside it (created before any
work, so an unwritable place fails at once) and renamed into place only when every file
is written: a failed or interrupted run leaves nothing at ``out_dir``. An existing
``out_dir`` is replaced only with ``overwrite=True``, and only if it holds nothing but an
earlier run's outputs (see :func:`check_out_dir`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence, Union

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._version import __version__
from ..util.checks import check_number
from ..data.contract import SetupError, get_counts, obs_categories, validate_counts
from ..util.io import (
    DiskFullError,
    OutputError,
    atomic_path,
    atomic_write_h5ad,
    atomic_write_json,
    atomic_write_text,
    is_disk_full,
    owned_dir_name,
    sweep_stale,
)
from ..model import LinearSCVI
from .plotting import (
    latent_pairs,
    loadings_frame,
    loadings_heatmap,
    top_genes,
    top_genes_bars,
    training_curves,
    umap,
)
from ..data.readers import read_counts
from .report import build_report
from ..data.results import result_keys
from ..factors.seeds import BackgroundFits, fit_seeds, uses_gpu
from ..factors.stability import StabilityResult, factor_stability

logger = logging.getLogger(__name__)

WORKFLOW_KEY = "ldvae_workflow"
FIGURE_FORMATS = ("png", "svg", "pdf")
#: A report section: ``(title, html)``, or a function of ``(model, adata)`` returning one.
ReportSection = Union[tuple[str, str], Callable[[LinearSCVI, object], tuple[str, str]]]


@dataclass
class WorkflowResult:
    """What :func:`run_workflow` made: the fitted model, the results AnnData and the files."""

    model: LinearSCVI
    adata: object  # the prepared AnnData holding every result
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)  # name -> final path
    top_genes: pd.DataFrame | None = None
    stability: StabilityResult | None = None  # with stability_seeds > 0

    @property
    def report(self) -> Path:
        return self.files["report"]


@contextlib.contextmanager
def _keep_torch_threads():
    """Restore torch's thread count after scanpy: its numba kernels set the shared OpenMP pool
    to every core (ignoring OMP_NUM_THREADS), which slows training many-fold on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Run with ``n`` torch CPU threads (None: the current count), then restore the count."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        check_option("n_threads", n, integer=True, minimum=1)
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- prepare -------------------------------------------------------------------------------


def prepare(
    adata,
    *,
    layer: str | None = None,
    target_sum: float = 1e5,
    n_top_genes: int = 1000,
    hvg_flavor: Literal["seurat_v3", "seurat_v3_paper", "seurat", "cell_ranger"] = "seurat_v3",
    batch_key: str | None = None,
):
    """The tutorial's preparation, on a copy of ``adata`` (the input is not modified).

    Counts (``adata.X`` or ``adata.layers[layer]``) are checked to be raw counts, then:
    ``layers["counts"]``, ``normalize_total(target_sum)``, ``log1p``, ``raw`` frozen,
    ``highly_variable_genes(flavor, n_top_genes, subset=True)`` (on the counts layer for the
    ``seurat_v3`` flavors; per batch with ``batch_key``). Cells left without counts in the
    selected genes are dropped with a warning (LDVAE cannot model an empty library).

    Returns
    -------
    A new AnnData, genes subset to the highly variable ones, with ``X`` (log1p of
    normalized counts), ``layers["counts"]``, ``raw`` (all genes, log-normalized),
    ``var["highly_variable"]`` and the other HVG columns, ``uns["log1p"]``, ``uns["hvg"]``.

    Raises
    ------
    SetupError
        Counts that are not raw counts; a ``batch_key`` column that is absent, has missing
        values or a batch of one cell; for the ``seurat_v3`` flavors, fewer than
        ``MIN_VARYING_GENES`` genes varying in a batch, or a loess fit that fails (checked
        before scanpy, whose loess crashes the process on such input).
    """
    import scanpy as sc

    counts = get_counts(adata, layer)
    validate_counts(adata, counts, layer)
    batches = _hvg_batches(adata, batch_key)
    check_option("n_top_genes", n_top_genes, integer=True, minimum=1)
    check_option("target_sum", target_sum, minimum=0, exclusive=True)
    counts = sp.csr_matrix(counts, dtype=np.float32)
    detected = int((counts.getnnz(axis=0) > 0).sum())
    if n_top_genes > detected:
        raise SetupError(
            f"n_top_genes={n_top_genes} but only {detected} of the {adata.n_vars} genes have any counts; "
            f"ask for at most {detected} highly variable genes (--n-top-genes)."
        )
    if hvg_flavor.startswith("seurat_v3"):
        _check_loess_points(counts, batches, batch_key, hvg_flavor)
    out = adata.copy()
    out.X = counts.copy()
    out.layers["counts"] = counts
    sc.pp.normalize_total(out, target_sum=target_sum)
    sc.pp.log1p(out)
    out.raw = out
    try:
        sc.pp.highly_variable_genes(
            out,
            flavor=hvg_flavor,
            layer="counts" if hvg_flavor.startswith("seurat_v3") else None,
            n_top_genes=n_top_genes,
            batch_key=batch_key,
            subset=True,
        )
    except ValueError as err:
        if hvg_flavor.startswith("seurat_v3"):
            _explain_loess_failure(counts, batches, batch_key, hvg_flavor, err)
        raise
    empty = np.asarray(out.layers["counts"].sum(axis=1)).ravel() <= 0
    if empty.any():
        logger.warning(
            "Dropping %d of %d cells with no counts in the %d highly variable genes.",
            int(empty.sum()), out.n_obs, out.n_vars,
        )
        out = out[~empty].copy()
    logger.info("prepared %d cells x %d highly variable genes (%s)", out.n_obs, out.n_vars, hvg_flavor)
    return out


# scanpy's seurat_v3 loess (span 0.3, degree 2) needs more than degree + 1 = 3 points in a
# span's neighbourhood: with fewer genes it never fits, and with 3 or fewer it crashes the process.
_LOESS_SPAN = 0.3
MIN_VARYING_GENES = math.ceil(4 / _LOESS_SPAN)  # 14


def _hvg_batches(adata, batch_key: str | None) -> tuple[list[str], np.ndarray]:
    """(batch names, code per cell) as scanpy's HVG step groups the cells; SetupError for an absent
    column, missing values, or a batch of one cell (whose variance across cells is undefined)."""
    if batch_key is None:
        return ["all cells"], np.zeros(adata.n_obs, dtype=np.int64)
    obs_categories(adata, batch_key, "batch_key")  # absent column, missing values
    names, codes = np.unique(adata.obs[batch_key].astype(str).to_numpy(), return_inverse=True)
    sizes = np.bincount(codes, minlength=len(names))
    if sizes.min() < 2:
        small = names[sizes < 2]
        raise SetupError(
            f"batch_key={batch_key!r}: {len(small)} batch(es) of adata.obs[{batch_key!r}] have a single cell "
            f"(first: {str(small[0])!r}); highly variable genes are selected per batch from the variance "
            "across its cells, which needs at least 2. Merge or drop those cells, or leave out batch_key "
            "(--batch-key)."
        )
    return [str(n) for n in names], codes.astype(np.int64)


def _varying_genes(counts: sp.csr_matrix, codes: np.ndarray, n_batch: int) -> np.ndarray:
    """Per batch, the number of genes whose counts are not all equal across its cells, (n_batch,)."""
    onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n_batch, len(codes)))
    x = counts.astype(np.float64)
    nnz = (onehot @ (x != 0).astype(np.float64)).toarray()  # (n_batch, n_genes)
    s1 = (onehot @ x).toarray()
    s2 = (onehot @ x.multiply(x)).toarray()
    n = np.bincount(codes, minlength=n_batch)[:, None]
    # Some but not all cells detected, or all detected with unequal values.
    varies = ((nnz > 0) & (nnz < n)) | ((nnz == n) & (n * s2 - s1**2 > 0))
    return varies.sum(axis=1)


def _check_loess_points(counts, batches, batch_key: str | None, hvg_flavor: str) -> None:
    names, codes = batches
    varying = _varying_genes(counts, codes, len(names))
    if varying.min() >= MIN_VARYING_GENES:
        return
    worst = int(varying.argmin())
    where = "the cells" if batch_key is None else f"the cells of batch {names[worst]!r} (batch_key={batch_key!r})"
    fix = (
        "Pass more genes, or hvg_flavor='seurat' (--hvg-flavor seurat)"
        if batch_key is None
        else "Merge that batch with another, leave out batch_key (--batch-key), or pass hvg_flavor='seurat'"
    )
    raise SetupError(
        f"hvg_flavor={hvg_flavor!r} fits a loess curve of gene variance on gene mean, which needs at least "
        f"{MIN_VARYING_GENES} genes whose counts vary across {where}; only {int(varying[worst])} do. {fix}."
    )


def _explain_loess_failure(counts, batches, batch_key: str | None, hvg_flavor: str, err: ValueError) -> None:
    """Raise SetupError naming the first batch whose seurat_v3 loess fit fails (scanpy's own error
    names neither the batch nor the cause); return when every batch fits (another error)."""
    from skmisc.loess import loess

    names, codes = batches
    for b, name in enumerate(names):
        x = counts[codes == b].astype(np.float64)
        n = x.shape[0]
        mean = np.asarray(x.mean(axis=0)).ravel()
        var = (np.asarray(x.multiply(x).sum(axis=0)).ravel() - n * mean**2) / (n - 1)
        keep = var > 0
        try:
            loess(np.log10(mean[keep]), np.log10(var[keep]), span=_LOESS_SPAN, degree=2).fit()
        except ValueError as fit_err:
            where = "the cells" if batch_key is None else f"batch {name!r} of batch_key={batch_key!r} ({n} cells)"
            raise SetupError(
                f"hvg_flavor={hvg_flavor!r}: the loess fit of gene variance on gene mean failed for {where}: "
                f"too many genes share the same mean, as rare genes in few cells do ({_one_line_error(fit_err)}). "
                "Drop rare genes first (sc.pp.filter_genes(adata, min_cells=10)), merge small batches, leave "
                "out batch_key (--batch-key), or pass hvg_flavor='seurat' (--hvg-flavor seurat)."
            ) from err


def _one_line_error(err: BaseException) -> str:
    text = err.args[0] if err.args else ""
    text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    return " ".join(text.split()) or type(err).__name__


# --- fit and interpret ------------------------------------------------------------------------


def fit(
    adata,
    *,
    batch_key: str | None = None,
    n_latent: int = 10,
    gene_likelihood: Literal["nb", "zinb", "poisson"] = "nb",
    max_epochs: int = 250,
    lr: float = 5e-3,
    batch_size: int = 128,
    check_val_every_n_epoch: int = 10,
    seed: int = 0,
    accelerator: str = "auto",
    progress_bar: bool = True,
    threads: int | None = None,
) -> LinearSCVI:
    """``setup_anndata(adata, layer="counts", batch_key=...)``, then a trained ``LinearSCVI``
    (``threads``: torch CPU threads while training, see :meth:`LinearSCVI.train`).

    Writes ``adata.uns["ldvae_setup"]`` (see :func:`ldvae.data.contract.setup_anndata`).
    """
    LinearSCVI.setup_anndata(adata, layer="counts", batch_key=batch_key)
    model = LinearSCVI(adata, n_latent=n_latent, gene_likelihood=gene_likelihood)
    model.train(
        max_epochs=max_epochs,
        lr=lr,
        batch_size=batch_size,
        check_val_every_n_epoch=check_val_every_n_epoch,
        accelerator=accelerator,
        seed=seed,
        progress_bar=progress_bar,
        threads=threads,
    )
    return model


def interpret(
    model: LinearSCVI,
    adata,
    *,
    n_neighbors: int = 20,
    umap_min_dist: float = 0.3,
    leiden_resolution: float = 0.8,
    seed: int = 0,
) -> None:
    """Latent means and loadings into ``adata``; neighbors, UMAP and Leiden on the latent space.

    Writes
    ------
    obsm["X_ldvae"], varm["ldvae_loadings"], uns["ldvae"], obs["Z_0"] … obs["Z_{K-1}"]
        See :func:`ldvae.data.results.write_results`.
    uns["neighbors"], obsp["distances"], obsp["connectivities"]
        ``sc.pp.neighbors(use_rep="X_ldvae", n_neighbors=...)``.
    obsm["X_umap"], uns["umap"]
        ``sc.tl.umap(min_dist=...)``.
    obs["leiden"], uns["leiden"]
        ``sc.tl.leiden(resolution=...)`` (igraph implementation, 2 iterations).
    """
    import scanpy as sc

    model.write_results(adata, obs_columns=True)
    sc.pp.neighbors(adata, use_rep=result_keys()["obsm"], n_neighbors=n_neighbors, random_state=seed)
    sc.tl.umap(adata, min_dist=umap_min_dist, random_state=seed)
    sc.tl.leiden(
        adata, resolution=leiden_resolution, key_added="leiden", random_state=seed,
        flavor="igraph", n_iterations=2, directed=False,
    )
    logger.info("added obsp['connectivities'], obsm['X_umap'], obs['leiden'] (%d clusters)",
                adata.obs["leiden"].nunique())


def format_top_genes(table: pd.DataFrame) -> str:
    """The tutorial's "Top loadings by magnitude" printout of a :func:`~ldvae.workflow.plotting.top_genes` table:
    per factor, the most negative genes, then the most positive (each ending at the extreme)."""
    rule = "-" * 88
    lines = ["Top loadings by magnitude", rule]
    for factor, group in table.groupby("factor", sort=False):
        neg = group[group["direction"] == "negative"].sort_values("loading")
        pos = group[group["direction"] == "positive"].sort_values("loading")
        lines.append(f"{factor}:\t" + "\t".join(f"{g}, {v:.2}" for g, v in zip(neg["gene"], neg["loading"])))
        lines.append("\t...")
        lines.append("\t" + "\t".join(f"{g}, {v:.2}" for g, v in zip(pos["gene"], pos["loading"])))
        lines.append(rule)
    return "\n".join(lines)


# --- write ----------------------------------------------------------------------------------------


def _history_plain(history: dict[str, pd.DataFrame]) -> dict:
    return {
        k: {"epoch": v.index.to_numpy(dtype=np.int64), "value": v.iloc[:, 0].to_numpy(dtype=np.float64)}
        for k, v in history.items()
    }


def _save_figure(fig, directory: Path, name: str, formats: Sequence[str]) -> dict[str, Path]:
    paths = {}
    for fmt in formats:
        path = directory / f"{name}.{fmt}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=110 if fmt == "png" else None)
        paths[f"{name}.{fmt}"] = path
    return paths


def write_outputs(
    model: LinearSCVI,
    adata,
    directory: str | os.PathLike,
    *,
    n_top_loadings: int = 5,
    color_by: Sequence[str] = (),
    figure_formats: Sequence[str] = ("png",),
    title: str = "LDVAE report",
    report_sections: Sequence[ReportSection] = (),
    stability: StabilityResult | None = None,
) -> dict[str, Path]:
    """Write every output file of the workflow into ``directory`` (which may exist).

    Files: ``results.h5ad``, ``loadings.csv`` (genes × Z_i), ``top_genes.csv``,
    ``model/`` (:meth:`LinearSCVI.save`), ``figures/<name>.png`` (and SVG/PDF on request)
    and ``report.html`` (figures embedded). ``adata`` must hold the results of :func:`interpret`
    and ``adata.uns["ldvae_workflow"]`` the settings and data summary. With ``stability``
    (:func:`ldvae.factors.stability.factor_stability` of this model, as reference, and refits), also
    ``factor_stability.csv``, ``figures/factor_stability.png``, a stability section and a
    stability column in the report's top-genes table.

    Returns
    -------
    Output name → path.
    """
    d = Path(directory)
    files: dict[str, Path] = {}
    loadings = loadings_frame(adata)
    table = top_genes(loadings, n_top_loadings)
    info = adata.uns.get(WORKFLOW_KEY, {})

    files["loadings.csv"] = d / "loadings.csv"
    atomic_write_text(files["loadings.csv"], loadings.rename_axis("gene").to_csv())
    files["top_genes.csv"] = d / "top_genes.csv"
    atomic_write_text(files["top_genes.csv"], table.to_csv(index=False))

    formats = ["png"] + [f for f in dict.fromkeys(figure_formats) if f != "png"]
    fig_dir = d / "figures"
    color = "leiden" if not color_by else color_by[0]
    figures = [
        ("training_curves", "Training and validation ELBO by epoch.", training_curves(model.history)),
        ("latent_pairs", f"Latent dimension pairs, coloured by {color}.", latent_pairs(adata, color=color)),
        ("loadings_heatmap", f"Loadings of the top {n_top_loadings} negative and positive genes per factor.",
         loadings_heatmap(adata, n_genes=n_top_loadings)),
        ("top_genes", f"Top {n_top_loadings} negative (blue) and positive (red) genes of each factor.",
         top_genes_bars(adata, n_genes=n_top_loadings)),
        ("umap_clusters", "UMAP of the LDVAE latent space, coloured by Leiden cluster"
         + (f" and by {', '.join(color_by)}." if color_by else "."),
         umap(adata, color=["leiden", *color_by], ncols=2)),
        ("umap_factors", "UMAP coloured by each factor.",
         umap(adata, color=list(loadings.columns), ncols=4)),
    ]
    embedded = []
    for name, caption, fig in figures:
        paths = _save_figure(fig, fig_dir, name, formats)
        files.update({f"figures/{k}": v for k, v in paths.items()})
        embedded.append((caption, paths[f"{name}.png"]))
    stability_sections = []
    if stability is not None:
        from .interpret_report import stability_section
        from ..factors.stability import plot_stability

        files["factor_stability.csv"] = d / "factor_stability.csv"
        atomic_write_text(files["factor_stability.csv"], stability_table(stability).to_csv())
        paths = _save_figure(plot_stability(stability), fig_dir, "factor_stability", formats)
        files.update({f"figures/{k}": v for k, v in paths.items()})
        stability_sections.append(stability_section(stability, figure=paths["factor_stability.png"]))

    model.save(d / "model", overwrite=True)
    files["model"] = d / "model"
    files["results.h5ad"] = d / "results.h5ad"
    atomic_write_h5ad(adata, files["results.h5ad"], compression="gzip")  # raw (all genes) and counts compress ~4x

    extra = [s(model, adata) if callable(s) else s for s in report_sections]
    source = adata.uns.get("source")
    footer = source.get("attribution", "") if isinstance(source, dict) else ""
    html_text = build_report(
        title=title,
        data_summary=dict(info.get("data", {"cells": adata.n_obs, "genes modelled": adata.n_vars})),
        settings=dict(info.get("settings", model.init_params_)),
        figures=embedded,
        top_genes=table,
        factor_stability=None if stability is None else stability.factors,
        extra_sections=stability_sections + extra,
        footer=footer,
    )
    files["report"] = d / "report.html"
    atomic_write_text(files["report"], html_text)
    return files


# --- stability across seeds ----------------------------------------------------------------------


def stability_table(result: StabilityResult) -> pd.DataFrame:
    """One row per factor: the stability columns and, per run, the matched factor
    (``match_run_i``) and its |correlation| (``correlation_run_i``); as in ``factor_stability.csv``."""
    return pd.concat(
        [result.factors, result.matches.add_prefix("match_"), result.correlations.add_prefix("correlation_")],
        axis=1,
    )


def _stability_plain(result: StabilityResult, seeds: Sequence[int]) -> dict:
    f = result.factors
    return {
        "factor": f.index.to_numpy(dtype=str),
        "stability": f["stability"].to_numpy(dtype=np.float64),
        "min_correlation": f["min_correlation"].to_numpy(dtype=np.float64),
        "stable": f["stable"].to_numpy(dtype=bool),
        "threshold": float(f.attrs["threshold"]),
        "seeds": np.asarray(seeds, dtype=np.int64),
    }


# --- the whole workflow ------------------------------------------------------------------------


def check_option(name: str, value, *, flag: str | None = None, **constraint) -> None:
    """``check_number`` for an option of the workflow, named with its command-line flag
    (by default ``--`` and the name with dashes)."""
    check_number(name, value, flag=flag or "--" + name.replace("_", "-"), **constraint)


#: The file that marks a directory as written by run_workflow, with the list of what it holds.
OUTPUT_MARKER = ".ldvae-output.json"
MAX_SEED = 2**32 - 1  # numpy's RandomState (UMAP, Leiden) takes seeds below 2**32


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
    if not os.path.lexists(path):
        return path
    if not overwrite:
        raise FileExistsError(f"Output directory {str(path)!r} already exists. Pass --overwrite (overwrite=True) "
                              "to replace it, or choose another --out-dir.")
    if path.is_symlink():
        _refuse(path, "it is a symbolic link")
    if not path.is_dir():
        raise FileExistsError(f"Output path {str(path)!r} exists and is not a directory.")
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


def _staging_dir(out_dir: Path) -> tuple[Path, list[Path]]:
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
        _remove_empty(made)
        if is_disk_full(err):
            raise DiskFullError(f"No space left on the device holding {parent}; nothing was written. "
                                "Free some space or choose another --out-dir.", parent) from err
        raise OutputError(f"Cannot write the output directory {str(out_dir)!r}: creating a directory in "
                          f"{str(parent)!r} failed ({err.strerror or err}). Choose another --out-dir.") from err
    return staging, made


def _remove_empty(directories: list[Path]) -> None:
    for d in directories:  # deepest first
        with contextlib.suppress(OSError):
            d.rmdir()


def _mark_output(staging: Path) -> None:
    written = sorted(_entries(staging))
    atomic_write_json(staging / OUTPUT_MARKER, {"written_by": f"ldvae {__version__}", "files": written})


def _check_workflow_options(options: dict) -> None:
    """Every numeric option of :func:`run_workflow`, before any work."""
    for name in ("n_top_genes", "n_latent", "max_epochs", "batch_size", "check_val_every_n_epoch"):
        check_option(name, options[name], integer=True, minimum=1)
    check_option("n_neighbors", options["n_neighbors"], integer=True, minimum=2)
    check_option("n_top_loadings", options["n_top_loadings"], integer=True, minimum=1)
    for name in ("target_sum", "lr", "leiden_resolution"):
        check_option(name, options[name], minimum=0, exclusive=True)
    check_option("umap_min_dist", options["umap_min_dist"], minimum=0, maximum=1)  # UMAP's spread is 1
    if options["n_threads"] is not None:
        check_option("n_threads", options["n_threads"], integer=True, minimum=1)
    check_option("stability_seeds", options["stability_seeds"], integer=True, minimum=0)
    check_option("seed", options["seed"], integer=True, minimum=0, maximum=MAX_SEED - options["stability_seeds"])
    if options["n_top_loadings"] > options["n_top_genes"]:
        raise SetupError(f"n_top_loadings={options['n_top_loadings']} is more than the {options['n_top_genes']} "
                         "genes modelled (n_top_genes); ask for at most that many (--n-top-loadings).")
    bad = [f for f in options["figure_formats"] if f not in FIGURE_FORMATS]
    if bad:
        raise SetupError(f"figure_formats: {bad[0]!r} is not one of {FIGURE_FORMATS}.")


def run_workflow(
    adata_or_path,
    *,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    layer: str | None = None,
    backup_url: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
    batch_key: str | None = None,
    target_sum: float = 1e5,
    n_top_genes: int = 1000,
    hvg_flavor: Literal["seurat_v3", "seurat_v3_paper", "seurat", "cell_ranger"] = "seurat_v3",
    n_latent: int = 10,
    gene_likelihood: Literal["nb", "zinb", "poisson"] = "nb",
    max_epochs: int = 250,
    lr: float = 5e-3,
    batch_size: int = 128,
    check_val_every_n_epoch: int = 10,
    seed: int = 0,
    accelerator: str = "auto",
    n_neighbors: int = 20,
    umap_min_dist: float = 0.3,
    leiden_resolution: float = 0.8,
    n_top_loadings: int = 5,
    color_by: Sequence[str] = (),
    figure_formats: Sequence[str] = ("png",),
    title: str | None = None,
    report_sections: Sequence[ReportSection] = (),
    stability_seeds: int = 0,
    n_threads: int | None = None,
    progress_bar: bool = True,
) -> WorkflowResult:
    """The LDVAE tutorial from counts to figures and a report, written into ``out_dir``.

    Parameters
    ----------
    adata_or_path
        An AnnData of raw counts (not modified), or a count file / 10x directory for
        :func:`ldvae.data.readers.read_counts` (with ``backup_url``, ``cache_dir``, ``sha256``).
    out_dir, overwrite
        Output directory; an existing one is replaced only with ``overwrite=True``, and
        only if it is empty or holds nothing but an earlier run's outputs (see
        :func:`check_out_dir`).
    layer
        Where the raw counts are (default ``X``).
    batch_key
        obs column of batches, for HVG selection and the model.
    target_sum, n_top_genes, hvg_flavor
        Preparation (see :func:`prepare`).
    n_latent, gene_likelihood, max_epochs, lr, batch_size, check_val_every_n_epoch, seed, accelerator
        The model and its training (see :class:`ldvae.LinearSCVI`).
    n_neighbors, umap_min_dist, leiden_resolution
        Neighbors graph, UMAP and Leiden clustering on the latent means.
    n_top_loadings
        Genes per direction and factor in the top-genes table and figures.
    color_by
        More obs columns to colour the UMAP (and, the first, the latent pairs) by.
    figure_formats
        ``"png"`` always; add ``"svg"`` and/or ``"pdf"``.
    title
        Report title.
    report_sections
        Extra report sections: ``(title, html)`` pairs, or functions of ``(model, adata)``
        returning one (see :mod:`ldvae.workflow.report`).
    stability_seeds
        Extra fits, with seeds ``seed + 1 … seed + stability_seeds``, whose factors are
        matched to the main model's (:func:`ldvae.factors.stability.factor_stability`, the main
        model as reference). On CPU they run in worker processes (one torch thread each)
        while the main model trains; on a GPU one after another after it. Adds
        ``factor_stability.csv``, a figure, a report section and a ``stability`` column
        to the report's top-genes table. 0: no refits.
    n_threads
        CPU threads for torch during the run (default: as set); restored afterwards.
    progress_bar
        Show the download and training progress bars.

    Returns
    -------
    A :class:`WorkflowResult`. Its ``adata`` holds, besides the prepared data (see
    :func:`prepare`) and the results of :func:`interpret`, ``uns["ldvae_workflow"]``:
    ``settings``, ``data`` (summary), ``history`` (per metric: ``epoch``, ``value``) and,
    with ``stability_seeds``, ``stability`` (``factor``, ``stability``, ``min_correlation``,
    ``stable``, ``threshold``, ``seeds``); the result's ``stability`` attribute holds the
    :class:`~ldvae.factors.stability.StabilityResult`.
    """
    import anndata

    started = time.perf_counter()
    _check_workflow_options(locals())
    inputs = [] if isinstance(adata_or_path, anndata.AnnData) else [adata_or_path, cache_dir]
    out_dir = check_out_dir(out_dir, overwrite, inputs=inputs)
    target = Path(os.path.abspath(out_dir))
    for kind in ("partial", "old"):  # left by runs that were killed
        sweep_stale(target.parent, f".{target.name}.{kind}-")
    staging, made = _staging_dir(out_dir)
    try:
        if isinstance(adata_or_path, anndata.AnnData):
            raw, input_name = adata_or_path, "AnnData in memory"
        else:
            raw = read_counts(adata_or_path, backup_url=backup_url, cache_dir=cache_dir, sha256=sha256,
                              progress_bar=progress_bar)
            input_name = str(adata_or_path) if adata_or_path is not None else str(backup_url)
        missing = [c for c in color_by if c not in raw.obs.columns]
        if missing:
            raise SetupError(f"color_by={missing[0]!r} is not a column of adata.obs "
                             f"(columns: {', '.join(map(repr, raw.obs.columns[:10])) or 'none'}).")
        if raw.n_obs <= n_neighbors:
            raise SetupError(f"n_neighbors={n_neighbors} needs more cells than that; the data has {raw.n_obs}.")

        import torch

        with _torch_threads(n_threads):
            with _keep_torch_threads():
                adata = prepare(raw, layer=layer, target_sum=target_sum, n_top_genes=n_top_genes,
                                hvg_flavor=hvg_flavor, batch_key=batch_key)
            if n_top_loadings > adata.n_vars:
                raise SetupError(f"n_top_loadings={n_top_loadings} is more than the {adata.n_vars} genes "
                                 "selected to model; ask for at most that many (--n-top-loadings).")
            train = dict(max_epochs=max_epochs, lr=lr, batch_size=batch_size,
                         check_val_every_n_epoch=check_val_every_n_epoch, accelerator=accelerator)
            extra_seeds = [seed + i for i in range(1, stability_seeds + 1)]
            background = None
            if extra_seeds and not uses_gpu(accelerator):
                # Started before the main fit so that they run beside it on the other cores.
                LinearSCVI.setup_anndata(adata, layer="counts", batch_key=batch_key)
                background = BackgroundFits(adata, extra_seeds, train_kwargs=train, n_latent=n_latent,
                                            gene_likelihood=gene_likelihood)
            with background or contextlib.nullcontext():
                t0 = time.perf_counter()
                # An explicit n_threads holds for training too (it otherwise picks its own count).
                model = fit(adata, batch_key=batch_key, n_latent=n_latent, gene_likelihood=gene_likelihood,
                            seed=seed, progress_bar=progress_bar, threads=n_threads, **train)
                if model.train_state_.interrupted:  # Ctrl-C: training stopped early, at a step boundary
                    raise KeyboardInterrupt
                train_seconds = time.perf_counter() - t0
                with _keep_torch_threads():
                    interpret(model, adata, n_neighbors=n_neighbors, umap_min_dist=umap_min_dist,
                              leiden_resolution=leiden_resolution, seed=seed)
                stability = None
                if extra_seeds:
                    t0 = time.perf_counter()
                    refits = background.result() if background is not None else fit_seeds(
                        adata, extra_seeds, train_kwargs=train, n_latent=n_latent, gene_likelihood=gene_likelihood)
                    stability = factor_stability([model, *refits], reference=0)
                    logger.info("%d of %d factors reproducible across %d seeds (waited %.1f s for the refits)",
                                int(stability.factors["stable"].sum()), n_latent, stability_seeds + 1,
                                time.perf_counter() - t0)

            hist = model.history
            lib = np.asarray(adata.layers["counts"].sum(axis=1)).ravel()
            raw_lib = np.asarray(get_counts(raw, layer).sum(axis=1)).ravel()
            data = {
                "input": input_name,
                "cells": int(adata.n_obs),
                "genes in input": int(raw.n_vars),
                "highly variable genes modelled": int(adata.n_vars),
                "cells dropped (no counts in the selected genes)": int(raw.n_obs - adata.n_obs),
                "median counts per cell (all genes)": float(np.median(raw_lib)),
                "median counts per cell (modelled genes)": float(np.median(lib)),
                "batches": int(adata.obs[batch_key].nunique()) if batch_key else 1,
                "Leiden clusters": int(adata.obs["leiden"].nunique()),
            }
            if isinstance(raw.uns.get("source"), str):
                data["source"] = raw.uns["source"]
            settings = {
                "counts": f"layers[{layer!r}]" if layer else "X",
                "batch_key": batch_key or "none",
                "target_sum": float(target_sum),
                "hvg_flavor": hvg_flavor,
                "n_top_genes": int(n_top_genes),
                "n_latent": int(n_latent),
                "gene_likelihood": gene_likelihood,
                "max_epochs": int(max_epochs),
                "epochs trained": int(model.train_state_.epoch),
                "lr": float(lr),
                "batch_size": int(batch_size),
                "check_val_every_n_epoch": int(check_val_every_n_epoch),
                "seed": int(seed),
                "device": str(model.device),
                "torch CPU threads": int(torch.get_num_threads()),
                "training time (s)": round(train_seconds, 1),
                "final elbo_train": float(hist["elbo_train"].iloc[-1, 0]) if "elbo_train" in hist else float("nan"),
                "final elbo_validation": float(hist["elbo_validation"].iloc[-1, 0]) if "elbo_validation" in hist
                else float("nan"),
                "stability_seeds": int(stability_seeds),
                "n_neighbors": int(n_neighbors),
                "umap_min_dist": float(umap_min_dist),
                "leiden_resolution": float(leiden_resolution),
                "ldvae version": __version__,
            }
            adata.uns[WORKFLOW_KEY] = {"settings": settings, "data": data, "history": _history_plain(hist)}
            if stability is not None:
                adata.uns[WORKFLOW_KEY]["stability"] = _stability_plain(stability, [seed, *extra_seeds])
            if isinstance(raw.uns.get("source"), dict):
                adata.uns["source"] = dict(raw.uns["source"])
        staged = write_outputs(model, adata, staging, n_top_loadings=n_top_loadings, color_by=list(color_by),
                               figure_formats=figure_formats, title=title or f"LDVAE report: {input_name}",
                               report_sections=report_sections, stability=stability)
        _mark_output(staging)
        _move_into_place(staging, out_dir, overwrite, inputs)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(made)
        if is_disk_full(err):
            name = err.path.name if isinstance(err, DiskFullError) else "the outputs"
            raise DiskFullError(f"No space left on the device holding {str(out_dir)!r} while writing {name}; "
                                "nothing was written. Free some space or choose another --out-dir.",
                                target) from err
        raise
    files = {k: out_dir / v.relative_to(staging) for k, v in staged.items()}
    logger.info("workflow finished in %.1f s; report: %s", time.perf_counter() - started, files["report"])
    return WorkflowResult(model=model, adata=adata, out_dir=out_dir, files=files,
                          top_genes=top_genes(loadings_frame(adata), n_top_loadings), stability=stability)


def _move_into_place(staging: Path, out_dir: Path, overwrite: bool, inputs: Sequence = ()) -> None:
    """Rename the finished staging directory to ``out_dir``; an old one (checked again, as it
    may have changed during the run) is moved aside first and removed only after."""
    if not os.path.lexists(out_dir):
        os.replace(staging, out_dir)
        return
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
