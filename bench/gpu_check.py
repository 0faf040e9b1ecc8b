"""One short script for a machine with a CUDA GPU: is the CUDA path right, and how fast is it?

    .venv/bin/python bench/gpu_check.py                 # on the GPU machine (falls back to CPU)
    .venv/bin/python bench/gpu_check.py --device cpu    # the same checks on CPU, as a dry run

Needs no data files and no network (the device machine has neither): counts are simulated
from the LDVAE model. Prints one JSON line per check, then a summary line:

1. ``equivalence``: one minibatch, the same parameters on CPU and on the device: the loss
   and every parameter gradient agree to float32 precision (sparse encoder, fused
   softmax + NB, gathered nonzeros grouped by gene with torch's sort on CUDA).
2. ``fit``: the same seed trained on CPU and on the device for a few epochs: final
   validation ELBO within 1 % (not bit-identical: CUDA sums in another order).
3. ``speed``: ms per training step at batch 128, 256 and 1024 on a 1000-gene dataset shaped
   like the tutorial's (11 % nonzero), and seconds per epoch at ``--cells`` cells.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def _emit(kind: str, **values) -> dict:
    record = {"check": kind, **values}
    print(json.dumps(record), flush=True)
    return record


def _adata(n_cells: int, library: float = 150.0, seed: int = 0):
    """Counts from the LDVAE model, 1000 genes, 10 factors, two batches (``obs["batch"]``)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from ldvae.data.simulate import make_truth, simulate_chunks

    truth = make_truth(1000, 10, n_batches=2, seed=seed)
    chunks = list(simulate_chunks(truth, n_cells, log_library_mean=float(np.log(library)), seed=seed))
    counts = sp.vstack([c[0] for c in chunks], format="csr")
    batch = np.concatenate([c[2] for c in chunks])
    adata = ad.AnnData(X=counts, obs=pd.DataFrame({"batch": pd.Categorical([f"b{i}" for i in batch])},
                                                   index=[f"cell{i}" for i in range(n_cells)]))
    adata.var_names = [f"gene{i}" for i in range(1000)]
    adata.layers["counts"] = counts
    return adata


def equivalence(device: torch.device) -> dict:
    import ldvae

    adata = _adata(2000)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ldvae.LinearSCVI(adata, dropout_rate=0.0)
    rows = torch.arange(256)
    results = {}
    for dev in (torch.device("cpu"), device):
        model.device = dev
        module = model.module.to(dev).train()
        b = model._data().gather(rows.to(dev), by_gene=True)
        torch.manual_seed(0)
        noise = torch.randn(256, 10).to(dev)  # the same reparameterization draws on both
        original = torch.randn_like
        torch.randn_like = lambda t, **kw: noise if t.shape == noise.shape else original(t, **kw)
        try:
            out = module.loss(b)
        finally:
            torch.randn_like = original
        module.zero_grad(set_to_none=True)
        out.loss.backward()
        results[dev.type] = (out.loss.item(), {n: p.grad.detach().cpu().clone() for n, p in module.named_parameters()})
    (loss_a, grads_a), (loss_b, grads_b) = results["cpu"], results[device.type]
    worst = max(float((grads_a[n] - grads_b[n]).abs().max() / grads_a[n].abs().max().clamp_min(1e-12)) for n in grads_a)
    ok = abs(loss_a - loss_b) <= 1e-4 * abs(loss_a) and worst < 1e-3
    return _emit("equivalence", device=str(device), loss_cpu=loss_a, loss_device=loss_b,
                 worst_relative_grad_difference=worst, ok=ok)


def fit(device: torch.device, epochs: int) -> dict:
    import ldvae

    adata = _adata(5000)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    elbos = {}
    for name, accelerator in (("cpu", "cpu"), (device.type, "cuda" if device.type == "cuda" else "cpu")):
        model = ldvae.LinearSCVI(adata)
        model.train(max_epochs=epochs, accelerator=accelerator, progress_bar=False, seed=0)
        elbos[name] = float(model.history["elbo_validation"].iloc[-1, 0])
    a, b = elbos["cpu"], elbos[device.type]
    return _emit("fit", device=str(device), epochs=epochs, elbo_validation_cpu=a, elbo_validation_device=b,
                 ok=abs(a - b) <= 0.01 * abs(a))


def speed(device: torch.device, n_cells: int) -> dict:
    import ldvae
    from ldvae.train.loop import InMemorySource, TrainConfig, fit as fit_loop, split_indices

    adata = _adata(n_cells, library=150.0)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    model = ldvae.LinearSCVI(adata)
    model.device = device
    model.module.to(device)
    data = model._data()
    density = data.values.numel() / (n_cells * 1000)
    per_step = {}
    for batch_size in (128, 256, 1024):
        train_idx, val_idx = split_indices(n_cells, 1.0, None, 0)
        source = InMemorySource(data, train_idx, val_idx, batch_size)
        config = TrainConfig(max_epochs=1, batch_size=batch_size, lr=5e-3, progress_bar=False)
        fit_loop(model.module, source, config)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fit_loop(model.module, source, config)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        per_step[batch_size] = {"ms_per_step": 1e3 * wall / source.steps_per_epoch, "s_per_epoch": wall}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return _emit("speed", device=str(device), device_name=name, n_cells=n_cells, nonzero_fraction=density,
                 per_batch_size=per_step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--cells", type=int, default=100_000)
    args = ap.parse_args()
    device = torch.device(args.device)
    print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}), flush=True)
    checks = [equivalence(device), fit(device, args.epochs), speed(device, args.cells)]
    failed = [c["check"] for c in checks if c.get("ok") is False]
    print(json.dumps({"summary": "ok" if not failed else f"failed: {failed}"}), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
