"""The tutorial workflow as one function: read → prepare → fit → interpret → show → write.

:func:`run_workflow` is what ``ldvae run`` and ``ldvae demo`` call. Its steps are
public functions too (:func:`prepare`, :func:`fit`, :func:`interpret`,
:func:`write_outputs`), so a notebook can run them one by one.

The output directory is written as :mod:`ldvae.workflow.outputs` describes: nothing is
left at ``out_dir`` by a failed or interrupted run, and an existing one is replaced only
with ``overwrite=True`` and only if it holds nothing but an earlier run's outputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence, Union

import numpy as np
import pandas as pd

from ..data.contract import SetupError
from ..data.readers import read_counts
from ..data.results import result_keys
from ..data.setup import setup_anndata
from ..factors.consensus import ConsensusFactors, consensus_factors, write_factors
from ..factors.seeds import SPLIT_SEED, BackgroundFits, fit_seeds, uses_gpu
from ..factors.stability import StabilityResult, factor_stability
from ..model import LinearSCVI
from ..util.io import atomic_path, atomic_write_h5ad, atomic_write_text
from ..util.settings import usable_cpus
# FIGURE_FORMATS, MAX_SEED, check_option, OUTPUT_MARKER and MIN_VARYING_GENES are also read from here.
from .checks import FACTOR_SEEDS, FIGURE_FORMATS, MAX_SEED, START, check_option, check_workflow_options, refit_seeds  # noqa: F401
from .outputs import OUTPUT_MARKER, check_out_dir, staged  # noqa: F401
from .plotting import (
    category_palette,
    latent_pairs,
    loadings_frame,
    loadings_heatmap,
    top_genes,
    top_genes_bars,
    training_curves,
    umap,
)
from .prepare import MIN_VARYING_GENES, prepare  # noqa: F401
from .report import build_report
from .summary import WORKFLOW_KEY, record_run, stability_table

logger = logging.getLogger(__name__)

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
    factors: ConsensusFactors | None = None

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
    split_seed: int = SPLIT_SEED,
    accelerator: str = "auto",
    progress_bar: bool = True,
    threads: int | None = None,
    init: Literal["random", "pca"] = START,
) -> LinearSCVI:
    """``setup_anndata(adata, layer="counts", batch_key=...)``, then a trained ``LinearSCVI``
    (``threads``: torch CPU threads while training; ``init``: where the fit starts, by default
    the principal components of the counts; ``split_seed``: the seed of the held-out cells,
    the same whatever ``seed``; see :meth:`LinearSCVI.train`).

    Writes ``adata.uns["ldvae_setup"]`` only (:func:`ldvae.data.setup.setup_anndata`: no
    scvi-tools code columns).
    """
    setup_anndata(adata, layer="counts", batch_key=batch_key)
    model = LinearSCVI(adata, n_latent=n_latent, gene_likelihood=gene_likelihood)
    model.train(
        max_epochs=max_epochs,
        lr=lr,
        batch_size=batch_size,
        check_val_every_n_epoch=check_val_every_n_epoch,
        accelerator=accelerator,
        seed=seed,
        split_seed=split_seed,
        progress_bar=progress_bar,
        threads=threads,
        init=init,
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


def _is_grouping(column) -> bool:
    """Whether an obs column sorts cells into groups (labels), not a measurement per cell."""
    return not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column) or column.nunique() <= 50


def format_factors(factors: ConsensusFactors, n_genes: int = 6) -> str:
    """The reproducible factors as printed lines: share, reproducibility and top genes (by score) of each."""
    t = factors.table
    genes = factors.top_genes(n_genes)
    assessed = (f"{int(t['reproducible'].sum())} of {len(t)} reproducible" if factors.n_runs > 1
                else "reproducibility not assessed: it needs more than one fit")
    lines = [f"Factors ({factors.n_runs} fit(s); {assessed}), by deviance explained; top genes by score"]
    for f, row in t.iterrows():
        repro = "" if np.isnan(row["consensus_reproducibility"]) else (
            f"reproducibility {row['consensus_reproducibility']:.3f} (one fit {row['reproducibility']:.3f})")
        top = ", ".join(genes[(genes["factor"] == f) & (genes["direction"] == "+")]["gene"])
        lines.append(f"{f}\tshare {row['fraction_of_model']:.3f}  {repro}{' *' if row['reproducible'] else ''}\t{top}")
    return "\n".join(lines)


# --- write ----------------------------------------------------------------------------------------


def _save_figure(fig, directory: Path, name: str, formats: Sequence[str]) -> dict[str, Path]:
    paths = {}
    for fmt in formats:
        path = directory / f"{name}.{fmt}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=110 if fmt == "png" else None)
        paths[f"{name}.{fmt}"] = path
    return paths


def _write_figures(model: LinearSCVI, adata, fig_dir: Path, files: dict[str, Path], *, n_top_loadings: int,
                   color_by: Sequence[str], formats: Sequence[str]) -> list[tuple[str, Path]]:
    """The workflow's figures in ``fig_dir`` (added to ``files``); returns (caption, PNG path) pairs."""
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
         umap(adata, color=list(loadings_frame(adata).columns), ncols=4)),
    ]
    embedded = []
    for name, caption, fig in figures:
        paths = _save_figure(fig, fig_dir, name, formats)
        files.update({f"figures/{k}": v for k, v in paths.items()})
        embedded.append((caption, paths[f"{name}.png"]))
    return embedded


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
    factors: ConsensusFactors | None = None,
) -> dict[str, Path]:
    """Write every output file of the workflow into ``directory`` (which may exist).

    Files: ``results.h5ad``, ``loadings.csv`` (genes × Z_i), ``top_genes.csv``,
    ``model/`` (:meth:`LinearSCVI.save`), ``figures/<name>.png`` (and SVG/PDF on request)
    and ``report.html`` (figures embedded). ``adata`` must hold the results of :func:`interpret`
    and ``adata.uns["ldvae_workflow"]`` the settings and data summary. With ``stability``
    (:func:`ldvae.factors.stability.factor_stability` of this model, as reference, and refits), also
    ``factor_stability.csv``, ``figures/factor_stability.png``, a stability section and a
    stability column in the report's top-genes table. With ``factors``
    (:func:`ldvae.factors.consensus.consensus_factors`, written into ``adata`` by
    :func:`~ldvae.factors.consensus.write_factors`), also ``factors.csv`` (one row per factor),
    ``factor_genes.csv`` (top 10 genes per factor and side, score and loading),
    ``figures/umap_reproducible_factors.png`` and the report's first section after the figures.

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
    embedded = _write_figures(model, adata, d / "figures", files, n_top_loadings=n_top_loadings,
                              color_by=color_by, formats=formats)
    for key in dict.fromkeys(["leiden", *color_by]):  # scanpy's plots of results.h5ad in the report's colours
        palette = category_palette(adata.obs[key]) if key in adata.obs else None
        if palette is not None:
            adata.uns[f"{key}_colors"] = palette
    stability_sections, summary = [], ""
    if factors is not None:
        from .interpret_report import factor_titles, factors_section, factors_table, summary_html

        # the first column that sorts cells into groups: a number per cell marks nothing
        group_key = next((c for c in color_by if _is_grouping(adata.obs[c])), "leiden")
        groups = adata.obs[group_key] if group_key in adata.obs else None
        files["factors.csv"] = d / "factors.csv"
        ftable = factors_table(factors, groups, n_genes=n_top_loadings)
        atomic_write_text(files["factors.csv"], ftable.to_csv(index=False))
        summary = summary_html(adata.n_obs, adata.n_vars, factors, ftable)
        files["factor_genes.csv"] = d / "factor_genes.csv"
        atomic_write_text(files["factor_genes.csv"], factors.top_genes(10).to_csv(index=False))
        paths = _save_figure(umap(adata, color=list(factors.table.index), ncols=4, titles=factor_titles(ftable)),
                             d / "figures", "umap_reproducible_factors", formats)
        files.update({f"figures/{k}": v for k, v in paths.items()})
        stability_sections.append(factors_section(factors, groups, group_name=group_key,
                                                  figure=paths["umap_reproducible_factors.png"], n_genes=n_top_loadings))
    if stability is not None:
        from .interpret_report import stability_section
        from ..factors.stability import plot_stability

        files["factor_stability.csv"] = d / "factor_stability.csv"
        atomic_write_text(files["factor_stability.csv"], stability_table(stability).to_csv())
        paths = _save_figure(plot_stability(stability), d / "figures", "factor_stability", formats)
        files.update({f"figures/{k}": v for k, v in paths.items()})
        stability_sections.append(stability_section(stability, figure=paths["factor_stability.png"]))

    model.save(d / "model", overwrite=True)
    files["model"] = d / "model"
    files["results.h5ad"] = d / "results.h5ad"
    atomic_write_h5ad(adata, files["results.h5ad"], compression="gzip")  # raw (all genes) and counts are integers: they compress well

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
        summary=summary,
    )
    files["report"] = d / "report.html"
    atomic_write_text(files["report"], html_text)
    return files


# --- the whole workflow ------------------------------------------------------------------------


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
    split_seed: int = SPLIT_SEED,
    accelerator: str = "auto",
    n_neighbors: int = 20,
    umap_min_dist: float = 0.3,
    leiden_resolution: float = 0.8,
    n_top_loadings: int = 5,
    color_by: Sequence[str] = (),
    figure_formats: Sequence[str] = ("png",),
    title: str | None = None,
    report_sections: Sequence[ReportSection] = (),
    stability_seeds: int = FACTOR_SEEDS,
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
    split_seed
        Seed of the validation cells, shared by every fit (the main one and the refits):
        analyses run with other seeds hold out the same cells, so their factors differ only
        by the fits' own randomness (minibatch order, sampling).
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
        Extra fits, with seeds drawn from ``seed`` (:func:`~ldvae.workflow.checks.refit_seeds`:
        analyses with different seeds share no fit). The reproducible
        factors ``F_k`` are the consensus of all fits
        (:func:`ldvae.factors.consensus.consensus_factors`, main model first), and the model's
        own factors are matched to the refits' (:func:`ldvae.factors.stability.factor_stability`,
        the main model as reference). On CPU they run in worker processes (one torch thread
        each) while the main model trains; on a GPU one after another after it. Adds
        ``factor_stability.csv``, a figure, a report section and a ``stability`` column
        to the report's top-genes table. 0: no refits (the factors are then the main
        model's, rotated, without reproducibility).
    n_threads
        CPU threads for torch during the run (default: as set); restored afterwards.
    progress_bar
        Show the download and training progress bars.

    Returns
    -------
    A :class:`WorkflowResult`. Its ``adata`` holds, besides the prepared data (see
    :func:`prepare`) and the results of :func:`interpret`, the factors (see
    :func:`~ldvae.factors.consensus.write_factors`: ``obsm["X_ldvae_factors"]``, ``obs["F_k"]``,
    ``varm["ldvae_factor_loadings"]``, ``varm["ldvae_factor_scores"]``,
    ``uns["ldvae_factors"]``), ``uns["ldvae_workflow"]``:
    ``settings``, ``data`` (summary), ``history`` (per metric: ``epoch``, ``value``) and,
    with ``stability_seeds``, ``stability`` (``factor``, ``stability``, ``min_correlation``,
    ``stable``, ``threshold``, ``seeds``); the result's ``stability`` attribute holds the
    :class:`~ldvae.factors.stability.StabilityResult`.
    """
    import anndata

    started = time.perf_counter()
    options = dict(locals())
    check_workflow_options(options)
    inputs = [] if isinstance(adata_or_path, anndata.AnnData) else [adata_or_path, cache_dir]
    out_dir = check_out_dir(out_dir, overwrite, inputs=inputs)
    with staged(out_dir, overwrite, inputs) as staging:
        raw, input_name = _read_input(adata_or_path, options)
        with _torch_threads(n_threads):
            with _keep_torch_threads():
                adata = prepare(raw, layer=layer, target_sum=target_sum, n_top_genes=n_top_genes,
                                hvg_flavor=hvg_flavor, batch_key=batch_key)
            if n_top_loadings > adata.n_vars:
                raise SetupError(f"n_top_loadings={n_top_loadings} is more than the {adata.n_vars} genes "
                                 "selected to model; ask for at most that many (--n-top-loadings).")
            model, stability, factors, train_seconds = _fit_and_interpret(adata, options)
            record_run(raw, adata, model, stability, options, input_name=input_name, train_seconds=train_seconds,
                       analysis_seconds=time.perf_counter() - started)
        staged_files = write_outputs(model, adata, staging, n_top_loadings=n_top_loadings, color_by=list(color_by),
                                     figure_formats=figure_formats, title=title or f"LDVAE report: {Path(input_name).name or input_name}",
                                     report_sections=report_sections, stability=stability, factors=factors)
    files = {k: out_dir / v.relative_to(staging) for k, v in staged_files.items()}
    logger.info("workflow finished in %.1f s; report: %s", time.perf_counter() - started, files["report"])
    return WorkflowResult(model=model, adata=adata, out_dir=out_dir, files=files,
                          top_genes=top_genes(loadings_frame(adata), n_top_loadings), stability=stability,
                          factors=factors)


