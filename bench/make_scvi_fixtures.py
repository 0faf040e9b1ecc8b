"""Write the fixtures of tests/test_scvi_files.py: tiny LinearSCVI models saved by scvi-tools,
with scvi-tools' outputs on the same cells, and models written by ldvae's
``write_scvi_model`` with what scvi-tools computes from them.

Three modes, each run with the environment it names (ldvae never imports scvi-tools;
``bench/setup_scvi_env.sh`` makes an environment with it, SCVI_SPEC choosing the version):

    # 1. scvi-tools trains and saves each configuration; once per version (1.4.2, 1.5.1)
    $SCVI_PY bench/make_scvi_fixtures.py
    # 2. ldvae trains and writes models in scvi-tools' layout
    .venv/bin/python bench/make_scvi_fixtures.py --write-ldvae
    # 3. scvi-tools loads each ldvae_* directory and records its outputs; once per version
    for d in tests/fixtures/scvi_models/ldvae_*; do $SCVI_PY bench/make_scvi_fixtures.py --check-ldvae-dir $d; done

Every output is deterministic: latent means and variances of q(z | x), the loadings, and
the normalized expression rho decoded from the latent mean (not from a sample, as
``get_normalized_expression`` does), each computed on all cells of counts.h5ad.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "scvi_models"
COUNTS = OUT / "counts.h5ad"
N_CELLS, N_GENES = 60, 30

# configuration name -> (setup_anndata arguments, LinearSCVI arguments)
SCVI_CONFIGS = {
    "nb_batch_labels": (dict(batch_key="batch", labels_key="cell_type"), dict(gene_likelihood="nb")),
    "zinb_gene_batch": (dict(batch_key="batch"), dict(gene_likelihood="zinb", dispersion="gene-batch")),
    "poisson_observed_2layers": (
        dict(layer="counts"), dict(gene_likelihood="poisson", use_observed_lib_size=True, n_layers=2),
    ),
}
LDVAE_CONFIGS = {
    "zinb_label_ln": (
        dict(batch_key="batch", labels_key="cell_type"),
        dict(gene_likelihood="zinb", dispersion="gene-label", latent_distribution="ln", use_batch_norm=False,
             bias=True),
    ),
    "poisson_observed_2layers": (
        dict(layer="counts"), dict(gene_likelihood="poisson", use_observed_lib_size=True, n_layers=2),
    ),
}
SIZES = dict(n_hidden=16, n_latent=3)


def make_counts():
    """60 cells x 30 genes of counts from a 3-factor log-linear model, 3 batches, 2 labels."""
    import anndata
    import pandas as pd

    rng = np.random.default_rng(0)
    z = rng.normal(size=(N_CELLS, 3))
    w = rng.normal(scale=0.7, size=(N_GENES, 3))
    batch = np.arange(N_CELLS) % 3
    shift = rng.normal(scale=0.3, size=(3, N_GENES))
    rate = np.exp(1.5 + z @ w.T + shift[batch])
    counts = rng.poisson(rate).astype(np.float32)
    counts[:, 0] += 1  # every cell has counts
    obs = pd.DataFrame({"batch": pd.Categorical([f"b{i}" for i in batch]),
                        "cell_type": pd.Categorical(np.where(z[:, 0] > 0, "alpha", "beta"))},
                       index=[f"cell{i}" for i in range(N_CELLS)])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(N_GENES)])
    return anndata.AnnData(X=counts.copy(), obs=obs, var=var, layers={"counts": counts})


def scvi_outputs(model, adata) -> dict[str, np.ndarray]:
    """q(z | x)'s mean and variance, q(l | x)'s mean (a learned library), the loadings, and
    decoded from the latent mean: rho, the inverse dispersion theta (not for Poisson) and
    the zero-inflation logits (ZINB)."""
    import torch

    module = model.module
    module.eval()
    qz_m, qz_v = model.get_latent_representation(adata, return_dist=True)
    loader = model._make_data_loader(adata=adata, batch_size=adata.n_obs, shuffle=False)
    tensors = next(iter(loader))
    with torch.inference_mode():
        inference = module.inference(**module._get_inference_input(tensors))
        # the decoder's input at the latent mean: z as q(z | x)'s mean, transformed for "ln"
        z = module.z_encoder.z_transformation(inference["qz"].loc)
        generative = module.generative(**module._get_generative_input(tensors, {**inference, "z": z}))
        px = generative["px"]
        out = dict(qz_m=np.asarray(qz_m), qz_v=np.asarray(qz_v), loadings=model.get_loadings().to_numpy(),
                   rho=px.scale.numpy())
        if inference["ql"] is not None:
            out["ql_m"] = inference["ql"].loc.numpy().ravel()
        if module.gene_likelihood != "poisson":
            out["theta"] = np.broadcast_to(px.theta.numpy(), out["rho"].shape).copy()
        if module.gene_likelihood == "zinb":
            out["zi_logits"] = px.zi_logits.numpy()
    return out


def _quiet_scvi():
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import scvi

    scvi.settings.verbosity = logging.ERROR
    return scvi


def train_with_scvi() -> None:
    scvi = _quiet_scvi()
    import anndata

    if not COUNTS.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        make_counts().write_h5ad(COUNTS)
    version = "scvi" + scvi.__version__.replace(".", "")
    for name, (setup, params) in SCVI_CONFIGS.items():
        adata = anndata.read_h5ad(COUNTS)
        scvi.settings.seed = 0
        scvi.model.LinearSCVI.setup_anndata(adata, **setup)
        model = scvi.model.LinearSCVI(adata, **SIZES, **params)
        model.train(max_epochs=5, batch_size=16, check_val_every_n_epoch=1, accelerator="cpu",
                    enable_progress_bar=False)
        out = OUT / f"{version}_{name}"
        model.save(out, overwrite=True)
        np.savez_compressed(out / "expected.npz", **scvi_outputs(model, adata),
                 validation_indices=np.asarray(model.validation_indices))
        print(f"wrote {out}")


def write_with_ldvae() -> None:
    import anndata

    import ldvae
    from ldvae.model.scvi_files import write_scvi_model

    for name, (setup, params) in LDVAE_CONFIGS.items():
        adata = anndata.read_h5ad(COUNTS)
        ldvae.settings.seed = 0
        ldvae.LinearSCVI.setup_anndata(adata, **setup)
        model = ldvae.LinearSCVI(adata, **SIZES, **params)
        model.train(max_epochs=5, batch_size=16, accelerator="cpu", progress_bar=False, seed=0)
        out = OUT / f"ldvae_{name}"
        write_scvi_model(model, out, overwrite=True)
        print(f"wrote {out}")


def check_ldvae_dir(directory: Path) -> None:
    scvi = _quiet_scvi()
    import anndata

    adata = anndata.read_h5ad(COUNTS)
    model = scvi.model.LinearSCVI.load(str(directory), adata=adata, accelerator="cpu")
    out = directory / f"scvi{scvi.__version__.replace('.', '')}_outputs.npz"
    np.savez_compressed(out, **scvi_outputs(model, adata))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write-ldvae", action="store_true", help="write ldvae_* with ldvae (run with ldvae's venv)")
    mode.add_argument("--check-ldvae-dir", type=Path, help="load this ldvae_* directory with scvi-tools")
    args = ap.parse_args()
    if args.write_ldvae:
        write_with_ldvae()
    elif args.check_ldvae_dir is not None:
        check_ldvae_dir(args.check_ldvae_dir)
    else:
        train_with_scvi()


if __name__ == "__main__":
    main()
