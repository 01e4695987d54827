"""Small layers shared by every backbone family."""
from .norm import (BATCH_NORM_TYPES, FrozenBatchNorm2d, FrozenBatchNormAct2d,
                   check_norm_cfg, freeze_batch_norms, is_batch_norm,
                   registered_norm_types)
from .sync_bn import (VBDistributedDataParallel, convert_sync_batchnorm,
                      norm_act_layers)

__all__ = [
    'BATCH_NORM_TYPES', 'FrozenBatchNorm2d', 'FrozenBatchNormAct2d',
    'VBDistributedDataParallel', 'check_norm_cfg', 'convert_sync_batchnorm',
    'freeze_batch_norms', 'is_batch_norm', 'norm_act_layers',
    'registered_norm_types'
]
