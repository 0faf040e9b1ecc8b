"""Is a query mapped onto a reference as good as a model trained on everything?

The 5-batch PBMC data: the reference is trained on four datasets (1000 seurat_v3 HVGs chosen
on them, ``batch_key="dataset"``, K = 10, 250 epochs, lr 5e-3); the fifth, pbmc3k, is mapped
onto it with ``load_query_data`` (its new batch's decoder columns fitted, ``--map-epochs``;
and once more with the encoders fitted too); a joint model is trained on all five with the
same genes and settings. On the pbmc3k cells with the Seurat labels (matched by barcode):

- Leiden (20-NN graph of the factor values, resolution 0.8) against the labels: ARI, for the
  mapped query, the reference's encoder alone (nothing fitted) and the joint model;
- the overlap of each cell's 20 nearest neighbours (among the query cells) in the mapped
  and the joint factor space (mean fraction shared), and between two joint models of
  different seeds as the yardstick;
- loadings of the mapped model against the reference's (identical by construction);
- mapping time against the reference's training time (one invocation, one thread).

    python bench/query_mapping.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import DATA, REPO


def _prepare(path):
    import anndata as ad
    import scanpy as sc

    full = ad.read_h5ad(path)
    full.layers["counts"] = full.X.copy()
    query_name = "pbmc3k_10x_raw_seurat_labels"
    ref = full[full.obs["dataset"] != query_name].copy()
    sc.pp.highly_variable_genes(ref, flavor="seurat_v3", layer="counts", n_top_genes=1000, batch_key="dataset")
    genes = ref.var_names[ref.var["highly_variable"]]
    labels = ad.read_h5ad(REPO.parent / "shared" / "data" / "pbmc3k_10x_raw_seurat_labels.h5ad", backed="r").obs
    query = full[full.obs["dataset"] == query_name].copy()
    barcodes = query.obs_names.str.split(":").str[-1]
    query.obs["seurat_annotation"] = labels["seurat_annotation"].reindex(barcodes).to_numpy()
    return ref[:, genes].copy(), query, full[:, genes].copy()


def _fit(adata, seed, epochs, lr):
    import ldvae

    ldvae.settings.seed = seed
    ldvae.LinearSCVI.setup_anndata(adata, "dataset", layer="counts")
    model = ldvae.LinearSCVI(adata, n_latent=10)
    start = time.perf_counter()
    model.train(epochs, plan_kwargs={"lr": lr}, progress_bar=False)
    return model, time.perf_counter() - start


def _ari(z, labels, seed):
    import anndata as ad
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score

    a = ad.AnnData(obsm={"X": z})
    sc.pp.neighbors(a, use_rep="X", n_neighbors=20, random_state=seed)
    sc.tl.leiden(a, resolution=0.8, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    return adjusted_rand_score(labels, a.obs["leiden"])


def _knn(z, k=20):
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z, return_distance=False)[:, 1:]


def _overlap(a, b):
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def main() -> None:
    import ldvae

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=250)
    p.add_argument("--map-epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=5e-3)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    ref, query, full = _prepare(DATA)
    labelled = query.obs["seurat_annotation"].notna().to_numpy()
    truth = query.obs["seurat_annotation"].to_numpy()[labelled]
    print(f"reference {ref.n_obs} cells (4 datasets), query {query.n_obs} pbmc3k cells ({labelled.sum()} labelled), "
          f"{ref.n_vars} genes; {args.epochs} epochs, mapping {args.map_epochs}")
    rows, joint_z = [], []
    for seed in args.seeds:
        reference, t_ref = _fit(ref.copy(), seed, args.epochs, args.lr)
        joint, t_joint = _fit(full.copy(), seed, args.epochs, args.lr)
        is_query = (joint.adata.obs["dataset"] == "pbmc3k_10x_raw_seurat_labels").to_numpy()
        zj = joint.get_latent_representation()[is_query][labelled]
        joint_z.append(zj)
        q = ldvae.LinearSCVI.prepare_query_anndata(query.copy(), reference)
        result = {"seed": seed, "t_ref": t_ref, "t_joint": t_joint, "ari_joint": _ari(zj, truth, seed)}
        for name, enc in (("mapped", False), ("mapped_enc", True)):
            ldvae.settings.seed = seed
            qm = ldvae.LinearSCVI.load_query_data(q.copy(), reference, train_encoder=enc)
            if name == "mapped":
                result["ari_encoder_only"] = _ari(qm.get_latent_representation()[labelled], truth, seed)
            start = time.perf_counter()
            qm.train(args.map_epochs, plan_kwargs={"lr": args.lr}, progress_bar=False)
            result[f"t_{name}"] = time.perf_counter() - start
            zq = qm.get_latent_representation()[labelled]
            result[f"ari_{name}"] = _ari(zq, truth, seed)
            result[f"knn_{name}"] = _overlap(_knn(zq), _knn(zj))
            result[f"dW_{name}"] = float(np.abs(qm.get_loadings().to_numpy() - reference.get_loadings().to_numpy()).max())
        rows.append(result)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}, flush=True)
    if len(joint_z) > 1:
        print(f"20-NN overlap between joint models of seeds {args.seeds[0]} and {args.seeds[1]}: "
              f"{_overlap(_knn(joint_z[0]), _knn(joint_z[1])):.3f}")
    keys = [k for k in rows[0] if k != "seed"]
    print("median over seeds:", {k: round(float(np.median([r[k] for r in rows])), 4) for k in keys})


if __name__ == "__main__":
    main()
