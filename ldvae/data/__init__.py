"""The data layer: the AnnData contract (counts, covariates, setup), counts on disk,
readers, simulation and the results written back into AnnData."""

from .contract import (
    CountData,
    Covariates,
    SetupError,
    check_not_view,
    get_counts,
    get_setup,
    library_prior,
    obs_categories,
    read_covariates,
    to_csr,
    validate_counts,
)
from .setup import setup_anndata

__all__ = ["CountData", "Covariates", "SetupError", "check_not_view", "get_counts", "get_setup",
           "library_prior", "obs_categories", "read_covariates", "setup_anndata", "to_csr", "validate_counts"]
