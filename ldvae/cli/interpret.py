"""The interpretation subcommands of ``ldvae``: ``factors``, ``stability`` and ``select-k``.

Each is a thin layer over public functions (:mod:`ldvae.factors.interpret`,
:mod:`ldvae.factors.stability`, :mod:`ldvae.factors.enrichment`, :mod:`ldvae.workflow.interpret_report`); each
writes CSV tables, PNG figures and a self-contained ``report.html`` into ``--out-dir``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (
    HelpFormatter,
    add_accelerator,
    add_batch_key,
    add_batch_size,
    add_gene_likelihood,
    add_hvg_flavor,
    add_layer,
    add_lr,
    add_max_epochs,
    add_n_latent,
    add_n_top_genes,
    add_out_dir,
    add_overwrite,
)


def _check_out_dir(path: str, overwrite: bool, inputs: list) -> Path:
    """``--out-dir``, checked before any work as ``ldvae run`` checks its own: an existing one
    only with ``--overwrite``, and then only if it holds nothing but ldvae's earlier outputs
    and none of ``inputs`` (the paths the command reads)."""
    from ..workflow.outputs import check_out_dir

    return check_out_dir(path, overwrite, inputs=inputs)


def _staged(d: Path, overwrite: bool, inputs: list):
    """The directory the outputs are written into: renamed to ``d`` when the block ends
    without error, removed on any error, so a failed command leaves nothing at ``d``."""
    from ..workflow.outputs import staged

    return staged(d, overwrite, inputs)


def _write(d: Path, name: str, frame, *, index: bool = True) -> None:
    from ..util.io import atomic_write_text

    atomic_write_text(d / name, frame.to_csv(index=index))


def _save_figure(fig, d: Path, name: str) -> None:
    fig.savefig(d / name, dpi=110)


def _write_report(d: Path, title: str, summary: dict, settings: dict, sections: list) -> Path:
    from ..util.io import atomic_write_text
    from ..workflow.report import build_report

    text = build_report(title=title, data_summary=summary, settings=settings, figures=[], extra_sections=sections)
    atomic_write_text(d / "report.html", text)
    return d / "report.html"


# --- ldvae factors ------------------------------------------------------------------------------


def add_factors(subparsers) -> None:
    p = subparsers.add_parser(
        "factors", help="deviance explained, covariate effects and gene-set enrichment of a fitted model",
        formatter_class=HelpFormatter,
        description="Interpret a saved model (e.g. OUT/model of `ldvae run`): the reproducible factors (those of\n"
                    "`ldvae run` when --adata holds them, else the model's own rotated to simple structure),\n"
                    "deviance explained per factor, covariate effects and, with --gmt, gene-set enrichment.\n"
                    "Writes factors.csv, factor_genes.csv, deviance.csv, ordered_loadings.csv,\n"
                    "covariate_effects.csv, enrichment.csv, figures and report.html.",
    )
    p.add_argument("model_dir", help="directory written by model.save() (e.g. OUT/model)")
    p.add_argument("--adata", default=None,
                   help="h5ad holding the model's cells and genes (e.g. OUT/results.h5ad); "
                        "default: adata.h5ad saved with the model")
    add_out_dir(p)
    add_overwrite(p)
    p.add_argument("--gmt", default=None, help="gene-set file (GMT) to test each factor against")
    p.add_argument("--min-size", type=int, default=5, help="smallest gene set tested (genes in the model)")
    p.add_argument("--max-size", type=int, default=500, help="largest gene set tested (genes in the model)")
    p.add_argument("--n-top", type=int, default=3, help="gene sets listed per factor and direction")
    add_accelerator(p)
    p.set_defaults(handler=_handle_factors)


def _check_model_dir(model_dir: str) -> Path:
    """``model_dir`` if it holds a saved model (ldvae's or scvi-tools'), else a FileNotFoundError
    that points to ``model/`` inside it where ``ldvae run`` saved one."""
    from ..model.files import holds_model

    d = Path(model_dir)
    if holds_model(d):
        return d
    if holds_model(d / "model"):
        raise FileNotFoundError(f"{d} holds no saved model, but {d / 'model'} does (the layout of `ldvae run`); "
                                "pass that.")
    raise FileNotFoundError(f"{d} holds no saved model; pass the directory that model.save() (or `ldvae run`'s "
                            "OUT/model) wrote.")


def _load_model(model_dir: str, adata_path: str | None, accelerator: str):
    """A saved model on ``adata_path`` (subset to the model's genes; default: the AnnData saved with it)."""
    from ..model import LinearSCVI
    from ..model.scvi_files import read_any_model

    _check_model_dir(model_dir)
    adata = None
    if adata_path is not None:
        from ..data.readers import read_file

        adata = read_file(adata_path)  # a missing or damaged file is one line naming it
        wanted = read_any_model(model_dir, None)[0]["var_names"]  # ldvae's files or scvi-tools
        missing = [g for g in wanted if g not in adata.var_names]
        if missing:
            raise ValueError(
                f"{adata_path} lacks {len(missing)} of the model's {len(wanted)} genes (first: {missing[0]!r}). "
                "Pass the AnnData the model was fitted on (e.g. OUT/results.h5ad)."
            )
        if list(adata.var_names) != wanted:
            adata = adata[:, wanted].copy()
    return LinearSCVI.load(model_dir, adata=adata, accelerator=accelerator)


def _handle_factors(args: argparse.Namespace) -> int:
    from ..factors.enrichment import factor_enrichment, plot_enrichment, read_gmt, top_sets
    from ..factors.interpret import covariate_effects, factor_deviance, ordered_loadings, plot_covariate_effects, plot_deviance
    from ..workflow.interpret_report import interpretation_sections

    from ..workflow.checks import check_option

    for name in ("min_size", "max_size", "n_top"):
        check_option(name, getattr(args, name), integer=True, minimum=1)
    if args.max_size < args.min_size:
        raise ValueError(f"max_size (--max-size) must be at least min_size (--min-size), got {args.max_size} "
                         f"< {args.min_size}.")
    inputs = [args.model_dir, args.adata, args.gmt]
    d = _check_out_dir(args.out_dir, args.overwrite, inputs)
    gene_sets = None if args.gmt is None else read_gmt(args.gmt)  # a bad file fails before any work
    model = _load_model(args.model_dir, args.adata, args.accelerator)
    with _staged(d, args.overwrite, inputs) as s:
        deviance = factor_deviance(model)
        _write(s, "deviance.csv", deviance)
        _write(s, "ordered_loadings.csv", ordered_loadings(model, deviance).rename_axis("gene"))
        _save_figure(plot_deviance(deviance), s, "deviance.png")
        effects = covariate_effects(model)
        _write(s, "covariate_effects.csv", effects, index=False)
        _save_figure(plot_covariate_effects(effects), s, "covariate_effects.png")
        print(f"Model explains {100 * deviance.attrs['fraction_explained']:.1f}% of the null deviance; by factor:")
        print(deviance[["rank", "fraction_of_model", "sign"]].to_string(float_format="{:.3f}".format))
        if gene_sets is not None:
            enrichment = factor_enrichment(model, gene_sets, min_size=args.min_size, max_size=args.max_size)
            _write(s, "enrichment.csv", enrichment, index=False)
            _save_figure(plot_enrichment(enrichment, args.n_top), s, "enrichment.png")
            best = top_sets(enrichment, 1, max_p_adj=0.05)
            print(f"Top gene set per factor and direction (p_adj <= 0.05): {len(best)} found")
            if len(best):
                print(best[["factor", "direction", "gene_set", "auc", "p_adj"]].to_string(index=False))
        sections = [_factors(s, model)]
        sections += [x(model, model.adata) if callable(x) else x for x in interpretation_sections(gmt=args.gmt)]
        _write_report(
            s, f"LDVAE factors: {Path(args.model_dir).name}",
            {"cells": model.adata.n_obs, "genes": len(model.var_names_), "model": str(args.model_dir)},
            dict(model.init_params_), sections,
        )
    print(f"Wrote tables, figures and {d / 'report.html'}")
    return 0


def _factors(d: Path, model):
    """The reproducible factors: those the workflow wrote into the AnnData (``uns["ldvae_factors"]``,
    the consensus of its fits), else this model's own, rotated; ``factors.csv``, ``factor_genes.csv``,
    a printout and the report section."""
    from ..factors.consensus import consensus_factors, read_factors
    from ..workflow.interpret_report import factors_section, factors_table
    from ..workflow.pipeline import format_factors

    adata = model.adata
    stored = adata.uns.get("ldvae_factors")
    if stored is not None and len(stored["names"]) == model.config.n_latent:
        factors = read_factors(adata)
    else:
        factors = consensus_factors([model])
    groups = adata.obs["leiden"] if "leiden" in adata.obs else None
    _write(d, "factors.csv", factors_table(factors, groups), index=False)
    _write(d, "factor_genes.csv", factors.top_genes(10), index=False)
    print(format_factors(factors))
    return factors_section(factors, groups, own_factors=None)  # this report has no table of the Z_k


# --- ldvae stability / select-k ---------------------------------------------------------------


def _fit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help=".h5ad (or another format ldvae reads) of raw counts, cells x genes")
    add_out_dir(p)
    add_overwrite(p)
    add_layer(p)
    add_batch_key(p)
    add_n_top_genes(p, help="highly variable genes to model; 0 keeps every gene")
    add_hvg_flavor(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="one fit per seed")
    p.add_argument("--n-jobs", type=int, default=None,
                   help="worker processes (default: one per seed up to the CPU count; 1 on a GPU)")
    add_max_epochs(p, default=None, help="training epochs (default: scvi-tools' rule)")
    add_lr(p)
    add_batch_size(p)
    add_gene_likelihood(p)
    p.add_argument("--threshold", type=float, default=0.9, help="stability needed to call a factor reproducible")
    add_accelerator(p)


