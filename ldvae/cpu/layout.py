"""The compiled step's parameter layout, named once for the torch side (``fused.TrainStep``)
and the kernels (``step.train_step_flat``, ``loop.train_steps``, which read it by field)."""

from __future__ import annotations

from typing import NamedTuple


class Layout(NamedTuple):
    """Sizes, then where each parameter starts in the flat parameter array (its gradient at
    the same place in the flat gradient array); -1 for one the model lacks (the l-encoder's
    when the library is observed, the decoder's bias). Encoder first-layer weights are
    gene-major (G, H), as ``GaussianEncoder`` stores them; the rest as torch shapes them."""

    n_genes: int  # G
    n_hidden: int  # H
    n_latent: int  # K
    n_columns: int  # C: the decoder's inputs, K + covariate columns
    z_weight: int  # (G, H)
    z_bias: int  # (H,)
    z_bn_weight: int  # (H,)
    z_bn_bias: int  # (H,)
    z_mean_weight: int  # (K, H)
    z_mean_bias: int  # (K,)
    z_var_weight: int  # (K, H)
    z_var_bias: int  # (K,)
    l_weight: int  # (G, H)
    l_bias: int  # (H,)
    l_bn_weight: int  # (H,)
    l_bn_bias: int  # (H,)
    l_mean_weight: int  # (1, H)
    l_mean_bias: int  # (1,)
    l_var_weight: int  # (1, H)
    l_var_bias: int  # (1,)
    decoder_weight: int  # (G, C)
    decoder_bias: int  # (G,)
    decoder_bn_weight: int  # (G,)
    decoder_bn_bias: int  # (G,)
    log_theta: int  # (G,)


SIZES = Layout._fields[:4]
OFFSETS = Layout._fields[4:]
