"""Chapter 6: the downstream toolkit of scVI, shared by SCVI and AUTOZI (scvi-tools' ``RNASeqMixin``).

Everything here reads a trained model through two calls only: ``self._forward_batches`` (the
posterior q(z, l | x), minibatch by minibatch) and ``self.module.generative`` (p(x | z, l)), so
any module with scVI's inference / generative pair gets it for free (AutoZI does, chapter 7):

- ``get_normalized_expression``: denoised expression E_q[rho] (optionally as if from another batch);
- ``posterior_predictive_sample``: counts drawn from p(x | z, l) with z, l ~ q;
- ``differential_expression``: Bayes factors from posterior samples of rho in two groups of cells;
- ``get_elbo``, ``get_reconstruction_error``, ``get_marginal_ll``: how well the model fits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch

from .. import _adata


class RNASeqMixin:
    """Posterior samples and what is computed from them (chapter 6). Mixed into a ``BaseModel``
    whose module has scVI's ``inference`` / ``generative`` / ``observation_distribution``."""

    # ---------------------------------------------------------------- posterior samples, batch by batch

    def _indices(self, adata: ad.AnnData, indices) -> np.ndarray:
        return np.arange(adata.n_obs) if indices is None else np.asarray(indices)

    def _batch_code(self, transform_batch) -> int:
        cats = self.registry["batch_categories"]
        if str(transform_batch) not in cats:
            raise ValueError(f"transform_batch {transform_batch!r} is not a batch the model knows: {cats}")
        return cats.index(str(transform_batch))

    @torch.no_grad()
    def _generate_samples(
        self, adata, indices, n_samples: int, batch_size: int, transform_batch=None, give_mean: bool = False
    ) -> Iterator[tuple[dict, list[dict]]]:
        """Per minibatch: ``(tensors, [generative outputs of each posterior sample])``."""
        adata = self._validate_anndata(adata)
        for tensors, inf in self._forward_batches(adata, batch_size, self._indices(adata, indices)):
            batch_index = tensors["batch"]
            if transform_batch is not None:
                batch_index = torch.full_like(batch_index, self._batch_code(transform_batch))
            samples = []
            for _ in range(n_samples):
                z = inf["qz_m"] if give_mean else inf["qz_m"] + inf["qz_v"].sqrt() * torch.randn_like(inf["qz_m"])
                library = inf["library"]
                if not self.module.use_observed_lib_size and not give_mean:
                    library = inf["ql_m"] + inf["ql_v"].sqrt() * torch.randn_like(inf["ql_m"])
                samples.append(self.module.generative(z, library, batch_index, tensors["labels"]))
            yield tensors, samples

    # ---------------------------------------------------------------- chapter 6: the toolkit

    def get_normalized_expression(
        self,
        adata: ad.AnnData | None = None,
        indices=None,
        transform_batch: str | Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        return_mean: bool = True,
        batch_size: int = 256,
    ) -> pd.DataFrame | np.ndarray:
        """Denoised expression E_q[rho_n] x ``library_size`` (or the cell's own library for 'latent').

        ``transform_batch`` decodes every cell as if it came from that batch (a list averages over
        batches). Returns a (n_cells, n_genes) DataFrame, or an (n_samples, n_cells, n_genes) array
        when ``return_mean=False``.
        """
        self._check_if_trained("get_normalized_expression")
        adata = self._validate_anndata(adata)
        # one batch (a name or a code like 0) or a list of them, averaged
        single = transform_batch is None or isinstance(transform_batch, (str, int, np.integer))
        batches = [transform_batch] if single else list(transform_batch)
        key = "px_rate" if library_size == "latent" else "px_scale"
        scale = 1.0 if library_size == "latent" else float(library_size)
        per_batch = []
        for tb in batches:
            chunks = []
            for _, samples in self._generate_samples(adata, indices, n_samples, batch_size, tb):
                chunks.append(torch.stack([s[key] for s in samples]).cpu() * scale)
            per_batch.append(torch.cat(chunks, dim=1))
        values = torch.stack(per_batch).mean(0).numpy()  # (n_samples, n_cells, n_genes)
        if not return_mean:
            return values
        idx = self._indices(adata, indices)
        return pd.DataFrame(values.mean(0), index=adata.obs_names[idx], columns=adata.var_names)

    def posterior_predictive_sample(
        self, adata: ad.AnnData | None = None, indices=None, n_samples: int = 1, batch_size: int = 256
    ) -> np.ndarray:
        """Counts drawn from p(x | z, l) with z, l ~ q: (n_cells, n_genes), or (n_cells, n_genes, n_samples)."""
        self._check_if_trained("posterior_predictive_sample")
        chunks = []
        for _, samples in self._generate_samples(adata, indices, n_samples, batch_size):
            draws = [self.module.observation_distribution(s).sample() for s in samples]
            chunks.append(torch.stack(draws, dim=-1).cpu())
        out = torch.cat(chunks).numpy()
        return out[..., 0] if n_samples == 1 else out

    @torch.no_grad()
    def _mean_over_cells(self, adata, indices, batch_size: int, fn) -> float:
        total, n = 0.0, 0
        adata = self._validate_anndata(adata)
        data = self._data(adata)
        self.module.eval()
        for tensors in data.batches(self._indices(adata, indices), batch_size):
            values = fn(tensors)
            total += values.sum().item()
            n += values.shape[0]
        return total / n

    def get_elbo(self, adata: ad.AnnData | None = None, indices=None, batch_size: int = 256) -> float:
        """The ELBO per cell (higher is better), one posterior sample per cell."""
        self._check_if_trained("get_elbo")
        def elbo(tensors):
            out = self.module(tensors, kl_weight=1.0)[2]
            return -(out.reconstruction_loss + out.kl_local)
        return self._mean_over_cells(adata, indices, batch_size, elbo)

    def get_reconstruction_error(self, adata: ad.AnnData | None = None, indices=None, batch_size: int = 256) -> dict:
        """-log p(x | z, l) per cell, averaged (lower is better)."""
        self._check_if_trained("get_reconstruction_error")
        value = self._mean_over_cells(
            adata, indices, batch_size, lambda tensors: self.module(tensors)[2].reconstruction_loss
        )
        return {"reconstruction_loss": value}

    def get_marginal_ll(
        self, adata: ad.AnnData | None = None, indices=None, n_mc_samples: int = 1000, batch_size: int = 256
    ) -> float:
        """log p(x) per cell by importance sampling with ``n_mc_samples`` draws (higher is better)."""
        self._check_if_trained("get_marginal_ll")
        return self._mean_over_cells(
            adata, indices, batch_size, lambda tensors: self.module.marginal_ll(tensors, n_mc_samples)
        )

    def differential_expression(
        self,
        adata: ad.AnnData | None = None,
        groupby: str | None = None,
        group1: str | None = None,
        group2: str | None = None,
        idx1=None,
        idx2=None,
        mode: Literal["vanilla", "change"] = "vanilla",
        delta: float = 0.25,
        n_samples: int = 5000,
        pseudocount: float = 1e-4,
        fdr_target: float = 0.05,
        batch_size: int = 256,
    ) -> pd.DataFrame:
        """Bayesian DE between two groups of cells (chapter 6; Lopez et al. 2018, Boyeau et al. 2019).

        Draws ``n_samples`` posterior samples of rho from each group (cells drawn at random) and pairs
        them. ``vanilla``: H1 rho1 > rho2 against rho1 <= rho2. ``change``: H1 |log2 fold change| >= delta.
        ``bayes_factor`` is the log odds of H1. One row per gene, sorted by the evidence.
        """
        self._check_if_trained("differential_expression")
        if mode not in ("vanilla", "change"):
            raise ValueError(f"mode must be 'vanilla' or 'change', got {mode!r}")
        adata = self._validate_anndata(adata)
        idx1, idx2, name1, name2 = self._de_groups(adata, groupby, group1, group2, idx1, idx2)
        rho1, rho2 = self._sample_scale(adata, idx1, n_samples, batch_size), self._sample_scale(adata, idx2, n_samples, batch_size)
        lfc = np.log2(rho1 + pseudocount) - np.log2(rho2 + pseudocount)  # (n_samples, n_genes)
        eps = 1e-8
        if mode == "vanilla":
            p1 = (rho1 > rho2).mean(0)
            res = {"proba_m1": p1, "proba_m2": 1 - p1, "proba_de": np.maximum(p1, 1 - p1),
                   "bayes_factor": np.log(p1 + eps) - np.log(1 - p1 + eps)}
        else:
            p_de = (np.abs(lfc) >= delta).mean(0)
            res = {"proba_de": p_de, "proba_not_de": 1 - p_de,
                   "bayes_factor": np.log(p_de + eps) - np.log(1 - p_de + eps)}
        X = _adata._matrix(adata, self.registry["layer"])
        res.update(
            lfc_mean=lfc.mean(0), lfc_median=np.median(lfc, 0), lfc_std=lfc.std(0),
            scale1=rho1.mean(0), scale2=rho2.mean(0),
            **_raw_stats(X, idx1, "1"), **_raw_stats(X, idx2, "2"),
        )
        df = pd.DataFrame(res, index=adata.var_names)
        # posterior expected FDR of the k genes with the highest proba_de: select the largest list whose
        # mean of (1 - proba_de) stays below the target
        p_de = df["proba_de"].to_numpy()
        order = np.argsort(-p_de, kind="stable")
        expected_fdr = np.empty(len(df))
        expected_fdr[order] = np.cumsum(1 - p_de[order]) / np.arange(1, len(df) + 1)
        df[f"is_de_fdr_{fdr_target}"] = expected_fdr <= fdr_target
        df = df.sort_values("proba_de" if mode == "change" else "bayes_factor", ascending=False)
        df["comparison"] = f"{name1} vs {name2}"
        return df

    def _de_groups(self, adata, groupby, group1, group2, idx1, idx2):
        if idx1 is not None:
            idx1 = np.flatnonzero(idx1) if np.asarray(idx1).dtype == bool else np.asarray(idx1)
            if idx2 is None:
                return idx1, np.setdiff1d(np.arange(adata.n_obs), idx1), "group1", "rest"
            idx2 = np.flatnonzero(idx2) if np.asarray(idx2).dtype == bool else np.asarray(idx2)
            return idx1, idx2, "group1", "group2"
        if groupby is None or group1 is None:
            raise ValueError("pass groupby= and group1= (and optionally group2=), or idx1= (and idx2=).")
        if groupby not in adata.obs:
            raise KeyError(f"groupby {groupby!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}).")
        labels = adata.obs[groupby].astype(str).to_numpy()
        idx1 = np.flatnonzero(labels == str(group1))
        idx2 = np.flatnonzero(labels != str(group1)) if group2 is None else np.flatnonzero(labels == str(group2))
        for name, idx in ((group1, idx1), (group2 or "rest", idx2)):
            if len(idx) == 0:
                raise ValueError(f"group {name!r} has no cells in adata.obs[{groupby!r}].")
        return idx1, idx2, str(group1), str(group2) if group2 is not None else "rest"

    def _sample_scale(self, adata, idx: np.ndarray, n_samples: int, batch_size: int) -> np.ndarray:
        """``n_samples`` draws of rho from q, cells of ``idx`` picked uniformly: (n_samples, n_genes)."""
        per_cell = max(1, math.ceil(n_samples / len(idx)))
        chunks = []
        for _, samples in self._generate_samples(adata, idx, per_cell, batch_size):
            chunks.append(torch.cat([s["px_scale"] for s in samples]).cpu())
        pool = torch.cat(chunks)
        pick = torch.randperm(pool.shape[0])[:n_samples] if pool.shape[0] >= n_samples else torch.randint(pool.shape[0], (n_samples,))
        return pool[pick].numpy().astype(np.float64)


def _raw_stats(X, idx: np.ndarray, suffix: str) -> dict:
    """Per-gene raw statistics of the cells ``idx``: mean count, fraction non-zero, mean normalized count."""
    sub = X[idx]
    dense = sub.toarray() if hasattr(sub, "toarray") else np.asarray(sub)
    totals = dense.sum(1, keepdims=True)
    return {
        f"raw_mean{suffix}": dense.mean(0),
        f"non_zeros_proportion{suffix}": (dense > 0).mean(0),
        f"raw_normalized_mean{suffix}": (dense / totals * 1e4).mean(0),
    }
