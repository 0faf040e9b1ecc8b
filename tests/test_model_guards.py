"""Hostile input to the model's own entry points: damaged model files and checkpoints,
learning rates that overflow, minibatches too small for batch normalization, saving that
must not touch the caller's AnnData, progress output in logs, and an ignored Ctrl-C.

Each test injects one fault and checks the message, that the user's objects are unchanged,
and that nothing is left behind.
"""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

import ldvae
from ldvae.cpu import loop as cpu_loop
from ldvae.cpu import fused
from ldvae.train import batches
from ldvae.train.optim import FusedAdam, adam
from ldvae.train.loop import ModelFileError, NonFiniteLossError, TrainConfig, load_checkpoint, minibatches
from conftest import assert_same_state, new_model, snapshot

N_CELLS, N_GENES = 200, 30  # 180 training cells


@pytest.fixture
def adata():
    a = ldvae.simulate(N_CELLS, N_GENES, 2, seed=3)
    ldvae.LinearSCVI.setup_anndata(a, layer="counts")
    return a


# --- loading a damaged model file ------------------------------------------------------


@pytest.fixture
def saved(adata, tmp_path):
    model = new_model(adata)
    model.train(max_epochs=1, progress_bar=False)
    model.save(tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def fresh(adata):
    """The same cells and genes, never set up: a load that succeeds records its setup here."""
    a = adata.copy()
    del a.uns["ldvae_setup"]
    return a


def _edit(meta: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        meta = meta[key]
    meta[last] = value


HOSTILE_JSON = {
    "extra train_state key": ("train_state.optimizer", {}, r"train_state must be null or the keys"),
    "n_hidden of the wrong type": ("init_params.n_hidden", "16",
                                   r"init_params.n_hidden must be a positive integer, got '16'"),
    "init_params not a dict": ("init_params", [16, 2], r"init_params must be the keys .*got \[16, 2\]"),
    "unknown init_params key": ("init_params.n_heads", 4, r"init_params must be the keys"),
    "bias not a boolean": ("init_params.bias", "no", r"init_params.bias must be True or False, got 'no'"),
    "negative epoch": ("train_state.epoch", -1, r"train_state.epoch must be an integer >= 0, got -1"),
    "history of strings": ("train_state.history", {"elbo_train": "low"},
                           r"train_state\['history'\]\['elbo_train'\] must be a list of \[epoch, value\] pairs"),
    "layer not a string": ("setup.layer", 3, r"setup.layer must be a string, got 3"),
    "batch categories not strings": ("setup.batch_categories", [1, 2], r"setup must be batch_key and "
                                     r"batch_categories together"),
    "gene names not strings": ("var_names", [1, 2], r"var_names must be a non-empty list of gene names, got \[1, 2\]"),
    "unknown top-level key": ("pickle", "x", r"the top level must be only the keys"),
}


@pytest.mark.parametrize("case", list(HOSTILE_JSON))
def test_damaged_model_json_is_refused_naming_the_field_and_adata_is_untouched(saved, fresh, case):
    path, value, message = HOSTILE_JSON[case]
    json_path = saved / "ldvae_model.json"
    meta = json.loads(json_path.read_text())
    _edit(meta, path, value)
    json_path.write_text(json.dumps(meta))
    uns_before = copy.deepcopy(dict(fresh.uns))
    with pytest.raises(ModelFileError, match=message) as err:
        ldvae.LinearSCVI.load(saved, adata=fresh, accelerator="cpu")
    assert str(json_path) in str(err.value)
    assert dict(fresh.uns).keys() == uns_before.keys() and "ldvae_setup" not in fresh.uns


def test_huge_n_hidden_in_the_json_is_refused_before_allocating(saved, fresh):
    json_path = saved / "ldvae_model.json"
    meta = json.loads(json_path.read_text())
    meta["init_params"]["n_hidden"] = 10**7  # would allocate ~2 GB per encoder here, ~22 GB on real data
    json_path.write_text(json.dumps(meta))
    built = []
    original = ldvae.model.LDVAEModule.__init__

    def spy(self, *args, **kwargs):
        built.append(args[0])
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ldvae.model.LDVAEModule, "__init__", spy)
        with pytest.raises(ModelFileError, match=r"init_params.n_hidden=10000000 in .*ldvae_model.json does not "
                                                 r"match the weights in model_state.pt"):
            ldvae.LinearSCVI.load(saved, adata=fresh, accelerator="cpu")
    assert built == []
    assert "ldvae_setup" not in fresh.uns


def test_json_settings_that_disagree_with_the_weights_name_the_setting(saved, fresh):
    json_path = saved / "ldvae_model.json"
    meta = json.loads(json_path.read_text())
    meta["init_params"]["n_latent"] = 3
    json_path.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"model_state.pt does not fit .*ldvae_model.json \(z_encoder.mean.weight "
                                             r"has shape \(2, 16\), .*\(3, 16\)\): init_params.n_latent=3 in "
                                             r"ldvae_model.json disagrees"):
        ldvae.LinearSCVI.load(saved, adata=fresh, accelerator="cpu")
    assert "ldvae_setup" not in fresh.uns


