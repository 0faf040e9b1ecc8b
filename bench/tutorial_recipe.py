"""The LDVAE tutorial recipe with ldvae, timed.

    .venv/bin/python bench/tutorial_recipe.py            # 250 epochs, batch 128, lr 5e-3
    .venv/bin/python bench/tutorial_recipe.py --epochs 20 --json

Data: ../shared/data/pbmc_5batch_8k.h5ad (10x Genomics PBMC sets, CC BY 4.0). Raw counts
go to ``layers["counts"]``; X is normalize_total(1e5) + log1p; 1000 seurat_v3 HVGs are
chosen on the counts. Then, as in the tutorial: ``LinearSCVI(adata, n_latent=10)``,
``train(max_epochs=250, plan_kwargs={"lr": 5e-3}, check_val_every_n_epoch=10)``.
Prints the final validation ELBO, the training wall time and the peak RSS of this process.
``bench/compare_scvi.py`` runs this script and its scvi-tools twin side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import numpy as np

from _common import load_tutorial_hvg, peak_rss_mib, step_threads


def run(epochs: int, batch_size: int, lr: float, seed: int, val_every: int, **train_kwargs) -> dict:
    import torch

    import ldvae

    adata = load_tutorial_hvg()
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    model = ldvae.LinearSCVI(adata, n_latent=10)
    t0, c0 = time.perf_counter(), time.process_time()
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        plan_kwargs={"lr": lr},
        check_val_every_n_epoch=val_every,
        seed=seed,
        progress_bar=False,
        **train_kwargs,
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "package": "ldvae",
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "threads": torch.get_num_threads(),
        "step_threads": step_threads(batch_size),
        "train_wall_s": wall,
        "train_cpu_s": cpu,
        "peak_rss_mib": peak_rss_mib(),
        "elbo_validation": float(model.history["elbo_validation"].iloc[-1, 0]),
        "elbo_train": float(model.history["elbo_train"].iloc[-1, 0]),
        "n_validation": int(len(model.validation_indices_)),
        "validation_sha1": hashlib.sha1(np.sort(np.asarray(model.validation_indices_)).tobytes()).hexdigest(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="The LDVAE tutorial recipe with ldvae, timed.")
    ap.add_argument("--epochs", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-val-every", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a summary")
    args = ap.parse_args()
    res = run(args.epochs, args.batch_size, args.lr, args.seed, args.check_val_every)
    if args.json:
        print(json.dumps(res))
        return
    print(
        f"ldvae tutorial recipe: {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}\n"
        f"  final validation ELBO  {res['elbo_validation']:.2f}\n"
        f"  training wall time     {res['train_wall_s']:.1f} s (CPU time {res['train_cpu_s']:.1f} s, "
        f"{res['threads']} threads)\n"
        f"  peak RSS               {res['peak_rss_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
