"""The ``ldvae`` command line: ``run``, ``demo`` and the factor-interpretation commands."""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
