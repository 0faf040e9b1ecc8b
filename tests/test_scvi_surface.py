"""scvi-tools' ``LinearSCVI`` surface: every public member of scvi-tools 1.5.1 exists in ldvae
with the same parameter names, order and defaults (recorded from its source into
tests/data/scvi_linear_scvi_surface.json by bench/record_scvi_surface.py), and the setup,
split, status, registry views, save/load and older-layout conversion answer as it does."""

from __future__ import annotations

import inspect
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import ldvae
from ldvae import LinearSCVI
from ldvae.data.setup import setup_anndata
from ldvae.train.loop import ModelFileError

SURFACE = json.loads((Path(__file__).parent / "data" / "scvi_linear_scvi_surface.json").read_text())
ORDERED = ("POSITIONAL_OR_KEYWORD",)


@pytest.fixture(scope="module")
def trained():
    adata = ldvae.simulate(300, 30, 3, n_batches=2, seed=4)
    adata.obs["labels"] = np.where(np.arange(300) % 3 == 0, "a", "b")
    LinearSCVI.setup_anndata(adata, "batch", "labels", "counts")
    ldvae.settings.seed = 0
    model = LinearSCVI(adata, n_latent=3, n_hidden=16)
    model.train(3, validation_size=0.1, train_size=0.8, progress_bar=False)
    return model


def _params(fn) -> list[list]:
    sig = inspect.signature(fn)
    return [[p.name, p.kind.name, None if p.default is inspect.Parameter.empty else repr(p.default)]
            for p in sig.parameters.values() if p.name not in ("self", "cls")]


def _check_params(name: str, ours: list[list], theirs: list[list]) -> None:
    """scvi-tools' positional parameters in the same order with the same defaults; its keyword-only
    ones present; ``**kwargs`` where it has them. ldvae may add keyword-only parameters."""
    ours_pos = [p for p in ours if p[1] in ORDERED]
    theirs_pos = [p for p in theirs if p[1] in ORDERED]
    assert [p[0] for p in ours_pos] == [p[0] for p in theirs_pos], name
    for o, t in zip(ours_pos, theirs_pos):
        assert o[2] == t[2], f"{name}: default of {o[0]} is {o[2]}, scvi-tools' is {t[2]}"
    names = {p[0] for p in ours}
    for t in theirs:
        if t[1] == "KEYWORD_ONLY":
            assert t[0] in names, f"{name}: keyword-only {t[0]} is missing"
        if t[1] == "VAR_KEYWORD":
            assert any(p[1] == "VAR_KEYWORD" for p in ours), f"{name}: takes no **{t[0]}"


def test_every_public_member_of_scvi_tools_exists_with_its_signature(trained):
    assert SURFACE["scvi_tools_version"] == "1.5.1"
    for name, member in SURFACE["members"].items():
        assert hasattr(trained, name), f"LinearSCVI has no {name}"
        static = inspect.getattr_static(LinearSCVI, name, None)
        kind = member["kind"]
        if kind == "classmethod":
            assert isinstance(static, classmethod), name
        elif kind == "staticmethod":
            assert isinstance(static, staticmethod), name
        elif kind == "property":
            assert isinstance(static, property) or name in vars(trained), name
        if kind in ("method", "classmethod", "staticmethod"):
            _check_params(name, _params(getattr(trained, name)), member["parameters"])
    _check_params("__init__", _params(LinearSCVI.__init__), SURFACE["init"])
    _check_params("setup_anndata", _params(LinearSCVI.setup_anndata), SURFACE["setup_anndata"])


def test_every_training_plan_and_trainer_option_is_accepted(small_adata):
    plan = {n: eval(d) for n, _, d in SURFACE["train_kwargs"]["training_plan"]  # noqa: S307 (recorded reprs)
            if n not in ("module", "kwargs") and d is not None}
    trainer = {n: eval(d) for n, _, d in SURFACE["train_kwargs"]["trainer"]  # noqa: S307
               if n not in ("kwargs", "accelerator", "devices", "max_epochs") and d is not None}
    LinearSCVI.setup_anndata(small_adata, layer="counts")
    model = LinearSCVI(small_adata, n_latent=2, n_hidden=8)
    model.train(1, plan_kwargs=plan, **trainer)
    assert model.is_trained and len(model.history["elbo_train"]) == 1


def test_setup_anndata_takes_batch_key_first(small_adata):
    LinearSCVI.setup_anndata(small_adata, "batch", None, "counts")
    model = LinearSCVI(small_adata, n_latent=2)
    assert model.get_setup_arg("batch_key") == "batch" and model.get_setup_arg("layer") == "counts"
    assert model.summary_stats.n_batch == 2 and model.summary_stats.n_vars == small_adata.n_vars
    with pytest.raises(TypeError, match=r"setup_anndata got unknown arguments \['batchkey'\]"):
        LinearSCVI.setup_anndata(small_adata, batchkey="batch")


