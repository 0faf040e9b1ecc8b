"""The model's settings: the constructor's hyperparameters as one ``ModuleConfig``, and the
checks of the constructor's and ``train``'s arguments."""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import torch

from ..nn.module import ENCODE_COVARIATES, LOG_VARIATIONAL, ModuleConfig
from ..util.checks import SetupError, check_number, positive_int

logger = logging.getLogger(__name__)

INITS = ("random", "pca")  # train(init=...): where an untrained model starts (ldvae.model.start)

CHOICES = {
    "dispersion": ("gene", "gene-batch", "gene-label", "gene-cell"),
    "gene_likelihood": ("nb", "zinb", "poisson"),
    "latent_distribution": ("normal", "ln"),
}
BOOL_PARAMS = ("use_observed_lib_size", "use_batch_norm", "bias")
# The constructor's hyperparameters, in the order ``init_params_`` and the saved JSON list them.
INIT_PARAMS = ("n_hidden", "n_latent", "n_layers", "dropout_rate", "dispersion", "gene_likelihood",
               "use_observed_lib_size", "latent_distribution", "use_batch_norm", "bias")
PLAN_KEYS = ("lr", "weight_decay", "eps", "n_epochs_kl_warmup", "n_steps_kl_warmup", "max_kl_weight", "min_kl_weight",
             "optimizer",
             "reduce_lr_on_plateau", "lr_factor", "lr_patience", "lr_threshold", "lr_scheduler_metric", "lr_min")
# scvi-tools' TrainingPlan options that change nothing in ldvae at these values (the first
# is the default); other values are refused, saying why.
PLAN_FIXED = {
    "optimizer_creator": (None,), "update_only_decoder": (False,),
    "loss_kwargs": (None, {}), "compile_kwargs": (None, {}),
}
# ... and those accepted at any value, with what ldvae does instead.
PLAN_NOTED = {
    "fused_optimizer": "ldvae's Adam is always torch's fused kernel",
    "compile": "ldvae's CPU training step is compiled already (numba); on CUDA it runs the torch path",
    "on_step": "ldvae records metrics once per epoch", "on_epoch": "ldvae records metrics once per epoch",
}


def check_init_params(params: dict) -> None:
    """The constructor's settings (those present in ``params``): a SetupError naming the
    first invalid one; a warning for a logistic-normal latent of one dimension."""
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
        if name in params and not isinstance(params[name], (bool, np.bool_)):
            raise SetupError(f"{name} must be True or False, got {params[name]!r}.")
    if params.get("latent_distribution") == "ln" and params.get("n_latent") == 1:
        warnings.warn("latent_distribution='ln' with n_latent=1: the softmax of one value is always 1, so every "
                      "cell decodes to the same expression. Use n_latent >= 2, or latent_distribution='normal'.",
                      UserWarning, stacklevel=3)


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


def covariate_names(setup: dict) -> list[str]:
    """Names of the decoder's input columns after z under ``setup_anndata``'s record ``setup``:
    ``batch_key:category`` (two or more batches), ``key:category`` of each categorical
    covariate with two or more categories, then the continuous covariates."""
    names = []
    if len(setup.get("batch_categories", ["0"])) > 1:
        names += [f"{setup['batch_key']}:{c}" for c in setup["batch_categories"]]
    for k in setup.get("categorical_covariate_keys", []):
        cats = setup["categorical_covariate_categories"][k]
        if len(cats) > 1:
            names += [f"{k}:{c}" for c in cats]
    return names + list(setup.get("continuous_covariate_keys", []))


def _positive_number(name: str, value) -> None:
    try:
        check_number(name, value, minimum=0, exclusive=True)
    except SetupError:  # scvi-tools' wording of the constraint, which callers match on
        raise SetupError(f"{name} must be a finite number > 0, got {value!r}.") from None


