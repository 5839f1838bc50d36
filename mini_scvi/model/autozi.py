"""Chapter 7: AutoZI (Clivio et al. 2019), scVI with a per-gene switch between NB and ZINB.

What changes from ``scvi.py``:

1. each gene g has delta_g ~ Beta(alpha, beta): the probability that g is *not* zero-inflated,
   with a variational posterior q(delta_g) = Beta(alpha_g, beta_g) (spike-and-slab on the ZINB);
2. the likelihood of a count is the mixture
   ``delta_g NB(x) + (1 - delta_g) ZINB(x; pi_tilde)``, pi_tilde = tau + (1 - tau) sigmoid(h) >= tau,
   evaluated in log space with one reparameterized draw of delta per step;
3. the loss gains the global term sum_g KL(q(delta_g) || Beta(alpha, beta)), counted once per pass
   over the N training cells: ``N * mean_cells(local terms) + KL_global``;
4. ``zero_inflation`` chooses one delta per gene, per gene and batch, or per gene and label;
   ``alpha_prior=None, beta_prior=None`` learns the prior (empirical Bayes).

A gene is called zero-inflated when q(delta_g < 0.5) > 0.5, i.e. when alpha_g < beta_g.
"""

from __future__ import annotations

import math
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import beta as beta_dist
from torch import nn

from .. import _adata
from ..distributions import kl_beta, nb_and_zinb_log_prob_fast
from ..module import LossOutput
from ..nn import one_hot
from .scvi import SCVI, SCVIModule

ZeroInflation = Literal["gene", "gene-batch", "gene-label"]


def _logit(p: float) -> float:
    return float(np.log(p) - np.log1p(-p))


