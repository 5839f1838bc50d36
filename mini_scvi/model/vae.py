"""Chapter 3: the Gaussian variational autoencoder, the autoencoder of chapter 2 plus three ideas:

1. the encoder outputs a distribution q(z | x) = N(mu(x), var(x)), and z is a reparameterized sample;
2. the decoder defines a likelihood p(x | z) = N(x_hat(z), obs_var * I) with a fixed variance;
3. the loss is the negative ELBO: reconstruction plus KL(q(z | x) || N(0, I)), in closed form.

Everything else (data, decoder, training, API) is inherited from ``ae.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import anndata as ad
import numpy as np
import torch

from ..distributions import kl_normal
from ..module import LossOutput
from ..nn import Encoder
from ..train import check_int
from .ae import AE, AEModule, log_normalize


class VAEModule(AEModule):
    def __init__(
        self,
        n_input: int,
        n_latent: int = 10,
        hidden_sizes: Sequence[int] = (256, 64),
        dropout_rate: float = 0.1,
        obs_var: float = 1.0,
    ) -> None:
        super().__init__(n_input, n_latent, hidden_sizes, dropout_rate)
        self.encoder = Encoder(n_input, n_latent, hidden_sizes, dropout_rate=dropout_rate)  # now Gaussian
        self.obs_var = obs_var

    def inference(self, x: torch.Tensor) -> dict:
        x_log = log_normalize(x)
        qz_m, qz_v, z = self.encoder(x_log)
        return {"x_log": x_log, "qz_m": qz_m, "qz_v": qz_v, "z": z}

    def loss(
        self, tensors: dict, inference_outputs: dict, generative_outputs: dict, kl_weight: float = 1.0, **kwargs
    ) -> LossOutput:
        x_log, x_hat = inference_outputs["x_log"], generative_outputs["x_hat"]
        # -log N(x; x_hat, obs_var): the squared error of the AE, scaled, plus a constant
        reconstruction = 0.5 * (((x_log - x_hat) ** 2) / self.obs_var + math.log(2 * math.pi * self.obs_var)).sum(-1)
        kl = kl_normal(inference_outputs["qz_m"], inference_outputs["qz_v"]).sum(-1)
        return LossOutput((reconstruction + kl_weight * kl).mean(), reconstruction, kl)


class VAE(AE):
    """Gaussian VAE on log-normalized counts (chapter 3)."""

    _module_cls = VAEModule
    _default_plan = {"n_epochs_kl_warmup": None}  # the plain VAE of chapter 3; warm-up arrives with scVI

    def __init__(
        self,
        adata: ad.AnnData,
        n_latent: int = 10,
        hidden_sizes: Sequence[int] = (256, 64),
        dropout_rate: float = 0.1,
        obs_var: float = 1.0,
    ) -> None:
        super().__init__(adata, n_latent, hidden_sizes, dropout_rate, obs_var=obs_var)

    @torch.no_grad()
    def sample(self, n_cells: int, add_noise: bool = False) -> np.ndarray:
        """Generate new cells: z ~ N(0, I), x = decoder(z) (+ N(0, obs_var) noise). (n_cells, n_genes)."""
        check_int("n_cells", n_cells, 1)
        self._check_if_trained("sample")
        self.module.eval()
        z = torch.randn(n_cells, self.module.n_latent, device=self.device)
        x = self.module.generative(z)["x_hat"]
        if add_noise:
            x = x + math.sqrt(self.module.obs_var) * torch.randn_like(x)
        return x.cpu().numpy()
