"""Training that survives faults, files that are never half-written.

Each test injects one fault (a NaN in the data path, a huge learning rate, Ctrl-C, a
crash between checkpoint writes, a damaged model file) and checks the documented
outcome, usually that the model holds exactly the state where its history ends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import ldvae
from ldvae.cpu import fused
from ldvae.data.contract import CountData
from ldvae.nn.module import LDVAEModule
from ldvae.train.loop import InMemorySource, NonFiniteLossError, load_checkpoint
from conftest import assert_same_state, new_model, snapshot

N_CELLS, N_GENES = 200, 30  # 180 training cells: 2 steps per epoch at batch_size=128


@pytest.fixture(autouse=True)
def one_step_per_call(monkeypatch):
    """These tests inject faults per minibatch into fit's step-at-a-time loop (models and
    sources without the compiled runner take it). fused.StepRunner, which runs many steps per
    call, is faulted the same ways in test_cpu_loop.py."""
    monkeypatch.setattr(fused.StepRunner, "for_fit", classmethod(lambda cls, *args: None))


@pytest.fixture
def adata():
    a = ldvae.simulate(N_CELLS, N_GENES, 2, seed=3)
    ldvae.LinearSCVI.setup_anndata(a, layer="counts")
    return a


def assert_same_history(h1: dict, h2: dict) -> None:
    assert h1.keys() == h2.keys()
    for key in h1:
        assert h1[key].equals(h2[key]), f"history {key!r} differs"


class GatherHook:
    """Wraps ``InMemorySource.train_batches``: before the ``at``-th training batch (1-based)
    is handed to the loop, record the module's state (= the state after the previous step)
    and apply ``fault`` to the batch. Validation batches are passed through. (Batches are
    gathered ahead in a background thread, so the hook sits where the loop receives them.)"""

    def __init__(self, monkeypatch, module, at: int, fault):
        self.module, self.at, self.fault = module, at, fault
        self.calls = 0
        self.before_fault = None
        self.before = []  # before[i]: the module's state before training batch i + 1
        original = InMemorySource.train_batches

        def train_batches(source, generator):
            for batch in original(source, generator):
                self.calls += 1
                self.before.append(snapshot(self.module))
                if self.calls == self.at:
                    self.before_fault = snapshot(self.module)
                    batch = self.fault(batch)
                yield batch

        monkeypatch.setattr(InMemorySource, "train_batches", train_batches)


def with_nan(batch):
    val = batch.val.clone()
    val[0] = float("nan")
    return dataclasses.replace(batch, val=val, dense=None, log1p_values=None, gene_order=None)


def raise_interrupt(batch):
    raise KeyboardInterrupt


def send_sigint(batch):
    os.kill(os.getpid(), signal.SIGINT)
    return batch


# --- numerical guards ------------------------------------------------------------------


def test_nan_in_data_stops_cleanly_where_the_history_ends(adata, monkeypatch):
    model = new_model(adata)
    hook = GatherHook(monkeypatch, model.module, at=6, fault=with_nan)  # epoch 3, step 2
    with pytest.raises(NonFiniteLossError, match=r"loss became non-finite at epoch 3, step 2 of that epoch") as err:
        model.train(max_epochs=5, progress_bar=False)
    message = str(err.value)
    assert "The model is back at the end of epoch 2, where its history ends" in message
    assert "use_observed_lib_size=True" in message and "lower the learning rate (lr=0.001)" in message
    assert_same_state(snapshot(model.module), hook.before[4])  # before epoch 3's first step
    # the model stays usable, with the history of the two completed epochs, and trains on
    assert model.is_trained_ and model.train_state_.step == 4
    assert list(model.history["elbo_train"].index) == [0, 1]
    assert np.isfinite(model.get_latent_representation()).all()
    monkeypatch.undo()
    model.train(max_epochs=1, progress_bar=False)
    assert list(model.history["elbo_train"].index) == [0, 1, 2] and model.train_state_.step == 6


@pytest.mark.parametrize("path", ["autograd", "compiled"])
def test_nonfinite_gradient_is_caught_before_the_step(adata, monkeypatch, path):
    model = new_model(adata, use_observed_lib_size=True)
    weight = model.module.factor_regressor.weight
    if path == "autograd":
        monkeypatch.setattr(fused, "ENABLED", False)

        def poison_gradient(batch):  # the loss stays finite, its gradient does not
            weight.register_hook(lambda g: torch.full_like(g, float("inf")))
            return batch
    else:
        poisoned = []
        original = fused.TrainStep.__call__

        def call(step, b, kl_weight):
            out = original(step, b, kl_weight)
            if b in poisoned:
                weight.grad[0, 0] = float("inf")
            return out

        monkeypatch.setattr(fused.TrainStep, "__call__", call)

        def poison_gradient(batch):
            poisoned.append(batch)
            return batch

    hook = GatherHook(monkeypatch, model.module, at=3, fault=poison_gradient)
    with pytest.raises(NonFiniteLossError, match=r"training gradient became non-finite at epoch 2, step 1") as err:
        model.train(max_epochs=3, progress_bar=False)
    # observed library: the hint is the learning rate only
    assert "use_observed_lib_size" not in str(err.value)
    assert_same_state(snapshot(model.module), hook.before_fault)


def test_huge_learning_rate_stops_cleanly_where_the_history_ends(adata, monkeypatch):
    model = new_model(adata)
    states = []  # states[i]: the module after i good steps
    original = InMemorySource.train_batches

    def train_batches(source, generator):
        for batch in original(source, generator):
            states.append(snapshot(model.module))
            yield batch

    monkeypatch.setattr(InMemorySource, "train_batches", train_batches)
    with pytest.raises(NonFiniteLossError, match=r"non-finite at epoch \d+, step \d+ of that epoch.*lower the "
                       r"learning rate \(lr=1e\+30\)"):
        model.train(max_epochs=20, lr=1e30, progress_bar=False)
    step = model.train_state_.step  # at an epoch's end (two steps each): where the history ends
    assert 0 <= step < 40 and step % 2 == 0 and len(model.history.get("elbo_train", [])) == step // 2
    assert_same_state(snapshot(model.module), states[step])
    if step == 0:  # failed in its first epoch: untrained again, and says so
        assert not model.is_trained_
        with pytest.raises(ldvae.NotTrainedError):
            model.get_latent_representation()


def test_library_sizes_from_1_to_a_million_train_without_nan():
    rng = np.random.default_rng(0)
    n, g = 200, 30
    sizes = np.round(np.exp(np.linspace(0.0, np.log(1e6), n))).astype(int)  # 1 ... 1e6
    probs = rng.dirichlet(np.full(g, 0.3), size=n)
    x = np.vstack([rng.multinomial(s, p) for s, p in zip(sizes, probs)]).astype(np.float32)
    import anndata

    a = anndata.AnnData(sp.csr_matrix(x))
    assert a.X.sum(1).min() == 1 and a.X.sum(1).max() == 1e6
    ldvae.LinearSCVI.setup_anndata(a)
    for likelihood in ("nb", "zinb", "poisson"):
        model = new_model(a, gene_likelihood=likelihood)
        model.train(max_epochs=25, lr=1e-2, batch_size=64, check_val_every_n_epoch=5, progress_bar=False)
        for key, frame in model.history.items():
            assert np.isfinite(frame.to_numpy()).all(), (likelihood, key)
        assert np.isfinite(model.get_latent_representation()).all()
        assert np.isfinite(model.get_loadings().to_numpy()).all()


def test_learned_library_starts_at_its_prior(adata):
    model = new_model(adata)
    prior_mean = float(model.module.library_log_means.mean())
    assert 5.0 < prior_mean < 12.0  # log total counts of the simulated cells
    assert model.module.l_encoder.mean.bias.item() == pytest.approx(prior_mean)
    with torch.no_grad():
        ql_m = model.module.inference(model._data().gather(torch.arange(50)), use_mean=True).ql_m
    assert abs(float(ql_m.mean()) - prior_mean) < 2.0


# --- interruption ----------------------------------------------------------------------


def _check_interrupted(model, caplog, steps: int, epochs: int) -> None:
    assert model.train_state_.interrupted
    assert model.train_state_.step == steps and model.train_state_.epoch == epochs
    assert model.is_trained_
    assert list(model.history["elbo_train"].index) == list(range(epochs))
    assert np.isfinite(model.get_latent_representation()).all()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"Training interrupted after {steps} completed steps (epoch {epochs})" in m for m in warnings)


def test_keyboard_interrupt_keeps_usable_model_and_history(adata, monkeypatch, caplog):
    model = new_model(adata)
    hook = GatherHook(monkeypatch, model.module, at=6, fault=raise_interrupt)
    model.train(max_epochs=5, progress_bar=False)  # returns normally
    _check_interrupted(model, caplog, steps=5, epochs=2)
    assert_same_state(snapshot(model.module), hook.before_fault)


@pytest.mark.parametrize("path", ["autograd", "compiled"])
def test_keyboard_interrupt_inside_a_step_restores_batch_norm_statistics(adata, monkeypatch, caplog, path):
    """An interrupt after the batch norms updated their running statistics (in the forward
    pass) but before the optimizer step: the buffers go back to the last step's."""
    model = new_model(adata)
    hook = GatherHook(monkeypatch, model.module, at=4, fault=lambda b: b)
    if path == "autograd":
        monkeypatch.setattr(fused, "ENABLED", False)
        original = LDVAEModule.decoder_input  # runs after the encoders, in every likelihood's loss

        def decoder_input(module, *args, **kwargs):
            if module.training and hook.calls == 4:
                raise KeyboardInterrupt
            return original(module, *args, **kwargs)

        monkeypatch.setattr(LDVAEModule, "decoder_input", decoder_input)
    else:
        original_call = fused.TrainStep.__call__

        def call(step, b, kl_weight):
            out = original_call(step, b, kl_weight)  # statistics updated, optimizer not yet
            if hook.calls == 4:
                raise KeyboardInterrupt
            return out

        monkeypatch.setattr(fused.TrainStep, "__call__", call)
    model.train(max_epochs=5, progress_bar=False)
    _check_interrupted(model, caplog, steps=3, epochs=1)
    assert_same_state(snapshot(model.module), hook.before_fault)


