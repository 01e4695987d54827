"""Training-loop pieces for mmengine's Runner: exact resume and a progress
bar (:mod:`.hooks`), layer-wise learning-rate decay (:mod:`.optim`), and SyncBN
that keeps timm's norm-act layers whole (:mod:`.sync_bn`: the conversion, the
DDP wrapper that applies it and the config policy). Importing it registers
the hooks, the optimizer constructor and the wrapper.
"""
from .hooks import ProgressBarHook, RNGStateHook
from .optim import NO_DECAY_TOKENS, VBLayerDecayOptimizerConstructor
from .sync_bn import (SYNC_BN_IMPLEMENTATIONS, VBDistributedDataParallel,
                      check_sync_bn, convert_sync_batchnorm, norm_act_layers,
                      route_sync_bn)

__all__ = [
    'NO_DECAY_TOKENS', 'ProgressBarHook', 'RNGStateHook',
    'SYNC_BN_IMPLEMENTATIONS', 'VBDistributedDataParallel',
    'VBLayerDecayOptimizerConstructor', 'check_sync_bn',
    'convert_sync_batchnorm', 'norm_act_layers', 'route_sync_bn'
]
