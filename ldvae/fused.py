"""The decoder's batch norm, softmax and NB likelihood as one autograd function on CPU.

``LDVAEModule.loss`` calls ``bn_softmax_nb`` for the default model (NB likelihood, one
dispersion per gene, decoder batch norm) when its tensors are float32 on the CPU; the
kernels are in ``cpu_kernels`` (numba). Everything else (other likelihoods and dispersions,
CUDA, float64) takes the torch path of ``likelihoods``, which computes the same values.
Set ``ENABLED = False`` (or the environment variable ``LDVAE_FUSED=0``) to force the torch
path; tests and benchmarks compare the two.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

ENABLED = os.environ.get("LDVAE_FUSED", "1") != "0"

try:  # numba is installed with scanpy; without it every model takes the torch path
    from . import cpu_kernels
except ImportError:  # pragma: no cover
    cpu_kernels = None


def applies(h: Tensor, bn: nn.BatchNorm1d | None, log_theta: Tensor | None) -> bool:
    """Whether ``bn_softmax_nb`` handles this decoder output (see the module docstring)."""
    return (
        ENABLED
        and cpu_kernels is not None
        and bn is not None
        and bn.affine
        and bn.track_running_stats
        and log_theta is not None
        and log_theta.dim() == 1
        and h.device.type == "cpu"
        and h.dtype == torch.float32
        and h.dim() == 2
        and h.shape[0] > 1
    )


class _BNSoftmaxNB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, gamma, beta, library, log_theta, bn, row_start, col, val):
        n, G = h.shape
        h = h.detach().contiguous()
        library = library.detach().contiguous()
        log_theta = log_theta.detach().contiguous()
        training = bn.training
        if training:
            bn.num_batches_tracked.add_(1)
        momentum = bn.momentum
        if momentum is None:  # cumulative average, as nn.BatchNorm1d
            momentum = 1.0 / float(bn.num_batches_tracked)
        ll = h.new_empty(n)
        xhat, p, sp = (torch.empty_like(h) for _ in range(3))
        inv_std = h.new_empty(G)
        cpu_kernels.bn_softmax_nb_forward(
            h.numpy(), gamma.detach().numpy(), beta.detach().numpy(), bn.running_mean.numpy(),
            bn.running_var.numpy(), training, float(momentum), float(bn.eps), library.numpy(),
            log_theta.numpy(), row_start.numpy(), col.numpy(), val.numpy(),
            ll.numpy(), xhat.numpy(), p.numpy(), sp.numpy(), inv_std.numpy(),
        )
        ctx.training = training
        ctx.save_for_backward(gamma, library, log_theta, row_start, col, val, xhat, p, sp, inv_std)
        return ll

    @staticmethod
    def backward(ctx, grad):
        gamma, library, log_theta, row_start, col, val, xhat, p, sp, inv_std = ctx.saved_tensors
        grad = grad.contiguous()
        grad_h = torch.empty_like(xhat)
        grad_gamma, grad_beta, grad_log_theta = (torch.empty_like(log_theta) for _ in range(3))
        grad_library = torch.empty_like(library)
        cpu_kernels.bn_softmax_nb_backward(
            grad.numpy(), gamma.detach().numpy(), ctx.training, library.numpy(), log_theta.numpy(),
            row_start.numpy(), col.numpy(), val.numpy(), xhat.numpy(), p.numpy(), sp.numpy(),
            inv_std.numpy(), grad_h.numpy(), grad_gamma.numpy(), grad_beta.numpy(),
            grad_library.numpy(), grad_log_theta.numpy(),
        )
        return grad_h, grad_gamma, grad_beta, grad_library, grad_log_theta, None, None, None, None


def bn_softmax_nb(
    h: Tensor, bn: nn.BatchNorm1d, library: Tensor, log_theta: Tensor, row_start: Tensor, col: Tensor, val: Tensor
) -> Tensor:
    """Per-cell NB log-likelihood (lgamma(x + 1) excluded) of counts with mean
    ``exp(library) * softmax(bn(h))`` and inverse dispersion ``exp(log_theta)``, (n_cells,).

    ``bn`` is used as ``nn.BatchNorm1d`` would be: batch statistics and a running-statistics
    update in training mode, running statistics in eval mode. The nonzeros of cell i are
    ``col``/``val`` positions ``row_start[i]`` to ``row_start[i + 1]`` (length n_cells + 1)."""
    return _BNSoftmaxNB.apply(h, bn.weight, bn.bias, library, log_theta, bn, row_start, col, val)


def encoder_applies(weight: Tensor, bn: nn.Module, dropout: nn.Module, n_cells: int) -> bool:
    """Whether ``encoder_block`` handles an encoder's first block (Linear, BatchNorm1d with
    affine and running statistics, ReLU, Dropout) on float32 CPU tensors."""
    return (
        ENABLED
        and cpu_kernels is not None
        and isinstance(bn, nn.BatchNorm1d)
        and bn.affine
        and bn.track_running_stats
        and isinstance(dropout, nn.Dropout)
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and n_cells > 1
    )


class _EncoderBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bias, gamma, beta, bn, rate, row_start, col, log1p_val):
        n, H = row_start.shape[0] - 1, weight.shape[0]
        training = bn.training
        if training:
            bn.num_batches_tracked.add_(1)
        momentum = bn.momentum
        if momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
        # Dropout's mask comes from a hash of this seed (see cpu_kernels._keep); drawing the
        # seed from torch's generator keeps fits reproducible under torch.manual_seed.
        seed = int(torch.randint(0, 2**62, (1,))) if rate > 0 else 0
        weight_t = weight.detach().t().contiguous()  # a view when stored gene-major (GaussianEncoder)
        out, xhat, mult = (weight.new_empty(n, H) for _ in range(3))
        inv_std = weight.new_empty(H)
        cpu_kernels.encoder_block_forward(
            weight_t.numpy(), bias.detach().numpy(), gamma.detach().numpy(), beta.detach().numpy(),
            bn.running_mean.numpy(), bn.running_var.numpy(), training, float(momentum), float(bn.eps),
            float(rate), seed, row_start.numpy(), col.numpy(), log1p_val.numpy(),
            out.numpy(), xhat.numpy(), mult.numpy(), inv_std.numpy(),
        )
        ctx.training = training
        ctx.n_genes = weight.shape[1]
        ctx.save_for_backward(gamma, xhat, mult, inv_std, row_start, col, log1p_val)
        return out

    @staticmethod
    def backward(ctx, grad):
        gamma, xhat, mult, inv_std, row_start, col, log1p_val = ctx.saved_tensors
        grad = grad.contiguous()
        H = xhat.shape[1]
        grad_weight_t = xhat.new_empty(ctx.n_genes, H)
        grad_bias, grad_gamma, grad_beta = (xhat.new_empty(H) for _ in range(3))
        cpu_kernels.encoder_block_backward(
            grad.numpy(), gamma.detach().numpy(), ctx.training, xhat.numpy(), mult.numpy(), inv_std.numpy(),
            row_start.numpy(), col.numpy(), log1p_val.numpy(),
            grad_weight_t.numpy(), grad_bias.numpy(), grad_gamma.numpy(), grad_beta.numpy(),
        )
        # (H, G) with gene-major strides, the layout of the weight
        return grad_weight_t.t(), grad_bias, grad_gamma, grad_beta, None, None, None, None, None


def encoder_block(
    linear: nn.Linear, bn: nn.BatchNorm1d, dropout: nn.Dropout, row_start: Tensor, col: Tensor, log1p_val: Tensor
) -> Tensor:
    """``dropout(relu(bn(linear(log1p(x)))))`` from a minibatch's nonzeros, (n_cells, H):
    cell i's are positions ``row_start[i]`` to ``row_start[i + 1]`` of ``col`` (gene) and
    ``log1p_val``. Batch norm and dropout behave as the modules do in their current mode."""
    rate = dropout.p if dropout.training else 0.0
    return _EncoderBlock.apply(
        linear.weight, linear.bias, bn.weight, bn.bias, bn, rate, row_start, col, log1p_val
    )
