"""Network blocks shared by every model (chapter 2 builds them, chapter 3 adds the Gaussian encoder).

A hidden block is Linear -> BatchNorm1d -> ReLU -> Dropout, as in scvi-tools (BatchNorm with
momentum 0.01 and eps 1e-3). Categorical covariates (the batch) enter as one-hot vectors
concatenated to the input of *every* layer, so no layer can forget them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def one_hot(index: torch.Tensor, n_cat: int) -> torch.Tensor:
    """index: (n,) int64 -> (n, n_cat) float."""
    return F.one_hot(index.reshape(-1), n_cat).float()


class FCLayers(nn.Module):
    """Hidden blocks with sizes ``sizes[0] -> sizes[1] -> ... -> sizes[-1]``.

    ``n_cat_list`` lists the number of categories of each covariate passed to ``forward``;
    covariates with a single category carry no information and are skipped.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        n_cat_list: Sequence[int] = (),
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        inject_covariates: bool = True,
    ) -> None:
        super().__init__()
        self.n_cat_list = [n if n > 1 else 0 for n in n_cat_list]
        self.inject_covariates = inject_covariates
        n_cat = sum(self.n_cat_list)
        self.layers = nn.ModuleList()
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            extra = n_cat if (i == 0 or inject_covariates) else 0
            self.layers.append(
                nn.Sequential(
                    nn.Linear(n_in + extra, n_out),
                    nn.BatchNorm1d(n_out, momentum=0.01, eps=1e-3) if use_batch_norm else nn.Identity(),
                    nn.ReLU(),
                    nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity(),
                )
            )

    def forward(self, x: torch.Tensor, *cat_list: torch.Tensor) -> torch.Tensor:
        """x: (n, sizes[0]); each cat: (n,) int64 -> (n, sizes[-1])."""
        one_hots = [one_hot(c, n) for c, n in zip(cat_list, self.n_cat_list) if n > 0]
        for i, layer in enumerate(self.layers):
            if one_hots and (i == 0 or self.inject_covariates):
                x = torch.cat([x, *one_hots], dim=-1)
            x = layer(x)
        return x


class DeterministicEncoder(nn.Module):
    """x -> z, one point per cell: the autoencoder's encoder (chapter 2)."""

    def __init__(self, n_input: int, n_output: int, hidden_sizes: Sequence[int], dropout_rate: float = 0.1) -> None:
        super().__init__()
        self.hidden = FCLayers([n_input, *hidden_sizes], dropout_rate=dropout_rate)
        self.out = nn.Linear(hidden_sizes[-1], n_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x))


def reparameterize(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Draw z ~ N(mu, var) as ``mu + sigma * eps``, eps ~ N(0, I): the noise is outside the graph,
    so gradients flow to mu and var (chapter 3)."""
    return mu + var.sqrt() * torch.randn_like(mu)


class Encoder(nn.Module):
    """Gaussian q(z | x) = N(mu(x), var(x)) with ``var = exp(.) + var_eps`` (chapter 3).

    The floor ``var_eps`` (1e-4, as scvi-tools) keeps the variance from collapsing to zero.
    Returns ``(q_m, q_v, z)``, each (n, n_output), z a reparameterized sample.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        hidden_sizes: Sequence[int] = (128,),
        n_cat_list: Sequence[int] = (),
        dropout_rate: float = 0.1,
        var_eps: float = 1e-4,
        inject_covariates: bool = True,
    ) -> None:
        super().__init__()
        self.hidden = FCLayers(
            [n_input, *hidden_sizes], n_cat_list, dropout_rate=dropout_rate, inject_covariates=inject_covariates
        )
        self.mean = nn.Linear(hidden_sizes[-1], n_output)
        self.log_var = nn.Linear(hidden_sizes[-1], n_output)
        self.var_eps = var_eps

    def forward(self, x: torch.Tensor, *cat_list: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.hidden(x, *cat_list)
        q_m = self.mean(h)
        q_v = torch.exp(self.log_var(h)) + self.var_eps
        return q_m, q_v, reparameterize(q_m, q_v)


class Decoder(nn.Module):
    """z -> hidden blocks -> a linear read-out of ``n_output`` unbounded values (chapters 2-3)."""

    def __init__(self, n_input: int, n_output: int, hidden_sizes: Sequence[int], dropout_rate: float = 0.0) -> None:
        super().__init__()
        self.hidden = FCLayers([n_input, *hidden_sizes], dropout_rate=dropout_rate)
        self.out = nn.Linear(hidden_sizes[-1], n_output)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(z))
