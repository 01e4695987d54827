"""Batch-norm helpers shared by every family: detection and freezing.

``norm_eval`` and frozen BN must treat every batch-norm-like layer the same
way, whichever library built it: ``torch.nn`` BN and SyncBN, mmcv's SyncBN
(which is not a ``_BatchNorm`` subclass) and timm's ``BatchNormAct2d`` (which
is, and carries an activation that must survive freezing).
"""
from typing import Tuple, Type

import torch
import torch.nn.functional as F
from mmcv.ops import SyncBatchNorm as MMCVSyncBatchNorm
from mmengine.registry import MODELS
from timm.layers import BatchNormAct2d, LayerNorm2d
from timm.layers.norm_act import SyncBatchNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# NOTE: 'LN2d' (channel LayerNorm on NCHW maps) is what mmdet's and mmseg's
# ConvNeXt configs name, but only mmpretrain registers it, in its own scope.
# timm's LayerNorm2d is the same computation; it is registered in the root
# registry (where mmcv's build_norm_layer looks) unless someone already did.
if 'LN2d' not in MODELS.module_dict:
    MODELS.register_module('LN2d', module=LayerNorm2d)

BATCH_NORM_TYPES: Tuple[Type[nn.Module], ...] = (_BatchNorm, MMCVSyncBatchNorm)


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalises with running batch statistics.

    Example:
        >>> is_batch_norm(nn.BatchNorm2d(8)), is_batch_norm(nn.GroupNorm(2, 8))
        (True, False)
    """
    return isinstance(module, BATCH_NORM_TYPES)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters.

    Unlike ``torchvision.ops.FrozenBatchNorm2d`` it keeps
    ``num_batches_tracked``, so its state-dict keys are exactly those of the
    ``BatchNorm2d`` it replaces, and it computes with ``F.batch_norm`` in
    inference mode, so its output is bit-identical to the eval-mode BN.

    Args:
        num_features (int): Number of channels.
        eps (float): Added to the variance. Defaults to 1e-5.

    Example:
        >>> bn = nn.BatchNorm2d(4).eval()
        >>> frozen = FrozenBatchNorm2d.from_batch_norm(bn)
        >>> x = torch.randn(1, 4, 5, 5)
        >>> torch.equal(bn(x), frozen(x)), sorted(frozen.state_dict()) == sorted(bn.state_dict())
        (True, True)
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer('weight', torch.ones(num_features))
        self.register_buffer('bias', torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_var', torch.ones(num_features))
        self.register_buffer('num_batches_tracked',
                             torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var,
                            self.weight, self.bias, False, 0.0, self.eps)

    @classmethod
    def from_batch_norm(cls, bn: nn.Module) -> 'FrozenBatchNorm2d':
        """Build a frozen copy of ``bn`` (any type in ``BATCH_NORM_TYPES``)."""
        if not bn.track_running_stats or not bn.affine:
            raise ValueError(
                f'frozen_bn: cannot freeze {type(bn).__name__} with '
                f'affine={bn.affine}, track_running_stats='
                f'{bn.track_running_stats}; only affine BN with running '
                'statistics has fixed parameters to freeze')
        frozen = cls(bn.num_features, bn.eps)
        for name in ('weight', 'bias', 'running_mean', 'running_var',
                     'num_batches_tracked'):
            getattr(frozen, name).data = getattr(bn, name).detach().clone()
        return frozen

    def extra_repr(self) -> str:
        return f'{self.num_features}, eps={self.eps}'


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """Frozen form of timm's ``BatchNormAct2d``: it keeps the drop and act.

    Example:
        >>> bn = BatchNormAct2d(4, act_layer=nn.ReLU).eval()
        >>> frozen = FrozenBatchNormAct2d.from_batch_norm(bn)
        >>> x = torch.randn(1, 4, 5, 5)
        >>> torch.equal(bn(x), frozen(x))
        True
    """

    @classmethod
    def from_batch_norm(cls, bn: nn.Module) -> 'FrozenBatchNormAct2d':
        frozen = super().from_batch_norm(bn)
        # timm's SyncBatchNormAct gets drop/act only from its converter.
        frozen.drop = getattr(bn, 'drop', nn.Identity())
        frozen.act = getattr(bn, 'act', nn.Identity())
        return frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def freeze_batch_norms(module: nn.Module) -> nn.Module:
    """Replace every batch norm inside ``module`` with a frozen one.

    State-dict keys and outputs (of the eval-mode layer) are unchanged, and
    timm's ``BatchNormAct2d`` keeps its activation. Children are replaced in
    place; the root is returned (a new object if the root itself is a BN).

    Example:
        >>> m = freeze_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
        >>> type(m[1]).__name__
        'FrozenBatchNorm2d'
    """
    if isinstance(module, (BatchNormAct2d, SyncBatchNormAct)):
        return FrozenBatchNormAct2d.from_batch_norm(module)
    if is_batch_norm(module):
        return FrozenBatchNorm2d.from_batch_norm(module)
    for name, child in list(module.named_children()):
        new = freeze_batch_norms(child)
        if new is not child:
            setattr(module, name, new)
    return module