def _check_fit_options(args: argparse.Namespace) -> Path:
    """The options of ``_fit_options`` (and the output directory), before any work."""
    from ..factors.seeds import check_seeds
    from ..workflow.checks import MAX_SEED, check_option

    check_option("n_top_genes", args.n_top_genes, integer=True, minimum=0)
    for seed in args.seeds:
        check_option("seeds", seed, integer=True, minimum=0, maximum=MAX_SEED)
    check_seeds(args.seeds, 2)
    for name in ("n_jobs", "max_epochs"):
        if getattr(args, name) is not None:
            check_option(name, getattr(args, name), integer=True, minimum=1)
    check_option("lr", args.lr, minimum=0, exclusive=True)
    check_option("batch_size", args.batch_size, integer=True, minimum=1)
    check_option("threshold", args.threshold, minimum=0, exclusive=True, maximum=1)
    return _check_out_dir(args.out_dir, args.overwrite, [args.input])


def _prepared(args: argparse.Namespace):
    from ..model import LinearSCVI
    from ..data.readers import read_counts
    from ..workflow.pipeline import prepare

    raw = read_counts(args.input, progress_bar=False)
    if args.n_top_genes > 0:
        adata = prepare(raw, layer=args.layer, n_top_genes=args.n_top_genes, hvg_flavor=args.hvg_flavor,
                        batch_key=args.batch_key)
        layer = "counts"
    else:
        adata, layer = raw, args.layer
    LinearSCVI.setup_anndata(adata, layer=layer, batch_key=args.batch_key)
    train_kwargs = {"max_epochs": args.max_epochs, "lr": args.lr, "batch_size": args.batch_size,
                    "accelerator": args.accelerator}
    return adata, train_kwargs