def check_plan(plan_kwargs: dict | None, lr: float | None) -> dict:
    """The optimizer, KL warm-up and learning-rate schedule of ``train`` (``lr`` overrides the
    plan's), checked before any step uses them; scvi-tools' other TrainingPlan options only at
    values that change nothing here."""
    plan = dict(plan_kwargs or {})
    for name, allowed in PLAN_FIXED.items():
        if name in plan:
            value = plan.pop(name)
            if not any(value is v or (type(value) is type(v) and value == v) for v in allowed):
                raise SetupError(f"plan_kwargs {name}={value!r} is not supported; ldvae trains with {name}={allowed[0]!r}.")
    for name, note in PLAN_NOTED.items():
        if name in plan:
            logger.info("plan_kwargs %s=%r: %s.", name, plan.pop(name), note)
    unknown = set(plan) - set(PLAN_KEYS)
    if unknown:
        raise TypeError(f"plan_kwargs has unknown keys: {sorted(unknown)}; ldvae's are {sorted(PLAN_KEYS)}.")
    if plan.get("optimizer", "Adam") not in ("Adam", "AdamW"):
        raise SetupError(f"optimizer must be 'Adam' or 'AdamW', got {plan['optimizer']!r}.")
    if lr is not None:
        plan["lr"] = lr
    for name in ("lr", "eps"):
        if name in plan:
            _positive_number(name, plan[name])
    for name in ("weight_decay", "lr_threshold", "lr_min", "max_kl_weight", "min_kl_weight"):
        if name in plan:
            check_number(name, plan[name], minimum=0)
    if "lr_factor" in plan and not 0.0 < float(plan["lr_factor"]) < 1.0:
        raise SetupError(f"lr_factor must be in (0, 1), got {plan['lr_factor']!r}.")
    if "lr_patience" in plan:
        value = plan["lr_patience"]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise SetupError(f"lr_patience must be an integer >= 0, got {value!r}.")
    for name in ("n_epochs_kl_warmup", "n_steps_kl_warmup"):
        if plan.get(name) is not None:
            value = plan[name]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise SetupError(f"{name} must be None or an integer >= 0, got {value!r}.")
    plan["shorten_kl_warmup"] = "n_epochs_kl_warmup" not in plan  # a warm-up asked for is kept as asked
    return plan


# ``train``'s keyword options: ldvae's own, and scvi-tools' Trainer options it implements.
TRAIN_OPTIONS = {
    "lr": None, "progress_bar": True, "seed": None, "checkpoint_dir": None, "checkpoint_every_n_epochs": 10,
    "resume_from": None, "batch_norm_momentum": None, "threads": None, "check_val_every_n_epoch": None,
    "early_stopping_patience": 45, "early_stopping_monitor": "elbo_validation", "early_stopping_min_delta": 0.0,
    "early_stopping_mode": "min", "early_stopping_warmup_epochs": 0, "strategy": "auto", "preset": None,
    "init": "random", "split_seed": None, "ema_decay": None,
}
# train(preset=...): settings that reach a plain fit's validation ELBO in fewer epochs,
# used where the call does not set them (bench/RESULTS.md, time to scvi-tools' quality).
PRESETS = {
    "fast": {"max_epochs": 60, "lr": 2e-2, "n_epochs_kl_warmup": 3, "batch_norm_momentum": 0.05, "ema_decay": 0.65},
}


def with_preset(opts: dict, plan: dict, max_epochs: int | None) -> tuple[dict, int | None]:
    """The settings of ``opts["preset"]`` where the call leaves them: fills ``opts`` and
    returns the plan and ``max_epochs``."""
    preset = PRESETS.get(opts["preset"], {})
    for name in ("batch_norm_momentum", "ema_decay"):
        opts[name] = preset.get(name) if opts[name] is None else opts[name]
    plan = {**{k: preset[k] for k in ("lr", "n_epochs_kl_warmup") if k in preset}, **plan}
    return plan, preset.get("max_epochs") if max_epochs is None else max_epochs


