"""Mapping new cells onto a trained model (scArches-style, Lotfollahi et al. 2022).

``prepare_query`` puts a query's genes in the reference's order (zeros for genes it lacks);
``query_model`` builds a model of the query cells that starts as the reference: its batch
categories are the reference's followed by the query's new ones, and every weight is the
reference's, with zero columns in the decoder's linear maps for the new batches (and, for
``dispersion="gene-batch"``, the mean of the reference's dispersions). Training it changes
only those new columns, and the encoders when asked; the factor loadings, the gene
intercepts and the reference's batch effects stay exactly as they were, so the query cells
land in the reference's factor space and every factor keeps its meaning."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..data.contract import SETUP_KEY, obs_categories
from ..data.setup import setup_anndata
from ..util.checks import SetupError
from .params import covariate_names

logger = logging.getLogger(__name__)

MIN_SHARED_GENES = 0.8  # below this share of the reference's genes the mapping is warned about
ENCODERS = ("z_encoder.", "l_encoder.")


def prepare_query_anndata(adata, reference_model, return_reference_var_names: bool = False,
                          inplace: bool = False):
    """``LinearSCVI.prepare_query_anndata``: the query over the reference's genes, or those genes."""
    names = pd.Index(reference_of(reference_model)[0]["var_names"])
    if return_reference_var_names:
        return names
    if inplace:
        raise SetupError("prepare_query_anndata(inplace=True) is not supported; use its result: "
                         "adata = LinearSCVI.prepare_query_anndata(adata, reference).")
    return prepare_query(adata, names)


def prepare_query(adata, var_names: pd.Index):
    """A new AnnData of ``adata``'s cells over ``var_names`` in that order: genes the query
    lacks are zero in ``X`` and every layer; genes the reference lacks are dropped."""
    import anndata

    names = pd.Index(adata.var_names.astype(str))
    shared = names.isin(var_names)
    if not shared.any():
        raise SetupError(
            "The query shares no gene with the reference model; compare adata.var_names with "
            "LinearSCVI.prepare_query_anndata(adata, reference, return_reference_var_names=True)."
        )
    share = names[shared].nunique() / len(var_names)
    logger.info("The query has %.1f%% of the reference's %d genes.", 100 * share, len(var_names))
    if share < MIN_SHARED_GENES:
        logger.warning("The query has only %.0f%% of the reference's genes; the missing ones are zero, which may "
                       "map its cells poorly.", 100 * share)
    position = pd.Series(np.arange(len(names)), index=names)
    position = position[~position.index.duplicated()]
    source = position.reindex(var_names).to_numpy()  # query column of each reference gene, NaN if absent
    have = ~np.isnan(source)
    pick = sp.csr_matrix((np.ones(have.sum()), (source[have].astype(np.int64), np.flatnonzero(have))),
                         shape=(len(names), len(var_names)))

    def reorder(mat):
        out = sp.csr_matrix(mat) @ pick
        return out.astype(np.asarray(mat[:0]).dtype if not sp.issparse(mat) else mat.dtype)

    var = pd.DataFrame(index=pd.Index(var_names, name=adata.var_names.name))
    return anndata.AnnData(X=None if adata.X is None else reorder(adata.X), obs=adata.obs.copy(), var=var,
                           obsm=dict(adata.obsm), uns={k: v for k, v in adata.uns.items() if k != SETUP_KEY},
                           layers={k: reorder(v) for k, v in adata.layers.items()})