def test_truncated_json_is_refused_and_adata_is_untouched(saved, fresh):
    json_path = saved / "ldvae_model.json"
    json_path.write_text(json_path.read_text()[:200])
    with pytest.raises(ModelFileError, match=r"corrupted or truncated JSON"):
        ldvae.LinearSCVI.load(saved, adata=fresh, accelerator="cpu")
    assert "ldvae_setup" not in fresh.uns


def test_nan_in_the_weights_is_refused(saved, fresh):
    weights = saved / "model_state.pt"
    state = torch.load(weights, weights_only=True)
    state["factor_regressor.weight"][0, 0] = float("nan")
    torch.save(state, weights)
    meta = json.loads((saved / "ldvae_model.json").read_text())
    meta["weights_sha256"] = None  # as written before checksums: reach the values
    (saved / "ldvae_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"factor_regressor.weight holds 1 non-finite values"):
        ldvae.LinearSCVI.load(saved, adata=fresh, accelerator="cpu")
    assert "ldvae_setup" not in fresh.uns


def test_load_onto_a_missing_gpu_leaves_adata_untouched(saved, fresh, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"accelerator='cuda' but no CUDA GPU is available"):
        ldvae.LinearSCVI.load(saved, adata=fresh, accelerator="cuda")
    assert "ldvae_setup" not in fresh.uns
    loaded = ldvae.LinearSCVI.load(saved, adata=fresh, accelerator="cpu")  # the same files load on the CPU
    assert fresh.uns["ldvae_setup"] == loaded.setup_


# --- resuming from a damaged checkpoint ------------------------------------------------


def _damage_checkpoint(payload: dict, case: str) -> None:
    if case == "extra train_state key":
        payload["train_state"]["learning_rate"] = 0.1
    elif case == "missing train_state key":
        del payload["train_state"]["best_val"]
    elif case == "extra top-level key":
        payload["notes"] = "x"
    elif case == "weights of another shape":
        payload["module_state"]["factor_regressor.weight"] = torch.zeros(N_GENES, 5)
    elif case == "nan weights":
        payload["module_state"]["px_r"] = torch.full((N_GENES,), float("nan"))
    elif case == "optimizer moments of another shape":
        payload["train_state"]["optimizer_state"]["state"][0]["exp_avg"] = torch.zeros(3)
    elif case == "seed not an integer":
        payload["train_config"]["seed"] = "7"


CHECKPOINT_MESSAGES = {
    "extra train_state key": r"checkpoint.pt is damaged: train_state has the keys .*learning_rate",
    "missing train_state key": r"checkpoint.pt is damaged: train_state has the keys",
    "extra top-level key": r"checkpoint.pt is damaged: unexpected keys \['notes'\]",
    "weights of another shape": r"other settings or genes \(factor_regressor.weight has shape \(30, 5\)",
    "nan weights": r"other settings or genes \(px_r holds 30 non-finite values",
    "optimizer moments of another shape": r"is damaged: optimizer state exp_avg of parameter 0 has shape \(3,\)",
    "seed not an integer": r"train_config\['seed'\] must be an integer, got '7'",
}


@pytest.mark.parametrize("case", list(CHECKPOINT_MESSAGES))
def test_damaged_checkpoint_leaves_the_model_unchanged(adata, tmp_path, case):
    new_model(adata).train(max_epochs=1, checkpoint_dir=tmp_path, progress_bar=False)
    path = tmp_path / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    _damage_checkpoint(payload, case)
    torch.save(payload, path)
    model = new_model(adata)
    model.train(max_epochs=1, progress_bar=False, seed=3)
    before, state_before = snapshot(model.module), copy.deepcopy(model.train_state_)
    with pytest.raises(ModelFileError, match=CHECKPOINT_MESSAGES[case]):
        model.train(max_epochs=3, resume_from=tmp_path, progress_bar=False)
    assert_same_state(snapshot(model.module), before)
    assert model.train_state_.step == state_before.step and model.train_state_.history == state_before.history


def test_load_checkpoint_checks_every_field(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "ldvae-checkpoint", "format_version": 1, "module_state": {"w": 3},
                "train_state": {}, "train_config": {}}, path)
    with pytest.raises(ModelFileError, match=r"module_state must be a dict of named tensors"):
        load_checkpoint(path)


