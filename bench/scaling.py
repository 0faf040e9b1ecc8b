"""Seconds per epoch and peak memory of ldvae on counts simulated from the LDVAE model.

    .venv/bin/python bench/scaling.py --n-cells 100000 --epochs 1 --json
    .venv/bin/python bench/scaling.py --n-cells 10000 --write-h5ad bench/out/sim_10k.h5ad

Cells x 1000 genes (``--n-genes``), 10 factors, NB counts with a median library of 300 UMIs (about
21 % nonzero, denser than the tutorial's 1000 HVGs at 11 %). The model is the
tutorial's (n_latent 10, batch 128, lr 5e-3); every cell trains (train_size 1.0), no
validation, so the time is the training pass alone. Peak RSS covers the whole process:
simulation, the CSR copy on the device and training.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from _common import peak_rss_mib, step_threads

N_GENES = 1000
LIBRARY = 300.0


def simulated_adata(n_cells: int, seed: int = 0, n_genes: int = N_GENES):
    import anndata as ad
    import scipy.sparse as sp

    from ldvae.data.simulate import make_truth, simulate_chunks

    truth = make_truth(n_genes, 10, seed=seed)
    chunks = [c for c, _, _ in simulate_chunks(truth, n_cells, log_library_mean=np.log(LIBRARY), seed=seed)]
    counts = sp.vstack(chunks, format="csr")
    del chunks
    adata = ad.AnnData(X=counts)
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{i}" for i in range(n_genes)]
    adata.layers["counts"] = counts
    return adata


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-cells", type=int, required=True)
    ap.add_argument("--n-genes", type=int, default=N_GENES)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--write-h5ad", default=None, help="only simulate and write the data (for scvi-tools)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    adata = simulated_adata(args.n_cells, n_genes=args.n_genes)
    if args.write_h5ad:
        adata.write_h5ad(args.write_h5ad)
        return
    import torch

    import ldvae

    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    model = ldvae.LinearSCVI(adata, n_latent=10)
    # The one-time copy of the counts onto the device (CSR tensors, per-cell totals and
    # log-gamma sums, the count checks) is timed apart from the epochs.
    s0 = time.perf_counter()
    model._data()
    setup = time.perf_counter() - s0
    t0, c0 = time.perf_counter(), time.process_time()
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, lr=5e-3, train_size=1.0, progress_bar=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    res = {
        "package": "ldvae",
        "n_cells": args.n_cells,
        "n_genes": args.n_genes,
        "nnz_fraction": adata.layers["counts"].nnz / (args.n_cells * args.n_genes),
        "epochs": args.epochs,
        "threads": torch.get_num_threads(),
        "step_threads": step_threads(args.batch_size),
        "setup_s": setup,
        "s_per_epoch": wall / args.epochs,
        "cpu_s_per_epoch": cpu / args.epochs,
        "peak_rss_mib": peak_rss_mib(),
    }
    print(json.dumps(res) if args.json else res)


if __name__ == "__main__":
    main()
