"""Chapters 5-6: scVI (Lopez et al. 2018), the VAE of chapter 3 rebuilt for counts.

What changes from ``vae.py``:

1. the data are raw counts, and the likelihood is a count distribution (ZINB, NB or Poisson)
   whose mean is ``library * rho``: rho = softmax(decoder(z)) are expression *frequencies*;
2. the library size is observed (log total counts) or a latent variable with a log-normal prior
   per batch, which adds an encoder q(log l | x) and a second KL term;
3. the batch enters the decoder (one-hot in every layer), so z need not encode it;
4. per-gene inverse dispersions theta (per gene, gene-batch, gene-label or gene-cell);
5. the downstream toolkit: normalized expression, posterior predictive samples, differential
   expression with Bayes factors, ELBO and marginal likelihood (chapter 6).

Defaults follow scvi-tools (see ``scvi-facts.md`` in the course references).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .. import _adata
from ..distributions import (
    NegativeBinomial,
    Poisson,
    ZeroInflatedNegativeBinomial,
    kl_normal,
    nb_log_prob_fast,
    poisson_log_prob,
    zinb_log_prob_fast,
)
from ..module import BaseModule, LossOutput
from ..nn import Encoder, FCLayers, one_hot
from .base import BaseModel

Likelihood = Literal["zinb", "nb", "poisson"]
Dispersion = Literal["gene", "gene-batch", "gene-label", "gene-cell"]


class DecoderSCVI(nn.Module):
    """z (+ batch) -> hidden h -> rho = softmax(.) over genes, zero-inflation logits, and
    (for ``gene-cell`` dispersion) log theta. No dropout in the decoder, as in scvi-tools."""

    def __init__(self, n_latent: int, n_output: int, n_cat_list: Sequence[int], n_layers: int, n_hidden: int) -> None:
        super().__init__()
        self.px_decoder = FCLayers([n_latent] + [n_hidden] * n_layers, n_cat_list, dropout_rate=0.0)
        self.px_scale_decoder = nn.Linear(n_hidden, n_output)
        self.px_dropout_decoder = nn.Linear(n_hidden, n_output)
        self.px_r_decoder = nn.Linear(n_hidden, n_output)

    def forward(self, z: torch.Tensor, *cat_list: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.px_decoder(z, *cat_list)
        px_scale = torch.softmax(self.px_scale_decoder(h), dim=-1)
        return px_scale, self.px_dropout_decoder(h), h


class SCVIModule(BaseModule):
    def __init__(
        self,
        n_input: int,
        n_batch: int = 1,
        n_labels: int = 1,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Dispersion = "gene",
        gene_likelihood: Likelihood = "zinb",
        use_observed_lib_size: bool = True,
        encode_covariates: bool = False,
        library_log_means: np.ndarray | None = None,
        library_log_vars: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if gene_likelihood not in ("zinb", "nb", "poisson"):
            raise ValueError(f"gene_likelihood must be 'zinb', 'nb' or 'poisson', got {gene_likelihood!r}")
        if dispersion not in ("gene", "gene-batch", "gene-label", "gene-cell"):
            raise ValueError(
                f"dispersion must be 'gene', 'gene-batch', 'gene-label' or 'gene-cell', got {dispersion!r}"
            )
        self.n_latent, self.n_batch, self.n_labels = n_latent, n_batch, n_labels
        self.dispersion, self.gene_likelihood = dispersion, gene_likelihood
        self.use_observed_lib_size = use_observed_lib_size
        self.encode_covariates = encode_covariates

        # log theta, one per gene (and per batch / label); gene-cell comes from the decoder
        n_disp = {"gene": 1, "gene-batch": n_batch, "gene-label": n_labels, "gene-cell": 0}[dispersion]
        self.px_r = nn.Parameter(torch.randn(n_input, n_disp).squeeze(-1)) if n_disp else None

        encoder_cats = [n_batch] if encode_covariates else []
        hidden = [n_hidden] * n_layers
        self.z_encoder = Encoder(n_input, n_latent, hidden, encoder_cats, dropout_rate)
        # library encoder and prior only when the library is a latent variable
        self.l_encoder = None if use_observed_lib_size else Encoder(n_input, 1, [n_hidden], encoder_cats, dropout_rate)
        self.register_buffer("library_log_means", torch.as_tensor(
            library_log_means if library_log_means is not None else np.zeros(n_batch), dtype=torch.float32))
        self.register_buffer("library_log_vars", torch.as_tensor(
            library_log_vars if library_log_vars is not None else np.ones(n_batch), dtype=torch.float32))
        self.decoder = DecoderSCVI(n_latent, n_input, [n_batch], n_layers, n_hidden)

    # ---------------------------------------------------------------- inference: x -> q(z, l | x)

    def _get_inference_input(self, tensors: dict) -> dict:
        return {"x": tensors["X"], "batch_index": tensors["batch"]}

    def inference(self, x: torch.Tensor, batch_index: torch.Tensor) -> dict:
        x_ = torch.log1p(x)  # numerical stability only, not a normalization
        cats = (batch_index,) if self.encode_covariates else ()
        qz_m, qz_v, z = self.z_encoder(x_, *cats)
        out = {"qz_m": qz_m, "qz_v": qz_v, "z": z}
        if self.use_observed_lib_size:
            out["library"] = torch.log(x.sum(dim=-1, keepdim=True))
        else:
            out["ql_m"], out["ql_v"], out["library"] = self.l_encoder(x_, *cats)
        return out

    # ---------------------------------------------------------------- generative: z, l -> p(x | z, l)

    def _get_generative_input(self, tensors: dict, inference_outputs: dict) -> dict:
        return {
            "z": inference_outputs["z"],
            "library": inference_outputs["library"],
            "batch_index": tensors["batch"],
            "labels": tensors["labels"],
        }

    def generative(
        self, z: torch.Tensor, library: torch.Tensor, batch_index: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict:
        """Returns px_scale (rho), px_rate (mu = l * rho), px_r (theta) and px_dropout (ZI logits): (n, n_genes)
        each, except px_r, which is (n_genes,) with ``dispersion='gene'``."""
        px_scale, px_dropout, h = self.decoder(z, batch_index)
        if self.dispersion == "gene":
            log_theta = self.px_r
        elif self.dispersion == "gene-batch":
            log_theta = F.linear(one_hot(batch_index, self.n_batch), self.px_r)
        elif self.dispersion == "gene-label":
            log_theta = F.linear(one_hot(labels, self.n_labels), self.px_r)
        else:  # gene-cell
            log_theta = self.decoder.px_r_decoder(h)
        return {
            "px_scale": px_scale,
            "px_rate": torch.exp(library) * px_scale,
            "px_r": torch.exp(log_theta),  # (n_genes,) for 'gene': broadcast, so lgamma(theta) runs G times, not n x G
            "px_dropout": px_dropout,
        }

    def log_likelihood(
        self, x: torch.Tensor, generative_outputs: dict, include_constant: bool = True, nonzero: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(x | z, l), summed over genes: (n,). The loss passes ``include_constant=False`` and
        adds the data-only sum of log x! that the data layer precomputed per cell, and the
        positions of the non-zero counts when the data layer has them (``X_nonzero``)."""
        g = generative_outputs
        # the *_fast functions equal zinb_log_prob / nb_log_prob (chapter 4) without the constant
        if self.gene_likelihood == "zinb":
            ll = zinb_log_prob_fast(x, g["px_rate"], g["px_r"], g["px_dropout"], nonzero)
        elif self.gene_likelihood == "nb":
            ll = nb_log_prob_fast(x, g["px_rate"], g["px_r"], nonzero)
        else:
            ll = poisson_log_prob(x, g["px_rate"], include_constant=False)
        ll = ll.sum(-1)
        return ll - torch.lgamma(x + 1).sum(-1) if include_constant else ll

    def observation_distribution(self, generative_outputs: dict):
        g = generative_outputs
        if self.gene_likelihood == "zinb":
            return ZeroInflatedNegativeBinomial(g["px_rate"], g["px_r"], g["px_dropout"])
        if self.gene_likelihood == "nb":
            return NegativeBinomial(g["px_rate"], g["px_r"])
        return Poisson(g["px_rate"])

    # ---------------------------------------------------------------- loss: the negative ELBO

    def kl_library(self, inference_outputs: dict, batch_index: torch.Tensor) -> torch.Tensor:
        """KL(q(log l | x) || N(m_b, v_b)) per cell: (n,). Zero when the library is observed."""
        if self.use_observed_lib_size:
            return torch.zeros_like(inference_outputs["qz_m"][:, 0])
        b = batch_index.reshape(-1)
        prior_m = self.library_log_means[b].unsqueeze(-1)
        prior_v = self.library_log_vars[b].unsqueeze(-1)
        return kl_normal(inference_outputs["ql_m"], inference_outputs["ql_v"], prior_m, prior_v).sum(-1)

    def loss(
        self, tensors: dict, inference_outputs: dict, generative_outputs: dict, kl_weight: float = 1.0, **kwargs
    ) -> LossOutput:
        x = tensors["X"]
        # the data-only term sum_g log x_ng! is precomputed per cell by the data layer
        log_px = self.log_likelihood(x, generative_outputs, include_constant=False, nonzero=tensors.get("X_nonzero"))
        reconstruction = tensors["log_x_factorial"] - log_px
        kl_z = kl_normal(inference_outputs["qz_m"], inference_outputs["qz_v"]).sum(-1)
        kl_l = self.kl_library(inference_outputs, tensors["batch"])
        # warm-up weighs only the KL of z, as in scvi-tools
        loss = torch.mean(reconstruction + kl_weight * kl_z + kl_l)
        return LossOutput(loss, reconstruction, kl_z + kl_l)

    # ---------------------------------------------------------------- marginal likelihood

    @torch.no_grad()
    def marginal_ll(self, tensors: dict, n_mc_samples: int, chunk: int = 64) -> torch.Tensor:
        """Importance-sampling estimate of log p(x) per cell, with q(z, l | x) as proposal: (n,).

        log p(x) ~= logsumexp_s [log p(x|z_s,l_s) + log p(z_s) + log p(l_s) - log q(z_s,l_s|x)] - log S
        """
        inf = self.inference(**self._get_inference_input(tensors))
        n = tensors["X"].shape[0]
        weights = []
        for start in range(0, n_mc_samples, chunk):
            s = min(chunk, n_mc_samples - start)
            rep = {k: tensors[k].repeat(s, *([1] * (tensors[k].dim() - 1))) for k in ("X", "batch", "labels")}
            qz_m, qz_v = inf["qz_m"].repeat(s, 1), inf["qz_v"].repeat(s, 1)
            z = qz_m + qz_v.sqrt() * torch.randn_like(qz_m)
            log_w = (
                torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
                - torch.distributions.Normal(qz_m, qz_v.sqrt()).log_prob(z).sum(-1)
            )
            if self.use_observed_lib_size:
                library = inf["library"].repeat(s, 1)
            else:
                ql_m, ql_v = inf["ql_m"].repeat(s, 1), inf["ql_v"].repeat(s, 1)
                library = ql_m + ql_v.sqrt() * torch.randn_like(ql_m)
                b = rep["batch"].reshape(-1)
                prior = torch.distributions.Normal(self.library_log_means[b], self.library_log_vars[b].sqrt())
                log_w += prior.log_prob(library[:, 0]) - torch.distributions.Normal(ql_m, ql_v.sqrt()).log_prob(
                    library
                ).sum(-1)
            gen = self.generative(z, library, rep["batch"], rep["labels"])
            log_w += self.log_likelihood(rep["X"], gen)
            weights.append(log_w.reshape(s, n))
        return torch.logsumexp(torch.cat(weights), dim=0) - math.log(n_mc_samples)


