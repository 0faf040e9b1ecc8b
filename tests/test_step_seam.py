"""The training step's seam: every path draws one step's randomness in the same order
(``fused.draw_step_noise``), so from one seed the autograd step, the compiled step and the
compiled runs take the same step; ``choose_step`` picks the path once per fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldvae.cpu import fused
from ldvae.train import InMemorySource, TrainConfig, TrainState
from ldvae.train.optim import adam
from ldvae.train.steps import CompiledRuns, OneAtATime, choose_step

from test_cpu_loop import _assert_same_module
from test_cpu_step import N_CELLS, _data, _module


@pytest.mark.parametrize("observed", [False, True])
def test_module_loss_draws_what_draw_step_noise_draws(monkeypatch, observed):
    """The rule: z encoder's dropout seed, z's noise, l encoder's dropout seed, the library's
    noise, in that order from torch's generator; ``module.loss`` on the compiled-kernel path
    consumes exactly these draws."""
    module = _module(use_observed_lib_size=observed)
    b = _data().gather(torch.arange(N_CELLS))
    drawn = []
    seed_of, randn_like = fused._dropout_seed, torch.randn_like
    monkeypatch.setattr(fused, "_dropout_seed", lambda rate: drawn.append(seed_of(rate)) or drawn[-1])
    monkeypatch.setattr(torch, "randn_like", lambda t: drawn.append(randn_like(t)) or drawn[-1])
    torch.manual_seed(11)
    module.loss(b)
    after_loss = torch.randn(3)
    monkeypatch.undo()

    noise_z, noise_l = torch.empty(N_CELLS, module.config.n_latent), torch.empty(N_CELLS)
    rate = module.config.dropout_rate
    torch.manual_seed(11)
    seeds = fused.draw_step_noise(noise_z, None if observed else noise_l, rate, rate)
    assert torch.equal(torch.randn(3), after_loss)  # nothing more, nothing less was drawn
    expected = [seeds[0], noise_z] + ([] if observed else [seeds[1], noise_l])
    assert len(drawn) == len(expected)
    for got, want in zip(drawn, expected):
        assert torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want


def _one_step(kind: str, seed: int = 4):
    data = _data()
    module = _module(seed=1)
    config = TrainConfig(max_epochs=1, batch_size=N_CELLS, lr=1e-2, progress_bar=False)
    source = InMemorySource(data, np.arange(N_CELLS), np.arange(0), batch_size=N_CELLS)
    optimizer = adam([p for p in module.parameters() if p.requires_grad], config)
    if kind == "autograd":
        step = OneAtATime(module, optimizer, None, None)
    elif kind == "compiled":
        step = OneAtATime(module, optimizer, fused.TrainStep.for_module(module), None)
        optimizer.use_flat(step.compiled.flat, step.compiled.flat_grad)
    else:
        step = choose_step(module, optimizer, source, TrainState(), config)
        assert isinstance(step, CompiledRuns)
    rows = torch.arange(N_CELLS)
    batch = rows if kind == "runs" else data.gather(rows, by_gene=module.needs_gene_order)
    torch.manual_seed(seed)
    result = step([batch], [0.7])
    assert result.done == 1 and result.failed is None
    return module, result


@pytest.mark.parametrize("kind", ["compiled", "runs"])
def test_every_step_takes_the_autograd_step_from_the_same_seed(kind):
    reference, ref_result = _one_step("autograd")
    module, result = _one_step(kind)
    _assert_same_module(module, reference, rtol=1e-4, atol=1e-5)
    for got, want in zip(result.terms, ref_result.terms):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-3)


def test_choose_step_takes_autograd_for_a_model_the_kernels_do_not_handle():
    module = _module(gene_likelihood="zinb")
    config = TrainConfig(max_epochs=1, progress_bar=False)
    source = InMemorySource(_data(), np.arange(N_CELLS), np.arange(0), batch_size=8)
    optimizer = adam([p for p in module.parameters() if p.requires_grad], config)
    step = choose_step(module, optimizer, source, TrainState(), config)
    assert isinstance(step, OneAtATime) and step.compiled is None


def test_minibatch_count_follows_the_one_cell_rule():
    from ldvae.train import minibatches, n_minibatches

    for n in range(1, 40):
        for size in (1, 2, 3, 8, 16):
            assert n_minibatches(n, size) == len(minibatches(torch.arange(n), size)), (n, size)