class AutoZIModule(SCVIModule):
    def __init__(
        self,
        n_input: int,
        zero_inflation: ZeroInflation = "gene",
        alpha_prior: float | None = 0.5,
        beta_prior: float | None = 0.5,
        minimal_dropout: float = 0.01,
        **scvi_kwargs,
    ) -> None:
        if scvi_kwargs.setdefault("gene_likelihood", "zinb") != "zinb":
            raise ValueError("AutoZI mixes NB and ZINB per gene: gene_likelihood must be 'zinb'.")
        super().__init__(n_input, **scvi_kwargs)
        if zero_inflation not in ("gene", "gene-batch", "gene-label"):
            raise ValueError(f"zero_inflation must be 'gene', 'gene-batch' or 'gene-label', got {zero_inflation!r}")
        if not 0.0 < minimal_dropout < 1.0:
            raise ValueError(f"minimal_dropout must be in (0, 1), got {minimal_dropout}")
        for name, value in (("alpha_prior", alpha_prior), ("beta_prior", beta_prior)):
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1) or None (empirical Bayes), got {value}")
        if (alpha_prior is None) != (beta_prior is None):
            raise ValueError("set both alpha_prior and beta_prior to None for empirical Bayes, or neither")
        self.zero_inflation = zero_inflation
        self.minimal_dropout = minimal_dropout
        n_cols = {"gene": 1, "gene-batch": self.n_batch, "gene-label": self.n_labels}[zero_inflation]
        # posterior Beta parameters live in (0, 1) through a sigmoid of free logits
        self.alpha_posterior_logit = nn.Parameter(torch.randn(n_input, n_cols).squeeze(-1))
        self.beta_posterior_logit = nn.Parameter(torch.randn(n_input, n_cols).squeeze(-1))
        if alpha_prior is None:  # empirical Bayes: one learned prior shared by all genes
            self.alpha_prior_logit = nn.Parameter(torch.randn(1))
            self.beta_prior_logit = nn.Parameter(torch.randn(1))
        else:  # fixed prior, each parameter from its own argument
            self.register_buffer("alpha_prior_logit", torch.tensor([_logit(alpha_prior)]))
            self.register_buffer("beta_prior_logit", torch.tensor([_logit(beta_prior)]))

    def get_alphas_betas(self) -> dict[str, torch.Tensor]:
        return {
            "alpha_posterior": torch.sigmoid(self.alpha_posterior_logit),
            "beta_posterior": torch.sigmoid(self.beta_posterior_logit),
            "alpha_prior": torch.sigmoid(self.alpha_prior_logit),
            "beta_prior": torch.sigmoid(self.beta_prior_logit),
        }

    def _per_cell(self, values: torch.Tensor, batch_index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(n_genes[, n_cols]) -> (n_cells, n_genes) by picking each cell's batch or label column."""
        if self.zero_inflation == "gene":
            return values.unsqueeze(0).expand(batch_index.shape[0], -1)
        index, n = (batch_index, self.n_batch) if self.zero_inflation == "gene-batch" else (labels, self.n_labels)
        return F.linear(one_hot(index, n), values)

    def generative(self, z, library, batch_index, labels=None) -> dict:
        out = super().generative(z, library, batch_index, labels)
        # the slab's zero-inflation probability pi = tau + (1 - tau) sigmoid(h) is bounded below by tau.
        # Its logit is computed without pi: in float32 pi rounds to exactly 1 once h > ~17, and
        # log(1 - pi) = -inf would send NaN gradients through the ZINB branch. With s = sigmoid(h),
        # pi / (1 - pi) = (tau + e^h) / (1 - tau), so logit(pi) = logit(tau) + softplus(h - log tau).
        h, tau = out["px_dropout"], self.minimal_dropout
        out["px_dropout"] = _logit(tau) + F.softplus(h - math.log(tau))
        ab = self.get_alphas_betas()
        if self.training:  # one reparameterized draw of delta per step, shared by the minibatch
            # (validate_args=False: the parameters are sigmoids, in (0, 1) by construction; the checks cost more than the draw)
            delta = torch.distributions.Beta(ab["alpha_posterior"], ab["beta_posterior"], validate_args=False).rsample()
        else:  # evaluation conditions on the posterior mean
            delta = ab["alpha_posterior"] / (ab["alpha_posterior"] + ab["beta_posterior"])
        out["delta"] = self._per_cell(delta, batch_index, labels)
        return out

    def log_likelihood(
        self, x: torch.Tensor, generative_outputs: dict, include_constant: bool = True, nonzero: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log [delta NB(x) + (1 - delta) ZINB(x)] summed over genes: (n,)."""
        g = generative_outputs
        delta = g["delta"].clamp(1e-7, 1 - 1e-7)
        # both branches in one pass: they share log NB(0) and the lgamma terms at the non-zero counts
        zinb, nb = nb_and_zinb_log_prob_fast(x, g["px_rate"], g["px_r"], g["px_dropout"], nonzero)
        ll = torch.logaddexp(torch.log(delta) + nb, torch.log1p(-delta) + zinb).sum(-1)
        # -log x! is common to both components, so it comes out of the mixture
        return ll - torch.lgamma(x + 1).sum(-1) if include_constant else ll

    def kl_global(self) -> torch.Tensor:
        """sum over genes (and batches / labels) of KL(Beta(alpha_g, beta_g) || Beta(alpha, beta))."""
        ab = self.get_alphas_betas()
        return kl_beta(ab["alpha_posterior"], ab["beta_posterior"], ab["alpha_prior"], ab["beta_prior"]).sum()

    def loss(self, tensors, inference_outputs, generative_outputs, kl_weight: float = 1.0, n_obs: int = 1, **kwargs):
        local = super().loss(tensors, inference_outputs, generative_outputs, kl_weight)
        kl_global = self.kl_global()
        return LossOutput(n_obs * local.loss + kl_global, local.reconstruction_loss, local.kl_local, kl_global)


class AUTOZI(SCVI):
    """Which genes are zero-inflated? (chapter 7). scvi-tools' ``AUTOZI`` call shape."""

    _module_cls = AutoZIModule

    def __init__(
        self,
        adata: ad.AnnData,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        zero_inflation: ZeroInflation = "gene",
        alpha_prior: float | None = 0.5,
        beta_prior: float | None = 0.5,
        minimal_dropout: float = 0.01,
        use_observed_lib_size: bool = True,
        **kwargs,
    ) -> None:
        if zero_inflation == "gene-label" and len(_adata.get_registry(adata, "AUTOZI")["labels_categories"]) < 2:
            raise ValueError("zero_inflation='gene-label' needs labels: call AUTOZI.setup_anndata(adata, labels_key=...).")
        if zero_inflation == "gene-batch" and len(_adata.get_registry(adata, "AUTOZI")["batch_categories"]) < 2:
            raise ValueError("zero_inflation='gene-batch' needs batches: call AUTOZI.setup_anndata(adata, batch_key=...).")
        kwargs.setdefault("gene_likelihood", "zinb")  # the module rejects anything else
        super().__init__(
            adata, n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate,
            dispersion=dispersion, use_observed_lib_size=use_observed_lib_size,
            zero_inflation=zero_inflation, alpha_prior=alpha_prior, beta_prior=beta_prior,
            minimal_dropout=minimal_dropout, **kwargs,
        )

    @torch.no_grad()
    def get_alphas_betas(self, as_numpy: bool = True) -> dict:
        """Posterior Beta parameters per gene (n_genes,) or (n_genes, n_batch | n_labels), and the prior's."""
        out = self.module.get_alphas_betas()
        return {k: v.detach().cpu().numpy() for k, v in out.items()} if as_numpy else out

    def get_zero_inflation(self, threshold: float = 0.5, adata: ad.AnnData | None = None) -> pd.DataFrame:
        """One row per gene (and batch / label column): q(delta < 0.5), the call, and mean expression.

        ``mean_expression`` is the raw mean count (per batch or label in those modes): calls for genes
        with a mean below 1 are unreliable (Clivio et al. 2019), so ``reliable`` flags mean > 1.
        """
        adata = self._validate_anndata(adata)
        ab = {k: v.detach().cpu().numpy() for k, v in self.module.get_alphas_betas().items()}
        zi_prob = beta_dist.cdf(0.5, ab["alpha_posterior"], ab["beta_posterior"])
        X = _adata._matrix(adata, self.registry["layer"])
        mode = self.module.zero_inflation
        if mode == "gene":
            columns, groups = [None], [np.arange(adata.n_obs)]
        else:
            key = self.registry["batch_key" if mode == "gene-batch" else "labels_key"]
            columns = self.registry["batch_categories" if mode == "gene-batch" else "labels_categories"]
            values = adata.obs[key].astype(str).to_numpy()
            groups = [np.flatnonzero(values == c) for c in columns]
        frames = []
        for j, (col, idx) in enumerate(zip(columns, groups)):
            p = zi_prob if col is None else zi_prob[:, j]
            a = ab["alpha_posterior"] if col is None else ab["alpha_posterior"][:, j]
            b = ab["beta_posterior"] if col is None else ab["beta_posterior"][:, j]
            mean = np.asarray(X[idx].mean(axis=0)).ravel() if len(idx) else np.full(adata.n_vars, np.nan)
            df = pd.DataFrame(
                {"alpha_posterior": a, "beta_posterior": b, "zi_prob": p, "is_zi": p > threshold,
                 "mean_expression": mean, "reliable": mean > 1.0},
                index=adata.var_names,
            )
            if col is not None:
                df.insert(0, mode.split("-")[1], col)
            frames.append(df)
        return pd.concat(frames)
