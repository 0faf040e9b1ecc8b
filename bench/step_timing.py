"""Time ldvae's training step on the tutorial data (1000 seurat_v3 HVGs of pbmc_5batch_8k).

    .venv/bin/python bench/step_timing.py --epochs 5 --repeats 3

Prints milliseconds per optimizer step (median over repeats; each repeat runs ``fit``
for ``--epochs`` epochs with no validation) and cells per second. Used to measure
each optimization before and after: point PYTHONPATH at another copy of the package
to time it on the same data.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import load_tutorial_hvg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="the fit's threads (torch's and the compiled step's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import ldvae
    from ldvae.train.loop import InMemorySource, TrainConfig, fit, split_indices

    adata = load_tutorial_hvg()
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    model = ldvae.LinearSCVI(adata, n_latent=10)
    train_idx, val_idx = split_indices(adata.n_obs, 0.9, None, 0)
    source = InMemorySource(model._data(), train_idx, val_idx, args.batch_size)
    config = TrainConfig(max_epochs=1, batch_size=args.batch_size, lr=5e-3, progress_bar=False, threads=args.threads)
    fit(model.module, source, config)  # warm-up
    config.max_epochs = args.epochs
    wall, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fit(model.module, source, config)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    steps = args.epochs * source.steps_per_epoch
    # CPU time of this process is far less disturbed by other load on a shared machine
    # than wall time; with one thread the two agree on an idle machine.
    print(
        f"{ldvae.__file__}: wall {statistics.median(wall) / steps * 1e3:.2f} ms/step, "
        f"cpu {statistics.median(cpu) / steps * 1e3:.2f} ms/step (medians of {args.repeats}; cpu: "
        f"{', '.join(f'{t / steps * 1e3:.2f}' for t in cpu)}), "
        f"{source.n_train * args.epochs / statistics.median(wall):,.0f} cells/s, threads={args.threads or 'default'}"
    )


if __name__ == "__main__":
    main()
