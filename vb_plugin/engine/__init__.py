"""Training-loop pieces for mmengine's Runner: exact resume and a progress
bar (:mod:`.hooks`), layer-wise learning-rate decay (:mod:`.optim`), and,
handed on from :mod:`vb_plugin.layers.sync_bn`, SyncBN that keeps timm's
norm-act layers whole (the conversion, the DDP wrapper that applies it and
the config policy). Importing it registers the hooks and the optimizer
constructor.
"""
from ..layers.sync_bn import (SYNC_BN_IMPLEMENTATIONS,
                              VBDistributedDataParallel, check_sync_bn,
                              convert_sync_batchnorm, norm_act_layers,
                              route_sync_bn)
from .hooks import ProgressBarHook, RNGStateHook
from .optim import NO_DECAY_TOKENS, VBLayerDecayOptimizerConstructor

__all__ = [
    'NO_DECAY_TOKENS', 'ProgressBarHook', 'RNGStateHook',
    'SYNC_BN_IMPLEMENTATIONS', 'VBDistributedDataParallel',
    'VBLayerDecayOptimizerConstructor', 'check_sync_bn',
    'convert_sync_batchnorm', 'norm_act_layers', 'route_sync_bn'
]
