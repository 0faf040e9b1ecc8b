"""The compiled CPU path (numba kernels in ``kernels``, ``encoder``, ``step`` and ``loop``),
seen from torch.

- ``TrainStep``: a whole training step (loss, every gradient, batch-norm updates) in one
  call, for the default model (NB likelihood, one dispersion per gene, normal latent, one
  hidden layer, batch norm) with float32 CPU parameters; ``train.steps.choose_step`` uses
  it when ``TrainStep.for_module`` accepts the module, and autograd otherwise.
- ``StepRunner``: runs of those steps (gather, step, finiteness check, Adam) in one call,
  for data in memory on the CPU; ``train.steps.choose_step`` uses it when
  ``StepRunner.for_fit`` accepts the step, optimizer and source.
- ``draw_step_noise``: a step's random draws, in the order ``LDVAEModule.loss`` makes them
  on the compiled-kernel path, so every path takes the same steps from the same seed.
- ``bn_softmax_nb`` and ``encoder_block``: autograd functions for the decoder's batch norm +
  softmax + NB likelihood and an encoder's first block, which ``LDVAEModule`` uses on CPU
  float32 tensors (queries, and the training of models ``TrainStep`` declines); this
  module hands them to ``nn.module.use_compiled`` when it is imported.

All compute what the torch path of ``module``/``likelihoods`` computes (tests compare them to
float32 rounding). Set ``ENABLED = False`` (or the environment variable ``LDVAE_FUSED=0``)
to force the torch path everywhere, the minibatch gather included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

import numpy as np
import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

ENABLED = os.environ.get("LDVAE_FUSED", "1") != "0"

try:  # numba is installed with scanpy; without it every model takes the torch path
    from . import encoder as cpu_encoder, kernels as cpu_kernels, loop as cpu_loop, step as cpu_step
except ImportError:  # pragma: no cover
    cpu_encoder = cpu_kernels = cpu_loop = cpu_step = None
from ..nn import module as _module
from ..nn.module import LossOutput
from ..util.settings import child_env, usable_cpus
from .layout import OFFSETS, Layout


# Cells of a minibatch per thread of the compiled step, at least: at batch 128 two threads
# still take 1.2x less time per step than one (bench/step_timing.py, RESULTS.md).
CELLS_PER_THREAD = 64


def default_threads(batch_size: int, reserved: int = 0) -> int:
    """Threads of the compiled step when the user names none: every CPU the process may use
    but ``reserved`` (kept for a background reader), at most numba's limit
    (``NUMBA_NUM_THREADS``), each with CELLS_PER_THREAD cells or more."""
    limit = usable_cpus() - reserved
    if cpu_step is not None:
        import numba

        limit = min(limit, numba.config.NUMBA_NUM_THREADS)
    return max(1, min(limit, batch_size // CELLS_PER_THREAD))


_current = threading.local()  # the compiled step's threads in this thread (use_threads sets them)


def step_threads() -> int:
    """Threads of the compiled training step now, in this thread: those a fit sets
    (``use_threads``), else 1; 1 runs the single-thread build of the step."""
    return getattr(_current, "threads", 1)


@contextlib.contextmanager
def use_threads(n: int):
    """The compiled step on ``n`` threads (capped at numba's limit) inside the block. numba's
    thread pool is started and sized only for more than one: a started OpenMP pool slows
    the torch work of other threads (a streamed fit's reader) even while the step runs alone."""
    if cpu_step is None:
        yield
        return
    import numba

    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    previous, pool = step_threads(), None
    if n > 1:
        pool = numba.get_num_threads()
        numba.set_num_threads(n)
    _current.threads = n
    try:
        yield
    finally:
        _current.threads = previous
        if pool is not None:
            numba.set_num_threads(pool)


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


def _momentum(bn: nn.BatchNorm1d) -> float:
    """This step's running-statistics momentum, as nn.BatchNorm1d takes it: in training the
    batch counter advances first, and momentum None means a cumulative average."""
    if not bn.training:
        return 0.0  # unused: eval mode reads the running statistics
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else float(bn.momentum)


class _BNSoftmaxNB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, gamma, beta, library, log_theta, bn, row_start, col, val):
        ensure_compiled(1)
        n, G = h.shape
        h = h.detach().contiguous()
        library = library.detach().contiguous()
        log_theta = log_theta.detach().contiguous()
        training = bn.training
        momentum = _momentum(bn)
        ll = h.new_empty(n)
        xhat, p, sp = (torch.empty_like(h) for _ in range(3))
        inv_std = h.new_empty(G)
        cpu_kernels.bn_softmax_nb_forward(
            h.numpy(), gamma.detach().numpy(), beta.detach().numpy(), bn.running_mean.numpy(),
            bn.running_var.numpy(), training, momentum, float(bn.eps), library.numpy(),
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


def _dropout_seed(rate: float) -> int:
    """A dropout mask's seed, from torch's generator (none drawn without dropout)."""
    return int(torch.randint(0, 2**62, (1,))) if rate > 0 else 0


def draw_step_noise(noise_z: Tensor, noise_l: Tensor | None, rate_z: float, rate_l: float) -> tuple[int, int]:
    """One training step's random draws from torch's generator: fills ``noise_z`` (n, K) and
    ``noise_l`` (n,; None when the library is observed) with standard normal noise and
    returns the dropout seeds of the z and l encoders (0 for one without dropout or absent).

    The order is ``LDVAEModule.loss``'s on the compiled-kernel path (``encoder_block`` draws
    its seed, then ``inference`` its sample, z encoder first): the z seed, z's noise, the l
    seed, the library's noise. Every compiled path draws through here, so a seed gives the
    same masks and samples whichever path trains."""
    seed_z = _dropout_seed(rate_z)
    torch.randn(noise_z.shape, out=noise_z)
    if noise_l is None:
        return seed_z, 0
    seed_l = _dropout_seed(rate_l)
    torch.randn(noise_l.shape, out=noise_l)
    return seed_z, seed_l


def encoder_applies(weight: Tensor, bn: nn.Module, dropout: nn.Module) -> bool:
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
    )


class _EncoderBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bias, gamma, beta, bn, rate, row_start, col, log1p_val):
        ensure_compiled(1)
        n, H = row_start.shape[0] - 1, weight.shape[0]
        training = bn.training
        momentum = _momentum(bn)
        # Dropout's mask comes from a hash of this seed (see encoder._keep); drawing the
        # seed from torch's generator keeps fits reproducible under torch.manual_seed.
        seed = _dropout_seed(rate)
        weight_t = weight.detach().t().contiguous()  # a view when stored gene-major (GaussianEncoder)
        out, xhat, mult = (weight.new_empty(n, H) for _ in range(3))
        inv_std = weight.new_empty(H)
        cpu_encoder.encoder_block_forward(
            weight_t.numpy(), bias.detach().numpy(), gamma.detach().numpy(), beta.detach().numpy(),
            bn.running_mean.numpy(), bn.running_var.numpy(), training, momentum, float(bn.eps),
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
        cpu_encoder.encoder_block_backward(
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


def _cache_index(threads: int = 1) -> str | None:
    """Where numba keeps the cache index of the training step for ``threads`` threads (None
    if unknown)."""
    try:
        step = cpu_step.train_step_flat_threaded if threads > 1 else cpu_step.train_step_flat
        return step._cache._cache_file._index_path
    except AttributeError:  # another numba version's internals
        return None


_ready: set[bool] = set()
_COMPILING = "LDVAE_COMPILING"  # set in the process that fills the cache


def ensure_compiled(threads: int) -> None:
    """Before this process first runs the compiled code for one thread (``threads`` 1) or
    several: where numba's cache lacks it, fill the cache from a child process (a tiny fit
    and queries, ``ldvae.factors.seeds.warm_up``), so that this process loads the code from
    the cache like every later one. Code compiled in a process differs from the same code
    loaded from the cache in the last bits of float results; this way the first run after an
    install gives what every other run gives. Where nothing can be cached, or the child
    fails, the code compiles here on its first call, as numba does by itself."""
    several = threads > 1
    if several in _ready:
        return
    _ready.add(several)
    index = _cache_index(threads)
    if index is None or os.path.exists(index) or os.environ.get(_COMPILING):
        return
    import subprocess

    logger.info("Compiling ldvae's CPU training step (numba) for %s: about a minute on first use after an "
                "install or upgrade, then cached in %s.", "several threads" if several else "one thread",
                os.path.dirname(index))
    code = f"from ldvae.factors.seeds import warm_up; warm_up({int(threads)})"
    try:
        subprocess.run([sys.executable, "-c", code], env=child_env(**{_COMPILING: "1"}), check=True,
                       capture_output=True)
    except (OSError, subprocess.SubprocessError) as err:
        logger.debug("Compiling in a child process failed (%s); compiling in this one.", err)


class TrainStep:
    """``module.loss(b, kl_weight)`` and its backward as one compiled call (``cpu_step``), for
    the default model on CPU: the same loss, per-cell terms and gradients (to float32
    rounding; dropout masks come from ``encoder._keep``).

    Building one moves every parameter into one flat float32 tensor (each parameter a view
    with its own shape and strides; values, names and state dict unchanged) and gives each
    a ``.grad`` that is a view of one flat gradient tensor, which every call overwrites.
    ``for_module`` returns None for a model it does not handle, which then takes autograd."""

    def __init__(self, module: nn.Module, roles: list):
        self.module = module
        params = list(module.parameters())
        sizes = [p.numel() for p in params]
        self.flat = torch.empty(sum(sizes))
        self.flat_grad = torch.zeros(sum(sizes))
        offset_of, start = {}, 0
        for p, size in zip(params, sizes):
            with torch.no_grad():
                view = self.flat.as_strided(p.shape, p.stride(), start)
                view.copy_(p)
            p.data = view
            p.grad = self.flat_grad.as_strided(p.shape, p.stride(), start)
            offset_of[id(p)] = start
            start += size
        self.params = params
        self.grads = [p.grad for p in params]
        c = module.config
        self.layout = Layout(
            c.n_genes, c.n_hidden, c.n_latent, c.n_latent + c.n_covariate_columns,
            **{name: -1 if p is None else offset_of[id(p)] for name, p in zip(OFFSETS, roles)},
        )
        z, d, lenc = module.z_encoder.trunk[1], module.factor_bn, module.l_encoder
        self.norms = [z, d] + ([] if lenc is None else [lenc.trunk[1]])
        spare = torch.zeros(0)
        self.l_stats = (spare, spare) if lenc is None else (lenc.trunk[1].running_mean, lenc.trunk[1].running_var)

    @classmethod
    def for_module(cls, module: nn.Module) -> TrainStep | None:
        c = module.config
        if not (
            ENABLED
            and cpu_step is not None
            and c.gene_likelihood == "nb"
            and c.dispersion == "gene"
            and c.latent_distribution == "normal"
            and c.n_layers == 1
            and c.use_batch_norm
            and module.factor_bn.affine
            and module.factor_bn.track_running_stats
        ):
            return None
        for p in module.parameters():
            dense = p.is_contiguous() or (p.dim() == 2 and p.t().is_contiguous())
            if not (p.device.type == "cpu" and p.dtype == torch.float32 and p.requires_grad and dense):
                return None
        encoders = [module.z_encoder] + ([] if module.l_encoder is None else [module.l_encoder])
        if module.needs_gene_order or not all(e.trunk[0].weight.t().is_contiguous() for e in encoders):
            return None  # an encoder's first block the kernels do not handle, or not stored gene-major
        roles = []  # in the order of layout.OFFSETS
        for e in (module.z_encoder, module.l_encoder):
            if e is None:
                roles += [None] * 8
            else:
                first, bn = e.trunk[0], e.trunk[1]
                roles += [first.weight, first.bias, bn.weight, bn.bias, e.mean.weight, e.mean.bias, e.var.weight,
                          e.var.bias]
        roles += [module.factor_regressor.weight, module.factor_regressor.bias, module.factor_bn.weight,
                  module.factor_bn.bias, module.px_r]
        if {id(p) for p in roles if p is not None} != {id(p) for p in module.parameters()}:
            return None  # a parameter the compiled step does not know
        return cls(module, roles)

    def grad_norm(self) -> Tensor:
        """The 2-norm of all gradients (one pass over the flat gradient)."""
        return torch.linalg.vector_norm(self.flat_grad)


    def __call__(self, b, kl_weight: float):
        m = self.module
        n = b.n_cells
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:  # e.g. after optimizer.zero_grad(set_to_none=True)
                p.grad = g
        mom_z, mom_d, *mom_l = (_momentum(bn) for bn in self.norms)
        rate = float(m.z_encoder.trunk[3].p)
        noise_z = torch.empty(n, m.config.n_latent)
        noise_l = torch.zeros(n)
        seed_z, seed_l = draw_step_noise(noise_z, None if m.l_encoder is None else noise_l, rate,
                                         0.0 if m.l_encoder is None else float(m.l_encoder.trunk[3].p))
        cov = m.covariate_columns(b)
        cov = noise_l.new_zeros(n, 0) if cov is None else cov.contiguous()
        zbn, dbn = self.norms[0], self.norms[1]
        rec, kl_z, kl_l = torch.empty(n), torch.empty(n), torch.empty(n)
        threads = step_threads()
        ensure_compiled(threads)
        loss = (cpu_step.train_step_flat_threaded if threads > 1 else cpu_step.train_step_flat)(
            b.indptr.numpy(), b.col.numpy(), b.val.numpy(), b.log1p_val.numpy(), cov.numpy(),
            b.lgamma_x1.numpy(), b.batch.numpy(), m.library_log_means.numpy(), m.library_log_vars.numpy(),
            b.log_total.numpy(), noise_z.numpy(), noise_l.numpy(),
            self.flat.numpy(), self.flat_grad.numpy(), self.layout,
            zbn.running_mean.numpy(), zbn.running_var.numpy(), self.l_stats[0].numpy(), self.l_stats[1].numpy(),
            dbn.running_mean.numpy(), dbn.running_var.numpy(),
            mom_z, mom_l[0] if mom_l else 0.0, mom_d, float(dbn.eps), rate, seed_z,
            seed_l, float(kl_weight), rec.numpy(), kl_z.numpy(), kl_l.numpy(), threads,
        )
        return LossOutput(torch.tensor(loss, dtype=torch.float32), rec, kl_z, kl_l)


class StepRunner:
    """Runs of up to ``chunk`` consecutive training steps in one compiled call
    (``cpu_loop.train_steps``: gather, ``TrainStep``'s step, the finiteness check, Adam),
    for a fit on an in-memory CPU source (``train.steps.CompiledRuns``). Each step's
    randomness is drawn by ``draw_step_noise``, as in ``TrainStep.__call__``, so a fit takes
    the same steps as through ``TrainStep`` and ``FusedAdam`` one call at a time (to float32
    rounding).

    ``for_fit`` returns None where it does not apply (no compiled step, an optimizer that is
    not a flat ``FusedAdam``, a source without in-memory CPU data); the fit then steps one
    call at a time."""

    chunk = 64  # steps per call: short enough that Ctrl-C is honoured promptly

    def __init__(self, step: TrainStep, optimizer, data):
        m = step.module
        self.step, self.optimizer = step, optimizer
        self.norms = step.norms  # z, decoder[, l]
        n = data.n_cells
        cat = np.zeros((n, 0), np.int64) if data.cat_covs is None else data.cat_covs.numpy()
        cont = np.zeros((n, 0), np.float32) if data.cont_covs is None else data.cont_covs.numpy()
        self.arrays = (
            *(t.numpy() for t in (data.indptr, data.indices, data.values, data.log_total, data.lgamma_x1,
                                  data.batch)),
            cat, np.asarray(m.config.one_hot_widths, np.int64), cont,
            m.library_log_means.numpy(), m.library_log_vars.numpy(),
        )
        self.rate_z = float(m.z_encoder.trunk[3].p)
        self.rate_l = None if m.l_encoder is None else float(m.l_encoder.trunk[3].p)

    @classmethod
    def for_fit(cls, step: TrainStep | None, optimizer, source) -> StepRunner | None:
        data = getattr(source, "data", None)
        if step is None or cpu_loop is None or data is None or not hasattr(source, "epoch_rows"):
            return None
        if data.device.type != "cpu" or not hasattr(optimizer, "flat_moments"):
            return None
        return None if optimizer.flat_moments() is None else cls(step, optimizer, data)

    def __call__(self, parts: list[Tensor], kl_weights: list[float]):
        """Train on the minibatches ``parts`` (cell indices). Returns the number of steps
        completed (fewer than len(parts) when one became non-finite; the model and optimizer
        then hold the state from before it); over the completed steps, the per-cell
        reconstruction, kl_z and kl_l and the loss summed over cells; and what became
        non-finite in the failed step, ``"loss"``, ``"gradient"`` or ``"update"`` (None when
        all completed)."""
        m, step = self.step.module, self.step
        sizes = [len(p) for p in parts]
        bounds = torch.zeros(len(parts) + 1, dtype=torch.int64)
        bounds[1:] = torch.tensor(sizes).cumsum(0)
        total = int(bounds[-1])
        noise_z = torch.empty(total, m.config.n_latent)
        noise_l = torch.zeros(total)
        seeds = np.zeros((len(parts), 2), np.int64)  # NumPy: cheaper element writes than torch
        for j, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
            seeds[j] = draw_step_noise(noise_z[a:b], None if self.rate_l is None else noise_l[a:b], self.rate_z,
                                       self.rate_l or 0.0)
        momenta = torch.zeros(len(parts), 3, dtype=torch.float64)
        for column, bn in zip((0, 2, 1), self.norms):
            momenta[:, column] = _momenta(bn, len(parts))
        moments = self.optimizer.flat_moments()  # re-made when a state dict is loaded
        group = self.optimizer.param_groups[0]
        taken = self.optimizer.step_count()
        adam = torch.tensor([group["lr"], *group["betas"], group["eps"], group["weight_decay"], taken],
                            dtype=torch.float64)
        rec, kl_z, kl_l = torch.empty(total), torch.empty(total), torch.empty(total)
        losses = torch.empty(len(parts), dtype=torch.float64)
        failure = np.zeros(1, np.int64)
        zbn, dbn = self.norms[0], self.norms[1]
        threads = step_threads()
        ensure_compiled(threads)
        done = (cpu_loop.train_steps_threaded if threads > 1 else cpu_loop.train_steps)(
            *self.arrays, torch.cat(parts).numpy(), bounds.numpy(), noise_z.numpy(), noise_l.numpy(),
            seeds, np.asarray(kl_weights, dtype=np.float64), momenta.numpy(),
            step.flat.numpy(), step.flat_grad.numpy(), step.layout,
            zbn.running_mean.numpy(), zbn.running_var.numpy(), step.l_stats[0].numpy(), step.l_stats[1].numpy(),
            dbn.running_mean.numpy(), dbn.running_var.numpy(), float(dbn.eps), self.rate_z,
            moments[0].numpy(), moments[1].numpy(), adam.numpy(),
            rec.numpy(), kl_z.numpy(), kl_l.numpy(), losses.numpy(), failure, threads,
        )
        self.optimizer.advance(done)
        for bn in self.norms:
            bn.num_batches_tracked.add_(done)
        failed = None
        if done < len(parts):
            failed = "update" if failure[0] == 2 else "loss" if not np.isfinite(float(losses[done])) else "gradient"
        cells = int(bounds[done])
        loss_sum = (losses[:done].float().double() * (bounds[1 : done + 1] - bounds[:done])).sum()
        return done, (rec[:cells], kl_z[:cells], kl_l[:cells], loss_sum), failed


def _momenta(bn: nn.BatchNorm1d, steps: int) -> Tensor:
    """The running-statistics momentum of each of the next ``steps`` training steps
    (``_momentum`` without advancing the counter)."""
    if bn.momentum is not None:
        return torch.full((steps,), float(bn.momentum), dtype=torch.float64)
    return 1.0 / (float(bn.num_batches_tracked) + torch.arange(1, steps + 1, dtype=torch.float64))


# The lower layer never imports this one: this one serves it (see nn.module.use_compiled).
_module.use_compiled(sys.modules[__name__])