def add_stability(subparsers) -> None:
    p = subparsers.add_parser(
        "stability", help="refit with several seeds; per-factor stability and consensus loadings",
        formatter_class=HelpFormatter,
        description="Fit one model per seed, match factors across runs by loadings correlation and report\n"
                    "per-factor stability (median matched |correlation|). Writes stability.csv, matches.csv,\n"
                    "consensus_loadings.csv, stability.png and report.html.",
    )
    _fit_options(p)
    add_n_latent(p)
    p.add_argument("--rotation", choices=("none", "varimax"), default="none",
                   help="varimax: rotate each run's loadings before matching (factors V_k); none: the models' Z_k")
    p.set_defaults(handler=_handle_stability)


def _handle_stability(args: argparse.Namespace) -> int:
    from ..workflow.interpret_report import stability_section
    from ..factors.stability import factor_stability, fit_seeds, plot_stability

    from ..workflow.checks import check_option

    d = _check_fit_options(args)
    check_option("n_latent", args.n_latent, integer=True, minimum=1)
    adata, train_kwargs = _prepared(args)
    models = fit_seeds(adata, args.seeds, n_jobs=args.n_jobs, train_kwargs=train_kwargs,
                       n_latent=args.n_latent, gene_likelihood=args.gene_likelihood)
    result = factor_stability(models, threshold=args.threshold,
                              rotation=None if args.rotation == "none" else args.rotation)
    with _staged(d, args.overwrite, [args.input]) as s:
        _write(s, "stability.csv", result.factors)
        _write(s, "matches.csv", result.matches)
        _write(s, "consensus_loadings.csv", result.consensus.rename_axis("gene"))
        _save_figure(plot_stability(result), s, "stability.png")
        print(result.factors.to_string(float_format="{:.3f}".format))
        _write_report(
            s, "LDVAE factor stability", {"cells": adata.n_obs, "genes": adata.n_vars, "input": args.input},
            {"n_latent": args.n_latent, "seeds": args.seeds, "rotation": args.rotation, **train_kwargs},
            [stability_section(result)],
        )
    print(f"{int(result.factors['stable'].sum())} of {len(result.factors)} factors reproducible; "
          f"report: {d / 'report.html'}")
    return 0


