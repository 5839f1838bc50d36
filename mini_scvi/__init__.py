"""mini_scvi: scVI and AutoZI, small enough to read, built step by step in the book.

Chapter map (each module says where the book explains it):

- ``mini_scvi.data``           chapter 1 (pbmc3k), chapters 2 and 5 (simulators)
- ``mini_scvi.distributions``  chapter 4 (count likelihoods)
- ``mini_scvi.nn``             chapters 2-3 (network blocks)
- ``mini_scvi.train``          chapter 2 (the one training loop)
- ``mini_scvi.model.AE``       chapter 2, ``VAE`` chapter 3, ``SCVI`` chapters 5-6, ``AUTOZI`` chapter 7
"""

from ._settings import settings

__version__ = "0.1.0"

from . import data, distributions, nn, model  # noqa: E402  (settings first: models read it)

__all__ = ["settings", "data", "distributions", "nn", "model", "__version__"]
