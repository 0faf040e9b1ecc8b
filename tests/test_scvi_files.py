"""scvi-tools' saved LinearSCVI directories, both ways, without scvi-tools: models saved by
scvi-tools 1.4.2 and 1.5.1 give scvi-tools' own outputs in ldvae, and models ldvae writes
give in scvi-tools what ldvae computes (fixtures by bench/make_scvi_fixtures.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

import ldvae
from ldvae.model.scvi_files import SCVI_GLOBALS, is_scvi_model, read_scvi_model, write_scvi_model
from ldvae.train.config import ModelFileError
from ldvae.util.checks import SetupError
from ldvae.util.safe_pickle import safe_torch_load

from conftest import SCVI_HISTORY_KEYS

FIXTURES = Path(__file__).parent / "fixtures" / "scvi_models"
SCVI_SAVED = sorted(p.name for p in FIXTURES.glob("scvi1*"))
LDVAE_WRITTEN = [(d.name, f.name) for d in sorted(FIXTURES.glob("ldvae_*"))
                 for f in sorted(d.glob("scvi*_outputs.npz"))]


def counts() -> anndata.AnnData:
    return anndata.read_h5ad(FIXTURES / "counts.h5ad")


def load_scvi_dir(path, *, prefix: str | None = None, saved_adata: bool = False) -> ldvae.LinearSCVI:
    """``LinearSCVI.load`` of a scvi-tools directory (on counts.h5ad, or on the AnnData saved beside it)."""
    return ldvae.LinearSCVI.load(path, adata=None if saved_adata else counts(), prefix=prefix, accelerator="cpu")


def outputs(model) -> dict[str, np.ndarray]:
    """What the fixture script records from scvi-tools, computed by ldvae on every cell:
    decoded at the latent mean, so every value is deterministic."""
    qz_m, qz_v = model.get_latent_representation(return_dist=True)
    b = model._data().gather(torch.arange(model.adata.n_obs))
    with torch.no_grad():
        inf = model.module.inference(b, use_mean=True)
        gen = model.module.generative(inf.qz_m, inf.library, model.module.covariate_columns(b), b.batch, b.label)
    out = {"qz_m": qz_m, "qz_v": qz_v, "loadings": model.get_loadings().to_numpy(), "rho": gen.log_rho.exp().numpy()}
    if inf.ql_m is not None:
        out["ql_m"] = inf.ql_m.numpy()
    if gen.log_theta is not None:
        out["theta"] = np.broadcast_to(gen.log_theta.detach().exp().numpy(), out["rho"].shape)
    if gen.zi_logits is not None:
        out["zi_logits"] = gen.zi_logits.numpy()
    return out


def assert_same_outputs(mine: dict, expected) -> None:
    assert set(mine) == set(expected.files) - {"validation_indices"}
    for name in ("qz_m", "qz_v", "loadings", "ql_m", "zi_logits"):
        if name in mine:
            np.testing.assert_allclose(mine[name], expected[name], rtol=0, atol=1e-4, err_msg=name)
    for name in ("rho", "theta"):  # positive, over orders of magnitude: relative
        if name in mine:
            np.testing.assert_allclose(mine[name], expected[name], rtol=1e-4, atol=0, err_msg=name)


def train_small(**kwargs) -> ldvae.LinearSCVI:
    setup = kwargs.pop("setup", {"batch_key": "batch", "labels_key": "cell_type"})
    adata = counts()
    ldvae.LinearSCVI.setup_anndata(adata, **setup)
    ldvae.settings.seed = 0
    model = ldvae.LinearSCVI(adata, n_hidden=16, n_latent=3, **kwargs)
    model.train(max_epochs=2, batch_size=16, accelerator="cpu", progress_bar=False, seed=0)
    return model


def resave(tmp_path, name: str, edit) -> Path:
    """A copy of fixture ``name`` whose loaded payload was changed by ``edit``."""
    payload = safe_torch_load(FIXTURES / name / "model.pt", SCVI_GLOBALS)
    edit(payload)
    out = tmp_path / "edited"
    out.mkdir()
    torch.save(payload, out / "model.pt")
    return out


# --- scvi-tools -> ldvae ---------------------------------------------------------------------
@pytest.mark.parametrize("name", SCVI_SAVED)
def test_scvi_saved_model_gives_scvi_tools_outputs(name):
    model = load_scvi_dir(FIXTURES / name)
    assert_same_outputs(outputs(model), np.load(FIXTURES / name / "expected.npz"))


@pytest.mark.parametrize("name", SCVI_SAVED)
def test_scvi_saved_model_keeps_setup_genes_history_and_split(name):
    model = load_scvi_dir(FIXTURES / name)
    expected = np.load(FIXTURES / name / "expected.npz")
    setup = model.setup_
    if "nb_batch_labels" in name:
        assert setup == {"batch_key": "batch", "batch_categories": ["b0", "b1", "b2"], "labels_key": "cell_type",
                         "label_categories": ["alpha", "beta"]}
    elif "zinb_gene_batch" in name:
        assert setup == {"batch_key": "batch", "batch_categories": ["b0", "b1", "b2"]}
    else:
        assert setup == {"layer": "counts"}
    assert list(model.var_names_) == list(counts().var_names)
    assert model.is_trained_ and model.train_state_.epoch == 5
    assert set(model.history) == SCVI_HISTORY_KEYS
    saved = safe_torch_load(FIXTURES / name / "model.pt", SCVI_GLOBALS)["attr_dict"]["history_"]
    for key, frame in model.history.items():  # kl_weight is logged on some epochs only
        assert list(frame.index) == ([0, 1, 2, 3, 4] if key != "kl_weight" else list(saved[key].index))
        np.testing.assert_array_equal(frame[key].to_numpy(), saved[key][key].to_numpy())
    np.testing.assert_array_equal(model.validation_indices_, expected["validation_indices"])
    cells = np.sort(np.concatenate([model.train_indices_, model.validation_indices_, model.test_indices_]))
    np.testing.assert_array_equal(cells, np.arange(60))


def test_scvi_directory_is_told_apart_from_ldvae_one(tmp_path):
    assert all(is_scvi_model(FIXTURES / name) for name in SCVI_SAVED)
    assert not is_scvi_model(Path(__file__).parent / "fixtures" / "saved_model" / "model")
    assert not is_scvi_model(tmp_path)


# --- ldvae -> scvi-tools ---------------------------------------------------------------------
@pytest.mark.parametrize("name, result", LDVAE_WRITTEN)
def test_ldvae_written_model_gives_in_scvi_tools_what_ldvae_computes(name, result):
    """scvi-tools loaded these directories (written by write_scvi_model) and recorded its outputs."""
    model = load_scvi_dir(FIXTURES / name)
    assert_same_outputs(outputs(model), np.load(FIXTURES / name / result))


@pytest.mark.parametrize("kwargs", [
    dict(gene_likelihood="zinb", dispersion="gene-batch"),
    dict(gene_likelihood="nb", dispersion="gene-label", latent_distribution="ln", use_batch_norm=False, bias=True),
    dict(gene_likelihood="poisson", use_observed_lib_size=True, n_layers=2, setup={"layer": "counts"}),
], ids=["zinb-gene-batch", "nb-gene-label-ln", "poisson-observed"])
def test_write_then_read_gives_the_same_model(tmp_path, kwargs):
    model = train_small(**kwargs)
    write_scvi_model(model, tmp_path / "m")
    meta, state = read_scvi_model(tmp_path / "m")
    own = model.module.state_dict()
    assert set(state) == set(own)
    observed = model.config.use_observed_lib_size  # scvi-tools keeps no library prior then; unused
    for key, value in own.items():
        if not (observed and key.startswith("library_log")):
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    assert meta["init_params"] == model.init_params_ and meta["setup"] == model.setup_
    assert meta["var_names"] == list(model.var_names_) and meta["n_cells"] == 60 and meta["is_trained"]
    assert meta["split"]["validation"] == [int(i) for i in model.validation_indices_]
    assert meta["train_state"]["history"] == model.train_state_.history


def test_scvi_model_written_again_reads_the_same(tmp_path):
    name = SCVI_SAVED[0]
    model = load_scvi_dir(FIXTURES / name)
    write_scvi_model(model, tmp_path / "again", prefix="run1_", save_anndata=True)
    assert sorted(os.listdir(tmp_path / "again")) == ["run1_adata.h5ad", "run1_model.pt"]
    first, again = read_scvi_model(FIXTURES / name)[1], read_scvi_model(tmp_path / "again", "run1_")[1]
    assert all(torch.equal(first[k], again[k]) for k in first)
    reloaded = load_scvi_dir(tmp_path / "again", prefix="run1_", saved_adata=True)
    np.testing.assert_array_equal(reloaded.get_latent_representation(), model.get_latent_representation())


def test_write_refuses_a_non_empty_directory_unless_asked(tmp_path):
    model = load_scvi_dir(FIXTURES / SCVI_SAVED[0])
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"already exists and is not empty\. Pass overwrite=True"):
        write_scvi_model(model, tmp_path)
    write_scvi_model(model, tmp_path, overwrite=True)
    assert is_scvi_model(tmp_path)


def test_write_refuses_covariates_scvi_tools_cannot_set_up(tmp_path):
    adata = counts()
    adata.obs["depth"] = np.log(adata.X.sum(1))
    ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch", categorical_covariate_keys=["cell_type"],
                                   continuous_covariate_keys=["depth"])
    model = ldvae.LinearSCVI(adata, n_hidden=16, n_latent=3)
    with pytest.raises(SetupError, match=re.escape(
            "categorical_covariate_keys=['cell_type'], continuous_covariate_keys=['depth'], but scvi-tools' "
            "LinearSCVI.setup_anndata takes only batch_key, labels_key and layer")):
        write_scvi_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_write_refuses_gene_cell_dispersion(tmp_path):
    adata = counts()
    ldvae.LinearSCVI.setup_anndata(adata)
    model = ldvae.LinearSCVI(adata, n_hidden=16, n_latent=3, dispersion="gene-cell")
    with pytest.raises(SetupError, match="scvi-tools' LinearSCVI cannot use dispersion='gene-cell'"):
        write_scvi_model(model, tmp_path / "m")


# --- what is refused when read ---------------------------------------------------------------
class _RunsAShellCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "m").mkdir()
    torch.save({"model_state_dict": {}, "var_names": np.array(["g"], dtype=object),
                "attr_dict": {"registry_": _RunsAShellCommand(marker)}}, tmp_path / "m" / "model.pt")
    with pytest.raises(ModelFileError, match=re.escape(f"asks for {os.system.__module__}.system, which is not on the "
                                                       "allow-list")):
        read_scvi_model(tmp_path / "m")
    assert not marker.exists()


def test_unknown_tensor_is_named(tmp_path):
    def add(payload):
        payload["model_state_dict"]["decoder.extra.weight"] = torch.zeros(3)

    with pytest.raises(ModelFileError, match=r"model_state_dict holds \['decoder\.extra\.weight'\], which ldvae's "
                                             r"LinearSCVI with these settings has no place for"):
        read_scvi_model(resave(tmp_path, SCVI_SAVED[0], add))


def test_missing_tensor_is_named(tmp_path):
    def drop(payload):
        del payload["model_state_dict"]["z_encoder.mean_encoder.bias"]

    with pytest.raises(ModelFileError, match=r"lacks 'z_encoder\.mean_encoder\.bias'"):
        read_scvi_model(resave(tmp_path, SCVI_SAVED[0], drop))


def test_tensor_of_the_wrong_shape_is_named_in_scvi_tools_terms(tmp_path):
    def shrink(payload):
        payload["model_state_dict"]["px_r"] = torch.zeros(5)

    with pytest.raises(ModelFileError, match=r"\('px_r' in scvi-tools' names\): px_r has shape \(5,\)"):
        read_scvi_model(resave(tmp_path, SCVI_SAVED[0], shrink))


def test_unsupported_setting_is_named(tmp_path):
    def encode(payload):
        payload["attr_dict"]["init_params_"]["kwargs"]["model_kwargs"]["encode_covariates"] = True

    with pytest.raises(ModelFileError, match=r"model_kwargs cannot be mapped: encode_covariates=True"):
        read_scvi_model(resave(tmp_path, SCVI_SAVED[0], encode))


def test_other_scvi_tools_model_is_refused(tmp_path):
    def rename(payload):
        payload["attr_dict"]["registry_"]["model_name"] = "SCVI"

    with pytest.raises(ModelFileError, match=r"holds a scvi-tools SCVI model; ldvae reads LinearSCVI models only"):
        read_scvi_model(resave(tmp_path, SCVI_SAVED[0], rename))


def test_unknown_attribute_is_named(tmp_path):
    def extend(payload):
        payload["attr_dict"]["module_state_"] = pd.DataFrame({"a": [1]})

    with pytest.raises(ModelFileError, match=r"attr_dict holds \['module_state_'\], which ldvae cannot map"):
        read_scvi_model(resave(tmp_path, SCVI_SAVED[0], extend))


def test_truncated_file_is_named(tmp_path):
    (tmp_path / "model.pt").write_bytes((FIXTURES / SCVI_SAVED[0] / "model.pt").read_bytes()[:5000])
    with pytest.raises(ModelFileError, match=r"model\.pt is not a readable scvi-tools model file \(UnpicklingError"):
        read_scvi_model(tmp_path)


def test_save_in_scvi_format_and_load_it_back_through_the_public_api(tmp_path, capsys):
    adata = counts()
    ldvae.LinearSCVI.setup_anndata(adata, "batch", "cell_type", "counts")
    ldvae.settings.seed = 0
    model = ldvae.LinearSCVI(adata, n_latent=3, n_hidden=16)
    model.train(3, progress_bar=False)
    model.save(tmp_path / "m", format="scvi", save_anndata=True)
    assert (tmp_path / "m" / "model.pt").exists() and not (tmp_path / "m" / "ldvae_model.json").exists()
    loaded = ldvae.LinearSCVI.load(tmp_path / "m")  # the format is told by its files
    np.testing.assert_allclose(loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6)
    np.testing.assert_array_equal(loaded.validation_indices, model.validation_indices)
    ldvae.LinearSCVI.view_setup_args(tmp_path / "m")
    assert "batch_key: 'batch'" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"format must be 'ldvae' or 'scvi', got 'h5'"):
        model.save(tmp_path / "x", format="h5")


def test_new_batches_map_onto_a_model_trained_by_scvi_tools():
    reference_dir = FIXTURES / "scvi151_nb_batch_labels"
    query = counts()
    query.obs["batch"] = "new"
    query = ldvae.LinearSCVI.prepare_query_anndata(query, reference_dir)
    mapped = ldvae.LinearSCVI.load_query_data(query, reference_dir)
    mapped.train(2, progress_bar=False)
    reference = load_scvi_dir(reference_dir)
    assert mapped.setup_["batch_categories"] == [*reference.setup_["batch_categories"], "new"]
    np.testing.assert_array_equal(mapped.get_loadings().to_numpy(), reference.get_loadings().to_numpy())