# --- learning rates and other optimizer settings -----------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": float("nan")}, r"lr must be a finite number > 0, got nan"),
        ({"lr": float("inf")}, r"lr must be a finite number > 0, got inf"),
        ({"lr": 0.0}, r"lr must be a finite number > 0, got 0.0"),
        ({"lr": -1e-3}, r"lr must be a finite number > 0, got -0.001"),
        ({"plan_kwargs": {"lr": "0.01"}}, r"lr must be a finite number > 0, got '0.01'"),
        ({"plan_kwargs": {"eps": 0}}, r"eps must be a finite number > 0, got 0"),
        ({"plan_kwargs": {"weight_decay": -1.0}}, r"weight_decay must be a finite number >= 0, got -1.0"),
        ({"plan_kwargs": {"weight_decay": float("nan")}}, r"weight_decay must be a finite number >= 0, got nan"),
        ({"plan_kwargs": {"n_epochs_kl_warmup": 2.5}}, r"n_epochs_kl_warmup must be None or an integer >= 0"),
        ({"plan_kwargs": {"n_steps_kl_warmup": -1}}, r"n_steps_kl_warmup must be None or an integer >= 0"),
        ({"plan_kwargs": {"max_kl_weight": -0.5}}, r"max_kl_weight must be a finite number >= 0, got -0.5"),
        ({"plan_kwargs": {"min_kl_weight": float("inf")}}, r"min_kl_weight must be a finite number >= 0, got inf"),
        ({"early_stopping_patience": 0}, r"early_stopping_patience must be a positive integer, got 0"),
        ({"check_val_every_n_epoch": 0}, r"check_val_every_n_epoch must be a positive integer, got 0"),
    ],
)
def test_bad_optimizer_settings_are_refused_before_training(adata, kwargs, message):
    model = new_model(adata)
    before = snapshot(model.module)
    with pytest.raises(ValueError, match=message):
        model.train(max_epochs=2, progress_bar=False, **kwargs)
    assert not model.is_trained_ and model.train_state_ is None
    assert_same_state(snapshot(model.module), before)


PATHS = ["runner", "one step per call", "autograd"]