def _read_input(adata_or_path, options: dict):
    """The raw counts and a name for them, with the options that depend on them checked."""
    import anndata

    if isinstance(adata_or_path, anndata.AnnData):
        raw, input_name = adata_or_path, "AnnData in memory"
    else:
        raw = read_counts(adata_or_path, backup_url=options["backup_url"], cache_dir=options["cache_dir"],
                          sha256=options["sha256"], progress_bar=options["progress_bar"])
        input_name = str(adata_or_path) if adata_or_path is not None else str(options["backup_url"])
    missing = [c for c in options["color_by"] if c not in raw.obs.columns]
    if missing:
        raise SetupError(f"color_by={missing[0]!r} is not a column of adata.obs "
                         f"(columns: {', '.join(map(repr, raw.obs.columns[:10])) or 'none'}).")
    if raw.n_obs == 0 or raw.n_vars == 0:
        raise SetupError(f"{input_name} holds no counts to model: {raw.n_obs} cells x {raw.n_vars} genes.")
    if raw.n_obs <= options["n_neighbors"]:
        raise SetupError(f"n_neighbors={options['n_neighbors']} (--n-neighbors) needs more cells than that; the data "
                         f"has {raw.n_obs}. Pass a smaller --n-neighbors, or more cells.")
    return raw, input_name


