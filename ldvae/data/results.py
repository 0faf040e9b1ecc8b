"""The one place that writes model results into an AnnData, scanpy style."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .contract import SetupError, check_not_view, plain

logger = logging.getLogger(__name__)


def result_keys(key_added: str = "ldvae") -> dict[str, str]:
    """Where results go: ``obsm["X_<key>"]``, ``varm["<key>_loadings"]``, ``uns["<key>"]``;
    obs columns ``Z_i`` for the default key, ``<key>_Z_i`` otherwise."""
    if not isinstance(key_added, str) or not key_added.strip():
        raise SetupError(f"key_added must be a non-empty name, got {key_added!r}.")
    return {
        "obsm": f"X_{key_added}",
        "varm": f"{key_added}_loadings",
        "uns": key_added,
        "obs_prefix": "Z_" if key_added == "ldvae" else f"{key_added}_Z_",
    }


def set_obs_columns(adata, columns: dict) -> None:
    """Set the obs columns ``columns`` (name -> one value per cell) in one step: inserted one by
    one, many columns fragment ``obs`` (pandas then warns once per insert). Columns already
    there are replaced and move to the end."""
    new = pd.DataFrame(columns)
    kept = adata.obs.drop(columns=[c for c in new.columns if c in adata.obs.columns]).reset_index(drop=True)
    obs = pd.concat([kept, new], axis=1)  # by position: obs names may repeat
    obs.index = adata.obs.index
    adata.obs = obs


def gene_positions(var_names: pd.Index, genes: pd.Index) -> np.ndarray:
    """Where each of ``genes`` lies in ``var_names``, which may repeat names the model does
    not use (a full 10x matrix's gene symbols); a model gene named twice is refused."""
    repeated = var_names.duplicated(keep=False)
    ambiguous = genes[genes.isin(var_names[repeated])]
    if len(ambiguous):
        raise SetupError(f"adata names the model's gene {ambiguous[0]!r} more than once, so its column is ambiguous; "
                         "make the names unique first (adata.var_names_make_unique()) or drop the copies.")
    kept = np.flatnonzero(~repeated)
    return kept[var_names[kept].get_indexer(genes)]


def write_results(model, adata=None, *, key_added: str = "ldvae", obs_columns: bool = False, copy: bool = False):
    """Write a trained model's results into ``adata`` (default: the training AnnData).

    ``adata`` may hold more genes than the model (e.g. before HVG subsetting); cells are
    encoded from the model's genes and unmodelled genes get NaN loadings.

    Writes
    ------
    obsm["X_<key>"]
        Latent means, float32, (n_obs, n_latent).
    varm["<key>_loadings"]
        Loadings, float32, (n_vars, n_latent); NaN rows for genes the model does not have.
    uns["<key>"]
        ``params`` (model settings), ``loadings_columns``, ``genes_modelled``,
        ``final_elbo_validation`` / ``final_elbo_train`` when known.
    obs["Z_0"] … obs["Z_{K-1}"]
        Only with ``obs_columns=True`` (the tutorial's columns).

    Returns
    -------
    The AnnData written to when ``copy=True``, else None.
    """
    model._check_trained()
    keys = result_keys(key_added)  # a bad key is refused before any work
    adata = model.adata if adata is None else adata
    if copy:
        adata = adata.to_memory() if adata.isbacked else adata.copy()  # a backed copy would need a new file
    else:
        check_not_view(adata, "write_results", "; or use copy=True")
    genes = model.var_names_
    var_names = pd.Index(adata.var_names.astype(str))
    missing = genes.difference(var_names)
    if len(missing):
        raise SetupError(
            f"adata lacks {len(missing)} of the model's genes (first: {missing[0]!r}); cannot encode its cells."
        )
    same = var_names.equals(genes)
    pos = np.arange(len(genes)) if same else gene_positions(var_names, genes)
    z = model.get_latent_representation(adata if same else adata[:, pos]).astype(np.float32)
    loadings = model.get_loadings()
    full = np.full((adata.n_vars, loadings.shape[1]), np.nan, dtype=np.float32)
    full[pos] = loadings.to_numpy(dtype=np.float32)
    adata.obsm[keys["obsm"]] = z
    adata.varm[keys["varm"]] = full
    info = {
        "params": plain(model.init_params_),
        "loadings_columns": list(loadings.columns),
        "genes_modelled": int(len(genes)),
    }
    hist = model.history
    for name in ("elbo_train", "elbo_validation"):
        if name in hist and len(hist[name]):
            info[f"final_{name}"] = float(hist[name].iloc[-1, 0])
    adata.uns[keys["uns"]] = info
    added = [f"obsm[{keys['obsm']!r}]", f"varm[{keys['varm']!r}]", f"uns[{keys['uns']!r}]"]
    if obs_columns:
        set_obs_columns(adata, {f"{keys['obs_prefix']}{i}": z[:, i] for i in range(z.shape[1])})
        added.append(f"obs[{keys['obs_prefix']}0 … {keys['obs_prefix']}{z.shape[1] - 1}]")
    logger.info("added %s", ", ".join(added))
    return adata if copy else None