def test_second_positional_argument_is_the_registry(small_adata):
    LinearSCVI.setup_anndata(small_adata, layer="counts")
    with pytest.raises(ValueError, match=r"second argument is registry \(as in scvi-tools 1.5\), got 64\. Pass the "
                                         r"other settings by keyword, e.g. LinearSCVI\(adata, n_hidden=64\)"):
        LinearSCVI(small_adata, 64)
    assert LinearSCVI(small_adata, None, 16).init_params_["n_hidden"] == 16
    with pytest.raises(ValueError, match="LinearSCVI needs adata"):
        LinearSCVI(registry={})


def test_scvi_module_options_at_ldvae_values_are_accepted_and_others_refused(small_adata):
    LinearSCVI.setup_anndata(small_adata, layer="counts")
    model = LinearSCVI(small_adata, n_latent=2, encode_covariates=False, use_layer_norm="none", log_variational=True,
                       use_batch_norm=False, bias=True)
    assert not model.config.use_batch_norm and model.config.bias
    with pytest.raises(ValueError, match=r"encode_covariates=True: ldvae's linearly decoded VAE has only "
                                         r"encode_covariates=False"):
        LinearSCVI(small_adata, encode_covariates=True)
    with pytest.raises(TypeError, match=r"unknown model option 'n_hiden'"):
        LinearSCVI(small_adata, n_hiden=3)


def test_module_answers_scvi_tools_attribute_names(small_adata):
    LinearSCVI.setup_anndata(small_adata, layer="counts", batch_key="batch")
    module = LinearSCVI(small_adata, n_latent=4, dispersion="gene-batch", gene_likelihood="zinb").module
    assert (module.n_input, module.n_latent, module.n_batch, module.n_labels) == (small_adata.n_vars, 4, 2, 1)
    assert (module.dispersion, module.gene_likelihood, module.latent_distribution) == ("gene-batch", "zinb", "normal")
    assert module.use_observed_lib_size is False and module.log_variational is True
    assert module.encode_covariates is False


def test_status_split_and_summary(trained):
    m = trained
    assert m.is_trained is True and m.n_latent == 3 and m.history_ is not None
    n = m.adata.n_obs
    assert (len(m.train_indices), len(m.validation_indices), len(m.test_indices)) == (240, 30, 30)
    together = np.concatenate([m.train_indices, m.validation_indices, m.test_indices])
    assert np.array_equal(np.sort(together), np.arange(n))
    assert "n_latent: 3" in m.summary_string and m.summary_string.endswith("Training status: Trained")
    assert m.get_normalized_function_name == "get_normalized_expression" and m.trainer is None


def test_registry_views(trained, capsys, tmp_path):
    m = trained
    assert m.adata_manager.registry is m.registry_ and m.registry is m.registry_
    assert dict(m.adata_manager.data_registry.batch) == {"attr_name": "obs", "attr_key": "_scvi_batch"}
    mapping = m.get_state_registry("batch").categorical_mapping
    assert isinstance(mapping, np.ndarray) and list(mapping) == ["b0", "b1"]
    codes = m.get_from_registry(m.adata, "batch").ravel()
    assert np.array_equal(codes, (m.adata.obs["batch"] == "b1").to_numpy().astype(int))
    assert list(mapping[codes]) == list(m.adata.obs["batch"])  # codes index the categories, as in scvi-tools
    genes = m.adata_manager.get_state_registry("X").column_names
    assert isinstance(genes, np.ndarray) and list(genes) == list(m.adata.var_names)
    m.view_anndata_setup()
    assert "batch: obs['_scvi_batch']; n_batch=2" in capsys.readouterr().out
    other = m.adata.copy()
    del other.uns["ldvae_setup"]
    assert m.get_anndata_manager(other) is None
    with pytest.raises(ValueError, match=r"Run model.transfer_fields\(adata\) first"):
        m.get_anndata_manager(other, required=True)
    assert m.transfer_fields(other) is other and m.get_anndata_manager(other) is not None
    with pytest.raises(NotImplementedError, match="ldvae keeps no AnnData managers"):
        LinearSCVI.register_manager(None)
    m.save(tmp_path / "m")
    LinearSCVI.view_setup_args(tmp_path / "m")
    assert "batch_key: 'batch'" in capsys.readouterr().out
    assert LinearSCVI.load_registry(tmp_path / "m")["setup_args"]["labels_key"] == "labels"


def test_state_registries_have_scvi_tools_types(small_adata):
    a = small_adata
    a.obs["site"] = np.where(np.arange(a.n_obs) % 2, "s1", "s2")
    a.obs["depth"] = np.arange(a.n_obs, dtype=float)
    LinearSCVI.setup_anndata(a, layer="counts", categorical_covariate_keys=["site"],
                             continuous_covariate_keys=["depth"])
    m = LinearSCVI(a, n_latent=2)
    labels = m.get_state_registry("labels").categorical_mapping  # no labels_key: one code, 0
    assert labels.dtype == np.int64 and list(labels) == [0]
    cats = m.get_state_registry("extra_categorical_covs")
    assert cats.field_keys == ("site",) and cats.n_cats_per_key == (2,)
    assert isinstance(cats.mappings["site"], np.ndarray) and list(cats.mappings["site"]) == ["s1", "s2"]
    columns = m.get_state_registry("extra_continuous_covs").columns
    assert isinstance(columns, np.ndarray) and list(columns) == ["depth"]
    assert m.registry_["field_registries"]["batch"]["state_registry"]["categorical_mapping"] == ["0"]  # record unchanged