def test_real_sigint_stops_at_the_next_step_boundary(adata, monkeypatch, caplog):
    model = new_model(adata)
    hook = GatherHook(monkeypatch, model.module, at=5, fault=send_sigint)
    model.train(max_epochs=5, progress_bar=False)
    # the signal arrives while the 5th batch is gathered; the loop stops before using it
    _check_interrupted(model, caplog, steps=4, epochs=2)
    assert hook.calls == 5
    assert_same_state(snapshot(model.module), hook.before_fault)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_after_the_last_step_is_still_reported(adata, monkeypatch, caplog, tmp_path):
    model = new_model(adata)
    original = CountData.gather
    sent = []

    def gather(data, rows, **kwargs):  # the signal arrives during the final validation pass
        if not model.module.training and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return original(data, rows, **kwargs)

    monkeypatch.setattr(CountData, "gather", gather)
    model.train(max_epochs=2, checkpoint_dir=tmp_path, progress_bar=False)
    _check_interrupted(model, caplog, steps=4, epochs=2)
    assert "elbo_validation" in model.history
    assert load_checkpoint(tmp_path)["train_state"]["epoch"] == 2


def test_second_sigint_stops_at_once(adata, monkeypatch, caplog):
    model = new_model(adata)

    def twice(batch):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # raises here, before the batch reaches the loop
        return batch

    hook = GatherHook(monkeypatch, model.module, at=4, fault=twice)
    model.train(max_epochs=5, progress_bar=False)
    _check_interrupted(model, caplog, steps=3, epochs=1)
    assert_same_state(snapshot(model.module), hook.before_fault)


