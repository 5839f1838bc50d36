"""Models, one file each, in the order the book builds them: AE -> VAE -> SCVI -> AUTOZI."""

from .ae import AE
from .autozi import AUTOZI
from .scvi import SCVI
from .vae import VAE

__all__ = ["AE", "VAE", "SCVI", "AUTOZI"]
