"""``setup_anndata``: check an AnnData's counts and covariates once and record the choices.

Counts in memory are checked here; counts on disk in one streaming pass
(``ldvae.data.backed.scan_counts``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..util.checks import SetupError
from .backed import scan_counts
from .disk import is_on_disk
from .contract import (
    SETUP_KEY,
    Covariates,
    check_not_view,
    get_counts,
    obs_categories,
    obs_column,
    read_covariates,
    validate_counts,
    warn_empty_cells,
    warn_repeated_genes,
)

MAX_COVARIATE = 1e15  # a continuous covariate's magnitude; its products with weights stay finite in float32


def setup_anndata(
    adata,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
) -> Covariates:
    """Check the counts and covariates and record the choices in ``adata.uns["ldvae_setup"]``.

    The input is not modified otherwise; on any error nothing is written. Returns the
    covariates read under the new setup (each cell's codes and values).
    """
    check_not_view(adata)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise SetupError(
            f"adata has no {'cells' if adata.n_obs == 0 else 'genes'} (shape {adata.n_obs} x {adata.n_vars}); "
            "LDVAE needs at least 2 cells and 1 gene. Check the filtering that produced it."
        )
    mat = get_counts(adata, layer)
    if is_on_disk(mat):  # backed AnnData: every stored value checked in one streaming pass
        n_empty = scan_counts(adata, layer).n_empty
    else:
        validate_counts(adata, mat, layer)
        totals = np.asarray(mat.sum(axis=1)).ravel()
        n_empty = int((totals <= 0).sum())
    warn_empty_cells(n_empty, adata.n_obs)
    warn_repeated_genes(adata.var_names)
    setup: dict = {}
    if layer is not None:
        setup["layer"] = layer
    for key, arg, cat_name in ((batch_key, "batch_key", "batch"), (labels_key, "labels_key", "label")):
        if key is not None:
            setup[arg] = key
            setup[f"{cat_name}_categories"] = obs_categories(adata, key, arg)
    if categorical_covariate_keys:
        setup["categorical_covariate_keys"] = list(categorical_covariate_keys)
        setup["categorical_covariate_categories"] = {
            k: obs_categories(adata, k, "categorical_covariate_keys")
            for k in categorical_covariate_keys
        }
    if continuous_covariate_keys:
        for k in continuous_covariate_keys:
            col = obs_column(adata, k, "continuous_covariate_keys")
            vals = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)
            if not np.isfinite(vals).all():
                raise SetupError(
                    f"continuous_covariate_keys: adata.obs[{k!r}] must be finite numbers "
                    f"({int((~np.isfinite(vals)).sum())} cells are not)."
                )
            if np.abs(vals).max() > MAX_COVARIATE:
                raise SetupError(
                    f"continuous_covariate_keys: adata.obs[{k!r}] reaches {np.abs(vals).max():.3g}, too large for "
                    f"float32 training (limit {MAX_COVARIATE:.0e}); scale it first, e.g. to unit variance."
                )
        setup["continuous_covariate_keys"] = list(continuous_covariate_keys)
    covariates = read_covariates(adata, setup)  # every code can be read under this setup, before anything is written
    adata.uns[SETUP_KEY] = setup
    return covariates
