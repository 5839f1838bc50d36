"""The one data layer: registering an AnnData, validating counts, and serving minibatches (chapter 2).

``setup_anndata`` writes a small registry into ``adata.uns`` (which layer holds the counts, which
``obs`` columns are batch and labels, and their categories). Every model reads its data through
``TensorData``: a dense matrix is moved to the device once; a sparse one stays a CSR matrix on the
host and each minibatch is densified on its own, so a 100k-cell dataset never exists densely.
"""

from __future__ import annotations

from collections.abc import Iterator

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy.special import gammaln

REGISTRY_KEY = "_mini_scvi"


# --------------------------------------------------------------------------- validation


def _matrix(adata: ad.AnnData, layer: str | None):
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty. Put raw counts in adata.X or pass layer='counts'.")
        return adata.X
    if layer not in adata.layers:
        available = list(adata.layers.keys()) or "none"
        raise KeyError(
            f"layer {layer!r} is not in adata.layers (available: {available}). "
            "Pass the name of the layer that holds raw counts, or layer=None to use adata.X."
        )
    return adata.layers[layer]


def check_counts(X, where: str = "adata.X") -> None:
    """Raise a clear error unless ``X`` (n_cells, n_genes) holds raw counts: finite, >= 0, integers."""
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{where} is empty ({X.shape[0]} cells x {X.shape[1]} genes); models need at least one of each.")
    values = X.data if sp.issparse(X) else np.asarray(X)
    if not np.issubdtype(values.dtype, np.number):
        raise TypeError(f"{where} has dtype {values.dtype}; expected numeric raw counts.")
    if not np.all(np.isfinite(values)):
        n_bad = int(np.size(values) - np.isfinite(values).sum())
        raise ValueError(
            f"{where} contains {n_bad} NaN or Inf values. Models need raw UMI counts; "
            "remove or fix those entries before calling setup_anndata."
        )
    if values.size and values.min() < 0:
        raise ValueError(
            f"{where} contains negative values (min {values.min():g}). Models need raw counts; "
            "scaled or centered data (e.g. after sc.pp.scale) cannot be used."
        )
    if values.size and not np.all(np.mod(values, 1) == 0):
        raise ValueError(
            f"{where} contains non-integer values (e.g. {values[np.mod(values, 1) != 0][0]:g}): it looks "
            "normalized or log-transformed. mini_scvi models need raw counts. Keep a copy before "
            "normalizing (adata.layers['counts'] = adata.X.copy()) and call setup_anndata(adata, layer='counts')."
        )
    totals = np.asarray(X.sum(axis=1)).ravel()
    if np.any(totals == 0):
        raise ValueError(
            f"{where} has {int((totals == 0).sum())} cells with zero total counts; their library size is 0 "
            "and log(0) is undefined. Filter them first: sc.pp.filter_cells(adata, min_counts=1)."
        )


def _categories(adata: ad.AnnData, key: str | None, what: str) -> list[str]:
    if key is None:
        return ["0"]
    if key not in adata.obs:
        raise KeyError(
            f"{what}_key {key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}). "
            f"Pass the name of the obs column that holds the {what}, or {what}_key=None."
        )
    column = adata.obs[key]
    if column.isna().any():
        raise ValueError(
            f"adata.obs[{key!r}] has {int(column.isna().sum())} missing values. Fill them "
            f"(e.g. adata.obs[{key!r}] = adata.obs[{key!r}].cat.add_categories('unknown').fillna('unknown')) "
            "or drop those cells."
        )
    if isinstance(column.dtype, pd.CategoricalDtype):
        # a categorical column keeps its own category order (and codes), as in scvi-tools
        return [str(c) for c in column.cat.categories]
    return [str(c) for c in pd.Categorical(column.astype(str)).categories]


def setup_anndata(
    adata: ad.AnnData, layer: str | None = None, batch_key: str | None = None, labels_key: str | None = None
) -> None:
    """Validate ``adata`` and record where counts, batch and labels are (scvi-tools' call shape)."""
    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"setup_anndata needs an AnnData, got {type(adata).__name__}.")
    check_counts(_matrix(adata, layer), f"adata.layers[{layer!r}]" if layer else "adata.X")
    adata.uns[REGISTRY_KEY] = {
        "layer": layer or "",
        "batch_key": batch_key or "",
        "labels_key": labels_key or "",
        "batch_categories": _categories(adata, batch_key, "batch"),
        "labels_categories": _categories(adata, labels_key, "labels"),
    }


def get_registry(adata: ad.AnnData, model_name: str = "Model") -> dict:
    if REGISTRY_KEY not in adata.uns:
        raise ValueError(
            f"This AnnData has not been set up. Call {model_name}.setup_anndata(adata) "
            "(with layer=, batch_key=, labels_key= as needed) before creating the model."
        )
    reg = dict(adata.uns[REGISTRY_KEY])
    for k in ("layer", "batch_key", "labels_key"):
        reg[k] = reg[k] or None
    reg["batch_categories"] = list(reg["batch_categories"])
    reg["labels_categories"] = list(reg["labels_categories"])
    return reg