@pytest.mark.parametrize("path", PATHS)
def test_update_that_overflows_the_parameters_is_refused(adata, monkeypatch, path):
    """lr=1e38 is finite, but its step size lr / (1 - beta1) overflows float32: every
    parameter the first update touches becomes inf or NaN, from finite gradients."""
    calls = []
    for name in ("train_steps", "train_steps_threaded"):  # one thread, several
        original = getattr(cpu_loop, name)
        monkeypatch.setattr(cpu_loop, name, lambda *args, run=original: calls.append(1) or run(*args))
    if path != "runner":
        monkeypatch.setattr(fused.StepRunner, "for_fit", classmethod(lambda cls, *args: None))
    if path == "autograd":
        monkeypatch.setattr(fused, "ENABLED", False)
    model = new_model(adata)
    model.train(max_epochs=1, progress_bar=False)
    before = snapshot(model.module)
    moments_before = copy.deepcopy(model.train_state_.optimizer_state["state"])
    with pytest.raises(NonFiniteLossError, match=r"The parameters after the optimizer's update became non-finite at "
                                                 r"epoch 2, step 1 of that epoch\. .*lower the learning rate "
                                                 r"\(lr=1e\+38\)"):
        model.train(max_epochs=2, lr=1e38, progress_bar=False)
    assert bool(calls) == (path == "runner")
    for value in model.module.state_dict().values():
        assert torch.isfinite(value.float()).all()
    assert_same_state(snapshot(model.module), before)
    assert model.train_state_.step == 2 and model.train_state_.epoch == 1
    for i, moments in model.train_state_.optimizer_state["state"].items():  # Adam's state as before, too
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.as_tensor(moments[key]), torch.as_tensor(moments_before[i][key])), (i, key)


def test_compiled_adam_undoes_an_overflowing_update():
    rng = np.random.default_rng(0)
    params = rng.normal(size=1000).astype(np.float32)
    grads = rng.normal(size=1000).astype(np.float32)
    m, v = (np.abs(rng.normal(size=1000)).astype(np.float32) for _ in range(2))
    before = (params.copy(), grads.copy(), m.copy(), v.copy())
    scratch = [np.empty(1000, np.float32) for _ in range(3)]
    assert not cpu_loop._adam(params, grads, m, v, 3.0, 1e38, 0.9, 0.999, 0.01, 1e-6, *scratch)
    for got, want in zip((params, grads, m, v), before):
        np.testing.assert_array_equal(got, want)
    # only the last element overflows (3.3e38 + ~3e37), after every other one was updated
    params[-1], grads[-1] = 3.3e38, -1.0
    m[:], v[:] = 0.0, 0.0
    before = (params.copy(), m.copy(), v.copy())
    assert not cpu_loop._adam(params, grads, m, v, 1.0, 3e37, 0.9, 0.999, 0.01, 0.0, *scratch)
    for got, want in zip((params, m, v), before):
        np.testing.assert_array_equal(got, want)
    assert cpu_loop._adam(params[:-1], grads[:-1], m[:-1], v[:-1], 1.0, 3e37, 0.9, 0.999, 0.01, 0.0,
                          *(a[:-1] for a in scratch))  # without it the same update is taken
    assert not np.array_equal(params[:-1], before[0][:-1])


