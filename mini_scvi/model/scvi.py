"""Chapters 5-6: scVI (Lopez et al. 2018), the VAE of chapter 3 rebuilt for counts.

What changes from ``vae.py``:

1. the data are raw counts, and the likelihood is a count distribution (ZINB, NB or Poisson)
   whose mean is ``library * rho``: rho = softmax(decoder(z)) are expression *frequencies*;
2. the library size is observed (log total counts) or a latent variable with a log-normal prior
   per batch, which adds an encoder q(log l | x) and a second KL term;
3. the batch enters the decoder (one-hot in every layer), so z need not encode it;
4. per-gene inverse dispersions theta (per gene, gene-batch, gene-label or gene-cell).

This file holds the module (``DecoderSCVI``, ``SCVIModule``: inference, generative, loss and the
marginal likelihood; chapter 5) and the thin ``SCVI`` class. What a trained model computes
(normalized expression, posterior predictive samples, differential expression, ELBO and marginal
likelihood; chapter 6) lives in ``rnaseq.py``, and mapping a query onto a trained reference
(scArches) in ``arches.py``, as scvi-tools splits them (``RNASeqMixin``, ``ArchesMixin``).

Defaults follow scvi-tools (see ``scvi-facts.md`` in the course references).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import anndata as ad
import numpy as np
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
from .arches import ArchesMixin
from .base import BaseModel
from .rnaseq import RNASeqMixin

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


class SCVI(RNASeqMixin, ArchesMixin, BaseModel):
    """single-cell Variational Inference (chapters 5-6), with scvi-tools' defaults and call shapes.

    The toolkit of chapter 6 comes from ``RNASeqMixin`` (rnaseq.py), ``load_query_data`` and
    ``prepare_query_anndata`` from ``ArchesMixin`` (arches.py)."""

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
