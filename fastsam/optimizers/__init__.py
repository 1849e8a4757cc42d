"""The public optimizers, one file each."""
from .asam import ASAM, asam_param_groups
from .sam import SAM

__all__ = ["SAM", "ASAM", "asam_param_groups"]
