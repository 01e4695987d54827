"""Small layers shared by every backbone family."""
from .norm import (BATCH_NORM_TYPES, FrozenBatchNorm2d, FrozenBatchNormAct2d,
                   freeze_batch_norms, is_batch_norm)

__all__ = [
    'BATCH_NORM_TYPES', 'FrozenBatchNorm2d', 'FrozenBatchNormAct2d',
    'freeze_batch_norms', 'is_batch_norm'
]