# scvi-tools' (Lightning's) Trainer options that have no counterpart here, with what ldvae does.
IGNORED_CODE = ("callbacks",)  # Trainer options whose objects ldvae never calls
TRAINER_NOTED = {
    "logger": "ldvae keeps the metrics in model.history (a logger is not used)",
    "callbacks": "ldvae has no callbacks: the loop is ldvae.train.loop.fit; use checkpoint_dir for checkpoints",
    "enable_checkpointing": "use checkpoint_dir= and checkpoint_every_n_epochs= for ldvae's checkpoints",
    "checkpointing_monitor": "ldvae checkpoints every checkpoint_every_n_epochs",
    "default_root_dir": "ldvae writes files only where checkpoint_dir= says",
    "log_save_dir": "ldvae keeps the metrics in model.history", "log_every_n_steps": "ldvae records once per epoch",
    "learning_rate_monitor": "ldvae logs each learning-rate reduction", "benchmark": "not a setting of ldvae",
    "num_sanity_val_steps": "ldvae runs no sanity validation", "enable_model_summary": "print(model) summarises it",
    "progress_bar_refresh_rate": "ldvae's progress bar updates once per epoch",
    "simple_progress_bar": "ldvae's progress bar is always simple", "gradient_clip_val": "ldvae refuses non-finite "
    "updates instead of clipping", "precision": "ldvae trains in float32", "deterministic": "ldvae is seeded "
    "(seed=, ldvae.settings.seed)", "num_nodes": "use ldvae.distributed under torchrun for several machines",
}
SPLITTER_NOTED = {
    "pin_memory": "ldvae gathers minibatches on the compute device", "num_workers": "ldvae's data path needs no workers",
    "persistent_workers": "ldvae's data path needs no workers", "prefetch_factor": "ldvae's data path needs no workers",
    "load_sparse_tensor": "ldvae always keeps counts sparse",
    "drop_dataset_tail": "ldvae.distributed gives each rank its share of cells itself",
    "distributed_sampler": "ldvae.distributed gives each rank its share of cells itself",
    "iter_ndarray": "ldvae hands minibatches to the model as tensors",
    "data_and_attributes": "ldvae reads the fields of its setup",
}


def train_options(trainer_kwargs: dict, trainer_config: dict | None) -> dict:
    """``train``'s keyword options with their defaults (``trainer_config`` first, then the
    keywords); Lightning-only options are logged with what ldvae does instead."""
    given = {**dict(trainer_config or {}), **trainer_kwargs}
    if "enable_progress_bar" in given:
        given["progress_bar"] = bool(given.pop("enable_progress_bar"))
    for name, note in TRAINER_NOTED.items():
        if name in given:
            value = given.pop(name)
            if value not in (None, False, [], ()):  # code the user wrote that will not run: a warning
                (logger.warning if name in IGNORED_CODE else logger.info)("train %s=%r: %s.", name, value, note)
    unknown = sorted(set(given) - set(TRAIN_OPTIONS))
    if unknown:
        raise TypeError(f"train got unknown arguments {unknown}; its options are {sorted(TRAIN_OPTIONS)} "
                        f"and scvi-tools' Trainer options {sorted(TRAINER_NOTED)}.")
    opts = {**TRAIN_OPTIONS, **given}
    if opts["preset"] is not None and opts["preset"] not in PRESETS:
        raise SetupError(f"preset must be one of {sorted(PRESETS)} or None, got {opts['preset']!r}.")
    if opts["init"] not in INITS:
        raise SetupError(f"init must be one of {list(INITS)}, got {opts['init']!r}.")
    if opts["split_seed"] is not None:
        check_number("split_seed", opts["split_seed"], integer=True, minimum=0, maximum=2**32 - 1)  # RandomState's
    if opts["early_stopping_mode"] not in ("min", "max"):
        raise SetupError(f"early_stopping_mode must be 'min' or 'max', got {opts['early_stopping_mode']!r}.")
    return opts


