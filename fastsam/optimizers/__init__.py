"""The public optimizers, one file each."""
from .asam import ASAM, asam_param_groups
from .gsam import GSAM
from .sam import SAM

__all__ = ["SAM", "ASAM", "GSAM", "asam_param_groups"]
