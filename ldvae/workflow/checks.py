"""Checks of the workflow's options, before any work: each names the option and its
command-line flag (``ldvae.util.checks.check_number`` underneath)."""

from __future__ import annotations

from ..util.checks import SetupError, check_number

FIGURE_FORMATS = ("png", "svg", "pdf")
#: Extra fits beside the main one by default: the factors are the consensus of all fits.
FACTOR_SEEDS = 3
START = "pca"  # where every fit of the workflow starts: train(init=...), ldvae.model.start


def check_option(name: str, value, *, flag: str | None = None, **constraint) -> None:
    """``check_number`` for an option of the workflow, named with its command-line flag
    (by default ``--`` and the name with dashes)."""
    check_number(name, value, flag=flag or "--" + name.replace("_", "-"), **constraint)


MAX_SEED = 2**32 - 1  # numpy's RandomState (UMAP, Leiden) takes seeds below 2**32


def check_workflow_options(options: dict) -> None:
    """Every numeric option of :func:`run_workflow`, before any work."""
    for name in ("n_top_genes", "n_latent", "max_epochs", "batch_size", "check_val_every_n_epoch"):
        check_option(name, options[name], integer=True, minimum=1)
    check_option("n_neighbors", options["n_neighbors"], integer=True, minimum=2)
    check_option("n_top_loadings", options["n_top_loadings"], integer=True, minimum=1)
    for name in ("target_sum", "lr", "leiden_resolution"):
        check_option(name, options[name], minimum=0, exclusive=True)
    check_option("umap_min_dist", options["umap_min_dist"], minimum=0, maximum=1)  # UMAP's spread is 1
    if options["n_threads"] is not None:
        check_option("n_threads", options["n_threads"], integer=True, minimum=1)
    check_option("stability_seeds", options["stability_seeds"], integer=True, minimum=0)
    check_option("seed", options["seed"], integer=True, minimum=0, maximum=MAX_SEED - options["stability_seeds"])
    check_option("split_seed", options["split_seed"], integer=True, minimum=0, maximum=MAX_SEED)
    if options["n_top_loadings"] > options["n_top_genes"]:
        raise SetupError(f"n_top_loadings={options['n_top_loadings']} is more than the {options['n_top_genes']} "
                         "genes modelled (n_top_genes); ask for at most that many (--n-top-loadings).")
    bad = [f for f in options["figure_formats"] if f not in FIGURE_FORMATS]
    if bad:
        raise SetupError(f"figure_formats: {bad[0]!r} is not one of {FIGURE_FORMATS}.")


def refit_seeds(seed: int, n: int) -> list[int]:
    """The seeds of the ``n`` extra fits beside a main fit with ``seed``: drawn from ``seed``,
    distinct and different from it, so that analyses run with different seeds share no fit."""
    import numpy as np

    draws = np.random.default_rng([int(seed), 0x5EED]).choice(2**31 - 1, size=n + 1, replace=False)
    return [int(s) for s in draws if s != seed][:n]
