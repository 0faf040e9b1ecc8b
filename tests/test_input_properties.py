"""Input validation under fuzzing.

Arbitrary small AnnData objects (random dtypes, dense/CSR/CSC/COO storage, NaN, inf,
negative and non-integer entries, empty cells and genes, random obs columns and keys) go
through ``setup_anndata`` and a one-epoch fit. Each either succeeds or raises a
``SetupError`` (a ``ValueError``) whose message is one of the documented ones, and the
input AnnData is never modified, except for ``uns["ldvae_setup"]`` after a successful
setup.
"""

from __future__ import annotations

import copy
import re
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ldvae
from ldvae import SetupError
from ldvae.data.contract import validate_counts

pytestmark = pytest.mark.filterwarnings("ignore")

# Every message setup_anndata, LinearSCVI(...) and train(...) may give for bad input.
DOCUMENTED = [
    r"LDVAE models raw counts, but adata\.(X|layers\['counts'\]) has (a non-finite value|negative values"
    r"|non-integer values|values too large to be counts)",
    r"adata\.(X|layers\['counts'\]) has dtype .*; LDVAE needs numeric raw counts",
    r"adata has no (cells|genes)",
    r"is not a column of adata\.obs",
    r"cells have a missing value in adata\.obs",
    r"continuous_covariate_keys: adata\.obs\[.*\] must be finite numbers",
    r"LDVAE needs at least 2 training cells",
    r"layer='counts' is not in adata\.layers",
    r"adata\.X is empty",
]

INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
FLOAT_DTYPES = [np.float16, np.float32, np.float64]
SPECIAL = [np.nan, np.inf, -np.inf, -1.0, 0.5, 2.25, 1e6, 1e30, 1e300]


@st.composite
def count_matrices(draw, formats=("dense", "csr", "csc", "coo")):
    # mostly shapes a model can fit, sometimes degenerate ones
    n_obs = draw(st.sampled_from([3, 4, 5, 6, 7, 8, 0, 1, 2]))
    n_vars = draw(st.sampled_from([1, 2, 3, 4, 5, 0]))
    dtype = np.dtype(draw(st.sampled_from([*INT_DTYPES, *FLOAT_DTYPES, np.bool_])))
    if dtype == np.bool_:
        elements = st.booleans()
    elif dtype.kind in "iu":
        lo = -3 if dtype.kind == "i" else 0
        elements = st.integers(1, 5) | st.integers(1, 5) | st.integers(lo, min(int(np.iinfo(dtype).max), 10**6))
    else:
        limit = float(np.finfo(dtype).max)
        specials = [v for v in SPECIAL if not np.isfinite(v) or abs(v) <= limit]
        elements = st.integers(1, 20).map(float) | st.integers(0, 20).map(float) | st.integers(1, 9).map(float) | st.sampled_from(specials)
    arr = draw(hnp.arrays(dtype, (n_obs, n_vars), elements=elements))
    empty = draw(st.sampled_from(["none", "none", "none", "cell", "gene", "gene"])) if n_obs and n_vars else "none"
    if empty == "cell":
        arr[draw(st.integers(0, n_obs - 1)), :] = 0
    elif empty == "gene":
        arr[:, draw(st.integers(0, n_vars - 1))] = 0
    fmt = draw(st.sampled_from(formats)) if dtype != np.float16 else "dense"  # scipy has no float16
    mat = arr if fmt == "dense" else {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "coo": sp.coo_matrix}[fmt](arr)
    return mat


OBS_COLUMN_KINDS = ["category", "str", "str_nan", "int", "float", "float_nan", "bool", "cat_nan", "cat_int"]


def _obs_column(kind: str, n: int, rng: np.random.Generator):
    codes = rng.integers(0, 3, size=n)
    if kind == "category":
        return pd.Categorical([f"c{c}" for c in codes], categories=["c0", "c1", "c2", "unused"])
    if kind == "str":
        return np.array([f"s{c}" for c in codes], dtype=object)
    if kind == "str_nan":
        return np.array([None if c == 0 else f"s{c}" for c in codes], dtype=object)
    if kind == "int":
        return codes.astype(np.int64)
    if kind == "float":
        return codes.astype(float) / 2
    if kind == "float_nan":
        return np.where(codes == 0, np.nan, codes.astype(float))
    if kind == "bool":
        return codes > 0
    if kind == "cat_nan":
        return pd.Categorical([None if c == 0 else f"k{c}" for c in codes])
    return pd.Categorical(codes)  # integer categories


