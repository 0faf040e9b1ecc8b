"""Parameter averaging (``train(ema_decay=...)``): the finished fit and every validation pass
hold the moving average of the parameters after each epoch, the steps go on from the live
parameters, and a checkpoint carries the average so that a resumed fit is the same fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ldvae
import ldvae.train.loop as loop
from ldvae.cpu import fused
from ldvae.train.loop import ModelFileError, load_checkpoint
from conftest import assert_same_state, new_model, snapshot

# the same KL warm-up in fits of any length (a longer default is shortened to fit max_epochs)
FIT = dict(progress_bar=False, seed=7, check_val_every_n_epoch=1, plan_kwargs={"n_epochs_kl_warmup": 1})


@pytest.fixture
def adata():
    a = ldvae.simulate(200, 30, 2, seed=3)
    ldvae.LinearSCVI.setup_anndata(a, layer="counts")
    return a


def expected_average(states: list[dict], decay: float) -> dict:
    """The average written out, from the states before the fit and after each epoch: the
    first epoch's state, then mean += (1 - decay) * (next - mean) per epoch for floating-point
    tensors; integer counters are the last state's."""
    mean = {k: v.clone() for k, v in states[1].items()}
    for state in states[2:]:
        for key, value in state.items():
            mean[key] = mean[key] + (1 - decay) * (value - mean[key]) if value.is_floating_point() else value
    return mean


def assert_close_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{key} differs")


def live_states(adata, epochs: int) -> list[dict]:
    """The module's state before the fit and after each epoch, without averaging."""
    live = new_model(adata)
    states = [snapshot(live.module)]
    for _ in range(epochs):
        live.train(max_epochs=1, **FIT)
        states.append(snapshot(live.module))
    return states


@pytest.mark.parametrize("path", ["compiled runs", "one step at a time"])
def test_the_fit_and_its_validation_hold_the_average_of_the_epochs(adata, monkeypatch, path):
    if path == "one step at a time":
        monkeypatch.setattr(fused.StepRunner, "for_fit", classmethod(lambda cls, *args: None))
    states = live_states(adata, 3)  # the same steps without averaging, one epoch per call
    decay = 0.6
    seen = []  # what each validation pass of the averaged fit read
    evaluate = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda module, *a: (seen.append(snapshot(module)), evaluate(module, *a))[1])
    averaged = new_model(adata)
    averaged.train(max_epochs=3, ema_decay=decay, **FIT)
    # validation after epoch e read the average of epochs 1..e; training went on from the live
    # parameters (otherwise the later averages would differ)
    assert len(seen) == 3
    for epoch in (1, 2, 3):
        assert_close_state(seen[epoch - 1], expected_average(states[: epoch + 1], decay))
    assert_close_state(snapshot(averaged.module), expected_average(states, decay))
    assert not torch.equal(averaged.module.z_encoder.mean.weight, states[-1]["z_encoder.mean.weight"])
    assert averaged.train_state_.average is None  # the model holds it now
    assert np.isfinite(averaged.get_latent_representation()).all()


def test_an_interrupted_fit_keeps_the_average_of_its_completed_epochs(adata, monkeypatch, caplog):
    monkeypatch.setattr(fused.StepRunner, "for_fit", classmethod(lambda cls, *args: None))  # a step per batch
    states = live_states(adata, 2)
    batches = loop.InMemorySource.train_batches
    calls = []

    def train_batches(source, generator):
        for batch in batches(source, generator):
            calls.append(1)
            if len(calls) == 6:  # the second step of the third epoch (two per epoch)
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(loop.InMemorySource, "train_batches", train_batches)
    model = new_model(adata)
    model.train(max_epochs=4, ema_decay=0.5, **FIT)
    assert model.train_state_.interrupted and model.train_state_.epoch == 2 and model.train_state_.step == 5
    held, want = snapshot(model.module), expected_average(states, 0.5)
    counters = [k for k, v in want.items() if not v.is_floating_point()]  # batch norm's: the steps taken
    assert all(int(held.pop(k)) == 5 and want.pop(k) is not None for k in counters)
    assert_close_state(held, want)
    assert "the model keeps the parameter average over the completed epochs" in caplog.text


def test_a_resumed_fit_with_averaging_is_the_uninterrupted_fit(adata, tmp_path):
    fit = dict(FIT, ema_decay=0.5)
    reference = new_model(adata)
    reference.train(max_epochs=4, **fit)
    first = new_model(adata)
    first.train(max_epochs=2, checkpoint_dir=tmp_path, **fit)
    saved = load_checkpoint(tmp_path)
    assert saved["train_state"]["average"] is not None  # beside the live parameters it saved
    assert not torch.equal(saved["module_state"]["z_encoder.mean.weight"], first.module.z_encoder.mean.weight)
    resumed = new_model(adata)
    resumed.train(max_epochs=4, resume_from=tmp_path, **{k: v for k, v in fit.items() if k != "seed"})
    assert_same_state(snapshot(resumed.module), snapshot(reference.module))
    assert resumed.history["elbo_validation"].equals(reference.history["elbo_validation"])


def test_checkpoints_without_an_average_resume_and_damaged_ones_are_refused(adata, tmp_path):
    model = new_model(adata)
    model.train(max_epochs=1, checkpoint_dir=tmp_path, **FIT)
    path = tmp_path / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    assert payload["train_state"]["average"] is None
    del payload["train_state"]["average"]  # as written before fits kept an average
    torch.save(payload, path)
    new_model(adata).train(max_epochs=2, resume_from=tmp_path, progress_bar=False)
    for bad, match in (("mean", "train_state\\['average'\\] must be None or a dict of named tensors"),
                       ({"z_encoder.mean.weight": torch.zeros(3)}, "missing tensors")):
        payload["train_state"]["average"] = bad
        torch.save(payload, path)
        target = new_model(adata)
        before = snapshot(target.module)
        with pytest.raises(ModelFileError, match=match):
            target.train(max_epochs=2, resume_from=tmp_path, progress_bar=False)
        assert_same_state(snapshot(target.module), before)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), True, "0.5"])
def test_ema_decay_is_checked(adata, bad):
    model = new_model(adata)
    with pytest.raises(ldvae.SetupError, match=r"ema_decay must be None or a number in \[0, 1\)"):
        model.train(max_epochs=1, ema_decay=bad, progress_bar=False)
    assert not model.is_trained_


def test_decay_zero_is_the_plain_fit(adata):
    plain, zero = new_model(adata), new_model(adata)
    plain.train(max_epochs=2, **FIT)
    zero.train(max_epochs=2, ema_decay=0.0, **FIT)
    assert_same_state(snapshot(zero.module), snapshot(plain.module))
