"""Reading pickles that other tools wrote (scvi-tools' ``attr.pkl`` and ``model.pt``) without
running their code: an unpickler that admits only an allow-list of NumPy and builtin
constructors and refuses every other global, so a hostile file raises instead of
executing anything. :func:`safe_torch_load` reads a file written by ``torch.save`` in the
same way, rebuilding its tensors itself."""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import zipfile

import torch

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
# The element type of each of torch's storage classes, as ``torch.save`` names them.
TORCH_STORAGES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class RefusedPickle(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list; nothing of it was run."""


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: set[tuple[str, str]]):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        # pickle protocols < 3 (torch.save's default) spell builtins as Python 2 did
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in self.allowed:
            raise RefusedPickle(f"the pickle asks for {module}.{name}, which is not on the allow-list of plain data "
                                "types; it was not loaded")
        return super().find_class(module, name)


def safe_loads(data: bytes, allowed: set[tuple[str, str]] = ALLOWED):
    """Unpickle ``data`` admitting only the globals in ``allowed`` (RefusedPickle otherwise)."""
    return _AllowListUnpickler(io.BytesIO(data), allowed).load()


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, requires_grad=False, hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` for a storage held as a flat tensor (bounds checked)."""
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _TorchUnpickler(_AllowListUnpickler):
    """The pickle inside ``torch.save``'s zip: tensors rebuilt from the archive's storage
    records, other globals only from the allow-list."""

    def __init__(self, file, allowed: set[tuple[str, str]], archive: zipfile.ZipFile, root: str):
        super().__init__(file, allowed)
        self.archive, self.root, self.storages = archive, root, {}

    def find_class(self, module: str, name: str):
        if module == "torch" and name in TORCH_STORAGES:
            return TORCH_STORAGES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        return super().find_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str)):
            raise RefusedPickle(f"the pickle refers to {pid!r}, which is not a tensor storage; it was not loaded")
        dtype, key = pid[1], pid[2]
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.root}data/{key}"))
            self.storages[key] = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return self.storages[key]


def safe_torch_load(path: str | os.PathLike, allowed: set[tuple[str, str]]):
    """What ``torch.save`` wrote to ``path`` (its zip layout), with tensors on the CPU, admitting
    only torch's tensors and the globals in ``allowed`` (RefusedPickle naming any other;
    ``pickle.UnpicklingError`` for a file that is not in ``torch.save``'s layout)."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise pickle.UnpicklingError(f"{path} is not a file written by torch.save ({err})") from err
    with archive:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)
        if pkl is None:
            raise pickle.UnpicklingError(f"{path} is not a file written by torch.save (it holds no data.pkl)")
        root = pkl[: -len("data.pkl")]
        if f"{root}byteorder" in names and archive.read(f"{root}byteorder") != b"little":
            raise pickle.UnpicklingError(f"{path} was written on a big-endian machine; load it there and save again")
        return _TorchUnpickler(io.BytesIO(archive.read(pkl)), allowed, archive, root).load()