def test_compiled_adam_skips_its_checks_only_while_bounds_keep_the_update_finite():
    rng = np.random.default_rng(1)
    p, g, m = (rng.normal(size=4096).astype(np.float32) for _ in range(3))
    v = np.abs(rng.normal(size=4096)).astype(np.float32)
    settings = (7.0, 5e-3, 0.9, 0.999, 1e-8, 1e-6)
    largest = [float(np.abs(a).max()) for a in (p, m, v, g)]
    assert [cpu_loop._largest(a) for a in (p, m, v)] == largest[:3]
    g_bad = g.copy()
    g_bad[7] = np.nan
    for parts in (1, 3):  # the largest gradient found over parts of the array, one per thread
        for largest_bits in (cpu_loop.largest_bits_parts, cpu_loop.largest_bits_threaded):
            top = largest_bits(g, parts)
            assert top == cpu_loop._largest_bits(g)
            assert cpu_loop._largest_gradient(np.zeros(1), top) == largest[3]
            assert cpu_loop._largest_gradient(np.zeros(1), largest_bits(g_bad, parts)) == -1.0
            assert cpu_loop._largest_gradient(np.array([np.inf]), top) == -1.0
    bounded, *bounds = cpu_loop.update_bounds(*largest, *settings)
    assert bounded
    checked = [a.copy() for a in (p, g, m, v)]
    fast = [a.copy() for a in (p, g, m, v)]
    assert cpu_loop._adam(*checked, *settings, *[np.empty(4096, np.float32) for _ in range(3)])
    cpu_loop._adam_unchecked(*fast, *settings)
    for got, want in zip(fast, checked):  # the same update, to rounding (the two compile differently)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for parts in (1, 3):  # the update over parts of the parameters, one per thread: the same, exactly
        for adam in (cpu_loop.adam_parts, cpu_loop.adam_parts_threaded):
            split = [a.copy() for a in (p, g, m, v)]
            adam(*split, *settings, parts)
            for got, want in zip(split, fast):
                np.testing.assert_array_equal(got, want)
    for bound, a in zip(bounds, (fast[0], fast[2], fast[3])):  # true upper bounds, and finite
        assert float(np.abs(a).max()) <= bound < 1e37
    # bounds that could reach float32's largest value send the step to the checked update
    assert cpu_loop.update_bounds(*largest[:3], 1e20, *settings)[0] is False  # g^2 would overflow
    assert cpu_loop.update_bounds(*largest, 7.0, 1e32, 0.9, 0.999, 1e-8, 0.0)[0] is False  # lr
    assert cpu_loop.update_bounds(3e37, *largest[1:], *settings)[0] is False  # a parameter near the edge


def test_fused_adam_given_a_gradient_bound_takes_the_same_steps_and_still_refuses_overflow():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a, opt_b = FusedAdam(a, lr=1e-2), FusedAdam(b, lr=1e-2)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        bound = float(torch.stack([g.norm() for g in grads]).norm())
        assert opt_a.step() is True and opt_b.step(bound) is True
        for p, q in zip(a, b):
            assert torch.equal(p, q)
    before = [q.detach().clone() for q in b]
    opt_b.param_groups[0]["lr"] = 1e39
    assert opt_b.step(bound) is False  # the bound cannot prove it: the checked update refuses
    for q, was in zip(b, before):
        assert torch.equal(q, was)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optimizers_refuse_an_overflowing_first_step_and_keep_their_state(dtype):
    params = [torch.nn.Parameter(torch.randn(5, 3, dtype=dtype)), torch.nn.Parameter(torch.randn(4, dtype=dtype))]
    for p in params:
        p.grad = torch.randn_like(p)
    huge = 1e38 if dtype == torch.float32 else 1e308
    opt = adam(params, TrainConfig(max_epochs=1, lr=huge))
    assert isinstance(opt, FusedAdam) == (dtype == torch.float32)
    before = [p.detach().clone() for p in params]
    assert opt.step() is False
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    state = opt.state_dict()["state"]
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in state.values())
    opt.param_groups[0]["lr"] = 1e-3
    assert opt.step() is True and not torch.equal(params[0], before[0])


# --- minibatches ---------------------------------------------------------------------------


def test_batch_size_below_two_is_refused_with_the_reason(adata):
    model = new_model(adata)
    with pytest.raises(ValueError, match=r"batch_size must be at least 2, got 1: batch normalization computes each "
                                         r"minibatch's mean and variance over its cells, which one cell cannot give"):
        model.train(max_epochs=1, batch_size=1, progress_bar=False)
    assert not model.is_trained_


def test_a_last_minibatch_of_one_cell_joins_the_one_before(adata, monkeypatch):
    assert [len(b) for b in minibatches(torch.arange(5), 2)] == [2, 3]
    assert [len(b) for b in minibatches(torch.arange(4), 2)] == [2, 2]
    sizes = []
    original = batches.minibatches
    monkeypatch.setattr(batches, "minibatches", lambda perm, n: sizes.append([len(b) for b in original(perm, n)])
                        or original(perm, n))
    model = new_model(adata)
    model.train(max_epochs=2, batch_size=179, train_size=0.9, progress_bar=False)  # 180 training cells: 179 + 1
    assert sizes[-2:] == [[180], [180]] and model.train_state_.step == 2


