"""The shape every model's module shares, mirroring scvi-tools' ``BaseModuleClass`` (chapter 2).

A module turns a minibatch into a loss in three named steps::

    inference(x)       -> q(z | x) and a sample z      (the encoder)
    generative(z)      -> the parameters of p(x | z)   (the decoder)
    loss(...)          -> LossOutput                   (reconstruction + KL terms)

``forward`` strings them together; the training loop only ever calls ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LossOutput:
    """What ``loss`` returns.

    loss: scalar to minimize (already KL-weighted). reconstruction_loss, kl_local: (n_cells,) per
    cell. kl_global: scalar, for parameters shared by all cells (AutoZI's Beta KL), counted once
    per pass over the n_obs training cells.
    """

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    kl_local: torch.Tensor
    kl_global: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))


class BaseModule(nn.Module):
    """Subclasses define the five methods below; see ``mini_scvi/model/ae.py`` for the smallest."""

    def _get_inference_input(self, tensors: dict) -> dict:
        raise NotImplementedError

    def _get_generative_input(self, tensors: dict, inference_outputs: dict) -> dict:
        raise NotImplementedError

    def inference(self, **kwargs) -> dict:
        raise NotImplementedError

    def generative(self, **kwargs) -> dict:
        raise NotImplementedError

    def loss(self, tensors: dict, inference_outputs: dict, generative_outputs: dict, **kwargs) -> LossOutput:
        raise NotImplementedError

    def forward(self, tensors: dict, **loss_kwargs) -> tuple[dict, dict, LossOutput]:
        inference_outputs = self.inference(**self._get_inference_input(tensors))
        generative_outputs = self.generative(**self._get_generative_input(tensors, inference_outputs))
        losses = self.loss(tensors, inference_outputs, generative_outputs, **loss_kwargs)
        return inference_outputs, generative_outputs, losses
