"""A model and a checkpoint saved by an earlier ldvae (tests/fixtures/saved_model, written by
the script below with ldvae 0.1.0) still load, give the same results and resume training.

    ad = ldvae.simulate(n_cells=80, n_genes=40, n_latent=3, n_batches=2, seed=3)
    ad.X = ad.layers["counts"].copy()
    ldvae.LinearSCVI.setup_anndata(ad, layer="counts", batch_key="batch")
    m = ldvae.LinearSCVI(ad, n_latent=3, n_hidden=16)
    m.train(max_epochs=3, batch_size=32, progress_bar=False, checkpoint_dir=out + "/checkpoint")
    m.save(out + "/model"); ad.write_h5ad(out + "/data.h5ad")
    np.save(out + "/latent.npy", m.get_latent_representation())
    m.get_loadings().to_csv(out + "/loadings.csv")
"""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

import ldvae

SAVED = Path(__file__).parent / "fixtures" / "saved_model"


@pytest.fixture
def saved():
    adata = anndata.read_h5ad(SAVED / "data.h5ad")
    return ldvae.LinearSCVI.load(SAVED / "model", adata=adata, accelerator="cpu"), adata


def test_saved_model_gives_its_latent_and_loadings(saved):
    model, _ = saved
    assert model.is_trained_
    assert model.init_params_["n_latent"] == 3 and model.init_params_["n_hidden"] == 16
    np.testing.assert_allclose(model.get_latent_representation(), np.load(SAVED / "latent.npy"),
                               rtol=1e-5, atol=1e-6)
    expected = pd.read_csv(SAVED / "loadings.csv", index_col=0)
    loadings = model.get_loadings()
    assert list(loadings.index) == list(expected.index.astype(str))
    assert list(loadings.columns) == list(expected.columns)
    np.testing.assert_allclose(loadings.to_numpy(), expected.to_numpy(), rtol=1e-5, atol=1e-6)


def test_saved_model_keeps_its_history(saved):
    model, _ = saved
    assert model.train_state_.epoch == 3
    assert list(model.history["elbo_train"].index) == [0, 1, 2]


def test_saved_checkpoint_resumes_training(saved):
    model, _ = saved
    model.train(max_epochs=5, batch_size=32, progress_bar=False, accelerator="cpu",
                resume_from=SAVED / "checkpoint")
    assert model.train_state_.epoch == 5
    assert list(model.history["elbo_train"].index) == [0, 1, 2, 3, 4]
    assert np.isfinite(model.get_latent_representation()).all()


def test_saved_model_saves_the_same_json(saved, tmp_path):
    model, _ = saved
    model.save(tmp_path / "again")
    import json

    before = json.loads((SAVED / "model" / "ldvae_model.json").read_text())
    after = json.loads((tmp_path / "again" / "ldvae_model.json").read_text())
    for key in ("format", "format_version", "init_params", "setup", "var_names", "n_cells", "is_trained",
                "train_state"):
        assert after[key] == before[key], key
