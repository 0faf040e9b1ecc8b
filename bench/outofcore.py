"""Out-of-core benchmark: a 1,000,000-cell x 2,000-gene dataset from the LDVAE generative
model, written to disk chunk by chunk (never whole in memory), then one epoch trained
out of core from the backed ``.h5ad`` and, for comparison, the in-memory path on a subset.

    python bench/outofcore.py                      # 1M cells under /tmp/ldvae_outofcore, deleted after
    python bench/outofcore.py --n-cells 200000 --keep

Each phase runs in its own process, so the peak RSS printed (``ru_maxrss``) is the
phase's own: generation, out-of-core training, in-memory training.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

N_GENES = 2000
N_LATENT = 10
N_BATCHES = 2
LIBRARY = 1500.0  # mean library size: about 36 % of the entries are non-zero, as in typical HVG matrices


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def generate(path: Path, n_cells: int, chunk_size: int = 5000, seed: int = 0) -> None:
    """Write an h5ad in anndata's on-disk layout: CSR ``X`` appended chunk by chunk with h5py,
    then ``obs`` (categorical ``batch``) and ``var``."""
    import anndata as ad
    import h5py
    import pandas as pd

    from ldvae.data.simulate import make_truth, simulate_chunks

    path.parent.mkdir(parents=True, exist_ok=True)
    truth = make_truth(N_GENES, N_LATENT, n_batches=N_BATCHES, seed=seed)
    batches = np.empty(n_cells, dtype=np.int8)
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        x = f.create_group("X")
        x.attrs["encoding-type"] = "csr_matrix"
        x.attrs["encoding-version"] = "0.1.0"
        x.attrs["shape"] = (n_cells, N_GENES)
        data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype="float32", chunks=(1 << 20,))
        indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1 << 20,))
        indptr = x.create_dataset("indptr", shape=(n_cells + 1,), dtype="int64")
        indptr[0] = 0
        nnz = 0
        chunks = simulate_chunks(truth, n_cells, chunk_size=chunk_size, log_library_mean=np.log(LIBRARY), seed=seed)
        for i, (csr, _, batch) in enumerate(chunks):
            start = i * chunk_size
            n = csr.shape[0]
            data.resize((nnz + csr.nnz,))
            indices.resize((nnz + csr.nnz,))
            data[nnz:] = csr.data
            indices[nnz:] = csr.indices
            indptr[start + 1 : start + n + 1] = csr.indptr[1:] + nnz
            nnz += csr.nnz
            batches[start : start + n] = batch
            if i % 20 == 0:
                print(f"  generated {start + n:,} cells ({time.perf_counter() - t0:.0f} s)", flush=True)
        obs = pd.DataFrame(
            {"batch": pd.Categorical.from_codes(batches, [f"b{i}" for i in range(N_BATCHES)])},
            index=pd.Index([f"cell{i}" for i in range(n_cells)]),
        )
        var = pd.DataFrame(index=pd.Index([f"gene{i}" for i in range(N_GENES)]))
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", var)
        for key in ("uns", "obsm", "varm", "layers", "obsp", "varp"):
            ad.io.write_elem(f, key, {})
    size = path.stat().st_size / 2**30
    print(json.dumps({"phase": "generate", "n_cells": n_cells, "nnz": nnz, "file_gib": round(size, 2),
                      "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mib": round(peak_rss_mib())}))


def _model(adata):
    import ldvae

    ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")
    return ldvae.LinearSCVI(adata, n_latent=N_LATENT)


def train_streaming(path: Path, batch_size: int) -> None:
    """One epoch out of core from the backed h5ad (setup and prior are streaming passes too)."""
    import anndata as ad

    adata = ad.read_h5ad(path, backed="r")
    t0 = time.perf_counter()
    model = _model(adata)
    t_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.train(max_epochs=1, batch_size=batch_size, train_size=1.0, progress_bar=False, accelerator="cpu")
    seconds = time.perf_counter() - t0
    print(json.dumps({"phase": "out-of-core", "n_cells": adata.n_obs, "cells_per_s": round(adata.n_obs / seconds),
                      "epoch_s": round(seconds, 1), "setup_and_prior_s": round(t_setup, 1),
                      "peak_rss_mib": round(peak_rss_mib())}))


def train_in_memory(path: Path, n_subset: int, batch_size: int) -> None:
    """One epoch of the in-memory path on the first ``n_subset`` cells."""
    import anndata as ad

    backed = ad.read_h5ad(path, backed="r")
    adata = backed[:n_subset].to_memory()
    backed.file.close()
    model = _model(adata)
    t0 = time.perf_counter()
    model.train(max_epochs=1, batch_size=batch_size, train_size=1.0, progress_bar=False, accelerator="cpu")
    seconds = time.perf_counter() - t0
    print(json.dumps({"phase": "in-memory", "n_cells": n_subset, "cells_per_s": round(n_subset / seconds),
                      "epoch_s": round(seconds, 1), "peak_rss_mib": round(peak_rss_mib())}))


def _run_phase(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    sys.stderr.write(out.stderr[-2000:] if out.returncode else "")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    print("\n".join(line for line in out.stdout.splitlines() if not line.startswith("{")), flush=True)
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", nargs="?", default="all", choices=("all", "generate", "stream", "memory"))
    parser.add_argument("--n-cells", type=int, default=1_000_000)
    parser.add_argument("--subset", type=int, default=100_000, help="cells of the in-memory comparison")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ldvae_outofcore"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for training (the reader thread of the out-of-core path uses another core)")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    args = parser.parse_args(argv)
    path = args.dir / f"sim_{args.n_cells}.h5ad"
    if args.phase in ("stream", "memory"):
        import torch

        torch.set_num_threads(args.threads)
    if args.phase == "generate":
        return generate(path, args.n_cells)
    if args.phase == "stream":
        return train_streaming(path, args.batch_size)
    if args.phase == "memory":
        return train_in_memory(path, min(args.subset, args.n_cells), args.batch_size)

    args.dir.mkdir(parents=True, exist_ok=True)
    common = ["--n-cells", str(args.n_cells), "--subset", str(args.subset), "--batch-size", str(args.batch_size),
              "--dir", str(args.dir), "--threads", str(args.threads)]
    try:
        if not path.exists():
            free = shutil.disk_usage(args.dir).free / 2**30
            print(f"generating {args.n_cells:,} x {N_GENES} cells into {path} ({free:.0f} GiB free)", flush=True)
            _run_phase("generate", *common)
        stream = _run_phase("stream", *common)
        memory = _run_phase("memory", *common)
    finally:
        if not args.keep and path.exists():
            path.unlink()
    ratio = stream["cells_per_s"] / memory["cells_per_s"]
    print(f"\nout-of-core: {stream['cells_per_s']:,} cells/s over {stream['n_cells']:,} cells, "
          f"peak RSS {stream['peak_rss_mib']:,} MiB (setup + prior passes {stream['setup_and_prior_s']} s)")
    print(f"in-memory:   {memory['cells_per_s']:,} cells/s over {memory['n_cells']:,} cells, "
          f"peak RSS {memory['peak_rss_mib']:,} MiB")
    print(f"ratio out-of-core / in-memory: {ratio:.2f}  (targets: peak RSS < 2048 MiB, ratio >= 0.5)")


if __name__ == "__main__":
    main()