def test_training_can_continue_after_an_interrupt(adata, monkeypatch):
    model = new_model(adata)
    GatherHook(monkeypatch, model.module, at=3, fault=raise_interrupt)
    model.train(max_epochs=4, progress_bar=False)
    assert model.train_state_.interrupted
    monkeypatch.undo()
    model.train(max_epochs=2, progress_bar=False)
    assert not model.train_state_.interrupted
    assert list(model.history["elbo_train"].index) == [0, 1, 2]


# --- checkpoints and resume ------------------------------------------------------------


def test_interrupted_then_resumed_fit_equals_uninterrupted_fit(adata, monkeypatch, tmp_path):
    train_kwargs = dict(max_epochs=6, check_val_every_n_epoch=1, progress_bar=False, seed=7)
    reference = new_model(adata)
    reference.train(**train_kwargs)

    interrupted = new_model(adata)
    with monkeypatch.context() as patch:
        GatherHook(patch, interrupted.module, at=10, fault=raise_interrupt)  # inside epoch 5
        interrupted.train(checkpoint_dir=tmp_path, checkpoint_every_n_epochs=2, **train_kwargs)
    assert interrupted.train_state_.interrupted and interrupted.train_state_.epoch == 4
    assert load_checkpoint(tmp_path)["train_state"]["epoch"] == 4

    resumed = new_model(adata)
    resumed.train(resume_from=tmp_path, **{k: v for k, v in train_kwargs.items() if k != "seed"})  # seed from it
    assert resumed.train_state_.epoch == 6 and resumed.train_state_.step == reference.train_state_.step
    assert_same_state(snapshot(resumed.module), snapshot(reference.module))
    assert_same_history(resumed.history, reference.history)
    np.testing.assert_array_equal(resumed.get_latent_representation(), reference.get_latent_representation())