def query_setup(adata, ref_setup: dict) -> dict:
    """Set up ``adata`` as the reference was, with the query's new batch categories after the
    reference's; labels and covariate categories must be ones the reference knows."""
    setup_anndata(adata, layer=ref_setup.get("layer"), batch_key=ref_setup.get("batch_key"),
                  labels_key=ref_setup.get("labels_key"),
                  categorical_covariate_keys=ref_setup.get("categorical_covariate_keys"),
                  continuous_covariate_keys=ref_setup.get("continuous_covariate_keys"))
    setup = dict(adata.uns[SETUP_KEY])
    if "batch_key" in ref_setup:
        known = list(ref_setup["batch_categories"])
        new = [c for c in setup["batch_categories"] if c not in known]
        setup["batch_categories"] = known + new
        logger.info("Query batches new to the reference: %s", new or "none")
    if "labels_key" in ref_setup:
        unknown = sorted(set(setup["label_categories"]) - set(ref_setup["label_categories"]))
        if unknown:
            raise SetupError(f"labels_key={ref_setup['labels_key']!r}: the query has labels the reference never saw "
                             f"({unknown[:5]}); only new batches can be mapped.")
        setup["label_categories"] = list(ref_setup["label_categories"])
    for key in ref_setup.get("categorical_covariate_keys", []):
        known = ref_setup["categorical_covariate_categories"][key]
        unknown = sorted(set(obs_categories(adata, key, "categorical_covariate_keys")) - set(known))
        if unknown:
            raise SetupError(f"categorical_covariate_keys: {key!r} has categories the reference never saw "
                             f"({unknown[:5]}); only new batches can be mapped.")
        setup["categorical_covariate_categories"][key] = list(known)
    adata.uns[SETUP_KEY] = setup
    return setup


def fits_anything(module, frozen: dict | None) -> bool:
    """Whether a model whose parameters ``frozen`` holds fixed (``TrainConfig.frozen``) has
    any entry left to fit: a parameter not named, or named with a mask."""
    return frozen is None or any(frozen.get(name, False) is not None for name, _ in module.named_parameters())


def transfer_weights(module, ref_state: dict, ref_setup: dict, setup: dict, n_latent: int, *,
                     train_encoder: bool) -> dict:
    """Copy the reference's weights into ``module`` (built for the query's setup) and return
    the ``TrainConfig.frozen`` that leaves only the new batch columns (and, with
    ``train_encoder``, the encoders) free."""
    old_cols, new_cols = covariate_names(ref_setup), covariate_names(setup)
    where = np.array([n_latent + new_cols.index(c) for c in old_cols], dtype=np.int64)
    fresh = torch.ones(n_latent + len(new_cols), dtype=torch.bool)  # True: held fixed
    n_old_batches = len(ref_setup.get("batch_categories", ["0"]))
    batch_key = setup.get("batch_key")
    for j, name in enumerate(new_cols):
        if batch_key is not None and name.startswith(f"{batch_key}:") and \
                name[len(batch_key) + 1:] not in ref_setup.get("batch_categories", []):
            fresh[n_latent + j] = False
    state = module.state_dict()
    frozen: dict = {}
    for key, value in state.items():
        old = ref_state[key]
        if key in ("library_log_means", "library_log_vars"):
            value[: n_old_batches] = old.reshape(-1)[:n_old_batches]  # new batches keep the query's own prior
        elif old.shape == value.shape:
            value.copy_(old)
        elif key.endswith("weight") and value.dim() == 2 and value.shape[1] == len(fresh):
            value.zero_()
            value[:, :n_latent] = old[:, :n_latent]
            value[:, torch.as_tensor(where)] = old[:, n_latent:]
            frozen[key] = fresh.expand_as(value).clone()
        elif key == "px_r" and value.dim() == 2:  # gene-batch dispersion: new batches start at the mean
            value[:, :n_old_batches] = old
            value[:, n_old_batches:] = old.mean(1, keepdim=True)
            mask = torch.ones_like(value, dtype=torch.bool)
            mask[:, n_old_batches:] = False
            frozen[key] = mask
        else:
            raise SetupError(f"The reference's {key} {tuple(old.shape)} does not fit the query model's "
                             f"{tuple(value.shape)}.")
    module.load_state_dict(state)
    for name, _ in module.named_parameters():
        if name not in frozen and not (train_encoder and name.startswith(ENCODERS)):
            frozen[name] = None
    return frozen


def reference_of(reference) -> tuple[dict, dict]:
    """The settings (as saved) and weights of a reference model or of its saved directory."""
    from .scvi_files import read_any_model

    if hasattr(reference, "module") and hasattr(reference, "setup_"):
        meta = {"var_names": list(reference.var_names_), "setup": reference.setup_,
                "init_params": reference.init_params_}
        return meta, {k: v.detach().cpu() for k, v in reference.module.state_dict().items()}
    return read_any_model(reference, None)
