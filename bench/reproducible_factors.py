"""Do the default factors come back when the whole analysis is re-run?

Fits ``--analyses`` independent analyses, each of ``--fits`` seeds (the workflow's main fit
and its refits; no seed shared between analyses; every fit holds out the same cells, as in the
workflow, unless ``--split`` says otherwise), on real counts with the tutorial's preparation
(1000 seurat_v3 HVGs), and compares the analyses' factors:

- factors of two analyses matched over cells (optimal one-to-one assignment); a factor is
  reproducible when its median matched |correlation| over the other analyses is >= 0.9;
- the top-10 genes (positive side, by score and by raw loading) shared by matched
  reproducible factors;
- with labels, each labelled population's best one-vs-rest AUC over the factors;
- each fit's validation ELBO (a rotation leaves it unchanged; printed for reference);
- the canonical correlations between two single fits' latent spaces: how many dimensions
  come back at all, whatever their rotation.

Compared: the consensus factors (``consensus_factors``), each main fit's own factors and
the main fit's own factors after a varimax rotation of its loadings.

    python bench/reproducible_factors.py                                  # pbmc3k, 9 Seurat labels
    python bench/reproducible_factors.py --data ../shared/data/pbmc_5batch_8k.h5ad --labels none --batch-key dataset
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.optimize import linear_sum_assignment

from _common import REPO


def _corr(a, b):
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a.T @ b) / np.outer(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0))


def _auc(x, y):
    from scipy.stats import rankdata

    r = rankdata(x)
    n1, n0 = y.sum(), (~y).sum()
    return (r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


def compare(latents, tops=None):
    """Per analysis as reference: matched |corr| to each other analysis; median per factor.
    Also, per pair of analyses, how many reproducible factors came back under another name
    (position) or with the other sign."""
    n = len(latents)
    counts, medians, overlaps, moved = [], [], [], []
    for r in range(n):
        per = []
        for o in range(n):
            if o == r:
                continue
            c = _corr(latents[r], latents[o])
            rows, cols = linear_sum_assignment(-np.abs(c))
            per.append(np.abs(c[rows, cols]))
            if o > r:
                kept = np.abs(c[rows, cols]) >= 0.9
                moved.append((int((kept & (cols != rows)).sum()), int((kept & (c[rows, cols] < 0)).sum())))
            if tops is not None and o > r:
                for i, j in zip(rows, cols):
                    if abs(c[i, j]) >= 0.9:
                        a = tops[r][i][True]
                        b = tops[o][j][bool(c[i, j] > 0)]
                        overlaps.append(len(set(a) & set(b)))
        med = np.median(np.array(per), axis=0)
        counts.append(int((med >= 0.9).sum()))
        medians.append(np.sort(med)[::-1])
    return np.mean(counts), np.mean(medians, axis=0), overlaps, moved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "pbmc3k_10x_raw_seurat_labels.h5ad"))
    p.add_argument("--labels", default="seurat_annotation", help="obs column of labels ('none': no AUC)")
    p.add_argument("--batch-key", default=None)
    p.add_argument("--analyses", type=int, default=2)
    p.add_argument("--fits", type=int, default=4, help="fits per analysis (the workflow: 1 + --stability-seeds)")
    p.add_argument("--n-latent", type=int, default=10)
    p.add_argument("--max-epochs", type=int, default=None, help="default: the preset's, else 250")
    p.add_argument("--lr", type=float, default=None, help="default: the preset's, else 5e-3")
    p.add_argument("--ema-decay", type=float, default=None, help="train(ema_decay=...): parameter averaging")
    p.add_argument("--preset", default=None, help="train(preset=...): its settings where --max-epochs, --lr and "
                                                  "--ema-decay are not given")
    p.add_argument("--init", default="pca", choices=["pca", "random"], help="train(init=...): where each fit starts")
    p.add_argument("--criterion", default="auto", choices=["auto", "latent", "loadings"])
    p.add_argument("--split", default="shared", choices=["shared", "seed", "none"],
                   help="training cells: one split (split_seed 0, the default) for every fit of every analysis, "
                        "each fit's own seeded split (split_seed=None), or all cells")
    args = p.parse_args()

    import anndata
    import ldvae
    from ldvae.factors.consensus import _matched, consensus_factors
    from ldvae.factors.stability import fit_seeds, varimax
    from ldvae.workflow.checks import refit_seeds
    from ldvae.workflow.prepare import prepare

    raw = anndata.read_h5ad(args.data)
    labels = None
    if args.labels != "none":
        raw = raw[raw.obs[args.labels].notna()].copy()
        labels = raw.obs[args.labels].astype(str).to_numpy()
    adata = prepare(raw, n_top_genes=1000, batch_key=args.batch_key)
    ldvae.LinearSCVI.setup_anndata(adata, layer="counts", batch_key=args.batch_key)
    seeds = [[a, *refit_seeds(a, args.fits - 1)] for a in range(args.analyses)]
    all_seeds = [s for group in seeds for s in group]
    if args.preset is None:
        args.max_epochs = 250 if args.max_epochs is None else args.max_epochs
        args.lr = 5e-3 if args.lr is None else args.lr
    train = {"max_epochs": args.max_epochs, "plan_kwargs": {} if args.lr is None else {"lr": args.lr},
             "init": args.init, "ema_decay": args.ema_decay, "preset": args.preset}
    if args.split == "none":
        train["train_size"] = 1.0
    elif args.split == "seed":
        train["split_seed"] = None
    t0 = time.perf_counter()
    fits = fit_seeds(adata, all_seeds, train_kwargs=train, n_latent=args.n_latent)
    fit_s = time.perf_counter() - t0
    by_seed = dict(zip(all_seeds, fits))
    print(f"{adata.n_obs} cells x {adata.n_vars} genes, K = {args.n_latent}, {args.analyses} analyses x "
          f"{args.fits} fits, {args.max_epochs or args.preset} epochs: {fit_s:.0f} s of fitting")
    elbo = [float(m.get_elbo(indices=m.validation_indices_ if len(m.validation_indices_) else None)) for m in fits]
    from ldvae.data.simulate import canonical_correlations
    lat = {s: by_seed[s].get_latent_representation() for s in all_seeds}
    cc = [canonical_correlations(lat[a], lat[b]) for group in seeds for i, a in enumerate(group) for b in group[i + 1:]]
    print(f"canonical correlations between two fits' latent spaces (pairs within an analysis, mean): "
          f"{np.round(np.mean(cc, axis=0), 3)}")
    print(f"validation ELBO per fit: median {np.median(elbo):.2f} (range {min(elbo):.2f} … {max(elbo):.2f})")

    t0 = time.perf_counter()
    results = [consensus_factors([by_seed[s] for s in group], criterion=args.criterion) for group in seeds]
    cons_s = (time.perf_counter() - t0) / len(results)
    mains = [by_seed[group[0]] for group in seeds]
    own = [m.get_latent_representation() for m in mains]
    vari = [m.get_latent_representation() @ varimax(m.get_loadings().to_numpy())[1] for m in mains]

    def tops(frame, n=10):
        return [{True: list(frame[c].nlargest(n).index), False: list(frame[c].nsmallest(n).index)}
                for c in frame.columns]

    rows = [
        ("consensus factors", [r.latent.to_numpy() for r in results], [tops(r.scores) for r in results],
         [tops(r.loadings) for r in results]),
        ("main fit, own factors", own, None, None),
        ("main fit, varimax of loadings", vari, None, None),
    ]
    print(f"consensus: {cons_s:.1f} s per analysis; criterion {[r.criterion for r in results]}; agreement "
          f"{[{k: round(v, 3) for k, v in r.agreement.items()} for r in results]}")
    for name, latents, top_scores, top_loadings in rows:
        n, med, ov, moved = compare(latents, top_scores)
        line = f"{name:32s} reproducible {n:.1f} of {args.n_latent}: {np.round(med, 2)}"
        if top_scores is not None:
            _, _, ovl, _ = compare(latents, top_loadings)
            line += (f"\n{'':32s} per pair of analyses, reproducible factors renamed {[m[0] for m in moved]}, "
                     f"sign flipped {[m[1] for m in moved]}")
            line += (f"\n{'':32s} top-10 shared (score): median {np.median(ov):.0f}, >= 7 in {np.mean(np.array(ov) >= 7):.0%};"
                     f" (raw loading): median {np.median(ovl):.0f}, >= 7 in {np.mean(np.array(ovl) >= 7):.0%}")
        if labels is not None:
            aucs = []
            for z in latents:
                best = {}
                for lab in np.unique(labels):
                    y = labels == lab
                    a = [_auc(z[:, k], y) for k in range(z.shape[1])]
                    best[lab] = max(max(a), 1 - min(a))
                aucs.append(best)
            mean = np.mean([np.mean(list(b.values())) for b in aucs])
            per = {lab: round(float(np.mean([b[lab] for b in aucs])), 3) for lab in aucs[0]}
            line += f"\n{'':32s} best AUC per population, mean {mean:.3f}: {per}"
        print(line)
    print("reproducibility reported by each analysis (single fits, each rotated on its own):")
    for r in results:
        print("  ", np.round(r.table["reproducibility"].to_numpy(), 2))
    print("consensus reproducibility estimated by each analysis (split-half of its fits, Spearman-Brown), "
          "in the order of the first line's factors:")
    lat0 = results[0].latent.to_numpy()
    for r in results:
        match, _ = _matched(lat0, r.latent.to_numpy())
        print("  ", np.round(r.table["consensus_reproducibility"].to_numpy()[match], 2))
    others = [_matched(lat0, r.latent.to_numpy())[1] for r in results[1:]]
    print("measured: matched |correlation| of the first analysis's factors with each other analysis's:")
    for o in others:
        print("  ", np.round(o, 2))


if __name__ == "__main__":
    main()
