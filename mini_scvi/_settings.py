"""Global settings: the seed (chapter 1 shows it at the top of every chapter)."""

from __future__ import annotations

import random

import numpy as np
import torch


class _Settings:
    """``mini_scvi.settings.seed = 0`` seeds Python, NumPy and torch, as ``scvi.settings.seed`` does."""

    def __init__(self) -> None:
        self._seed: int | None = None

    @property
    def seed(self) -> int | None:
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"settings.seed must be an int, got {value!r}")
        self._seed = int(value)
        random.seed(self._seed)
        np.random.seed(self._seed)
        torch.manual_seed(self._seed)  # also seeds CUDA and MPS generators


settings = _Settings()