def _codes(adata: ad.AnnData, key: str | None, categories: list[str], what: str) -> np.ndarray:
    if key is None:
        return np.zeros(adata.n_obs, dtype=np.int64)
    if key not in adata.obs:
        raise KeyError(f"{what}_key {key!r} used in training is not a column of this adata.obs.")
    values = adata.obs[key].astype(str).to_numpy()
    lookup = {c: i for i, c in enumerate(categories)}
    unknown = sorted(set(values) - lookup.keys())
    if unknown:
        raise ValueError(
            f"adata.obs[{key!r}] has categories the model was not trained on: {unknown[:5]}. "
            f"Known {what} categories: {categories}."
        )
    return np.array([lookup[v] for v in values], dtype=np.int64)


def library_log_stats(adata: ad.AnnData, registry: dict) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of log total counts in each batch: scVI's prior on the log library size.

    Returns two float32 arrays of shape (n_batch,).
    """
    totals = np.asarray(_matrix(adata, registry["layer"]).sum(axis=1), dtype=np.float64).ravel()
    codes = _codes(adata, registry["batch_key"], registry["batch_categories"], "batch")
    log_totals = np.log(totals)
    n_batch = len(registry["batch_categories"])
    means, variances = np.zeros(n_batch), np.ones(n_batch)
    for b in range(n_batch):
        lb = log_totals[codes == b]
        if len(lb):
            means[b] = lb.mean()
            variances[b] = lb.var() if len(lb) > 1 else 1.0
    return means.astype(np.float32), np.maximum(variances, 1e-4).astype(np.float32)


# --------------------------------------------------------------------------- minibatches


class TensorData:
    """Counts, batch and label codes of one AnnData, served as minibatches of tensors on ``device``.

    Each minibatch is a dict: ``X`` (b, n_genes) float32 counts, ``batch`` and ``labels`` (b,) int64,
    ``log_x_factorial`` (b,) the per-cell sum of log x!, and ``X_nonzero``: the positions of the
    non-zero counts in ``X.reshape(-1)`` (int64), read off the sparse matrix for free, or ``None``
    for dense data (the likelihood then finds them itself; chapter 5).
    """

    def __init__(self, adata: ad.AnnData, registry: dict, device: torch.device | str = "cpu") -> None:
        X = _matrix(adata, registry["layer"])
        self.device = torch.device(device)
        self.n_obs, self.n_vars = X.shape
        self.sparse = sp.issparse(X)
        if self.sparse:
            self._csr = sp.csr_matrix(X, dtype=np.float32)  # stays on the host; no dense copy
            if not self._csr.has_canonical_format or (self._csr.data == 0).any():
                # the minibatches list the stored entries as the non-zero counts: no duplicates, no
                # explicit zeros (a copy, so that the caller's matrix is left as it was)
                self._csr = self._csr.copy()
                self._csr.sum_duplicates()
                self._csr.eliminate_zeros()
        else:
            self._dense = torch.as_tensor(np.asarray(X, dtype=np.float32), device=self.device)
        # sum_g log(x_ng!) per cell: it depends on the data alone, so it is computed once here
        # instead of at every training step (see mini_scvi/distributions.py)
        if self.sparse:
            lf = sp.csr_matrix((gammaln(self._csr.data + 1.0), self._csr.indices, self._csr.indptr), shape=self._csr.shape)
            log_x_factorial = np.asarray(lf.sum(axis=1), dtype=np.float32).ravel()
        else:
            log_x_factorial = torch.lgamma(self._dense + 1.0).sum(1).cpu().numpy()
        self.log_x_factorial = torch.as_tensor(log_x_factorial, device=self.device)
        self.batch = torch.as_tensor(
            _codes(adata, registry["batch_key"], registry["batch_categories"], "batch"), device=self.device
        )
        self.labels = torch.as_tensor(
            _codes(adata, registry["labels_key"], registry["labels_categories"], "labels"), device=self.device
        )

    def batches(self, indices: np.ndarray, batch_size: int, shuffle: bool = False) -> Iterator[dict]:
        """Yield minibatches over ``indices``. Never yields a batch of one cell while training
        (BatchNorm cannot normalize a single sample): a lone last cell joins the previous batch."""
        indices = np.asarray(indices)
        if shuffle:
            indices = indices[torch.randperm(len(indices)).numpy()]
        bounds = list(range(0, len(indices), batch_size)) + [len(indices)]
        if shuffle and len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            del bounds[-2]
        if self.sparse:
            # one row gather per pass, then every minibatch is a cheap contiguous slice
            csr = self._csr[indices]
        for start, stop in zip(bounds[:-1], bounds[1:]):
            idx = indices[start:stop]
            if self.sparse:
                rows = csr[start:stop]
                x = torch.from_numpy(rows.toarray()).to(self.device, non_blocking=True)
                # row-major positions of the stored entries: row * n_genes + column
                flat = np.repeat(np.arange(stop - start) * self.n_vars, np.diff(rows.indptr)) + rows.indices
                nonzero = torch.from_numpy(flat.astype(np.int64, copy=False)).to(self.device, non_blocking=True)
            else:
                x = self._dense[torch.as_tensor(idx, device=self.device)]
                nonzero = None
            tidx = torch.as_tensor(idx, device=self.device)
            yield {
                "X": x,
                "batch": self.batch[tidx],
                "labels": self.labels[tidx],
                "log_x_factorial": self.log_x_factorial[tidx],
                "X_nonzero": nonzero,
            }
