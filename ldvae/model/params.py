"""The model's settings: the constructor's hyperparameters as one ``ModuleConfig``, and the
checks of the constructor's and ``train``'s arguments."""

from __future__ import annotations

import numpy as np
import torch

from ..nn.module import ModuleConfig
from ..util.checks import SetupError, check_number, positive_int

CHOICES = {
    "dispersion": ("gene", "gene-batch", "gene-label", "gene-cell"),
    "gene_likelihood": ("nb", "zinb", "poisson"),
    "latent_distribution": ("normal", "ln"),
}
BOOL_PARAMS = ("use_observed_lib_size", "use_batch_norm", "bias")
# The constructor's hyperparameters, in the order ``init_params_`` and the saved JSON list them.
INIT_PARAMS = ("n_hidden", "n_latent", "n_layers", "dropout_rate", "dispersion", "gene_likelihood",
               "use_observed_lib_size", "latent_distribution", "use_batch_norm", "bias")
PLAN_KEYS = ("lr", "weight_decay", "eps", "n_epochs_kl_warmup", "n_steps_kl_warmup")


def check_init_params(params: dict) -> None:
    """The constructor's settings (those present in ``params``): a SetupError naming the
    first invalid one."""
    for name in ("n_hidden", "n_latent", "n_layers"):
        if name in params:
            positive_int(name, params[name])
    if "dropout_rate" in params:
        rate = params["dropout_rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) or not 0.0 <= rate < 1.0:
            raise SetupError(f"dropout_rate must be in [0, 1), got {rate!r}.")
    for name, allowed in CHOICES.items():
        if name in params and params[name] not in allowed:
            raise SetupError(f"{name} must be one of {allowed}, got {params[name]!r}.")
    for name in BOOL_PARAMS:
        if name in params and not isinstance(params[name], bool):
            raise SetupError(f"{name} must be True or False, got {params[name]!r}.")


def init_params_of(config: ModuleConfig) -> dict:
    """scvi-tools' ``init_params_``: the constructor's hyperparameters of ``config``."""
    return {name: getattr(config, name) for name in INIT_PARAMS}


def module_config(setup: dict, n_genes: int, params: dict) -> ModuleConfig:
    """The module's configuration: the hyperparameters ``params`` and the sizes that
    ``setup_anndata``'s record ``setup`` implies."""
    cats = setup.get("categorical_covariate_categories", {})
    return ModuleConfig(
        n_genes=n_genes,
        n_batch=len(setup.get("batch_categories", ["0"])),
        n_labels=len(setup.get("label_categories", ["0"])),
        n_cats_per_cov=tuple(len(cats[k]) for k in setup.get("categorical_covariate_keys", [])),
        n_continuous_cov=len(setup.get("continuous_covariate_keys", [])),
        **{name: params[name] for name in INIT_PARAMS},
    )


def _positive_number(name: str, value) -> None:
    try:
        check_number(name, value, minimum=0, exclusive=True)
    except SetupError:  # scvi-tools' wording of the constraint, which callers match on
        raise SetupError(f"{name} must be a finite number > 0, got {value!r}.") from None


def check_plan(plan_kwargs: dict | None, lr: float | None) -> dict:
    """The optimizer and KL warm-up settings of ``train`` (``lr`` overrides the plan's), checked
    before any step uses them."""
    plan = dict(plan_kwargs or {})
    unknown = set(plan) - {*PLAN_KEYS, "optimizer"}
    if unknown:
        raise TypeError(f"plan_kwargs has unknown keys: {sorted(unknown)}.")
    if plan.pop("optimizer", "Adam") != "Adam":
        raise SetupError("Only optimizer='Adam' is supported.")
    if lr is not None:
        plan["lr"] = lr
    for name in ("lr", "eps"):
        if name in plan:
            _positive_number(name, plan[name])
    if "weight_decay" in plan:
        check_number("weight_decay", plan["weight_decay"], minimum=0)
    for name in ("n_epochs_kl_warmup", "n_steps_kl_warmup"):
        if plan.get(name) is not None:
            value = plan[name]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise SetupError(f"{name} must be None or an integer >= 0, got {value!r}.")
    return plan


def check_train_args(*, batch_size, max_epochs, early_stopping_patience, check_val_every_n_epoch,
                     checkpoint_every_n_epochs, threads, batch_norm_momentum) -> None:
    """``train``'s counts and rates, in the order a user reads them."""
    positive_int("batch_size", batch_size)
    if batch_size < 2:
        raise SetupError(
            f"batch_size must be at least 2, got {batch_size}: batch normalization computes each "
            "minibatch's mean and variance over its cells, which one cell cannot give."
        )
    positive_int("early_stopping_patience", early_stopping_patience)
    if check_val_every_n_epoch is not None:
        positive_int("check_val_every_n_epoch", check_val_every_n_epoch)
    positive_int("max_epochs", max_epochs)
    positive_int("checkpoint_every_n_epochs", checkpoint_every_n_epochs)
    if threads is not None:
        positive_int("threads", threads)
    if batch_norm_momentum is not None and not 0.0 < float(batch_norm_momentum) <= 1.0:
        raise SetupError(f"batch_norm_momentum must be in (0, 1], got {batch_norm_momentum!r}.")


def resolve_device(accelerator: str = "auto", device: int | str | None = None) -> torch.device:
    """'auto' -> the first CUDA GPU when there is one, else CPU; 'gpu'/'cuda' or 'cpu' force it."""
    acc = accelerator.lower()
    if acc not in ("auto", "cpu", "gpu", "cuda"):
        raise SetupError(f"accelerator must be 'auto', 'cpu', 'gpu' or 'cuda', got {accelerator!r}.")
    if acc == "cpu":
        return torch.device("cpu")
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise SetupError(f"accelerator={accelerator!r} but no CUDA GPU is available; use accelerator='cpu'.")
    if torch.cuda.is_available():
        index = device if isinstance(device, int) else 0
        return torch.device("cuda", index)
    return torch.device("cpu")
