"""Chapter 2: the autoencoder. Log-normalized expression -> bottleneck z -> reconstruction, MSE loss.

The smallest model of the course and the template for the others: a module with ``inference``
(x -> z), ``generative`` (z -> x_hat) and ``loss``, wrapped by a thin AnnData-facing class.

Why these defaults: the course's GENEEX autoencoder uses hidden layers 2048-1024 and a 128-d
code for 60,484 genes. With 1,000-2,000 genes on a laptop CPU, 256-64 keeps one training step
to a few milliseconds and still has capacity to spare; pass ``hidden_sizes=(2048, 1024)`` and
``n_latent=128`` to rebuild GENEEX exactly (a GPU makes that size comfortable).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import anndata as ad
import torch

from ..module import BaseModule, LossOutput
from ..nn import Decoder, DeterministicEncoder
from .base import BaseModel


def log_normalize(x: torch.Tensor, target_sum: float = 1e4) -> torch.Tensor:
    """x: (n_cells, n_genes) raw counts -> log(1 + counts scaled to ``target_sum`` per cell)."""
    return torch.log1p(x / x.sum(dim=-1, keepdim=True) * target_sum)


class AEModule(BaseModule):
    """Encoder and decoder mirror each other: n_genes -> hidden_sizes -> n_latent -> reversed -> n_genes."""

    def __init__(
        self, n_input: int, n_latent: int = 10, hidden_sizes: Sequence[int] = (256, 64), dropout_rate: float = 0.1
    ) -> None:
        super().__init__()
        self.n_latent = n_latent
        self.encoder = DeterministicEncoder(n_input, n_latent, hidden_sizes, dropout_rate)
        self.decoder = Decoder(n_latent, n_input, list(hidden_sizes)[::-1], dropout_rate)

    def _get_inference_input(self, tensors: dict) -> dict:
        return {"x": tensors["X"]}

    def inference(self, x: torch.Tensor) -> dict:
        x_log = log_normalize(x)
        return {"x_log": x_log, "z": self.encoder(x_log)}

    def _get_generative_input(self, tensors: dict, inference_outputs: dict) -> dict:
        return {"z": inference_outputs["z"]}

    def generative(self, z: torch.Tensor) -> dict:
        # no activation on the output: log-expression is unbounded above
        return {"x_hat": self.decoder(z)}

    def loss(self, tensors: dict, inference_outputs: dict, generative_outputs: dict, **kwargs) -> LossOutput:
        # squared error summed over genes, averaged over cells (= n_genes x the per-entry MSE)
        reconstruction = ((inference_outputs["x_log"] - generative_outputs["x_hat"]) ** 2).sum(-1)
        return LossOutput(reconstruction.mean(), reconstruction, torch.zeros_like(reconstruction))


class AE(BaseModel):
    """Deterministic autoencoder on log-normalized counts (chapter 2)."""

    _module_cls = AEModule
    _default_plan = {"n_epochs_kl_warmup": None}  # nothing to warm up: there is no KL term

    def __init__(
        self,
        adata: ad.AnnData,
        n_latent: int = 10,
        hidden_sizes: Sequence[int] = (256, 64),
        dropout_rate: float = 0.1,
        **module_kwargs,
    ) -> None:
        # a tuple in init_params (what save() writes); a bare number is left for BaseModel to reject by name
        if isinstance(hidden_sizes, Iterable):
            hidden_sizes = tuple(hidden_sizes)
        super().__init__(adata, n_latent=n_latent, hidden_sizes=hidden_sizes, dropout_rate=dropout_rate, **module_kwargs)

    @torch.no_grad()
    def get_reconstruction(self, adata: ad.AnnData | None = None, batch_size: int = 1024) -> torch.Tensor:
        """(n_cells, n_genes) decoder output: the reconstructed log-normalized expression."""
        self._check_if_trained("get_reconstruction")
        out = [self.module.generative(inf["z"])["x_hat"].cpu() for _, inf in self._forward_batches(adata, batch_size)]
        return torch.cat(out)
