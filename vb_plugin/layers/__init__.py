"""Small layers shared by every backbone family."""
from .norm import (BATCH_NORM_TYPES, FrozenBatchNorm2d, FrozenBatchNormAct2d,
                   check_norm_cfg, freeze_batch_norms, is_batch_norm,
                   registered_norm_types)

__all__ = [
    'BATCH_NORM_TYPES', 'FrozenBatchNorm2d', 'FrozenBatchNormAct2d',
    'check_norm_cfg', 'freeze_batch_norms', 'is_batch_norm',
    'registered_norm_types'
]