@st.composite
def adatas(draw):
    mat = draw(count_matrices(formats=("dense", "csr", "csc")))  # AnnData itself refuses COO
    n_obs, n_vars = mat.shape
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    names = draw(st.lists(st.text("abcxyz_ ", min_size=1, max_size=4), unique=True, max_size=4))
    obs = pd.DataFrame(
        {name: _obs_column(draw(st.sampled_from(OBS_COLUMN_KINDS)), n_obs, rng) for name in names},
        index=[f"cell{i}" for i in range(n_obs)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_vars)])
    where = draw(st.sampled_from(["X", "X", "layer", "layer", "layer_missing"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if where == "X":
            adata = anndata.AnnData(X=mat, obs=obs, var=var)
        else:
            adata = anndata.AnnData(X=np.full((n_obs, n_vars), 0.5, dtype=np.float32), obs=obs, var=var)
            if where == "layer":
                adata.layers["counts"] = mat
    adata.uns["user"] = {"note": "keep me"}
    keys = st.sampled_from([*names, "missing key"])
    maybe = st.booleans().flatmap(lambda use: keys if use else st.none())
    setup = {
        "layer": None if where == "X" else "counts",
        "batch_key": draw(maybe),
        "labels_key": draw(maybe),
        "categorical_covariate_keys": draw(st.none() | st.lists(keys, max_size=2, unique=True)),
        "continuous_covariate_keys": draw(st.none() | st.lists(keys, max_size=2, unique=True)),
    }
    return adata, setup


def _same_values(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if sp.issparse(a):
        if a.shape != b.shape or a.dtype != b.dtype or a.format != b.format:
            return False
        parts = ("data", "row", "col") if a.format == "coo" else ("data", "indices", "indptr")
        return all(_same_values(getattr(a, p), getattr(b, p)) for p in parts)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, pd.DataFrame):
        return a.equals(b) and list(a.dtypes) == list(b.dtypes) and a.index.equals(b.index)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_values(a[k], b[k]) for k in a)
    return a == b


def _assert_unmodified(before, after, *, setup_done: bool) -> None:
    assert _same_values(before.X, after.X), "adata.X was modified"
    assert before.layers.keys() == after.layers.keys()
    for key in before.layers.keys():
        assert _same_values(before.layers[key], after.layers[key]), f"adata.layers[{key!r}] was modified"
    obs_after = after.obs
    uns_after = dict(after.uns)
    if setup_done:  # what setup writes: the record, and scvi-tools' code columns
        assert isinstance(uns_after.pop("ldvae_setup"), dict)
        codes = obs_after[["_scvi_batch", "_scvi_labels"]].to_numpy()
        assert codes.dtype == np.int64 and codes.min(initial=0) >= 0
        obs_after = obs_after.drop(columns=["_scvi_batch", "_scvi_labels"])
    assert _same_values(before.obs, obs_after), "adata.obs was modified"
    assert _same_values(before.var, after.var), "adata.var was modified"
    assert _same_values(dict(before.uns), uns_after), "adata.uns was modified"
    assert list(before.obsm.keys()) == list(after.obsm.keys()) and list(before.varm.keys()) == list(after.varm.keys())


def _assert_documented(err: Exception) -> None:
    assert isinstance(err, SetupError), f"undocumented error {type(err).__name__}: {err}"
    assert any(re.search(p, str(err)) for p in DOCUMENTED), f"undocumented message: {err}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adatas())
def test_setup_and_tiny_fit_succeed_or_raise_documented_errors(case):
    adata, setup = case
    before = copy.deepcopy(adata)
    setup_done = False
    try:
        ldvae.LinearSCVI.setup_anndata(adata, **setup)
        setup_done = True
        model = ldvae.LinearSCVI(adata, n_latent=2, n_hidden=8)
        model.train(max_epochs=1, batch_size=4, accelerator="cpu", progress_bar=False)
        assert np.isfinite(model.get_latent_representation()).all()
        event("fitted")
    except SetupError as err:
        _assert_documented(err)
        event(next(p for p in DOCUMENTED if re.search(p, str(err)))[:40])
    except Exception as err:  # noqa: BLE001 - the property: nothing else escapes
        pytest.fail(f"undocumented {type(err).__name__}: {err}")
    _assert_unmodified(before, adata, setup_done=setup_done)


@settings(max_examples=40, deadline=None)
@given(count_matrices())
def test_validation_agrees_across_storage_formats(mat):
    """Dense, CSR, CSC and COO copies of one matrix get the same verdict and message
    (COO only through ``validate_counts``: AnnData does not store COO)."""
    dense = mat.toarray() if sp.issparse(mat) else mat
    assume(dense.dtype != np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = anndata.AnnData(X=dense.astype(np.float32))
    before = dense.copy()
    verdicts = set()
    for convert in (np.asarray, sp.csr_matrix, sp.csc_matrix, sp.coo_matrix):
        stored = convert(dense)
        try:
            validate_counts(names, stored, None)
            verdicts.add("ok")
        except SetupError as err:
            _assert_documented(err)
            verdicts.add(str(err))
        assert _same_values(stored.toarray() if sp.issparse(stored) else stored, before)
    assert len(verdicts) == 1, verdicts