def fit_and_split_seeds(opts: dict, payload: dict | None, default: int) -> tuple[int, int]:
    """A fit's seed and the seed of its training/validation split: as given; else, resuming,
    the checkpoint's (the same split and random stream as before); else ``default``. The
    split's seed is the fit's unless ``split_seed`` says otherwise."""
    saved = {} if payload is None else payload["train_config"]
    seed = opts["seed"] if opts["seed"] is not None else saved.get("seed")
    seed = default if seed is None else int(seed)
    split_seed = opts["split_seed"] if opts["split_seed"] is not None else saved.get("split_seed")
    return seed, seed if split_seed is None else int(split_seed)


def splitter_options(datasplitter_kwargs: dict | None, n_cells: int) -> list[np.ndarray] | None:
    """scvi-tools' ``datasplitter_kwargs``: ``external_indexing`` ([train, validation, test]
    cell positions) is returned, checked; ``drop_last`` must be False; the rest is logged."""
    kwargs = dict(datasplitter_kwargs or {})
    external = kwargs.pop("external_indexing", None)
    if kwargs.pop("drop_last", False):
        raise SetupError("datasplitter_kwargs drop_last=True is not supported: ldvae trains on every training "
                         "cell (a last minibatch of one cell joins the one before).")
    for name, note in SPLITTER_NOTED.items():
        if name in kwargs:
            logger.info("datasplitter_kwargs %s=%r: %s.", name, kwargs.pop(name), note)
    if kwargs.pop("shuffle", True) is not True:
        raise SetupError("datasplitter_kwargs shuffle=False is not supported: ldvae shuffles training minibatches.")
    if kwargs:
        raise TypeError(f"datasplitter_kwargs has unknown keys {sorted(kwargs)}; ldvae uses external_indexing.")
    if external is None:
        return None
    parts = [np.asarray(part if part is not None else [], dtype=np.int64).ravel() for part in external]
    parts += [np.zeros(0, np.int64)] * (3 - len(parts))
    if len(parts) != 3:
        raise SetupError("external_indexing must be [train, validation, test] cell positions.")
    everything = np.concatenate(parts)
    if everything.size and (everything.min() < 0 or everything.max() >= n_cells):
        raise SetupError(f"external_indexing holds positions outside 0..{n_cells - 1}.")
    if np.unique(everything).size != everything.size:
        raise SetupError("external_indexing repeats a cell (within or across train, validation and test).")
    return parts


def check_strategy(strategy, devices) -> None:
    """scvi-tools' ``strategy``/``devices``: one process trains here; several GPUs or machines
    run ``ldvae.distributed`` under torchrun."""
    # under torchrun without a process group (ldvae.distributed makes one): ranks would train apart
    grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not grouped:
        raise SetupError(
            "model.train() runs in one process; under torchrun call ldvae.distributed.fit_distributed(path, ...) "
            "on every rank, which shards the cells and averages the gradients."
        )
    if not grouped and (strategy not in (None, "auto") or devices not in ("auto", 1, -1, [0], "1")):
        logger.info("train strategy=%r devices=%r: ldvae trains in this process on one device; for several GPUs "
                    "or machines run ldvae.distributed under torchrun (see docs/scale.md).", strategy, devices)


def check_train_args(*, batch_size, max_epochs, early_stopping_patience, check_val_every_n_epoch,
                     checkpoint_every_n_epochs, threads, batch_norm_momentum, ema_decay) -> None:
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
    number = isinstance(ema_decay, (int, float, np.integer, np.floating)) and not isinstance(ema_decay, bool)
    if ema_decay is not None and not (number and 0.0 <= ema_decay < 1.0):
        raise SetupError(f"ema_decay must be None or a number in [0, 1) (the average's decay per epoch), "
                         f"got {ema_decay!r}.")