def test_split_seed_sets_the_held_out_cells_and_resumes_with_them(adata, tmp_path):
    from ldvae.train.batches import split_cells

    a, b = new_model(adata), new_model(adata)
    a.train(max_epochs=2, seed=1, split_seed=5, progress_bar=False, checkpoint_dir=tmp_path,
            checkpoint_every_n_epochs=1)
    b.train(max_epochs=1, seed=2, split_seed=5, progress_bar=False)
    want = split_cells(adata.n_obs, None, None, 5, 128)
    for m in (a, b):
        np.testing.assert_array_equal(m.validation_indices_, want[1])
        np.testing.assert_array_equal(m.train_indices_, want[0])
    assert load_checkpoint(tmp_path)["train_config"]["split_seed"] == 5
    resumed = new_model(adata)
    resumed.train(max_epochs=3, resume_from=tmp_path, progress_bar=False)  # seed and split from the checkpoint
    np.testing.assert_array_equal(resumed.validation_indices_, want[1])
    assert resumed.train_state_.epoch == 3
    for bad in (-1, 1.5, "0", 2**32):
        with pytest.raises(ldvae.SetupError, match=rf"split_seed must be an integer in \[0, 4294967295\], got {bad!r}"):
            new_model(adata).train(max_epochs=1, split_seed=bad, progress_bar=False)


