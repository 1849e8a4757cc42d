"""The public optimizers, one file each."""
from .asam import ASAM, asam_param_groups
from .freesam import FreeSAM
from .gsam import GSAM
from .sam import SAM

__all__ = ["SAM", "ASAM", "GSAM", "FreeSAM", "asam_param_groups"]
