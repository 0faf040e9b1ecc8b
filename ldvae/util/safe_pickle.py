"""Reading pickles that other tools wrote (scvi-tools' ``attr.pkl``) without running their
code: an unpickler that admits only an allow-list of NumPy and builtin constructors and
refuses every other global, so a hostile file raises instead of executing anything."""

from __future__ import annotations

import io
import pickle

# (module, name) pairs a NumPy array, dtype or scalar pickles to, in NumPy 1.x and 2.x.
NUMPY_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
     ("numpy._core.numeric", "_frombuffer")}
BUILTIN_GLOBALS = {("builtins", name) for name in ("list", "dict", "set", "frozenset", "tuple", "slice", "complex",
                                                    "bytearray", "range")}
ALLOWED = NUMPY_GLOBALS | BUILTIN_GLOBALS


class RefusedPickle(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list; nothing of it was run."""


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: set[tuple[str, str]]):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise RefusedPickle(f"the pickle asks for {module}.{name}, which is not on the allow-list of plain data "
                                "types; it was not loaded")
        return super().find_class(module, name)


def safe_loads(data: bytes, allowed: set[tuple[str, str]] = ALLOWED):
    """Unpickle ``data`` admitting only the globals in ``allowed`` (RefusedPickle otherwise)."""
    return _AllowListUnpickler(io.BytesIO(data), allowed).load()