def test_crash_between_checkpoint_writes_keeps_previous_checkpoint(adata, monkeypatch, tmp_path):
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            with open(f, "wb") as fh:  # half a file, then the "disk" fails
                fh.write(b"PK\x03\x04 truncated")
            raise OSError("No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    model = new_model(adata)
    with pytest.raises(OSError, match="No space left on device"):
        model.train(max_epochs=4, checkpoint_dir=tmp_path, checkpoint_every_n_epochs=1, progress_bar=False)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["train_state"]["epoch"] == 1
    # the failed write does not lose the fit either: two epochs done, the model usable
    assert model.train_state_.epoch == 2
    assert np.isfinite(model.get_latent_representation()).all()
    # and the surviving checkpoint resumes
    resumed = new_model(adata)
    resumed.train(max_epochs=2, resume_from=tmp_path, progress_bar=False)
    assert resumed.train_state_.epoch == 2


def test_checkpoint_is_written_at_early_stopping(adata, tmp_path):
    model = new_model(adata)
    model.train(max_epochs=50, early_stopping=True, early_stopping_patience=1, lr=1e-5,
                checkpoint_dir=tmp_path, checkpoint_every_n_epochs=100, progress_bar=False)
    stopped = model.train_state_.epoch
    assert stopped < 50
    assert load_checkpoint(tmp_path)["train_state"]["epoch"] == stopped


def test_checkpoint_every_n_epochs_is_validated(adata, tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every_n_epochs must be a positive integer, got 0"):
        new_model(adata).train(max_epochs=1, checkpoint_dir=tmp_path, checkpoint_every_n_epochs=0)


class _Foreign:
    """An object a pickle would rebuild."""


def test_damaged_or_foreign_checkpoints_are_refused(adata, tmp_path):
    model = new_model(adata)
    model.train(max_epochs=1, checkpoint_dir=tmp_path, progress_bar=False)
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"checkpoint.pt is not a readable ldvae checkpoint"):
        load_checkpoint(tmp_path)
    torch.save({"format": "ldvae-checkpoint", "hook": _Foreign()}, path)  # never advises weights_only=False
    with pytest.raises(ValueError, match=r"holds pickled objects or is not a torch file, and ldvae loads tensors "
                                         r"and plain data only\.$"):
        load_checkpoint(tmp_path)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=r"checkpoint.pt is not an ldvae checkpoint\."):
        load_checkpoint(path)
    torch.save({"format": "ldvae-checkpoint", "format_version": 2}, path)
    with pytest.raises(ValueError, match=r"checkpoint format version 2; this ldvae reads up to version 1"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match=r"missing.pt does not exist\. Pass the checkpoint_dir of an earlier"):
        new_model(adata).train(max_epochs=1, resume_from=tmp_path / "missing.pt")


def test_resuming_a_checkpoint_of_another_model_names_the_fix(adata, tmp_path):
    new_model(adata).train(max_epochs=1, checkpoint_dir=tmp_path, progress_bar=False)
    other = ldvae.LinearSCVI(adata, n_latent=3, n_hidden=16)
    with pytest.raises(ValueError, match=r"(?s)written by a model with other settings or genes .*Resume with the"):
        other.train(max_epochs=2, resume_from=tmp_path, progress_bar=False)


def test_resuming_onto_other_genes_or_categories_is_refused_and_other_settings_are_named(adata, tmp_path, caplog):
    new_model(adata).train(max_epochs=2, checkpoint_dir=tmp_path, checkpoint_every_n_epochs=1, progress_bar=False)
    flipped = adata[:, ::-1].copy()  # the same genes in another order: the weights would go to the wrong genes
    ldvae.LinearSCVI.setup_anndata(flipped, layer="counts")
    model = new_model(flipped)
    before = snapshot(model.module)
    with pytest.raises(ValueError, match=rf"written for other genes \(first: '{adata.var_names[0]}' where the data "
                                         rf"has '{adata.var_names[-1]}'\)"):
        model.train(max_epochs=3, resume_from=tmp_path, progress_bar=False)
    assert_same_state(snapshot(model.module), before)
    assert model.train_state_ is None
    batched = adata.copy()
    batched.obs["batch"] = np.where(np.arange(batched.n_obs) % 2, "a", "b")
    ldvae.LinearSCVI.setup_anndata(batched, layer="counts", batch_key="batch")
    with pytest.raises(ValueError, match=r"written for another setup \(batch_categories: None, here \['a', 'b'\]\)"):
        new_model(batched).train(max_epochs=3, resume_from=tmp_path, progress_bar=False)
    with caplog.at_level("WARNING"):
        new_model(adata).train(max_epochs=3, resume_from=tmp_path, batch_size=64, lr=1e-2, progress_bar=False)
    assert "other settings or data than it was written with (batch_size 64, was 128; lr 0.01, was " in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        new_model(adata).train(max_epochs=1, resume_from=tmp_path, progress_bar=False)
    assert "has 2 epochs already; max_epochs=1 leaves nothing to train" in caplog.text