class SCVI(BaseModel):
    """single-cell Variational Inference (chapters 5-6), with scvi-tools' defaults and call shapes."""

    _module_cls = SCVIModule
    _default_plan = {"n_epochs_kl_warmup": 400}

    def __init__(
        self,
        adata: ad.AnnData,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Dispersion = "gene",
        gene_likelihood: Likelihood = "zinb",
        use_observed_lib_size: bool = True,
        encode_covariates: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(
            adata, n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate,
            dispersion=dispersion, gene_likelihood=gene_likelihood, use_observed_lib_size=use_observed_lib_size,
            encode_covariates=encode_covariates, **kwargs,
        )

    def _module_kwargs(self, adata: ad.AnnData, **model_kwargs) -> dict:
        means, variances = _adata.library_log_stats(adata, self.registry)
        if model_kwargs.get("dispersion") == "gene-label" and self.summary_stats["n_labels"] < 2:
            raise ValueError("dispersion='gene-label' needs labels: call setup_anndata(adata, labels_key=...).")
        return {
            "n_input": adata.n_vars,
            "n_batch": self.summary_stats["n_batch"],
            "n_labels": self.summary_stats["n_labels"],
            "library_log_means": means,
            "library_log_vars": variances,
            **model_kwargs,
        }

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
        def elbo(tensors):
            out = self.module(tensors, kl_weight=1.0)[2]
            return -(out.reconstruction_loss + out.kl_local)
        return self._mean_over_cells(adata, indices, batch_size, elbo)

    def get_reconstruction_error(self, adata: ad.AnnData | None = None, indices=None, batch_size: int = 256) -> dict:
        """-log p(x | z, l) per cell, averaged (lower is better)."""
        value = self._mean_over_cells(
            adata, indices, batch_size, lambda tensors: self.module(tensors)[2].reconstruction_loss
        )
        return {"reconstruction_loss": value}

    def get_marginal_ll(
        self, adata: ad.AnnData | None = None, indices=None, n_mc_samples: int = 1000, batch_size: int = 256
    ) -> float:
        """log p(x) per cell by importance sampling with ``n_mc_samples`` draws (higher is better)."""
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
