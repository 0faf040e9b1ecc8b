"""``ldvae map``: put the cells of a new dataset into a trained model's factor space.

A thin layer over :meth:`ldvae.LinearSCVI.prepare_query_anndata` and
:meth:`ldvae.LinearSCVI.load_query_data`; writes the query's results, the query model, a
UMAP of reference and query cells together, and a report into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from .interpret import _check_model_dir, _check_out_dir, _load_model, _save_figure, _staged, _write, _write_report
from .options import HelpFormatter, add_accelerator, add_lr, add_max_epochs, add_out_dir, add_overwrite, add_seed

logger = logging.getLogger(__name__)


def add_map(subparsers) -> None:
    p = subparsers.add_parser(
        "map", help="map the cells of a new dataset onto a trained model (its factors unchanged)",
        formatter_class=HelpFormatter,
        description="Align QUERY's genes to the model's, add its new batches, fit only their decoder columns (and,\n"
                    "unless --frozen-encoder, the encoders) and write results.h5ad (the query's factor values),\n"
                    "query_latent.csv, the query model, umap_reference_query.png and report.html into --out-dir.",
    )
    p.add_argument("model_dir", help="directory of the reference model (e.g. OUT/model of `ldvae run`)")
    p.add_argument("query", help=".h5ad (or another format `ldvae run` reads) of the new cells' raw counts")
    p.add_argument("--reference-adata", default=None,
                   help="the reference's cells (default: adata.h5ad saved with the model, else results.h5ad "
                        "beside the model directory)")
    p.add_argument("--layer", default=None,
                   help="layer of QUERY holding its raw counts (default: the reference's layer where QUERY has "
                        "it, else X)")
    p.add_argument("--query-batch", default="query",
                   help="batch of every query cell when QUERY lacks the reference's batch column")
    add_out_dir(p)
    add_overwrite(p)
    add_max_epochs(p, default=30)
    add_lr(p)
    p.add_argument("--frozen-encoder", action="store_true",
                   help="keep the reference's encoders (fit only the new batches' decoder columns)")
    add_seed(p, help="random seed (training, UMAP)")
    add_accelerator(p)
    p.add_argument("--color-by", nargs="+", default=[], help="obs columns to colour the UMAP by, besides dataset "
                                                            "and batch")
    p.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(handler=_handle_map)


def _reference_cells(model_dir: Path, path: str | None) -> str:
    """Where the reference's cells are: --reference-adata, the AnnData saved with the model, or
    results.h5ad beside the model directory (``ldvae run``'s layout)."""
    candidates = [Path(path)] if path else [model_dir / "adata.h5ad", model_dir.parent / "results.h5ad"]
    for c in candidates:
        if c.exists():
            return str(c)
    raise FileNotFoundError(f"No reference cells found ({', '.join(map(str, candidates))}); pass --reference-adata.")


def _query(path: str, setup: dict, query_batch: str, source: str | None = None):
    """The query's cells, with their raw counts (``source``: a layer of the file, default the
    reference's layer where the file has it, else X) where the reference's setup reads them."""
    from ..data.contract import get_counts
    from ..data.readers import read_counts

    q = read_counts(path, progress_bar=False)
    layer = setup.get("layer")
    if source is not None or (layer is not None and layer not in q.layers):
        counts = get_counts(q, source)  # names the layers there are when --layer is not one
        if layer is None:
            q.X = counts
        else:
            q.layers[layer] = counts  # checked when the query is set up
    key = setup.get("batch_key")
    if key is not None and key not in q.obs.columns:
        q.obs[key] = query_batch
    return q


def _handle_map(args: argparse.Namespace) -> int:
    from ..model import LinearSCVI
    from ..model.mapping import fits_anything
    from ..util.io import write_h5ad
    from ..util.settings import settings
    from ..workflow.report import figure_html, note_html, table_html

    began = time.perf_counter()
    inputs = [args.model_dir, args.reference_adata, args.query]
    d = _check_out_dir(args.out_dir, args.overwrite, inputs)
    settings.seed = args.seed
    model_dir = _check_model_dir(args.model_dir)
    reference = _load_model(str(model_dir), _reference_cells(model_dir, args.reference_adata), args.accelerator)
    query = LinearSCVI.prepare_query_anndata(_query(args.query, reference.setup_, args.query_batch, args.layer),
                                             reference)
    missing = [c for c in args.color_by if c not in reference.adata.obs and c not in query.obs]
    if missing:
        raise ValueError(f"--color-by {missing[0]!r} is a column of neither the reference's nor the query's obs.")
    model = LinearSCVI.load_query_data(query, reference, train_encoder=not args.frozen_encoder,
                                       accelerator=args.accelerator)
    free = fits_anything(model.module, model.frozen_)  # else the reference's encoder maps the cells as is
    start = time.perf_counter()
    if free:
        model.train(args.max_epochs, plan_kwargs={"lr": args.lr}, progress_bar=args.progress_bar)
    seconds = time.perf_counter() - start
    new = [c for c in model.setup_.get("batch_categories", []) if c not in reference.setup_.get("batch_categories", [])]
    summary = {"reference cells": reference.adata.n_obs, "query cells": query.n_obs, "new batches": ", ".join(new)
               or "none", "genes": len(model.var_names_), "reference model": str(model_dir)}
    parts = (["the decoder's columns of the new batches"] if new else []) + ([] if args.frozen_encoder else ["the encoders"])
    fitted = (f"Fitted {args.max_epochs} epochs in {seconds:.1f} s on the query cells only: {' and '.join(parts)}; "
              "batch norm ran on the reference's statistics." if free else "The query adds no batch: its cells are "
              "mapped by the reference's encoder as they are, nothing was fitted.")
    fitted += (" The factor loadings, gene intercepts and the reference's batch effects are the reference's, "
               "unchanged, so the factors keep their meaning.")
    batch_key = [reference.setup_["batch_key"]] if "batch_key" in reference.setup_ else []
    with _staged(d, args.overwrite, inputs) as s:
        model.write_results(query, obs_columns=True)
        named = _reference_factors(reference, query)
        write_h5ad(query, s / "results.h5ad", compression="gzip")
        model.save(s / "model", overwrite=True)
        _write(s, "query_latent.csv", query.obs[[f"Z_{i}" for i in range(model.n_latent)] + named])
        together = _together(reference, model, args.color_by)
        logger.info("a UMAP of the %d reference and query cells together ...", together.n_obs)
        _save_figure(_umap(together, list(dict.fromkeys([SIDE, *batch_key, *args.color_by]))), s,
                     "umap_reference_query.png")
        counts = together.obs[SIDE].value_counts().rename_axis(SIDE).reset_index(name="cells")
        section = ("Reference and query", note_html(fitted) + table_html(counts)
                   + figure_html(s / "umap_reference_query.png",
                                 "UMAP of the factor values of reference and query cells."))
        _write_report(s, f"LDVAE mapping: {Path(args.query).name} onto {model_dir.name}", summary,
                      {"max_epochs": args.max_epochs, "lr": args.lr, "frozen_encoder": args.frozen_encoder,
                       "seed": args.seed}, [section])
    print(f"Mapped {query.n_obs} cells onto {model_dir} in {time.perf_counter() - began:.1f} s "
          f"({seconds:.1f} s fitting); report: {d / 'report.html'}")
    return 0


def _reference_factors(reference, query) -> list[str]:
    """The reference's factors F_k for the query cells, where the reference's AnnData holds
    them (``ldvae run``'s results): its main fit's rotation onto them (``uns["ldvae_factors"]
    ["rotation"]``) applied to the query's latent (``obsm["X_ldvae"]``, from ``write_results``).
    On the reference cells these follow the consensus F_k, an average over fits, closely
    (correlation 0.95-0.99 on the demo).
    Writes ``obsm["X_ldvae_factors"]`` and ``obs["F_k"]``; returns the names (none without them)."""
    from ..data.results import set_obs_columns

    record = reference.adata.uns.get("ldvae_factors")
    if not isinstance(record, dict) or "rotation" not in record:
        return []
    names = [str(n) for n in record["names"]]
    values = (np.asarray(query.obsm["X_ldvae"]) @ np.asarray(record["rotation"])).astype(np.float32)
    query.obsm["X_ldvae_factors"] = values
    set_obs_columns(query, {name: values[:, k] for k, name in enumerate(names)})
    return names


SIDE = "reference or query"  # the column of the joint UMAP that tells the two apart


def _together(reference, query_model, color_by: list[str]):
    """Reference and query cells with their factor values, for one UMAP."""
    import anndata
    import pandas as pd

    parts = []
    for name, m in (("reference", reference), ("query", query_model)):
        obs = pd.DataFrame({SIDE: name}, index=m.adata.obs_names.astype(str) + f"-{name}")
        for col in [reference.setup_.get("batch_key"), *color_by]:
            if col is not None and col != SIDE:
                values = m.adata.obs[col] if col in m.adata.obs else pd.Series(np.nan, index=m.adata.obs_names)
                obs[col] = np.where(values.isna(), None, values.astype(str))  # no label: drawn as such, in grey
        parts.append(anndata.AnnData(obs=obs, obsm={"X_ldvae": np.asarray(m.get_latent_representation())}))
    return anndata.concat(parts)


def _umap(adata, color: list[str]):
    import scanpy as sc

    from ..workflow.plotting import umap

    sc.pp.neighbors(adata, use_rep="X_ldvae", n_neighbors=20)
    sc.tl.umap(adata, min_dist=0.3)
    return umap(adata, color=color)
