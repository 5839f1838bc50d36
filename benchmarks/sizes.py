"""The three data sets the speed benchmarks run on (issue 16), shared by ``step_profile.py`` and
``scvi_vs_scvi_tools.py`` so that both time the same matrices.

* ``pbmc700``: a seeded 700-cell subsample of pbmc3k's QC'd cells on its own 765 highly variable
  genes (seurat_v3 on the subsample's counts): the size of the chapters' and exercises' toy runs;
* ``pbmc3k``: ``mini_scvi.data.pbmc3k_hvg()``, 2,638 cells x 1,200 genes, what chapters 5-7 train on;
* ``sim6000``: 6,000 cells x 200 genes from ``simulate_counts`` as in ``autozi_simulation.py``
  (half of the genes zero-inflated), the AutoZI size.

Each returns an AnnData with raw counts in ``layers['counts']`` (CSR for the pbmc sets, dense for
the simulation, as the chapters have them) and ``obs['cell_type']``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

import mini_scvi

SIZES = ("pbmc700", "pbmc3k", "sim6000")


def pbmc700(seed: int = 0):
    full = mini_scvi.data.pbmc3k_qc()
    cells = np.sort(np.random.default_rng(seed).choice(full.n_obs, size=700, replace=False))
    sub = full[cells].copy()
    detected = np.asarray((sub.X > 0).sum(axis=0)).ravel() >= 3  # seurat_v3 needs genes seen in the subsample
    sub = sub[:, detected].copy()
    sub = sub[:, mini_scvi.data.select_hvg(sub, 765)].copy()
    totals = np.asarray(sub.X.sum(axis=1)).ravel()
    sub = sub[totals > 0].copy()  # a cell with no count on these genes has no library size
    sub.layers["counts"] = sub.X.copy()
    return sub


def pbmc3k():
    return mini_scvi.data.pbmc3k_hvg()


def sim6000(seed: int = 0):
    adata = mini_scvi.data.simulate_counts(
        n_cells=6000, n_genes=200, n_cell_types=2, de_fraction=0.2, zi_fraction=0.5, zi_rate=(0.3, 0.7),
        mean_log_expr=1.0, sd_log_expr=1.0, theta=(5.0, 50.0), seed=seed,
    )
    adata.layers["counts"] = adata.X.copy()
    return adata


def load(name: str):
    return {"pbmc700": pbmc700, "pbmc3k": pbmc3k, "sim6000": sim6000}[name]()


if __name__ == "__main__":
    for name in SIZES:
        a = load(name)
        X = a.layers["counts"]
        nnz = X.nnz if sp.issparse(X) else int((X > 0).sum())
        print(name, a.shape, "sparse" if sp.issparse(X) else "dense", f"{nnz / np.prod(a.shape):.3f} non-zero",
              a.obs["cell_type"].nunique(), "types")