def add_select_k(subparsers) -> None:
    p = subparsers.add_parser(
        "select-k", help="held-out ELBO, marginal log-likelihood and stability against the number of factors",
        formatter_class=HelpFormatter,
        description="Fit each --n-latents value with several seeds; report the held-out (validation) ELBO,\n"
                    "the held-out marginal log-likelihood and factor stability against K. Writes select_k.csv,\n"
                    "select_k.png and report.html.",
    )
    _fit_options(p)
    p.add_argument("--n-latents", type=int, nargs="+", default=[5, 10, 15, 20], help="candidate K")
    p.add_argument("--n-mc-samples", type=int, default=50,
                   help="importance samples per held-out cell for the marginal log-likelihood")
    p.set_defaults(handler=_handle_select_k, seeds=[0, 1, 2])


def _handle_select_k(args: argparse.Namespace) -> int:
    from ..workflow.interpret_report import select_k_section
    from ..factors.stability import plot_select_k, select_k

    from ..workflow.checks import check_option

    d = _check_fit_options(args)
    for k in args.n_latents:
        check_option("n_latents", k, integer=True, minimum=1)
    check_option("n_mc_samples", args.n_mc_samples, integer=True, minimum=1)
    adata, train_kwargs = _prepared(args)
    table = select_k(adata, args.n_latents, seeds=args.seeds, n_jobs=args.n_jobs, train_kwargs=train_kwargs,
                     threshold=args.threshold, n_mc_samples=args.n_mc_samples,
                     gene_likelihood=args.gene_likelihood)
    with _staged(d, args.overwrite, [args.input]) as s:
        _write(s, "select_k.csv", table)
        _save_figure(plot_select_k(table), s, "select_k.png")
        print(table.to_string(float_format="{:.3f}".format))
        _write_report(
            s, "LDVAE: choosing K", {"cells": adata.n_obs, "genes": adata.n_vars, "input": args.input},
            {"n_latents": args.n_latents, "seeds": args.seeds, **train_kwargs}, [select_k_section(table)],
        )
    print(f"Chosen K = {table.attrs['best_k']}; report: {d / 'report.html'}")
    return 0
