"""fastsam: fused sharpness-aware minimization for PyTorch.

    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

See README.md for the two-step and closure usage.
"""
from .averaging import EMA, SWA, update_bn
from .batchnorm import disable_running_stats, enable_running_stats, frozen_bn_stats
from .distributed import local_pass
from .grouping import sam_on_groups
from .integrations import unwrap
from .optimizers import (
    AESAM,
    ASAM,
    ESAM,
    GSAM,
    MSAM,
    SAM,
    WSAM,
    FreeSAM,
    FriendlySAM,
    LookSAM,
    asam_param_groups,
    esam_select,
)
from .schedulers import CosineScheduler, LinearScheduler, ProportionScheduler

__version__ = "0.1.0"
__all__ = [
    "SAM",
    "ASAM",
    "GSAM",
    "FreeSAM",
    "LookSAM",
    "WSAM",
    "FriendlySAM",
    "MSAM",
    "AESAM",
    "ESAM",
    "esam_select",
    "ProportionScheduler",
    "LinearScheduler",
    "CosineScheduler",
    "asam_param_groups",
    "sam_on_groups",
    "SWA",
    "EMA",
    "update_bn",
    "local_pass",
    "unwrap",
    "frozen_bn_stats",
    "disable_running_stats",
    "enable_running_stats",
]