def _fit_and_interpret(adata, options: dict):
    """The main fit, its interpretation and, with ``stability_seeds``, the refits matched to
    it and the consensus factors of all fits: ``(model, stability or None, factors, training seconds)``."""
    o = options
    train = dict(max_epochs=o["max_epochs"], lr=o["lr"], batch_size=o["batch_size"],
                 check_val_every_n_epoch=o["check_val_every_n_epoch"], accelerator=o["accelerator"], init=START,
                 split_seed=o["split_seed"])
    model_kwargs = dict(n_latent=o["n_latent"], gene_likelihood=o["gene_likelihood"])
    extra_seeds = refit_seeds(o["seed"], o["stability_seeds"])
    background = None
    if extra_seeds and not uses_gpu(o["accelerator"]):
        # Started before the main fit so that they run beside it on the other cores.
        setup_anndata(adata, layer="counts", batch_key=o["batch_key"])
        background = BackgroundFits(adata, extra_seeds, train_kwargs=train, **model_kwargs)
    with background or contextlib.nullcontext():
        t0 = time.perf_counter()
        # An explicit n_threads holds for training too; otherwise, beside the refits' workers
        # (one thread each), the main fit takes the CPUs they leave.
        threads = o["n_threads"]
        if threads is None and background is not None:
            threads = max(1, usable_cpus() - len(extra_seeds))
        model = fit(adata, batch_key=o["batch_key"], seed=o["seed"], progress_bar=o["progress_bar"],
                    threads=threads, **model_kwargs, **train)
        if model.train_state_.interrupted:  # Ctrl-C: training stopped early, at a step boundary
            raise KeyboardInterrupt
        train_seconds = time.perf_counter() - t0
        with _keep_torch_threads():
            interpret(model, adata, n_neighbors=o["n_neighbors"], umap_min_dist=o["umap_min_dist"],
                      leiden_resolution=o["leiden_resolution"], seed=o["seed"])
        stability, runs = None, [model]
        if extra_seeds:
            t0 = time.perf_counter()
            refits = background.result() if background is not None else fit_seeds(
                adata, extra_seeds, train_kwargs=train, **model_kwargs)
            stability = factor_stability([model, *refits], reference=0)
            runs += refits
            logger.info("the model's own factors (Z_i): %d of %d come back across %d seeds (waited %.1f s for the "
                        "refits)", int(stability.factors["stable"].sum()), o["n_latent"], o["stability_seeds"] + 1,
                        time.perf_counter() - t0)
        factors = consensus_factors(runs, seed=o["seed"])  # logs how many of its factors are reproducible
        write_factors(adata, factors, obs_columns=True)
    return model, stability, factors, train_seconds