# --- saving never changes the caller's AnnData -----------------------------------------


def test_save_with_anndata_leaves_obs_var_and_uns_unchanged(adata, tmp_path):
    adata.obs["donor"] = [f"d{i % 3}" for i in range(N_CELLS)]  # a string column anndata would make categorical
    adata.var["symbol"] = [f"g{i}" for i in range(N_GENES)]
    adata.uns["note"] = {"kept": [1, 2]}
    model = new_model(adata)
    obs, var, uns = adata.obs.copy(), adata.var.copy(), copy.deepcopy(dict(adata.uns))
    model.save(tmp_path / "run", save_anndata=True)
    assert adata.obs["donor"].dtype == object and adata.var["symbol"].dtype == object
    pd.testing.assert_frame_equal(adata.obs, obs)
    pd.testing.assert_frame_equal(adata.var, var)
    assert dict(adata.uns).keys() == uns.keys() and adata.uns["note"] == uns["note"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adata.h5ad", "ldvae_model.json",
                                                                   "model_state.pt"]
    loaded = ldvae.LinearSCVI.load(tmp_path / "run", accelerator="cpu")  # the saved AnnData is complete
    assert list(loaded.adata.obs["donor"]) == list(obs["donor"])


# --- progress output -------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream", ["terminal", "log file"])
@pytest.mark.parametrize("progress_bar", [True, False])
def test_progress_is_a_bar_on_a_terminal_and_a_few_log_lines_elsewhere(adata, monkeypatch, caplog, stream,
                                                                        progress_bar):
    err = Terminal() if stream == "terminal" else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    model = new_model(adata)
    caplog.clear()
    model.train(max_epochs=20, progress_bar=progress_bar)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training: epoch")]
    if not progress_bar:
        assert err.getvalue() == "" and lines == []
    elif stream == "terminal":
        assert "Training" in err.getvalue() and "\r" in err.getvalue() and lines == []
    else:
        assert err.getvalue() == ""
        assert len(lines) == 10 and lines[0].startswith("Training: epoch 2 of 20, elbo_train=")
        assert lines[-1].startswith("Training: epoch 20 of 20, elbo_train=") and "elbo_val=" in lines[-1]


def test_progress_reaches_a_log_file_without_any_logging_set_up(tmp_path):
    """A script run in the background (its output in a file), with no logging configured:
    the lines of a fit and of several seeds' fits still reach stderr."""
    script = textwrap.dedent("""
        import ldvae
        from ldvae.factors.stability import fit_seeds
        a = ldvae.simulate(100, 20, 2, seed=0)
        ldvae.LinearSCVI.setup_anndata(a, layer="counts")
        ldvae.LinearSCVI(a, n_latent=2).train(20, threads=1)
        fit_seeds(a, [0, 1], train_kwargs={"max_epochs": 2}, n_latent=2, n_jobs=1)
    """)
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, "-c", script], stderr=log, stdout=subprocess.DEVNULL, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, text[-2000:]
    assert text.count("Training: epoch") == 10 and "Training: epoch 20 of 20, elbo_train=" in text
    assert "Fits of 2 seeds: 1 done (seed 0)." in text and "Fits of 2 seeds: 2 done (seed 1)." in text


def test_progress_is_a_bar_in_a_jupyter_notebook(adata, monkeypatch, caplog):
    import types

    class ZMQInteractiveShell:  # the shell of a Jupyter kernel, whose stderr is no terminal
        pass

    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=ZMQInteractiveShell))
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    caplog.clear()
    new_model(adata).train(max_epochs=5)
    assert "Training" in err.getvalue() and "5/5" in err.getvalue()
    assert not [r for r in caplog.records if r.getMessage().startswith("Training: epoch")]


# --- an inherited "ignore Ctrl-C" ---------------------------------------------------------

