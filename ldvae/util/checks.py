"""Checks of argument values shared by every layer, and the error they raise."""

from __future__ import annotations

import math

import numpy as np


class SetupError(ValueError):
    """Bad input to setup_anndata, the model, a query or a command; the message says how to fix it."""


class MissingKeyError(SetupError, KeyError):
    """A column or key that is not there (an ``adata.obs`` column, say): also the KeyError
    scvi-tools raises there."""

    def __str__(self) -> str:  # the message as written, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


class ModelNotFoundError(FileNotFoundError, ValueError):
    """No saved model where one was asked for; also a ValueError, which scvi-tools raises there."""


class ExistingModelError(FileExistsError, ValueError):
    """A model would be saved over files already there, without ``overwrite=True``; also a
    ValueError, which scvi-tools raises there."""


def check_number(name: str, value, *, integer: bool = False, minimum: float | None = None,
                 exclusive: bool = False, maximum: float | None = None, flag: str | None = None) -> None:
    """Raise SetupError unless ``value`` is a finite number (an integer with ``integer=True``)
    at least ``minimum`` (above it with ``exclusive=True``) and at most ``maximum``.

    The message names the argument (and its command-line ``flag`` when given), the
    constraint and the value received."""
    if integer:
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
            and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if exclusive else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if ok:
        return
    what = "an integer" if integer else "a finite number"
    lo, hi = (f"{b:g}" if isinstance(b, float) else str(b) for b in (minimum, maximum))
    if minimum == 0 and exclusive and maximum is None:
        constraint = f"a positive {'integer' if integer else 'finite number'}"
    elif integer and minimum == 1 and maximum is None:
        constraint = "a positive integer"
    elif minimum is not None and maximum is not None:
        constraint = f"{what} in {'(' if exclusive else '['}{lo}, {hi}]"
    elif minimum is not None:
        constraint = f"{what} {'>' if exclusive else '>='} {lo}"
    elif maximum is not None:
        constraint = f"{what} <= {hi}"
    else:
        constraint = what
    raise SetupError(f"{name} must be {constraint}, got {value!r}" + (f" ({flag})." if flag else "."))


def positive_int(name: str, value) -> int:
    """``value`` as an int; SetupError unless it is a positive integer."""
    check_number(name, value, integer=True, minimum=1)
    return int(value)