def resolve_device(accelerator: str = "auto", device: int | str | None = None) -> torch.device:
    """'auto' -> a CUDA GPU when there is one (``device``: its index, or 'cuda:N'; default the
    first), else CPU; 'gpu'/'cuda' or 'cpu' force it."""
    acc = accelerator.lower()
    if acc not in ("auto", "cpu", "gpu", "cuda"):
        raise SetupError(f"accelerator must be 'auto', 'cpu', 'gpu' or 'cuda', got {accelerator!r}.")
    if acc == "cpu":
        return torch.device("cpu")
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise SetupError(f"accelerator={accelerator!r} but no CUDA GPU is available; use accelerator='cpu'.")
    if isinstance(device, str) and device not in ("auto", "cpu"):  # "cuda:1", "gpu:1", "1"
        try:
            device = int(device.rsplit(":", 1)[-1])
        except ValueError:
            raise SetupError(f"device must be 'auto', a GPU index or 'cuda:N', got {device!r}.") from None
    if torch.cuda.is_available():
        index = device if isinstance(device, int) else 0
        if not 0 <= index < torch.cuda.device_count():
            raise SetupError(f"device={index} but this machine has {torch.cuda.device_count()} CUDA GPU(s).")
        return torch.device("cuda", index)
    return torch.device("cpu")


# scvi-tools' VAE options that LDVAE passes through, at the values ldvae's model has.
SCVI_MODULE_DEFAULTS = {
    "log_variational": (LOG_VARIATIONAL,), "encode_covariates": (ENCODE_COVARIATES,),
    "deeply_inject_covariates": (False,),
    "use_layer_norm": ("none", False), "use_size_factor_key": (False,), "var_activation": (None,),
    "batch_representation": ("one-hot",), "extra_encoder_kwargs": (None, {}), "extra_decoder_kwargs": (None, {}),
    "batch_embedding_kwargs": (None, {}), "library_log_means": (None,), "library_log_vars": (None,),
}


def warn_factor_count(n_latent: int, n_genes: int) -> None:
    """A warning when there are as many factors as genes, or more."""
    if n_latent >= n_genes:
        logger.warning("n_latent=%d factors for %d genes: the loadings cannot tell that many factors apart, so some "
                       "will repeat others or explain nothing. Choose n_latent below the number of genes (select-k "
                       "helps).", n_latent, n_genes)


def check_model_kwargs(model_kwargs: dict) -> dict:
    """``use_batch_norm`` and ``bias`` of ``model_kwargs``, with their defaults; scvi-tools'
    VAE options only at the values ldvae's model has."""
    extra = {"use_batch_norm": bool(model_kwargs.get("use_batch_norm", True)), "bias": bool(model_kwargs.get("bias", False))}
    check_init_params({name: model_kwargs[name] for name in extra if name in model_kwargs})
    for name, value in model_kwargs.items():
        if name in extra:
            continue
        if name in SCVI_MODULE_DEFAULTS:
            if not any(value is v or (type(value) is type(v) and value == v) for v in SCVI_MODULE_DEFAULTS[name]):
                raise SetupError(
                    f"{name}={value!r}: ldvae's linearly decoded VAE has only {name}="
                    f"{SCVI_MODULE_DEFAULTS[name][0]!r} (the LDVAE of Svensson et al. 2020)."
                )
            continue
        raise TypeError(
            f"LinearSCVI got an unknown model option {name!r}; ldvae's are use_batch_norm and bias, "
            f"and scvi-tools' VAE options {sorted(SCVI_MODULE_DEFAULTS)} at ldvae's values."
        )
    return extra


def check_registry(adata, registry) -> None:
    """``LinearSCVI(adata, registry)``: ldvae builds a model from a set-up AnnData."""
    if registry is not None and not isinstance(registry, dict):
        raise SetupError(
            f"LinearSCVI's second argument is registry (as in scvi-tools 1.5), got {registry!r}. "
            "Pass the other settings by keyword, e.g. LinearSCVI(adata, n_hidden=64)."
        )
    if adata is None:
        raise SetupError(
            "LinearSCVI needs adata, set up with LinearSCVI.setup_anndata(adata, ...); ldvae does not build "
            "models from a registry alone (it reads counts out of core from a backed AnnData instead)."
        )
