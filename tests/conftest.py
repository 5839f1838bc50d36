"""Shared fixtures for the package tests.

Every test starts from ``mini_scvi.settings.seed = 0`` so that results do not depend on test order.
Data fixtures are small (hundreds of cells, tens of genes) so these tests take about 25 s of CPU
time; the few tests that need the full-size toy data build it themselves.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import mini_scvi

# The test models are tiny, so a second thread gains little; on a busy shared machine (2 cores, many
# processes) two torch threads per process made these tests many times slower than one.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    mini_scvi.settings.seed = 0
    yield


@pytest.fixture(scope="session")
def pbmc_readonly() -> ad.AnnData:
    """The bundled pbmc3k counts, loaded once. Do not modify: take ``.copy()`` first."""
    return mini_scvi.data.pbmc3k()


@pytest.fixture
def profiles_small() -> ad.AnnData:
    """three_profiles at 600 cells x 60 genes (fresh for every test, so setup_anndata can write to it)."""
    return mini_scvi.data.three_profiles(n_cells=600, n_genes=60)


def _make_counts(n_cells: int = 50, n_genes: int = 8, seed: int = 0, with_batch: bool = True) -> ad.AnnData:
    """A tiny AnnData of Poisson counts (every cell has at least one count) with obs['batch'] and obs['label']."""
    rng = np.random.default_rng(seed)
    X = rng.poisson(3.0, size=(n_cells, n_genes)).astype(np.float32)
    X[:, 0] += 1  # no empty cells
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n_cells)])
    if with_batch:
        obs["batch"] = pd.Categorical(np.where(np.arange(n_cells) % 2 == 0, "b0", "b1"))
        obs["label"] = pd.Categorical(np.where(np.arange(n_cells) % 3 == 0, "A", "B"))
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    return ad.AnnData(X=X, obs=obs, var=var)


@pytest.fixture
def make_counts():
    """Factory fixture: ``make_counts(n_cells=50, n_genes=8, seed=0, with_batch=True)``."""
    return _make_counts


@pytest.fixture
def counts_small() -> ad.AnnData:
    return _make_counts()