_SIGINT_SCRIPT = textwrap.dedent(
    """
    import os, signal
    import ldvae
    from ldvae.train.loop import InMemorySource
    a = ldvae.simulate(200, 30, 2, seed=3)
    ldvae.LinearSCVI.setup_anndata(a, layer="counts")
    m = ldvae.LinearSCVI(a, n_latent=2, n_hidden=16)
    seen = []
    original = InMemorySource.epoch_rows
    def epoch_rows(source, generator):
        seen.append(signal.getsignal(signal.SIGINT))
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(source, generator)
    InMemorySource.epoch_rows = epoch_rows
    m.train(max_epochs=3, progress_bar=False, accelerator="cpu")
    print("interrupted", m.train_state_.interrupted, "epochs", m.train_state_.epoch,
          "ignored", all(h is signal.SIG_IGN for h in seen), signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
    """
)


def test_training_keeps_an_inherited_ignored_sigint():
    def run(ignore: bool):
        return subprocess.run(
            [sys.executable, "-c", _SIGINT_SCRIPT], capture_output=True, text=True, timeout=300,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore else None,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )

    ignored = run(ignore=True)
    assert ignored.returncode == 0, ignored.stderr
    assert ignored.stdout.split() == ["interrupted", "False", "epochs", "3", "ignored", "True", "True"]
    handled = run(ignore=False)  # the same signal, not ignored: the fit stops at the next step
    assert handled.returncode == 0, handled.stderr
    assert handled.stdout.split()[:4] == ["interrupted", "True", "epochs", "1"]


# --- a session of calls: continued fits, numbers from NumPy, torch's default dtype ---------------------


