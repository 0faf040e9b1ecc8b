"""Earlier module paths (``ldvae.stability``, ``ldvae.stream``, ...) as aliases of the
modules that now hold that code, so code written against them keeps working.

An alias is the very module object (``ldvae.stream is ldvae.data.backed``), so setting a
module attribute through either name changes the one record."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

ALIASES = {
    "ldvae.io": "ldvae.util.io",
    "ldvae.prefetch": "ldvae.util.prefetch",
    "ldvae.module": "ldvae.nn.module",
    "ldvae.likelihoods": "ldvae.nn.likelihoods",
    "ldvae.cpu_kernels": "ldvae.cpu.kernels",
    "ldvae.cpu_step": "ldvae.cpu.step",
    "ldvae.cpu_loop": "ldvae.cpu.loop",
    "ldvae.fused": "ldvae.cpu.fused",
    "ldvae.stream": "ldvae.data.backed",
    "ldvae.readers": "ldvae.data.readers",
    "ldvae.simulate": "ldvae.data.simulate",
    "ldvae.results": "ldvae.data.results",
    "ldvae.optim": "ldvae.train.optim",
    "ldvae.posterior": "ldvae.query.posterior",
    "ldvae.de": "ldvae.query.de",
    "ldvae.interpret": "ldvae.factors.interpret",
    "ldvae.stability": "ldvae.factors.stability",
    "ldvae.seeds": "ldvae.factors.seeds",
    "ldvae.enrichment": "ldvae.factors.enrichment",
    "ldvae.plotting": "ldvae.workflow.plotting",
    "ldvae.report": "ldvae.workflow.report",
    "ldvae.interpret_report": "ldvae.workflow.interpret_report",
    "ldvae.cli_interpret": "ldvae.cli.interpret",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in ALIASES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(ALIASES[spec.name])

    def exec_module(self, module):
        pass  # the target module ran when it was imported


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
