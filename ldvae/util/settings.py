"""Package-wide defaults, as ``scvi.settings``."""

from __future__ import annotations


class Settings:
    """Package-wide defaults, as ``scvi.settings``: ``ldvae.settings.seed = 0``."""

    seed: int = 0


settings = Settings()
