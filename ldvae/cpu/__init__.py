"""The compiled CPU training path: numba kernels (``special``, ``kernels``, ``encoder``), the
one-step and many-step calls (``step``, ``loop``) over one parameter layout (``layout``), and
their torch-side callers (``fused``), which hand ``ldvae.nn.module`` its compiled kernels."""
