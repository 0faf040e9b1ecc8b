"""What scvi-tools' ``LinearSCVI`` does and ldvae does the same way: the split rules, the
training options (AdamW, reduce_lr_on_plateau, early-stopping monitor, external indices),
minified data, the aggregated posterior, differential abundance, importance weights and
the sampling conventions."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import ldvae
from ldvae import LinearSCVI
from ldvae.train.optim import FusedAdam


@pytest.fixture
def adata():
    a = ldvae.simulate(301, 30, 3, n_batches=2, seed=5)
    LinearSCVI.setup_anndata(a, "batch", layer="counts")
    return a


def _model(adata, **kwargs):
    ldvae.settings.seed = 0
    return LinearSCVI(adata, n_latent=3, n_hidden=16, **kwargs)


@pytest.fixture(scope="module")
def trained():
    a = ldvae.simulate(300, 30, 3, n_batches=2, seed=6)
    LinearSCVI.setup_anndata(a, "batch", layer="counts")
    ldvae.settings.seed = 0
    m = LinearSCVI(a, n_latent=3, n_hidden=16, use_observed_lib_size=True)
    m.train(20, progress_bar=False)
    return m


# --- the split -------------------------------------------------------------------------------


def test_default_split_moves_a_last_minibatch_of_one_or_two_cells_to_validation(adata, caplog):
    m = _model(adata)
    m.train(1, batch_size=135, progress_bar=False)  # ceil(0.9 * 301) = 271 = 2 * 135 + 1
    assert (len(m.train_indices), len(m.validation_indices)) == (270, 31)
    assert "1 cells moved from the training to the validation cells" in caplog.text
    m = _model(adata)
    m.train(1, batch_size=135, train_size=0.9, progress_bar=False)  # given: kept, joins the minibatch before
    assert (len(m.train_indices), len(m.validation_indices)) == (271, 30)


def test_unshuffled_split_and_external_indices(adata):
    m = _model(adata)
    m.train(1, shuffle_set_split=False, train_size=0.8, validation_size=0.1, progress_bar=False)
    assert np.array_equal(m.validation_indices, np.arange(30)) and np.array_equal(m.train_indices, np.arange(30, 271))
    assert np.array_equal(m.test_indices, np.arange(271, 301))
    m = _model(adata)  # shuffled: the test cells are the permutation's last, in its order, as scvi-tools has them
    m.train(1, train_size=0.8, validation_size=0.1, progress_bar=False, seed=3)
    assert np.array_equal(m.test_indices, np.random.RandomState(3).permutation(301)[271:])
    cells = np.random.default_rng(0).permutation(301)
    m = _model(adata)
    m.train(1, datasplitter_kwargs={"external_indexing": [cells[:200], cells[200:250], cells[250:]]},
            progress_bar=False)
    assert np.array_equal(m.train_indices, cells[:200]) and np.array_equal(m.test_indices, cells[250:])
    with pytest.raises(ValueError, match="external_indexing repeats a cell"):
        m.train(1, datasplitter_kwargs={"external_indexing": [cells[:200], cells[:10]]})
    with pytest.raises(ValueError, match="drop_last=True is not supported"):
        m.train(1, datasplitter_kwargs={"drop_last": True})
    with pytest.raises(ValueError, match="datamodule is not supported"):
        m.train(1, datamodule=object())


# --- the optimizer and schedule ---------------------------------------------------------------


def test_building_and_training_leave_the_users_random_state(adata, tmp_path):
    # as in scvi-tools, the user's torch generator is the user's: a model seeds its own work
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model = _model(adata)
    model.train(2, progress_bar=False)
    assert torch.equal(torch.rand(3), expected)
    for fmt in ("ldvae", "scvi"):  # saving and loading too
        torch.manual_seed(123)
        model.save(tmp_path / fmt, format=fmt)
        LinearSCVI.load(tmp_path / fmt, adata=adata)
        assert torch.equal(torch.rand(3), expected), fmt
    again = _model(adata)  # and the model's own randomness still follows ldvae.settings.seed
    again.train(2, progress_bar=False)
    np.testing.assert_array_equal(model.get_latent_representation(), again.get_latent_representation())


def test_adamw_step_is_torchs_adamw():
    torch.manual_seed(0)
    p0 = torch.randn(50)
    grads = [torch.randn(50) for _ in range(3)]
    ours, ref = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    fused = FusedAdam([ours], lr=0.1, eps=1e-8, weight_decay=0.5, decoupled_weight_decay=True)
    adamw = torch.optim.AdamW([ref], lr=0.1, eps=1e-8, weight_decay=0.5)
    for g in grads:
        ours.grad, ref.grad = g.clone(), g.clone()
        fused.step()
        adamw.step()
    torch.testing.assert_close(ours.detach(), ref.detach())
    adam = torch.optim.Adam([p0.clone().requires_grad_()], lr=0.1, eps=1e-8, weight_decay=0.5)
    assert not torch.allclose(adam.param_groups[0]["params"][0], ours.detach())


def test_adamw_trains_and_decays_the_weights(adata):
    norms = {}
    for opt in ("Adam", "AdamW"):
        m = _model(adata)
        m.train(3, plan_kwargs={"optimizer": opt, "weight_decay": 5.0}, progress_bar=False)
        norms[opt] = float(m.module.factor_regressor.weight.detach().norm())
        assert np.isfinite(m.history["elbo_train"].to_numpy()).all()
    assert norms["AdamW"] < norms["Adam"]
    with pytest.raises(ValueError, match=r"optimizer must be 'Adam' or 'AdamW', got 'SGD'"):
        _model(adata).train(1, plan_kwargs={"optimizer": "SGD"})


def test_reduce_lr_on_plateau_lowers_the_learning_rate(adata, caplog):
    m = _model(adata)
    # a threshold no epoch can beat: every epoch after the first is a plateau
    m.train(4, check_val_every_n_epoch=1, progress_bar=False,  # epochs 2, 3 bad: more than lr_patience
            plan_kwargs={"lr": 1e-2, "reduce_lr_on_plateau": True, "lr_patience": 1, "lr_factor": 0.5,
                         "lr_threshold": 1e9, "lr_min": 3e-3})
    assert m.train_state_.optimizer_state["param_groups"][0]["lr"] == pytest.approx(5e-3)
    m = _model(adata)
    m.train(9, check_val_every_n_epoch=1, progress_bar=False,
            plan_kwargs={"lr": 1e-2, "reduce_lr_on_plateau": True, "lr_patience": 1, "lr_factor": 0.5,
                         "lr_threshold": 1e9, "lr_min": 3e-3})
    assert m.train_state_.optimizer_state["param_groups"][0]["lr"] == pytest.approx(3e-3)  # floored at lr_min
    assert "lr reduced to 0.005" in caplog.text


def test_kl_weight_runs_from_min_to_max_kl_weight(adata):
    m = _model(adata)
    m.train(6, progress_bar=False, plan_kwargs={"n_epochs_kl_warmup": 3, "min_kl_weight": 0.2, "max_kl_weight": 0.5})
    weights = m.history["kl_weight"]["kl_weight"].to_numpy()  # the weight of each epoch's last step
    assert 0.2 < weights[0] < weights[1] < weights[2] < weights[3] == weights[-1] == 0.5
    # a warm-up asked for is kept as asked, longer than half the fit too, as in scvi-tools;
    # the default 400 epochs end by mid-fit
    m = _model(adata)
    m.train(6, progress_bar=False, plan_kwargs={"n_epochs_kl_warmup": 5})
    weights = m.history["kl_weight"]["kl_weight"].to_numpy()
    assert (np.diff(weights) > 0).all() and weights[4] < weights[5] == 1.0  # rising over the first five epochs
    m = _model(adata)
    m.train(6, progress_bar=False)
    weights = m.history["kl_weight"]["kl_weight"].to_numpy()
    assert weights[2] < weights[3] == weights[-1] == 1.0  # shortened to 3 epochs
    m = _model(adata, use_observed_lib_size=True)  # no library KL term: a zero weight leaves the reconstruction
    m.train(2, progress_bar=False, plan_kwargs={"max_kl_weight": 0.0})
    h = m.history
    assert (h["kl_local_train"]["kl_local_train"] > 0).all()
    np.testing.assert_allclose(h["train_loss"]["train_loss"], h["reconstruction_loss_train"]["reconstruction_loss_train"],
                               rtol=1e-6)


def test_early_stopping_follows_its_monitor_and_mode(adata):
    settings = dict(early_stopping=True, early_stopping_monitor="kl_weight", early_stopping_patience=2,
                    check_val_every_n_epoch=1, progress_bar=False, plan_kwargs={"n_epochs_kl_warmup": 8})
    m = _model(adata)
    m.train(12, **settings)  # kl_weight rises during warm-up: with mode "min" it never improves after epoch 1
    assert len(m.history["elbo_train"]) == 3
    m = _model(adata)
    m.train(12, early_stopping_mode="max", **settings)  # rising improves until it reaches 1, then 2 more epochs
    weights = m.history["kl_weight"]["kl_weight"].to_numpy()
    assert len(weights) == int(np.argmax(weights == 1.0)) + 1 + 2
    m = _model(adata)
    m.train(12, early_stopping_warmup_epochs=6, **settings)  # not before epoch 7, then 2 more
    assert len(m.history["elbo_train"]) == 9
    # a later call watches its own epochs, as a new Trainer does: not the earlier call's best
    m = _model(adata)
    m.train(12, **settings)  # stopped after 3 epochs
    m.train(12, early_stopping=True, early_stopping_monitor="elbo_train", early_stopping_patience=2,
            check_val_every_n_epoch=1, progress_bar=False)
    assert len(m.history["elbo_train"]) > 3 + 3  # elbo_train improves for more than patience + 1 epochs


def test_lightning_only_options_are_accepted_and_unknown_ones_named(adata, caplog):
    m = _model(adata)
    m.train(1, logger=True, callbacks=["cb"], enable_checkpointing=True, load_sparse_tensor=True,
            datasplitter_kwargs={"pin_memory": True, "num_workers": 2, "drop_dataset_tail": True},
            plan_config={"lr": 1e-3}, trainer_config={"log_every_n_steps": 5}, progress_bar=False)
    assert "train callbacks=['cb']: ldvae has no callbacks" in caplog.text
    # callbacks are the user's code, which never runs here: a warning, seen without logging set up
    assert [r.levelname for r in caplog.records if "callbacks=" in r.getMessage()] == ["WARNING"]
    assert "drop_dataset_tail=True: ldvae.distributed gives each rank its share" in caplog.text
    with pytest.raises(TypeError, match=r"train got unknown arguments \['max_epoch'\]"):
        m.train(1, max_epoch=3)


# --- results: types and sampling -------------------------------------------------------------


def test_posterior_predictive_sample_types_and_transform_batch(trained):
    x = trained.posterior_predictive_sample(indices=np.arange(50))
    if importlib.util.find_spec("sparse") is not None:
        import sparse

        assert isinstance(x, sparse.GCXS) and x.shape == (50, 30)
        dense = x.todense()
    else:
        assert sp.issparse(x) and x.shape == (50, 30)
        dense = x.toarray()
    assert (dense >= 0).all() and np.array_equal(dense, np.round(dense))
    many = trained.posterior_predictive_sample(indices=np.arange(50), n_samples=3)
    assert many.shape == (50, 30, 3)
    cells = np.flatnonzero(trained.adata.obs["batch"] == "b0")[:40]
    own = trained.posterior_predictive_sample(indices=cells)
    as_b0 = trained.posterior_predictive_sample(indices=cells, transform_batch="b0")
    as_b1 = trained.posterior_predictive_sample(indices=cells, transform_batch="b1")
    todense = (lambda a: a.todense()) if not sp.issparse(own) else (lambda a: a.toarray())
    assert np.array_equal(todense(own), todense(as_b0)) and not np.array_equal(todense(own), todense(as_b1))


# --- minified data ------------------------------------------------------------------------------


def test_minified_model_answers_from_the_stored_posterior(trained, tmp_path):
    m = LinearSCVI.load(_saved(trained, tmp_path), adata=trained.adata.copy())
    full = m.adata
    qzm, qzv = m.get_latent_representation(return_dist=True)
    full.obsm["X_latent_qzm"], full.obsm["X_latent_qzv"] = qzm, qzv
    expr = m.get_normalized_expression(n_samples=2)
    m.minify_adata()
    assert m.minified_data_type == "latent_posterior_parameters" and m.adata is not full
    assert m.adata.layers["counts"].nnz == 0 and m.adata.raw is None and "_scvi_adata_minify_type" not in full.uns
    np.testing.assert_array_equal(m.get_latent_representation(), qzm)
    np.testing.assert_allclose(m.get_normalized_expression(n_samples=2).to_numpy(), expr.to_numpy(), rtol=1e-5)
    np.testing.assert_array_equal(m.adata.obs["observed_lib_size"], np.asarray(full.layers["counts"].sum(1)).ravel())
    with pytest.raises(ValueError, match=r"get_elbo needs the counts, and this model's AnnData is minified"):
        m.get_elbo()
    with pytest.raises(ValueError, match=r"train needs the counts"):
        m.train(1)
    m.save(tmp_path / "mini", save_anndata=True)
    again = LinearSCVI.load(tmp_path / "mini")
    assert again.minified_data_type == "latent_posterior_parameters"
    np.testing.assert_array_equal(again.get_latent_representation(), qzm)


def test_minified_with_counts_answers_every_query_from_the_stored_posterior(trained, tmp_path):
    m = LinearSCVI.load(_saved(trained, tmp_path), adata=trained.adata.copy())
    full = m.adata
    qzm, qzv = m.get_latent_representation(return_dist=True)
    full.obsm["X_latent_qzm"], full.obsm["X_latent_qzv"] = qzm, qzv
    ldvae.settings.seed = 0
    elbo = float(m.get_elbo())
    m.minify_adata("latent_posterior_parameters_with_counts")
    assert m.minified_data_type == "latent_posterior_parameters_with_counts" and m.adata is not full
    assert m.adata.layers["counts"].nnz == full.layers["counts"].nnz and "_scvi_adata_minify_type" not in full.uns
    np.testing.assert_array_equal(m.get_latent_representation(), qzm)
    ldvae.settings.seed = 0
    assert float(m.get_elbo()) == pytest.approx(elbo, rel=1e-5)  # the stored posterior is the encoder's
    assert np.isfinite(float(m.get_marginal_ll(n_mc_samples=5)))
    # the queries read the stored posterior: moving it moves the ELBO and the latent
    m.adata.obsm["X_latent_qzm"] = qzm + 2.0
    np.testing.assert_allclose(m.get_latent_representation(), qzm + 2.0, rtol=1e-6)
    assert float(m.get_elbo()) < elbo - 1.0
    with pytest.raises(ValueError, match=r"train is refused on a minified AnnData"):
        m.train(1)
    with pytest.raises(ValueError, match=r"minified_data_type must be one of"):
        LinearSCVI.load(_saved(trained, tmp_path), adata=trained.adata.copy()).minify_adata("latent")
    m.adata.obsm["X_latent_qzm"] = qzm
    m.save(tmp_path / "mini", save_anndata=True)
    again = LinearSCVI.load(tmp_path / "mini")
    assert again.minified_data_type == "latent_posterior_parameters_with_counts"
    np.testing.assert_array_equal(again.get_latent_representation(), qzm)
    ldvae.settings.seed = 0
    assert float(again.get_elbo()) == pytest.approx(elbo, rel=1e-5)


def _saved(model, tmp_path):
    model.save(tmp_path / "full", overwrite=True)
    return tmp_path / "full"


def test_minify_refuses_a_model_whose_library_needs_the_counts(tmp_path):
    a = ldvae.simulate(200, 20, 2, seed=3)
    LinearSCVI.setup_anndata(a, layer="counts")
    m = LinearSCVI(a, n_latent=2, n_hidden=8)
    m.train(2, progress_bar=False)
    a.obsm["X_latent_qzm"], a.obsm["X_latent_qzv"] = m.get_latent_representation(return_dist=True)
    with pytest.raises(ValueError, match=r"minify_adata needs a model that uses the observed library size"):
        m.minify_adata()
    assert m.minified_data_type is None and m.adata is a and a.layers["counts"].nnz > 0


def test_minify_needs_the_posterior_in_obsm(trained, tmp_path):
    m = LinearSCVI.load(_saved(trained, tmp_path), adata=trained.adata.copy())
    with pytest.raises(ValueError, match=r"minify_adata needs adata.obsm\['X_latent_qzm'\] of shape \(300, 3\)"):
        m.minify_adata()


# --- aggregated posterior, differential abundance, importance weights --------------------------


def test_aggregated_posterior_is_the_mixture_of_the_cells_posteriors(trained):
    cells = np.arange(20)
    mean, var = trained.get_latent_representation(indices=cells, return_dist=True)
    z = torch.as_tensor(mean[:3] + 0.1, dtype=torch.float32)
    comps = torch.distributions.Normal(torch.as_tensor(mean)[None], torch.as_tensor(var).sqrt()[None])
    want = torch.logsumexp(comps.log_prob(z[:, None].double()).sum(-1), 1) - np.log(20)
    got = trained.get_aggregated_posterior(indices=cells, dof=None).log_prob(z)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    student = trained.get_aggregated_posterior(indices=cells)  # Student-t components, dof 3
    assert isinstance(student.component_distribution.base_dist, torch.distributions.StudentT)


def test_differential_abundance_scores_cells_under_each_sample(trained):
    a = trained.adata
    a.obs["sample"] = np.where(np.arange(a.n_obs) < 150, "s1", "s2")
    table = trained.differential_abundance(sample_key="sample")
    assert list(table.columns) == ["s1", "s2"] and table.shape == (a.n_obs, 2)
    assert a.obsm["da_log_probs"] is table
    z = torch.as_tensor(trained.get_latent_representation(), dtype=torch.float32)
    want = trained.get_aggregated_posterior(indices=np.arange(150), dof=None).log_prob(z).numpy()
    np.testing.assert_allclose(table["s1"].to_numpy(), want, rtol=1e-5)
    with pytest.raises(ValueError, match="sample_key must name a column of adata.obs"):
        trained.differential_abundance(sample_key="donor")


def test_importance_weights_favour_draws_that_explain_the_cells(trained):
    from ldvae.query.importance import CountDistribution

    cells = np.arange(40)
    mean, var = trained.get_latent_representation(indices=cells, return_dist=True)
    qz = torch.distributions.Normal(torch.as_tensor(mean), torch.as_tensor(var).sqrt())
    far = torch.full((1, 3), 6.0)
    zs = torch.cat([torch.as_tensor(mean[:5], dtype=torch.float32), far])  # 5 draws at cells' means, 1 far out
    batch = torch.zeros(6, dtype=torch.long)
    gen = trained.module.generative(zs, torch.zeros(6), torch.nn.functional.one_hot(batch, 2).float(), batch, batch)
    px = CountDistribution(scale=gen.log_rho.exp(), log_theta=gen.log_theta, zi_logits=None)
    w = trained.get_importance_weights(None, cells, qz, px, zs, n_mc_samples=50)
    assert w.shape == (6,) and np.isclose(w.sum(), 1.0) and (w >= 0).all()
    assert w[5] < w[:5].min()
    truncated = trained.get_importance_weights(None, cells, qz, px, zs, n_mc_samples=50, truncation=True)
    assert truncated.min() > w.min()


def test_importance_weighted_expression_and_de(trained):
    expr = trained.get_normalized_expression(indices=np.arange(30), n_samples_overall=40, weights="importance",
                                             max_cells=20, n_mc_samples=20)
    assert expr.shape == (40, 30) and np.allclose(expr.sum(1), 1.0, atol=1e-4)
    assert set(expr.index) <= set(trained.adata.obs_names[:30])  # each draw named by its cell, as without weights
    totals = pd.Series(np.asarray(trained.adata.layers["counts"].sum(1)).ravel(), index=trained.adata.obs_names)
    draws = trained.get_normalized_expression(indices=np.arange(30), n_samples_overall=40, weights="importance",
                                              library_size="latent", max_cells=20, n_mc_samples=20)
    assert draws.index.nunique() > 1  # ... by the cell it was drawn from: with the observed library, its total
    np.testing.assert_allclose(draws.sum(1), totals[draws.index], rtol=1e-4)
    de = trained.differential_expression(groupby="batch", group1="b0", weights="importance",
                                         importance_weighting_kwargs={"max_cells": 20, "n_mc_samples": 20},
                                         n_samples_overall=200)
    uniform = trained.differential_expression(groupby="batch", group1="b0", n_samples_overall=200)
    assert list(de.columns) == list(uniform.columns) and len(de) == 30


def test_under_torchrun_train_points_to_the_distributed_fit(adata, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"under torchrun call ldvae.distributed.fit_distributed\(path, ...\)"):
        _model(adata).train(1, strategy="ddp")


def test_fast_preset_sets_what_the_call_leaves_unset(adata, monkeypatch):
    from ldvae.model import facade

    seen = []
    monkeypatch.setattr(facade, "fit", lambda module, source, config, state: seen.append(config) or state)
    m = _model(adata)
    m.train(preset="fast", progress_bar=False)
    m.train(5, preset="fast", plan_kwargs={"lr": 1e-3}, batch_norm_momentum=0.2, ema_decay=0.0, progress_bar=False)
    m.train(5, progress_bar=False)
    first, second, plain = seen
    assert (first.max_epochs, first.lr, first.n_epochs_kl_warmup, first.batch_norm_momentum,
            first.ema_decay) == (60, 2e-2, 3, 0.05, 0.65)
    assert (second.max_epochs, second.lr, second.batch_norm_momentum, second.ema_decay) == (5, 1e-3, 0.2, 0.0)
    assert (plain.lr, plain.batch_norm_momentum, plain.ema_decay) == (1e-3, None, None)  # scvi-tools' settings
    with pytest.raises(ValueError, match=r"preset must be one of \['fast'\] or None, got 'quick'"):
        m.train(1, preset="quick")


def test_common_mistakes_raise_what_scvi_tools_raises_as_well(adata, tmp_path, trained):
    fresh = ldvae.simulate(50, 30, 2, seed=1)
    with pytest.raises(KeyError) as missing:  # scvi-tools: KeyError; ldvae's SetupError (a ValueError) too
        LinearSCVI.setup_anndata(fresh, batch_key="nope", layer="counts")
    assert isinstance(missing.value, ValueError) and str(missing.value).startswith("batch_key='nope' is not a column")
    with pytest.raises(KeyError):
        trained.differential_expression(groupby="nope")
    with pytest.raises(ValueError) as absent:  # scvi-tools: ValueError; a FileNotFoundError too
        LinearSCVI.load(tmp_path / "nothing", adata=trained.adata)
    assert isinstance(absent.value, FileNotFoundError)


def test_devices_named_as_strings_and_gpus_that_are_not_there(trained, monkeypatch):
    from ldvae.model.params import resolve_device

    if not torch.cuda.is_available():
        with pytest.raises(ldvae.SetupError, match=r"to_device\('cuda:0'\): no CUDA GPU is available"):
            trained.to_device("cuda:0")
        assert trained.device == torch.device("cpu")
    with pytest.raises(ldvae.SetupError, match="device must be 'auto', a GPU index or 'cuda:N'"):
        resolve_device("auto", "cuda:first")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine of two GPUs, as torch reports it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", "cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ldvae.SetupError, match="device=3 but this machine has 2 CUDA GPU"):
        resolve_device("gpu", 3)
