"""Option builders shared by every command-line entry point (``ldvae run``, ``ldvae demo``,
``ldvae factors/stability/select-k`` and ``python -m ldvae.distributed``), so that each
option's name, type and default are written once."""

from __future__ import annotations

import argparse

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
LIKELIHOODS = ("nb", "zinb", "poisson")
LR = 5e-3  # the tutorial's learning rate
BATCH_SIZE = 128
N_LATENT = 10


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it has none or its help already says it; keeps
    the description's line breaks."""

    def _fill_text(self, text, width, indent):
        return "\n".join(indent + line for line in text.splitlines())

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def add_out_dir(p, *, help: str = "output directory", default: str | None = None, alias: bool = False) -> None:
    names = ("--out-dir", "--out") if alias else ("--out-dir",)
    p.add_argument(*names, dest="out_dir", default=default, required=default is None, help=help)


def add_overwrite(p, *, help: str = "replace an existing --out-dir that ldvae wrote (one holding other files is refused)"
                  ) -> None:
    p.add_argument("--overwrite", action="store_true", help=help)


def add_layer(p, *, help: str = "layer holding the raw counts (default: X)") -> None:
    p.add_argument("--layer", default=None, help=help)


def add_batch_key(p, *, help: str = "obs column of batches") -> None:
    p.add_argument("--batch-key", default=None, help=help)


def add_n_top_genes(p, *, help: str = "highly variable genes to model") -> None:
    p.add_argument("--n-top-genes", type=int, default=1000, help=help)


def add_hvg_flavor(p) -> None:
    p.add_argument("--hvg-flavor", choices=("seurat_v3", "seurat_v3_paper", "seurat", "cell_ranger"),
                   default="seurat_v3", help="highly_variable_genes flavor")


def add_n_latent(p) -> None:
    p.add_argument("--n-latent", type=int, default=N_LATENT, help="latent factors K")


def add_gene_likelihood(p) -> None:
    p.add_argument("--gene-likelihood", choices=LIKELIHOODS, default="nb", help="count likelihood")


def add_max_epochs(p, *, default: int | None, help: str = "training epochs") -> None:
    p.add_argument("--max-epochs", type=int, default=default, help=help)


def add_lr(p) -> None:
    p.add_argument("--lr", type=float, default=LR, help="Adam learning rate")


def add_batch_size(p, *, help: str = "cells per minibatch") -> None:
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=help)


def add_check_val(p, *, default: int | None) -> None:
    p.add_argument("--check-val-every-n-epoch", type=int, default=default, help="validation ELBO every N epochs")


def add_seed(p, *, help: str = "random seed") -> None:
    p.add_argument("--seed", type=int, default=0, help=help)


def add_accelerator(p, *, help: str = "compute device") -> None:
    p.add_argument("--accelerator", choices=ACCELERATORS, default="auto", help=help)
