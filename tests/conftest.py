from __future__ import annotations

import logging
import signal

import pytest
import torch

import ldvae

# The minibatches here are small: one thread is as fast as two on an idle 2-core machine
# and 10-30x faster on a busy one (OpenMP threads spin against the other load). scanpy
# calls can raise torch's thread count, so every test starts from one thread again.
torch.set_num_threads(1)


# The history keys of a scvi-tools model trained with validation (its saved files say so).
SCVI_HISTORY_KEYS = {f"{metric}_{part}" for part in ("train", "validation")
                     for metric in ("elbo", "reconstruction_loss", "kl_local", "kl_global")} | {
    "train_loss", "validation_loss", "kl_weight"}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_as_at_a_terminal():
    """The Ctrl-C tests press Ctrl-C as at a terminal. A suite started as a background job
    inherits an ignored SIGINT, which ldvae rightly keeps ignoring (and passes on to the
    processes it starts), so the suite restores Python's handler for itself."""
    inherited = signal.getsignal(signal.SIGINT)
    if inherited == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


@pytest.fixture
def small_adata():
    """400 cells x 40 genes simulated from the LDVAE model, 2 batches, counts in layers['counts']."""
    return ldvae.simulate(400, 40, 3, n_batches=2, seed=1)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="ldvae")
    yield


def fit_small(adata, epochs: int = 3, **model_kwargs):
    """A quickly trained model on ``adata`` (set up on the counts layer if not yet)."""
    if "ldvae_setup" not in adata.uns:
        ldvae.LinearSCVI.setup_anndata(adata, layer="counts")
    model = ldvae.LinearSCVI(adata, **model_kwargs)
    model.train(max_epochs=epochs, progress_bar=False)
    return model


def new_model(adata, **kwargs):
    ldvae.settings.seed = 0  # the same initial weights for every model of a test
    return ldvae.LinearSCVI(adata, n_latent=2, n_hidden=16, **kwargs)


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"
