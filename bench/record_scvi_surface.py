"""Record the public API surface of scvi-tools' ``LinearSCVI`` as JSON.

Writes tests/data/scvi_linear_scvi_surface.json (or ``--out``): the scvi-tools version;
every public member of ``scvi.model.LinearSCVI`` with its kind (method, classmethod,
staticmethod, property, attribute), parameters and return annotation; the public
attributes a trained instance carries beyond its class; and the parameters of
``LinearSCVI.__init__``, ``LinearSCVI.setup_anndata`` and of the classes that receive
``train``'s extra keyword arguments (``TrainingPlan``, ``Trainer``, ``DataSplitter``).
Each parameter is ``[name, kind, repr(default) or null]``.

Run with the python of an environment that has scvi-tools installed:

    /path/to/scvi-venv/bin/python bench/record_scvi_surface.py
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import warnings
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "scvi_linear_scvi_surface.json"


def annotation(a) -> str | None:
    if a is inspect.Signature.empty:
        return None
    return a if isinstance(a, str) else inspect.formatannotation(a)


def signature(func, drop_first: bool = False) -> dict:
    sig = inspect.signature(func)
    params = list(sig.parameters.values())[1 if drop_first else 0:]
    return {
        "parameters": [
            [p.name, p.kind.name, None if p.default is inspect.Parameter.empty else repr(p.default)]
            for p in params
        ],
        "returns": annotation(sig.return_annotation),
    }


def describe_member(cls, name: str) -> dict:
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, staticmethod):
        return {"kind": "staticmethod", **signature(getattr(cls, name))}
    if isinstance(raw, classmethod):
        return {"kind": "classmethod", **signature(getattr(cls, name))}  # bound: cls dropped
    if isinstance(raw, property):
        returns = annotation(inspect.signature(raw.fget).return_annotation) if raw.fget else None
        return {"kind": "property", "parameters": None, "returns": returns}
    if inspect.isfunction(raw):
        return {"kind": "method", **signature(raw, drop_first=True)}
    return {"kind": "attribute", "parameters": None, "returns": None, "type": type(raw).__name__}


def trained_instance():
    import scvi
    from scvi.model import LinearSCVI

    scvi.settings.seed = 0
    scvi.settings.verbosity = logging.ERROR
    adata = scvi.data.synthetic_iid()
    LinearSCVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    model = LinearSCVI(adata)
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import scvi
    from scvi.dataloaders import DataSplitter
    from scvi.model import LinearSCVI
    from scvi.train import Trainer, TrainingPlan

    public = [n for n in dir(LinearSCVI) if not n.startswith("_")]
    members = {name: describe_member(LinearSCVI, name) for name in public}
    model = trained_instance()
    for name, value in vars(model).items():
        if not name.startswith("_") and name not in members:
            members[name] = {"kind": "attribute", "parameters": None, "returns": None,
                             "type": type(value).__name__}

    surface = {
        "scvi_tools_version": scvi.__version__,
        "members": members,
        "init": signature(LinearSCVI.__init__, drop_first=True)["parameters"],
        "setup_anndata": signature(LinearSCVI.setup_anndata)["parameters"],
        "train_kwargs": {
            "training_plan": signature(TrainingPlan.__init__, drop_first=True)["parameters"],
            "trainer": signature(Trainer.__init__, drop_first=True)["parameters"],
            "data_splitter": signature(DataSplitter.__init__, drop_first=True)["parameters"],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(surface, sort_keys=True, indent=1) + "\n")
    kinds: dict[str, int] = {}
    for m in members.values():
        kinds[m["kind"]] = kinds.get(m["kind"], 0) + 1
    print(f"scvi-tools {scvi.__version__}: {len(members)} members {kinds} -> {args.out}")


if __name__ == "__main__":
    main()
