"""Models, one file each, in the order the book builds them: AE -> VAE -> SCVI -> AUTOZI.

``rnaseq.py`` holds what SCVI and AUTOZI compute once trained (chapter 6; scvi-tools' ``RNASeqMixin``)
and ``arches.py`` maps a query onto a trained reference (scArches; scvi-tools' ``ArchesMixin``).
"""

from .ae import AE
from .arches import ArchesMixin
from .autozi import AUTOZI
from .rnaseq import RNASeqMixin
from .scvi import SCVI
from .vae import VAE

__all__ = ["AE", "VAE", "SCVI", "AUTOZI", "RNASeqMixin", "ArchesMixin"]