# --- atomic writes ---------------------------------------------------------------------


def test_crash_while_saving_leaves_no_partial_files(adata, monkeypatch, tmp_path):
    model = new_model(adata)
    model.train(max_epochs=1, progress_bar=False)
    model.save(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}

    def failing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt  # even an interrupt mid-write

    monkeypatch.setattr(torch, "save", failing_save)
    model.train(max_epochs=1, progress_bar=False)
    with pytest.raises(KeyboardInterrupt):
        model.save(tmp_path / "run", overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        model.save(tmp_path / "fresh")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    assert not (tmp_path / "fresh").exists()  # the directory this save made goes too
    ldvae.LinearSCVI.load(tmp_path / "run", adata=adata, accelerator="cpu")


def test_written_files_get_the_usual_permissions(adata, tmp_path):
    model = new_model(adata)
    model.save(tmp_path / "run")
    umask = os.umask(0)
    os.umask(umask)
    for p in (tmp_path / "run").iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p.name


# --- loading defensively ---------------------------------------------------------------


@pytest.fixture
def saved(adata, tmp_path):
    model = new_model(adata)
    model.train(max_epochs=1, progress_bar=False)
    model.save(tmp_path / "run")
    return tmp_path / "run"


def _edit_json(path, **changes):
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def test_truncated_model_json(saved, adata):
    path = saved / "ldvae_model.json"
    path.write_text(path.read_text()[:100])
    with pytest.raises(ValueError, match=r"ldvae_model.json is not a valid ldvae model file \(corrupted or truncated JSON"):
        ldvae.LinearSCVI.load(saved, adata=adata)


def test_binary_garbage_model_json(saved, adata):
    (saved / "ldvae_model.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"corrupted or truncated JSON"):
        ldvae.LinearSCVI.load(saved, adata=adata)


def test_model_json_missing_fields(saved, adata):
    meta = json.loads((saved / "ldvae_model.json").read_text())
    del meta["var_names"]
    (saved / "ldvae_model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"not a valid ldvae model file \(corrupted: missing or invalid \['var_names'\]"):
        ldvae.LinearSCVI.load(saved, adata=adata)


@pytest.mark.parametrize("cut", [0.5, 0.0])
def test_truncated_weights(saved, adata, cut):
    path = saved / "model_state.pt"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    _edit_json(saved / "ldvae_model.json", weights_sha256=None)  # as written before checksums
    with pytest.raises(ValueError, match=r"model_state.pt is not a readable ldvae weights file"):
        ldvae.LinearSCVI.load(saved, adata=adata)


def test_truncated_weights_fail_the_checksum(saved, adata):
    path = saved / "model_state.pt"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"does not match the checksum .*Save the model again"):
        ldvae.LinearSCVI.load(saved, adata=adata)


def test_corrupted_weights(saved, adata):
    path = saved / "model_state.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = b"\x00" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model_state.pt does not match the checksum recorded in ldvae_model.json"):
        ldvae.LinearSCVI.load(saved, adata=adata)


class NotAWeight:
    """A pickled object: never executed on load (weights_only=True)."""


def test_weights_with_pickled_objects_are_refused(saved, adata):
    torch.save({"payload": NotAWeight()}, saved / "model_state.pt")
    _edit_json(saved / "ldvae_model.json", weights_sha256=None)  # reach torch.load
    with pytest.raises(ValueError, match=r"model_state.pt is not a readable ldvae weights file \(UnpicklingError"):
        ldvae.LinearSCVI.load(saved, adata=adata)


def test_weights_of_another_model(saved, adata):
    torch.save({"w": torch.zeros(3)}, saved / "model_state.pt")
    _edit_json(saved / "ldvae_model.json", weights_sha256=None)  # reach torch.load
    with pytest.raises(ValueError, match=r"does not match the weights in model_state.pt .*belongs to another model"):
        ldvae.LinearSCVI.load(saved, adata=adata)


def test_foreign_json(saved, adata):
    (saved / "ldvae_model.json").write_text(json.dumps({"format": "scvi-model", "version": 3}))
    with pytest.raises(ValueError, match=r"ldvae_model.json is not an ldvae model file\."):
        ldvae.LinearSCVI.load(saved, adata=adata)
    (saved / "ldvae_model.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=r"is not an ldvae model file\."):
        ldvae.LinearSCVI.load(saved, adata=adata)


def test_directory_that_is_not_a_model(tmp_path, adata):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match=r"ldvae_model.json does not exist; is .* a directory written by model.save\(\)"):
        ldvae.LinearSCVI.load(tmp_path, adata=adata)
    (tmp_path / "model.pt").write_bytes(b"scvi-tools layout")  # scvi-tools' file name, damaged
    with pytest.raises(ldvae.ModelFileError, match=r"model.pt is not a readable scvi-tools model file"):
        ldvae.LinearSCVI.load(tmp_path, adata=adata)


@pytest.mark.parametrize("version", [2, 99, "1", None, True])
def test_newer_or_invalid_format_version(saved, adata, version):
    _edit_json(saved / "ldvae_model.json", format_version=version)
    with pytest.raises(ValueError, match=r"was written in model format version .*reads up to version 1\. Upgrade ldvae"):
        ldvae.LinearSCVI.load(saved, adata=adata)


def test_failed_load_leaves_adata_untouched(saved):
    other = ldvae.simulate(50, N_GENES + 1, 2, seed=0)
    with pytest.raises(ldvae.SetupError, match="adata's genes differ from the model's"):
        ldvae.LinearSCVI.load(saved, adata=other)
    assert "ldvae_setup" not in other.uns


# --- determinism -----------------------------------------------------------------------

_FIT_SCRIPT = textwrap.dedent(
    """
    import hashlib, sys
    import numpy as np, torch, ldvae
    a = ldvae.simulate(200, 30, 2, seed=3)
    ldvae.LinearSCVI.setup_anndata(a, layer="counts")
    ldvae.settings.seed = 0
    m = ldvae.LinearSCVI(a, n_latent=2, n_hidden=16)
    m.train(max_epochs=3, check_val_every_n_epoch=1, progress_bar=False, seed=11, accelerator="cpu")
    h = hashlib.sha256()
    for k, v in sorted(m.module.state_dict().items()):
        h.update(k.encode()); h.update(v.detach().cpu().numpy().tobytes())
    h.update(np.ascontiguousarray(m.get_latent_representation()).tobytes())
    for k, f in sorted(m.history.items()):
        h.update(k.encode()); h.update(f.to_numpy().tobytes())
    print(h.hexdigest())
    """
)


def _fit_digest_here() -> str:
    namespace: dict = {}
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_FIT_SCRIPT, "<fit>", "exec"), namespace)  # noqa: S102 - our own script
    return out.getvalue().strip()


def test_same_seed_same_result_across_runs_and_processes(monkeypatch):
    monkeypatch.undo()  # the default training path, as in the subprocess
    first, second = _fit_digest_here(), _fit_digest_here()
    assert first == second
    env = dict(os.environ, PYTHONHASHSEED="123", OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-c", _FIT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == first


def test_different_seeds_differ(adata):
    a, b = new_model(adata), new_model(adata)
    a.train(max_epochs=1, seed=1, progress_bar=False)
    b.train(max_epochs=1, seed=2, progress_bar=False)
    assert not np.array_equal(a.get_latent_representation(), b.get_latent_representation())



def test_import_works_where_numba_has_no_folder_to_cache_in():
    # a read-only install and home: numba finds no cache locator; ldvae compiles in each process and says how to keep it
    script = textwrap.dedent("""
        import warnings
        from numba.core import caching
        caching.CacheImpl._locator_classes = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import ldvae
            from ldvae.cpu import special
        print(special._JIT["cache"], sum("NUMBA_CACHE_DIR" in str(w.message) for w in caught))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "1"]
