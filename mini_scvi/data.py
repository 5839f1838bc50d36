"""Data for the course: the bundled pbmc3k counts and seeded simulators with known ground truth.

Nothing here downloads anything. ``pbmc3k`` reads the copy that ships with the package (the
repository's ``data/`` folder, installed as ``mini_scvi/_data`` in a wheel; chapter 1);
``pbmc3k_hvg`` is the cells and genes the course trains on; ``three_profiles`` is the course's autoencoder toy (chapter 2); ``simulate_counts``
draws overdispersed counts with cell types, batches, library sizes, DE genes and zero-inflated
genes, all returned as ground truth (chapters 5-7 and the tests).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

# where the bundled files live: inside the installed package (a wheel), or the repository's data/
_DATA_DIRS = (Path(__file__).resolve().parent / "_data", Path(__file__).resolve().parents[1] / "data")
HVG_GENES_FILE = "pbmc3k_hvg_genes.txt"


def _bundled(name: str) -> Path:
    """Path of a file that ships with mini_scvi (the first folder of ``_DATA_DIRS`` that has it)."""
    for folder in _DATA_DIRS:
        if (folder / name).exists():
            return folder / name
    return _DATA_DIRS[-1] / name  # not found: the error below names the repository's location


def pbmc3k(path: str | os.PathLike | None = None) -> ad.AnnData:
    """Load 2,700 PBMCs x 32,738 genes of raw 10x UMI counts with ``obs['cell_type']`` (chapter 1).

    The file ships with the package (``data/pbmc3k.h5ad`` in the repository); set
    ``MINI_SCVI_DATA`` or pass ``path`` to read it from somewhere else. ``X`` is a CSR matrix of
    integer counts. The 62 cells without a ``cell_type`` are the ones that fail the usual quality
    control (chapter 1).
    """
    path = Path(path or os.environ.get("MINI_SCVI_DATA", _bundled("pbmc3k.h5ad")))
    if path.is_dir():
        path = path / "pbmc3k.h5ad"
    if not path.exists():
        raise FileNotFoundError(
            f"pbmc3k counts not found at {path}. The file ships with the repository in data/; "
            "reinstall mini_scvi (pip install .) or run from a full clone, or set MINI_SCVI_DATA to the folder or file that holds pbmc3k.h5ad."
        )
    adata = ad.read_h5ad(path)
    if not sp.issparse(adata.X):
        adata.X = sp.csr_matrix(adata.X)
    return adata


def three_profiles(
    n_cells: int = 6000,
    n_genes: int = 1000,
    n_profiles: int = 3,
    base_rate: float = 1.0,
    up_rate: float = 8.0,
    seed: int = 0,
) -> ad.AnnData:
    """The course's autoencoder toy: each 1/3 of the cells up-regulates its own 1/3 of the genes.

    Counts are Poisson with rate ``base_rate`` (background) or ``up_rate`` (up-regulated block).
    Returns raw counts in ``X``; ``obs['profile']`` is the ground truth (chapter 2).
    """
    rng = np.random.default_rng(seed)
    profile = np.arange(n_cells) * n_profiles // n_cells  # 0,0,...,1,1,...,2,2
    gene_block = np.arange(n_genes) * n_profiles // n_genes
    rate = np.where(profile[:, None] == gene_block[None, :], up_rate, base_rate)
    counts = rng.poisson(rate).astype(np.float32)
    adata = ad.AnnData(
        X=counts,
        obs=pd.DataFrame(
            {"profile": pd.Categorical([f"profile {p}" for p in profile])},
            index=[f"cell{i}" for i in range(n_cells)],
        ),
        var=pd.DataFrame(
            {"up_in_profile": gene_block}, index=[f"gene{g}" for g in range(n_genes)]
        ),
    )
    return adata


def simulate_counts(
    n_cells: int = 2000,
    n_genes: int = 500,
    n_cell_types: int = 4,
    n_batches: int = 1,
    batch_effect: float = 0.5,
    de_fraction: float = 0.1,
    de_lfc: float = 2.0,
    zi_fraction: float = 0.0,
    zi_rate: tuple[float, float] = (0.3, 0.7),
    mean_log_expr: float = 0.0,
    sd_log_expr: float = 1.0,
    library_log_mean: float = 0.0,
    library_log_sd: float = 0.3,
    theta: tuple[float, float] = (2.0, 20.0),
    overdispersion: Literal["gamma", "lognormal"] = "gamma",
    sparse: bool = False,
    chunk_size: int = 10_000,
    seed: int = 0,
) -> ad.AnnData:
    """Draw negative-binomial counts with known structure (chapters 5-7).

    Model, for cell n of type t in batch b and gene g::

        log mu_ng = base_g + lfc_tg + batch_bg + log s_n      (s_n ~ LogNormal: library size factor)
        x_ng ~ NB(mu_ng, theta_g), then set to 0 with probability pi_g for zero-inflated genes.

    The NB is drawn as Poisson(r_ng) with a rate r_ng ~ Gamma of mean mu_ng and variance
    mu_ng^2 / theta_g. ``overdispersion="lognormal"`` draws the rate from a log-normal with the same
    mean and variance instead (log-sd sqrt(log(1 + 1 / theta_g))): Poisson log-normal counts, the
    kind AutoZI's paper simulated (chapter 8), with the variance of the NB but not its shape.

    Ground truth: ``obs['cell_type']``, ``obs['batch']``, ``obs['size_factor']``;
    ``var['de']`` (gene up- or down-regulated in some type), ``var['zero_inflated']``,
    ``var['zi_rate']``, ``var['theta']``, ``var['nb_mean']`` (mean before zero-inflation);
    ``varm['lfc']`` the (n_genes, n_cell_types) log fold changes.
    Generated in chunks of cells, so ``sparse=True`` never holds the whole dense matrix.
    """
    if n_cell_types < 1 or n_batches < 1:
        raise ValueError("n_cell_types and n_batches must be at least 1")
    if overdispersion not in ("gamma", "lognormal"):
        raise ValueError(f"overdispersion must be 'gamma' (NB counts) or 'lognormal', got {overdispersion!r}")
    rng = np.random.default_rng(seed)
    base = rng.normal(mean_log_expr, sd_log_expr, size=n_genes)

    # DE genes: each type gets its own disjoint block of up/down-regulated genes
    lfc = np.zeros((n_cell_types, n_genes))
    n_de_per_type = int(round(de_fraction * n_genes / max(n_cell_types, 1)))
    de_genes = rng.permutation(n_genes)
    for t in range(n_cell_types if n_cell_types > 1 else 0):
        genes = de_genes[t * n_de_per_type : (t + 1) * n_de_per_type]
        lfc[t, genes] = rng.choice([-1.0, 1.0], size=len(genes)) * de_lfc
    batch_shift = rng.normal(0.0, batch_effect, size=(n_batches, n_genes)) if n_batches > 1 else np.zeros((1, n_genes))
    thetas = np.exp(rng.uniform(np.log(theta[0]), np.log(theta[1]), size=n_genes))

    n_zi = int(round(zi_fraction * n_genes))
    zi_genes = rng.choice(n_genes, size=n_zi, replace=False)
    zi = np.zeros(n_genes, dtype=bool)
    zi[zi_genes] = True
    pi = np.where(zi, rng.uniform(zi_rate[0], zi_rate[1], size=n_genes), 0.0)

    cell_type = rng.integers(n_cell_types, size=n_cells)
    batch = rng.integers(n_batches, size=n_cells)
    size_factor = np.exp(rng.normal(library_log_mean, library_log_sd, size=n_cells))

    chunks = []
    for start in range(0, n_cells, chunk_size):
        sl = slice(start, min(start + chunk_size, n_cells))
        log_mu = base[None, :] + lfc[cell_type[sl]] + batch_shift[batch[sl]] + np.log(size_factor[sl])[:, None]
        mu = np.exp(log_mu)
        if overdispersion == "gamma":
            rate = rng.gamma(shape=thetas[None, :], scale=mu / thetas[None, :])  # Gamma-Poisson = NB
        else:  # log-normal with mean mu and variance mu^2 / theta
            sigma = np.sqrt(np.log1p(1.0 / thetas))[None, :]
            rate = mu * np.exp(sigma * rng.standard_normal(mu.shape) - sigma**2 / 2)
        x = rng.poisson(rate).astype(np.float32)
        x[rng.random(x.shape) < pi[None, :]] = 0.0
        chunks.append(sp.csr_matrix(x) if sparse else x)
    X = sp.vstack(chunks, format="csr") if sparse else np.concatenate(chunks)

    # the mean of the NB part, averaged over cells, for the "mean > 1" caveat of AutoZI
    nb_mean = np.exp(base) * np.mean(
        np.exp(lfc[cell_type] + batch_shift[batch]) * size_factor[:, None], axis=0
    ) if n_cells * n_genes <= 5e7 else np.exp(base) * np.exp(library_log_mean)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type{t}" for t in cell_type]),
            "batch": pd.Categorical([f"batch{b}" for b in batch]),
            "size_factor": size_factor,
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(
        {
            "de": np.abs(lfc).sum(0) > 0,
            "zero_inflated": zi,
            "zi_rate": pi,
            "theta": thetas,
            "nb_mean": nb_mean,
        },
        index=[f"gene{g}" for g in range(n_genes)],
    )
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.varm["lfc"] = pd.DataFrame(lfc.T, index=var.index, columns=[f"type{t}" for t in range(n_cell_types)])
    return adata


def select_hvg(adata: ad.AnnData, n_top_genes: int = 1200) -> pd.Index:
    """Names of the ``n_top_genes`` most variable genes of raw counts (scanpy's ``seurat_v3``; chapter 1).

    The flavor scvi-tools' tutorials use: a variance-stabilizing fit of variance against mean on
    the counts themselves, so no log-normalization decides which genes count as variable.
    Returned in the order of ``adata.var_names``.
    """
    import scanpy as sc  # imported here: scanpy is slow to import and only these functions need it

    hvg = sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="seurat_v3", inplace=False)
    return pd.Index(adata.var_names[hvg["highly_variable"].to_numpy()])


def stored_hvg_genes() -> list[str]:
    """The course's 1,200 genes, as stored in ``data/pbmc3k_hvg_genes.txt`` (one name per line)."""
    path = _bundled(HVG_GENES_FILE)
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def pbmc3k_qc(min_cells: int = 3) -> ad.AnnData:
    """The 2,638 cells of pbmc3k that pass quality control and carry a cell type, on the genes
    detected in at least ``min_cells`` of them (chapter 1). Raw counts in ``X``."""
    import scanpy as sc

    adata = pbmc3k()
    adata = adata[adata.obs["cell_type"].notna().to_numpy()].copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.remove_unused_categories()
    sc.pp.filter_genes(adata, min_cells=min_cells)
    return adata


def held_out(n_obs: int, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """(n_obs,) bool mask of a seeded random ``fraction`` of cells kept aside for evaluation.

    Drawn with NumPy's generator from ``seed`` alone, so it is the same on every machine: the
    stored models (``make models``) are trained on the other cells and scored on these.
    """
    mask = np.zeros(n_obs, dtype=bool)
    mask[np.random.default_rng(seed).choice(n_obs, size=int(n_obs * fraction), replace=False)] = True
    return mask


def pbmc3k_hvg(n_top_genes: int = 1200, recompute: bool = False) -> ad.AnnData:
    """pbmc3k as the course trains on it (chapters 2-8, ``make models`` and the benchmarks).

    The 2,638 QC'd, labelled cells of :func:`pbmc3k_qc` and ``n_top_genes`` highly variable genes
    selected on counts (:func:`select_hvg`). For the default 1,200 the genes are read from the list
    stored with the package, so every machine trains and loads on the same genes (an HVG ranking
    can flip at its boundary from one machine to another); ``recompute=True`` (or another
    ``n_top_genes``) selects them afresh. ``X`` and ``layers['counts']`` hold the raw counts.
    """
    adata = pbmc3k_qc()
    if n_top_genes < 1:
        raise ValueError(f"n_top_genes must be at least 1, got {n_top_genes}")
    stored = stored_hvg_genes()
    if n_top_genes == len(stored) and not recompute:
        genes = pd.Index(stored)
        missing = genes.difference(adata.var_names)
        if len(missing):
            raise ValueError(f"{len(missing)} stored HVG genes are not in pbmc3k (e.g. {list(missing[:3])}): "
                             f"the file {HVG_GENES_FILE} does not belong to this data set.")
        genes = adata.var_names[adata.var_names.isin(genes)]  # keep the data's gene order
    else:
        genes = select_hvg(adata, n_top_genes)
    adata = adata[:, genes].copy()
    adata.layers["counts"] = adata.X.copy()
    adata.obs["split"] = pd.Categorical(np.where(held_out(adata.n_obs), "held out", "train"),
                                        categories=["train", "held out"])
    return adata
