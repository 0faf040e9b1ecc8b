"""Reproducible LDVAE factors of pbmc3k: their top genes and the cell type they mark.

Fits LDVAE with several seeds on the 1000 seurat_v3 highly variable genes of pbmc3k,
matches factors across the runs, and prints, for every reproducible factor (in order of
deviance explained, sign convention applied), its top genes and the Seurat-annotated cell
type with the highest mean factor value.

The prior N(0, I) does not fix the rotation of the factors, so by default each run's
loadings are varimax-rotated before matching (``--rotation varimax``), and the factors
shown are the reference run's rotated ones (``V_k``: loadings W R, latent z R);
``--rotation none`` matches and shows the model's own factors ``Z_k``.

    .venv/bin/python examples/interpret_pbmc3k.py [--seeds 4] [--max-epochs 300] [--n-latent 6]
"""

from __future__ import annotations

import argparse
import logging
import time

import anndata
import numpy as np
import pandas as pd
import scanpy as sc

import ldvae
from ldvae.factors.interpret import factor_deviance, ordered_latent, ordered_loadings
from ldvae.factors.stability import factor_stability, fit_seeds, rotated_latent

DATA = "/work/shared/data/pbmc3k_10x_raw_seurat_labels.h5ad"


def load(path: str):
    """Raw counts of the annotated cells, subset to 1000 seurat_v3 highly variable genes."""
    adata = anndata.read_h5ad(path)
    adata = adata[~adata.obs["seurat_annotation"].isna()].copy()
    adata.layers["counts"] = adata.X.copy()
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=1000, layer="counts", subset=True)
    adata = adata[np.asarray(adata.layers["counts"].sum(axis=1)).ravel() > 0].copy()
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    return adata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DATA, help="pbmc3k h5ad with raw counts in X and obs['seurat_annotation']")
    parser.add_argument("--n-latent", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=4, help="number of seeds (fits)")
    parser.add_argument("--max-epochs", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--n-jobs", type=int, default=None, help="worker processes (default: automatic)")
    parser.add_argument("--threshold", type=float, default=0.9, help="stability of a reproducible factor")
    parser.add_argument("--n-genes", type=int, default=6, help="top genes shown per direction")
    parser.add_argument("--rotation", choices=("varimax", "none"), default="varimax",
                        help="rotate each run's loadings before matching")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    adata = load(args.data)
    print(f"pbmc3k: {adata.n_obs} annotated cells x {adata.n_vars} highly variable genes")
    started = time.perf_counter()
    models = fit_seeds(
        adata, range(args.seeds), n_jobs=args.n_jobs, n_latent=args.n_latent,
        train_kwargs={"max_epochs": args.max_epochs, "lr": args.lr},
    )
    print(f"fitted {len(models)} seeds x {args.max_epochs} epochs in {time.perf_counter() - started:.0f} s")

    rotation = None if args.rotation == "none" else args.rotation
    stability = factor_stability(models, threshold=args.threshold, rotation=rotation)
    model = models[stability.reference]  # the most typical run
    if rotation is None:
        deviance = factor_deviance(model)
        loadings = ordered_loadings(model, deviance)  # ordered, largest |loading| positive
        latent = ordered_latent(model, deviance=deviance)
    else:
        rot = stability.rotations[stability.reference]  # W R and z R are the reference's V_k
        deviance = factor_deviance(model, rotation=rot)
        order, signs = deviance.index, deviance["sign"].to_numpy()[None, :]
        latent = rotated_latent(model, rot)
        raw = model.get_loadings()
        loadings = pd.DataFrame(raw.to_numpy() @ rot, index=raw.index, columns=latent.columns)[order] * signs
        latent = latent[order] * signs
    means = latent.groupby(adata.obs["seurat_annotation"].astype(str).to_numpy()).mean()
    print(f"model explains {100 * deviance.attrs['fraction_explained']:.1f}% of the null deviance; "
          f"reference run {stability.reference}; rotation {args.rotation}; stability threshold {args.threshold}")
    print("stabilities: " + ", ".join(f"{k} {v:.3f}" for k, v in stability.factors["stability"].items()) + "\n")

    for factor in deviance.index:
        stab = stability.factors.loc[factor, "stability"]
        share = deviance.loc[factor, "fraction_of_model"]
        col = loadings[factor].sort_values()
        top_cell = means[factor].idxmax()
        if not stability.factors.loc[factor, "stable"]:
            print(f"{factor}  deviance share {share:.3f}  stability {stab:.3f}  not reproducible "
                  f"(top genes {', '.join(col.index[::-1][:3])}; highest in {top_cell})")
            continue
        print(f"{factor}  deviance share {share:.3f}  stability {stab:.3f}  reproducible")
        print(f"  top genes (+): {', '.join(col.index[::-1][: args.n_genes])}")
        print(f"  top genes (-): {', '.join(col.index[: args.n_genes])}")
        others = means[factor].drop(top_cell)
        print(f"  highest mean factor value: {top_cell} ({means.loc[top_cell, factor]:+.2f}; "
              f"next {others.idxmax()} {others.max():+.2f})")
    n_stable = int(stability.factors["stable"].sum())
    print(f"\n{n_stable} of {len(deviance)} factors reproducible (stability >= {args.threshold})")


if __name__ == "__main__":
    main()