def test_scvi_code_columns_are_written_where_scvi_tools_writes_them(trained, tmp_path):
    """LinearSCVI's setup, transfer_fields and load write scvi-tools' code columns; ldvae's own
    setup writes none, and the registry then names the user's columns."""
    m = trained
    want = (m.adata.obs["batch"] == "b1").to_numpy().astype(int)
    assert np.array_equal(m.adata.obs["_scvi_batch"].to_numpy(), want)
    assert np.array_equal(m.adata.obs["_scvi_labels"].to_numpy(), (m.adata.obs["labels"] == "b").to_numpy())
    plain = m.adata[:, :].copy()
    plain.obs = plain.obs[["batch", "labels"]].copy()
    del plain.uns["ldvae_setup"]
    setup_anndata(plain, layer="counts", batch_key="batch", labels_key="labels")
    assert list(plain.obs.columns) == ["batch", "labels"]
    model = LinearSCVI(plain, n_latent=3, n_hidden=16)
    assert dict(model.adata_manager.data_registry.batch) == {"attr_name": "obs", "attr_key": "batch"}
    m.save(tmp_path / "m")
    bad = plain.copy()
    bad.obs["batch"] = bad.obs["batch"].astype(str).replace("b1", "new")
    with pytest.raises(ValueError, match="new"):
        LinearSCVI.load(tmp_path / "m", adata=bad)
    assert "_scvi_batch" not in bad.obs  # a failed load writes nothing
    loaded = LinearSCVI.load(tmp_path / "m", adata=plain)
    assert np.array_equal(plain.obs["_scvi_batch"].to_numpy(), want)
    assert loaded.adata_manager.data_registry.labels.attr_key == "_scvi_labels"


def test_split_and_status_survive_save_and_load(trained, tmp_path):
    trained.save(tmp_path / "m", save_anndata=True)
    loaded = LinearSCVI.load(tmp_path / "m")
    for name in ("train_indices", "validation_indices", "test_indices"):
        assert np.array_equal(getattr(loaded, name), getattr(trained, name)), name
    assert loaded.is_trained and loaded.n_latent == 3
    np.testing.assert_array_equal(loaded.get_latent_representation(), trained.get_latent_representation())


def test_to_device_moves_the_module(trained):
    trained.to_device("cpu")
    assert all(p.device.type == "cpu" for p in trained.module.parameters()) and trained.device.type == "cpu"


def _legacy_save(model, d: Path) -> None:
    """The older scvi-tools layout, written as that code wrote it."""
    d.mkdir(parents=True)
    torch.save(model.module.state_dict(), d / "model_params.pt")
    np.savetxt(d / "var_names.csv", model.adata.var_names.astype(str).to_numpy(), fmt="%s")
    with open(d / "attr.pkl", "wb") as f:
        pickle.dump({k: v for k, v in model._get_user_attributes() if k.endswith("_")}, f)


def test_older_layout_is_refused_then_converted(trained, tmp_path):
    _legacy_save(trained, tmp_path / "old")
    with pytest.raises(ModelFileError, match=r"older layout .* Convert it first: LinearSCVI.convert_legacy_save"):
        LinearSCVI.load(tmp_path / "old", adata=trained.adata)
    LinearSCVI.convert_legacy_save(tmp_path / "old", tmp_path / "new")
    loaded = LinearSCVI.load(tmp_path / "new", adata=trained.adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), trained.get_latent_representation())
    assert np.array_equal(loaded.validation_indices, trained.validation_indices) and loaded.is_trained
    assert loaded.history["elbo_train"].equals(trained.history["elbo_train"])


class _Hostile:
    def __reduce__(self):
        return (os.system, ("touch hostile_pickle_ran",))


def test_a_hostile_attr_pickle_is_refused_without_running_it(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _legacy_save(trained, tmp_path / "old")
    (tmp_path / "old" / "attr.pkl").write_bytes(pickle.dumps({"init_params_": _Hostile()}))
    with pytest.raises(ModelFileError, match=r"the pickle asks for posix.system, which is not on the allow-list"):
        LinearSCVI.convert_legacy_save(tmp_path / "old", tmp_path / "new")
    assert not (tmp_path / "hostile_pickle_ran").exists() and not (tmp_path / "new").exists()


def test_the_compatibility_page_names_every_member():
    page = (Path(__file__).parents[1] / "docs" / "scvi-tools.md").read_text()
    assert [n for n in SURFACE["members"] if f"| `{n}" not in page] == []