def test_training_and_queries_keep_float32_when_torchs_default_is_float64(adata):
    model = new_model(adata)
    model.train(max_epochs=2, progress_bar=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as another library in the notebook may set it
    try:
        model.train(max_epochs=1, progress_bar=False)
        fresh = new_model(adata)
        fresh.train(max_epochs=1, progress_bar=False)
        for m in (model, fresh):
            assert {p.dtype for p in m.module.parameters()} == {torch.float32}
            assert np.isfinite(m.history["elbo_train"].to_numpy()).all()
            assert m.get_latent_representation().dtype == np.float32
            assert m.get_normalized_expression().shape == (adata.n_obs, adata.n_vars)
        assert torch.get_default_dtype() == torch.float64  # the user's setting left as it was
    finally:
        torch.set_default_dtype(previous)


def test_numpy_numbers_give_checkpoints_and_saves_that_read_back(adata, tmp_path):
    model = new_model(adata)
    model.train(max_epochs=np.int64(2), lr=np.logspace(-3, -2, 3)[0], batch_size=np.int64(64),
                checkpoint_dir=tmp_path / "ck", checkpoint_every_n_epochs=np.int64(1), progress_bar=False)
    assert load_checkpoint(tmp_path / "ck")["train_state"]["epoch"] == 2
    model.save(tmp_path / "saved")
    assert ldvae.LinearSCVI.load(tmp_path / "saved", adata=adata).is_trained


def test_a_new_fit_does_not_replace_another_fits_checkpoint(adata, tmp_path):
    new_model(adata).train(max_epochs=2, checkpoint_dir=tmp_path / "ck", progress_bar=False)
    with pytest.raises(ldvae.SetupError, match="holds the checkpoint of another fit"):
        new_model(adata).train(max_epochs=1, checkpoint_dir=tmp_path / "ck", progress_bar=False)
    assert load_checkpoint(tmp_path / "ck")["train_state"]["epoch"] == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(ldvae.SetupError, match="cannot take checkpoints"):  # found before the first epoch
        new_model(adata).train(max_epochs=1, checkpoint_dir=tmp_path / "file" / "ck", progress_bar=False)


def test_early_stopping_without_validation_cells_is_refused(adata):
    with pytest.raises(ldvae.SetupError, match="no validation cells"):
        new_model(adata).train(max_epochs=2, train_size=1.0, early_stopping=True, progress_bar=False)


def test_a_continued_fit_ends_at_the_full_kl_weight(adata):
    model = new_model(adata)
    model.train(max_epochs=2, progress_bar=False, plan_kwargs={"n_epochs_kl_warmup": 100})  # interrupted early, say
    model.train(max_epochs=4, progress_bar=False)  # finished with a short call
    assert model.history["kl_weight"]["kl_weight"].iloc[-1] == 1.0
    other = new_model(adata)
    other.train(max_epochs=2, progress_bar=False)
    other.train(max_epochs=2, progress_bar=False, plan_kwargs={"n_epochs_kl_warmup": 100})  # given: applied
    assert other.history["kl_weight"]["kl_weight"].iloc[-1] < 0.1


def test_a_trained_model_from_scvi_tools_files_stays_trained_and_keeps_its_weights(adata, tmp_path):
    model = new_model(adata)
    model.train(max_epochs=3, progress_bar=False)
    model.save(tmp_path / "scvi", format="scvi")  # scvi-tools' layout: no step count travels with it
    loaded = ldvae.LinearSCVI.load(tmp_path / "scvi", adata=adata)
    before = loaded.get_latent_representation()
    loaded.train(max_epochs=1, init="pca", lr=1e-12, progress_bar=False)  # a trained model continues from its weights
    assert np.abs(loaded.get_latent_representation() - before).max() < 0.05  # batch norm's statistics move a little
    again = ldvae.LinearSCVI.load(tmp_path / "scvi", adata=adata)
    with pytest.raises(NonFiniteLossError):
        again.train(max_epochs=1, lr=1e38, progress_bar=False)  # fails at its first step
    assert again.is_trained and again.get_latent_representation().shape == before.shape


def test_an_interrupt_as_a_compiled_run_returns_leaves_the_last_counted_step(adata, monkeypatch):
    # a second Ctrl-C (or a user's alarm handler) raises at the first bytecode after the compiled
    # run: its steps moved the parameters and Adam's moments but were not yet counted
    model = new_model(adata)
    original, calls, before = fused.StepRunner.__call__, [], {}

    def run(runner, parts, weights):
        if len(calls) == 2:
            before.update(snapshot(model.module))
        calls.append(original(runner, parts, weights))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return calls[-1]

    monkeypatch.setattr(fused.StepRunner, "__call__", run)
    model.train(max_epochs=10, batch_size=32, threads=1, progress_bar=False)
    assert len(calls) == 3 and model.train_state_.interrupted
    assert_same_state(snapshot(model.module), before)  # parameters and buffers of the last counted step
    counted = model.train_state_.step
    assert counted == sum(c[0] for c in calls[:2])
    adam = model.train_state_.optimizer_state["state"]
    assert {float(s["step"]) for s in adam.values()} == {float(counted)}  # Adam's count agrees


def test_threads_sharing_torch_get_the_answers_of_one_thread(adata):
    """torch's generator and default dtype are the process's: queries and fits from several
    threads run one after another, so each gives its single-threaded answer, a fit queried
    from another thread is the fit alone, and the user's default dtype stays."""
    import threading

    def fit():
        ldvae.settings.seed = 0
        m = new_model(adata)
        m.train(max_epochs=6, progress_bar=False, threads=1)
        return m

    def queries(m):
        return (float(m.get_elbo()), m.get_normalized_expression(n_samples=3, return_numpy=True),
                float(m.get_reconstruction_error()["reconstruction_loss"]))

    alone = fit()
    expected = queries(alone)
    results, errors = [], []
    trained = {}

    def query_loop():
        try:
            for _ in range(3):
                results.append(queries(alone))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def fit_in_thread():
        trained["model"] = fit()

    torch.set_default_dtype(torch.float64)
    try:
        threads = [threading.Thread(target=query_loop) for _ in range(2)] + [threading.Thread(target=fit_in_thread)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(torch.float32)
    assert not errors and len(results) == 6
    for elbo, expr, rec in results:
        assert elbo == expected[0] and rec == expected[2]
        np.testing.assert_array_equal(expr, expected[1])
    for a, b in zip(trained["model"].module.state_dict().values(), alone.module.state_dict().values()):
        assert torch.equal(a, b)
