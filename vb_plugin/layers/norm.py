"""Norm helpers shared by every family: config checks, batch-norm detection
and freezing.

``norm_eval`` and frozen BN must treat every batch-norm-like layer the same
way, whichever library built it: ``torch.nn`` BN and SyncBN, mmcv's SyncBN
(which is not a ``_BatchNorm`` subclass) and timm's ``BatchNormAct2d`` (which
is, and carries an activation that must survive freezing).
"""
import inspect
import re
from typing import List, Tuple, Type

import torch
import torch.nn.functional as F
from mmcv.ops import SyncBatchNorm as MMCVSyncBatchNorm
from mmengine.registry import MODELS
from timm.layers import BatchNormAct2d, LayerNorm2d
from timm.layers.norm_act import SyncBatchNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

# NOTE: 'LN2d' (channel LayerNorm on NCHW maps) is what mmdet's and mmseg's
# ConvNeXt configs name, but only mmpretrain registers it, in its own scope.
# timm's LayerNorm2d is the same computation; it is registered in the root
# registry (where mmcv's build_norm_layer looks) unless someone already did.
if 'LN2d' not in MODELS.module_dict:
    MODELS.register_module('LN2d', module=LayerNorm2d)

BATCH_NORM_TYPES: Tuple[Type[nn.Module], ...] = (_BatchNorm, MMCVSyncBatchNorm)

#: Base classes of norm layers, to tell norms from the other entries of
#: mmengine's MODELS registry (which holds every model and layer).
_NORM_BASES: Tuple[type, ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm,
                                 nn.LocalResponseNorm, MMCVSyncBatchNorm) + (
                                     (nn.RMSNorm, ) if hasattr(nn, 'RMSNorm')
                                     else ())


def _is_norm_class(obj) -> bool:
    return inspect.isclass(obj) and issubclass(obj, nn.Module) and (
        issubclass(obj, _NORM_BASES)
        or re.search(r'Norm(\d+d)?$', obj.__name__) is not None)


def _lookup_norm(layer_type: str):
    """Resolve a norm type name exactly as mmcv's ``build_norm_layer`` does
    (the current default scope's registry, then its parents)."""
    with MODELS.switch_scope_and_registry(None) as registry:
        return registry.get(layer_type)


def registered_norm_types() -> List[str]:
    """Names of the norm layers that mmcv's ``build_norm_layer`` can build
    under the current default scope, sorted.

    Example:
        >>> {'BN', 'GN', 'LN2d', 'SyncBN'} <= set(registered_norm_types())
        True
    """
    names = set()
    with MODELS.switch_scope_and_registry(None) as registry:
        while registry is not None:
            names |= {name for name, obj in registry.module_dict.items()
                      if _is_norm_class(obj)}
            registry = registry.parent
    return sorted(names)


def check_norm_cfg(cfg, name: str) -> Type[nn.Module]:
    """Check a norm config meant for NCHW feature maps, before anything is
    built; return the norm class it names.

    Every family checks its norm options here (``out_norm_cfg`` in
    :class:`~vb_plugin.models.VBBackbone`, ``norm_cfg`` in each family), so
    that a wrong config fails at construction with the option's name instead
    of inside mmcv's ``build_norm_layer`` (``KeyError: 'Cannot find None in
    registry'``, a bare ``assert``) or at the first forward pass.

    Args:
        cfg (dict): The config, as mmcv's ``build_norm_layer`` takes it.
        name (str): The option's name, for the messages.

    Returns:
        type: The norm layer class that ``cfg['type']`` resolves to.

    Raises:
        TypeError: If ``cfg`` is not a dict with a ``'type'``.
        ValueError: If the type is not a registered norm type, is ``'LN'``
            (``nn.LayerNorm`` normalises the last dim: the width of an NCHW
            map), or is ``'GN'`` without ``num_groups``.

    Example:
        >>> check_norm_cfg(dict(type='GN', num_groups=2), 'norm_cfg')
        <class 'torch.nn.modules.normalization.GroupNorm'>
        >>> check_norm_cfg(dict(type='LN'), 'out_norm_cfg')
        Traceback (most recent call last):
            ...
        ValueError: out_norm_cfg={'type': 'LN'}: norm type 'LN' normalises the last dim, i.e. the width of NCHW maps; use 'LN2d' (channel LayerNorm)
    """
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise TypeError(f"{name} must be a dict with a 'type' (a registered "
                        f"norm type, e.g. 'BN', 'GN', 'LN2d'), got {cfg!r} "
                        f'({type(cfg).__name__})')
    layer_type = cfg['type']
    shown = f'{name}={dict(cfg)!r}'
    if inspect.isclass(layer_type):
        layer, type_name = layer_type, layer_type.__name__
    elif isinstance(layer_type, str):
        layer, type_name = _lookup_norm(layer_type), repr(layer_type)
        if layer is None:
            raise ValueError(
                f'{shown}: {layer_type!r} is not a registered norm type; '
                f'registered norm types: {registered_norm_types()} (for a '
                "LayerNorm on NCHW maps use 'LN2d', not 'LN')")
    else:
        raise TypeError(f"{shown}: 'type' must be a norm type name (str) or "
                        f'a norm class, got {layer_type!r} '
                        f'({type(layer_type).__name__})')
    if layer is nn.LayerNorm:
        raise ValueError(
            f'{shown}: norm type {type_name} normalises the last dim, i.e. '
            "the width of NCHW maps; use 'LN2d' (channel LayerNorm)")
    if layer is nn.GroupNorm and 'num_groups' not in cfg:
        raise ValueError(f'{shown}: norm type {type_name} needs num_groups, '
                         f"e.g. dict(type={layer_type!r}, num_groups=32)")
    return layer


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
