"""What a workflow run records about itself in ``adata.uns["ldvae_workflow"]``: settings,
a data summary, the training history and the stability of its factors."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .._version import __version__
from ..data.contract import get_counts
from ..factors.stability import StabilityResult
from .checks import START, refit_seeds

WORKFLOW_KEY = "ldvae_workflow"


def history_plain(history: dict[str, pd.DataFrame]) -> dict:
    """The training history as plain arrays per metric (``epoch``, ``value``), for ``uns``."""
    return {
        k: {"epoch": v.index.to_numpy(dtype=np.int64), "value": v.iloc[:, 0].to_numpy(dtype=np.float64)}
        for k, v in history.items()
    }


def stability_table(result: StabilityResult) -> pd.DataFrame:
    """One row per factor: the stability columns and, per run, the matched factor
    (``match_run_i``) and its |correlation| (``correlation_run_i``); as in ``factor_stability.csv``."""
    return pd.concat(
        [result.factors, result.matches.add_prefix("match_"), result.correlations.add_prefix("correlation_")],
        axis=1,
    )


def stability_plain(result: StabilityResult, seeds: Sequence[int]) -> dict:
    """The per-factor stability as plain arrays, for ``uns``."""
    f = result.factors
    return {
        "factor": f.index.to_numpy(dtype=str),
        "stability": f["stability"].to_numpy(dtype=np.float64),
        "min_correlation": f["min_correlation"].to_numpy(dtype=np.float64),
        "stable": f["stable"].to_numpy(dtype=bool),
        "threshold": float(f.attrs["threshold"]),
        "seeds": np.asarray(seeds, dtype=np.int64),
    }


def record_run(raw, adata, model, stability, options: dict, *, input_name: str, train_seconds: float,
               analysis_seconds: float) -> None:
    """``adata.uns["ldvae_workflow"]``: the run's settings, a data summary, the history and
    the stability of its factors."""
    import torch

    o = options
    hist = model.history
    lib = np.asarray(adata.layers["counts"].sum(axis=1)).ravel()
    raw_lib = np.asarray(get_counts(raw, o["layer"]).sum(axis=1)).ravel()
    data = {
        "input": input_name,
        "cells": int(adata.n_obs),
        "genes in input": int(raw.n_vars),
        "highly variable genes modelled": int(adata.n_vars),
        "cells dropped (no counts in the selected genes)": int(raw.n_obs - adata.n_obs),
        "median counts per cell (all genes)": float(np.median(raw_lib)),
        "median counts per cell (modelled genes)": float(np.median(lib)),
        "batches": int(adata.obs[o["batch_key"]].nunique()) if o["batch_key"] else 1,
        "Leiden clusters": int(adata.obs["leiden"].nunique()),
    }
    if isinstance(raw.uns.get("source"), str):
        data["source"] = raw.uns["source"]
    settings = {
        "counts": f"layers[{o['layer']!r}]" if o["layer"] else "X",
        "batch_key": o["batch_key"] or "none",
        "target_sum": float(o["target_sum"]),
        "hvg_flavor": o["hvg_flavor"],
        "n_top_genes": int(o["n_top_genes"]),
        "n_latent": int(o["n_latent"]),
        "gene_likelihood": o["gene_likelihood"],
        "max_epochs": int(o["max_epochs"]),
        "epochs trained": int(model.train_state_.epoch),
        "lr": float(o["lr"]),
        "batch_size": int(o["batch_size"]),
        "check_val_every_n_epoch": int(o["check_val_every_n_epoch"]),
        "seed": int(o["seed"]),
        "split_seed": int(o["split_seed"]),
        "init": START,
        "device": str(model.device),
        "torch CPU threads": int(torch.get_num_threads()),
        "training time (s)": round(train_seconds, 1),
        "analysis time, reading to clusters (s)": round(analysis_seconds, 1),
        "final elbo_train (negative ELBO per cell, lower is better)":
            float(hist["elbo_train"].iloc[-1, 0]) if "elbo_train" in hist else float("nan"),
        "final elbo_validation (the same, held-out cells)":
            float(hist["elbo_validation"].iloc[-1, 0]) if "elbo_validation" in hist else float("nan"),
        "stability_seeds": int(o["stability_seeds"]),
        "n_neighbors": int(o["n_neighbors"]),
        "umap_min_dist": float(o["umap_min_dist"]),
        "leiden_resolution": float(o["leiden_resolution"]),
        "ldvae version": __version__,
    }
    adata.uns[WORKFLOW_KEY] = {"settings": settings, "data": data, "history": history_plain(hist)}
    if stability is not None:
        seeds = [o["seed"], *refit_seeds(o["seed"], o["stability_seeds"])]
        adata.uns[WORKFLOW_KEY]["stability"] = stability_plain(stability, seeds)
    if isinstance(raw.uns.get("source"), dict):
        adata.uns["source"] = dict(raw.uns["source"])
