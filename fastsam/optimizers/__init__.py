"""The public optimizers, one file each."""
from .asam import ASAM, asam_param_groups
from .freesam import FreeSAM
from .gsam import GSAM
from .looksam import LookSAM
from .sam import SAM

__all__ = ["SAM", "ASAM", "GSAM", "FreeSAM", "LookSAM", "asam_param_groups"]
