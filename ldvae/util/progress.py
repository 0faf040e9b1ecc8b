"""Progress lines of long work (a fit's epochs off a terminal, the fits of several seeds):
through the ``ldvae`` loggers where something listens to them at INFO (the command line, a
session with logging configured), else straight to stderr, so that a script whose output
goes to a file (a batch job, ``nohup``) still says how far it is."""

from __future__ import annotations

import logging
import sys


def note(log: logging.Logger, message: str, *args) -> None:
    """``log.info(message, *args)`` if that reaches a handler, else the line on stderr."""
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(message, *args)
    else:
        print(message % args if args else message, file=sys.stderr, flush=True)
