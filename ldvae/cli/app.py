"""The ``ldvae`` command: a thin layer over :func:`ldvae.workflow.pipeline.run_workflow`.

Every option is a parameter of the Python function it calls, spelled with dashes
(``--n-top-genes`` → ``n_top_genes``). Bad input ends the command with exit status 1
and one line on stderr (``--traceback`` shows the full error instead); usage errors
exit with status 2 (argparse). Ctrl-C ends it with status 130, SIGTERM and SIGHUP with
128 + the signal's number, each with one line, after the same clean-up as an error.

The subcommands are the explicit list ``SUBCOMMANDS``: each is a function
``add(subparsers)`` that adds one parser and sets ``handler`` (a function of the parsed
arguments returning the exit status) with ``parser.set_defaults(handler=...)``. Options
come from the shared builders of :mod:`ldvae.cli.options`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from typing import Sequence

from .._version import __version__
from ..factors.seeds import SPLIT_SEED
from ..workflow.checks import FACTOR_SEEDS
from .interpret import add_factors, add_select_k, add_stability
from .mapping import add_map
from .options import (
    HelpFormatter,
    add_accelerator,
    add_batch_key,
    add_batch_size,
    add_check_val,
    add_gene_likelihood,
    add_hvg_flavor,
    add_layer,
    add_lr,
    add_max_epochs,
    add_n_latent,
    add_n_top_genes,
    add_out_dir,
    add_overwrite,
    add_seed,
)

DEMO_EPOCHS = 250  # the tutorial's count
DEMO_OUT = "ldvae_demo"


def _workflow_options(
    p: argparse.ArgumentParser, *, out_dir: str | None, max_epochs: int = 250, n_threads: int | None = None,
    stability_seeds: int | None = None,
) -> None:
    """The options of :func:`ldvae.run_workflow` shared by ``run`` and ``demo``."""
    out = p.add_argument_group("output")
    add_out_dir(out, default=out_dir, alias=True, help="output directory (must not exist, unless --overwrite)")
    add_overwrite(out)
    out.add_argument("--figure-formats", nargs="+", choices=("png", "svg", "pdf"), default=["png"],
                     help="figure formats (PNG is always written; add svg and/or pdf)")
    out.add_argument("--n-top-loadings", type=int, default=5, help="genes per direction and factor in the top-genes table")
    out.add_argument("--color-by", nargs="+", default=[], help="obs columns to colour the UMAP by, besides Leiden")
    out.add_argument("--title", default=None, help="report title (default: from the input name)")

    prep = p.add_argument_group("preparation (as the tutorial)")
    add_batch_key(prep, help="obs column of batches (HVG selection and model)")
    prep.add_argument("--target-sum", type=float, default=1e5, help="normalize_total target per cell")
    add_n_top_genes(prep)
    add_hvg_flavor(prep)

    model = p.add_argument_group("model and training")
    add_n_latent(model)
    add_gene_likelihood(model)
    add_max_epochs(model, default=max_epochs)
    add_lr(model)
    add_batch_size(model)
    add_check_val(model, default=10)
    add_seed(model, help="random seed (training, UMAP, Leiden)")
    model.add_argument("--split-seed", type=int, default=SPLIT_SEED,
                       help="seed of the validation cells, the same for every fit and every --seed")
    add_accelerator(model, help="compute device; auto uses a CUDA GPU when there is one")
    model.add_argument("--n-threads", type=int, default=n_threads,
                       help="CPU threads of training (its compiled step and torch); default: every usable CPU "
                       "for the step" if n_threads is None
                       else "CPU threads of training (the demo's refits run beside it on the other cores)")
    model.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=True,
                       help="show download and training progress bars")
    model.add_argument("--stability-seeds", type=int, default=FACTOR_SEEDS if stability_seeds is None else stability_seeds,
                       help="extra fits (seeds drawn from --seed) beside the main one, run in parallel: the reproducible "
                            "factors F_k are the consensus of all fits; 0: the main fit's factors, rotated")

    graph = p.add_argument_group("neighbors, UMAP, Leiden on the latent space")
    graph.add_argument("--n-neighbors", type=int, default=20, help="neighbors of each cell")
    graph.add_argument("--umap-min-dist", type=float, default=0.3, help="UMAP min_dist")
    graph.add_argument("--leiden-resolution", type=float, default=0.8, help="Leiden resolution")


_WORKFLOW_PARAMS = (
    "out_dir", "overwrite", "figure_formats", "n_top_loadings", "color_by", "title", "batch_key", "target_sum",
    "n_top_genes", "hvg_flavor", "n_latent", "gene_likelihood", "max_epochs", "lr", "batch_size",
    "check_val_every_n_epoch", "seed", "split_seed", "accelerator", "progress_bar", "n_neighbors", "umap_min_dist",
    "leiden_resolution", "n_threads", "stability_seeds",
)


def _run_and_report(source, args: argparse.Namespace, **extra) -> int:
    from ..workflow.interpret_report import interpretation_sections
    from ..workflow.pipeline import format_factors, format_top_genes, run_workflow

    kwargs = {name: getattr(args, name) for name in _WORKFLOW_PARAMS}
    kwargs["report_sections"] = interpretation_sections()  # deviance explained, covariate effects
    kwargs.update(extra)
    result = run_workflow(source, **kwargs)
    print(format_top_genes(result.top_genes))
    print(format_factors(result.factors))
    print(f"Wrote {len(result.files)} outputs to {result.out_dir}/")
    print(f"Report: {result.report}")
    return 0


def add_run(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="the tutorial workflow on a counts file", formatter_class=HelpFormatter,
        description="Read counts, prepare as the LDVAE tutorial, fit, interpret, and write results.h5ad,\n"
                    "loadings.csv, top_genes.csv, the model, figures and report.html into --out-dir.",
    )
    p.add_argument("input", nargs="?", default=None,
                   help=".h5ad, 10x .h5 or matrix directory, .loom, .mtx or .csv of raw counts (cells x genes)")
    src = p.add_argument_group("input")
    add_layer(src)
    src.add_argument("--backup-url", default=None, help="download the input from this URL when it is missing")
    src.add_argument("--cache-dir", default=None,
                     help="where downloads go (default: beside the input, or ~/.cache/ldvae without one)")
    src.add_argument("--sha256", default=None, help="expected SHA-256 of the downloaded file")
    _workflow_options(p, out_dir=None)
    p.set_defaults(handler=_handle_run)


def _handle_run(args: argparse.Namespace) -> int:
    if args.input is None and args.backup_url is None:
        raise ValueError("Give an input file, or --backup-url to download one.")
    return _run_and_report(args.input, args, layer=args.layer, backup_url=args.backup_url,
                           cache_dir=args.cache_dir, sha256=args.sha256)


def add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the tutorial workflow on the embedded pbmc3k demo data", formatter_class=HelpFormatter,
        description="Run the whole workflow on the embedded 1000-cell pbmc3k subset (raw counts, 13656 genes;\n"
                    "Data: 10x Genomics, CC BY 4.0) and print where the report is.",
    )
    _workflow_options(p, out_dir=DEMO_OUT, max_epochs=DEMO_EPOCHS, n_threads=1)
    p.set_defaults(handler=_handle_demo, color_by=["seurat_annotation"])


def _handle_demo(args: argparse.Namespace) -> int:
    from ..data.readers import demo_file

    if args.title is None:
        args.title = "LDVAE report: pbmc3k demo (1000 cells)"
    return _run_and_report(str(demo_file()), args)  # the report names the file it read


SUBCOMMANDS = (add_run, add_demo, add_factors, add_stability, add_select_k, add_map)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldvae", formatter_class=HelpFormatter,
        description="Linearly decoded VAE (LDVAE) for single-cell RNA-seq counts.",
    )
    parser.add_argument("--version", action="version", version=f"ldvae {__version__}")
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    parser.add_argument("--traceback", action="store_true", help="on error, show the full traceback")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split()) or type(err).__name__


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the program is so that it unwinds (and cleans up) as
    after Ctrl-C. A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    takes it for an error."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _terminate(signum, frame) -> None:
    for s in _STOP_SIGNALS:  # one is enough: let the clean-up finish
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def _stop_signals_raise():
    """While active (main thread only), SIGTERM and SIGHUP raise :class:`Terminated`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # A signal the caller ignores (nohup: SIGHUP) stays ignored.
    previous = {s: signal.signal(s, _terminate) for s in _STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ldvae`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("ldvae")
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING if args.quiet else logging.INFO)
    import matplotlib

    pyplot = sys.modules.get("matplotlib.pyplot")  # a session's (a notebook's) backend, put back at the end
    backend = None if pyplot is None else pyplot.get_backend()
    matplotlib.use("Agg")
    try:
        with _stop_signals_raise():
            return args.handler(args)
    except KeyboardInterrupt:
        print("ldvae: interrupted; no output directory was written.", file=sys.stderr)
        return 130
    except Terminated as stop:
        print(f"ldvae: stopped by {signal.Signals(stop.signum).name}; no output directory was written.",
              file=sys.stderr)
        return 128 + stop.signum
    except Exception as err:  # bad input of any kind: one clear line, unless asked for more
        if args.traceback:
            raise
        print(f"ldvae: error: {_one_line(err)}", file=sys.stderr)
        return 1
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        if backend is not None:
            pyplot.switch_backend(backend)


if __name__ == "__main__":
    sys.exit(main())
