"""The public optimizers, one file each."""
from .aesam import AESAM
from .asam import ASAM, asam_param_groups
from .esam import ESAM, esam_select
from .freesam import FreeSAM
from .friendlysam import FriendlySAM
from .gsam import GSAM
from .looksam import LookSAM
from .msam import MSAM
from .sam import SAM
from .wsam import WSAM

__all__ = ["SAM", "ASAM", "GSAM", "FreeSAM", "LookSAM", "WSAM", "FriendlySAM", "MSAM",
           "AESAM", "ESAM", "asam_param_groups", "esam_select"]
