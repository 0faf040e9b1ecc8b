"""The tutorial recipe with scvi-tools ``LinearSCVI``; run by bench/compare_scvi.py with the
benchmark environment's python (.bench-venv), never imported by ldvae. Prints one JSON line.

    .bench-venv/bin/python bench/_scvi_recipe.py --epochs 250
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
import warnings

import numpy as np

from _common import load_tutorial_hvg, peak_rss_mib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-val-every", type=int, default=10)
    ap.add_argument("--train-size", type=float, default=0.9)
    ap.add_argument("--h5ad", default=None, help="train on this file's layers['counts'] instead")
    ap.add_argument("--save-validation", default=None, help="write the validation indices (.npy)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import scvi
    import torch

    scvi.settings.seed = args.seed
    scvi.settings.verbosity = logging.ERROR
    if args.h5ad:
        import anndata as ad

        adata = ad.read_h5ad(args.h5ad)
    else:
        adata = load_tutorial_hvg()
    scvi.model.LinearSCVI.setup_anndata(adata, layer="counts")
    model = scvi.model.LinearSCVI(adata, n_latent=10)
    t0, c0 = time.perf_counter(), time.process_time()
    model.train(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        plan_kwargs={"lr": args.lr},
        check_val_every_n_epoch=args.check_val_every,
        train_size=args.train_size,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    val = np.asarray(model.validation_indices)
    if args.save_validation:
        np.save(args.save_validation, val)
    hist = model.history
    res = {
        "package": "scvi-tools",
        "version": scvi.__version__,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "threads": torch.get_num_threads(),
        "train_wall_s": wall,
        "train_cpu_s": cpu,
        "peak_rss_mib": peak_rss_mib(),
        "elbo_validation": float(hist["elbo_validation"].iloc[-1, 0]) if "elbo_validation" in hist else None,
        "s_per_epoch": wall / args.epochs,
        "cpu_s_per_epoch": cpu / args.epochs,
        "n_cells": int(adata.n_obs),
        "elbo_train": float(hist["elbo_train"].iloc[-1, 0]) if "elbo_train" in hist else None,
        "history_keys": sorted(hist),
        "n_validation": int(len(val)),
        "validation_sha1": hashlib.sha1(np.sort(val).tobytes()).hexdigest(),
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
