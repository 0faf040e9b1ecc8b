"""Models move between scvi-tools and ldvae: the same latent means, loadings and normalized
expression on the tutorial data (5-batch PBMC, 1000 HVGs, ``batch_key="dataset"``, K = 10).

Four steps, each with the environment it names ($SCVI_PY: a python with scvi-tools, made by
bench/setup_scvi_env.sh; 1.4.2 installs beside torch 2.13, 1.5.1 with --no-deps
--ignore-requires-python on Python 3.11, an unsupported pairing that imports and runs):

    $SCVI_PY bench/scvi_interop.py scvi-train out/interop/scvi      # scvi-tools trains, saves, records
    .venv/bin/python bench/scvi_interop.py ldvae-compare out/interop/scvi
    .venv/bin/python bench/scvi_interop.py ldvae-train out/interop/ldvae   # ldvae trains, saves format="scvi"
    $SCVI_PY bench/scvi_interop.py scvi-compare out/interop/ldvae

Recorded on every cell: q(z | x)'s mean, the loadings, and rho decoded at the latent mean
(deterministic; ``bench/make_scvi_fixtures.py`` computes them the same way).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from _common import load_tutorial_hvg


def _ldvae_outputs(model) -> dict[str, np.ndarray]:
    import torch

    qz_m, _ = model.get_latent_representation(return_dist=True)
    b = model._data().gather(torch.arange(model.adata.n_obs))
    with torch.no_grad():
        inf = model.module.inference(b, use_mean=True)
        gen = model.module.generative(inf.qz_m, inf.library, model.module.covariate_columns(b), b.batch, b.label)
    return {"qz_m": qz_m, "loadings": model.get_loadings().to_numpy(), "rho": gen.log_rho.exp().numpy()}


def _compare(mine: dict, theirs: dict) -> None:
    for name in ("qz_m", "loadings", "rho"):
        diff = np.abs(mine[name] - theirs[name])
        rel = (diff / np.abs(theirs[name]).clip(1e-30)).max() if name == "rho" else None
        print(f"{name:9s} max |difference| {diff.max():.2e}" + (f", max relative {rel:.2e}" if rel is not None else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("scvi-train", "ldvae-compare", "ldvae-train", "scvi-compare"))
    ap.add_argument("directory", type=Path)
    ap.add_argument("--epochs", type=int, default=50)
    args = ap.parse_args()
    adata = load_tutorial_hvg()
    d = args.directory
    if args.step.startswith("scvi"):
        sys.path.insert(0, str(Path(__file__).parent))
        from make_scvi_fixtures import _quiet_scvi, scvi_outputs

        scvi = _quiet_scvi()
        print(f"scvi-tools {scvi.__version__}")
        if args.step == "scvi-train":
            scvi.settings.seed = 0
            scvi.model.LinearSCVI.setup_anndata(adata, batch_key="dataset", layer="counts")
            model = scvi.model.LinearSCVI(adata, n_latent=10)
            model.train(max_epochs=args.epochs, plan_kwargs={"lr": 5e-3}, accelerator="cpu", enable_progress_bar=False)
            model.save(str(d), overwrite=True)
            np.savez(d / "scvi_outputs.npz", **{k: v for k, v in scvi_outputs(model, adata).items()
                                                if k in ("qz_m", "loadings", "rho")})
        else:
            model = scvi.model.LinearSCVI.load(str(d), adata=adata, accelerator="cpu")
            _compare({k: v for k, v in scvi_outputs(model, adata).items()}, dict(np.load(d / "ldvae_outputs.npz")))
        return
    import ldvae

    print(f"ldvae {ldvae.__version__}")
    if args.step == "ldvae-train":
        ldvae.settings.seed = 0
        ldvae.LinearSCVI.setup_anndata(adata, batch_key="dataset", layer="counts")
        model = ldvae.LinearSCVI(adata, n_latent=10)
        model.train(args.epochs, plan_kwargs={"lr": 5e-3}, progress_bar=False)
        model.save(d, overwrite=True, format="scvi")
        np.savez(d / "ldvae_outputs.npz", **_ldvae_outputs(model))
    else:
        model = ldvae.LinearSCVI.load(d, adata=adata, accelerator="cpu")
        _compare(_ldvae_outputs(model), dict(np.load(d / "scvi_outputs.npz")))


if __name__ == "__main__":
    main()
