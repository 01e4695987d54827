"""Pieces shared by the conv families (ResNet, RegNet): mmdet's default
initialisation, the zero-init of residual branches and the plain stem.

Example:
    >>> from torch import nn
    >>> bn = nn.BatchNorm2d(4)
    >>> zero_init_norm(bn)
    >>> float(bn.weight.abs().sum())
    0.0
"""
from typing import Dict, Optional

from mmcv.cnn import build_conv_layer, build_norm_layer
from torch import nn

#: mmdet's default initialisation of conv + BN backbones (ResNet, RegNet).
CONV_BN_INIT_CFG = (
    dict(type='Kaiming', layer='Conv2d'),
    dict(type='Constant', val=1, layer=['_BatchNorm', 'GroupNorm']),
)


def zero_init_norm(norm: nn.Module) -> None:
    """Zero a residual branch's last norm (its affine weight, when it has
    one), so that the block starts as the identity (Goyal et al. 2017; as
    mmdet's and torchvision's ``zero_init_residual``)."""
    weight = getattr(norm, 'weight', None)
    if weight is not None:
        nn.init.zeros_(weight)


def stem_norm_name(norm_cfg: dict, channels: int) -> str:
    """mmdet's name of the stem norm: its type's abbreviation and 1 (``bn1``,
    ``gn1``, ...).

    Example:
        >>> stem_norm_name(dict(type='GN', num_groups=4), 8)
        'gn1'
    """
    return build_norm_layer(norm_cfg, channels, postfix=1)[0]


def conv_norm_relu_stem(conv_cfg: Optional[dict], norm_cfg: dict,
                        in_channels: int, channels: int,
                        kernel_size: int) -> Dict[str, nn.Module]:
    """mmdet's ResNet/RegNet stem: ``conv1`` (stride 2, no bias), its norm
    under :func:`stem_norm_name`, ``relu``.

    Example:
        >>> list(conv_norm_relu_stem(None, dict(type='BN'), 3, 8, 7))
        ['conv1', 'bn1', 'relu']
    """
    return {
        'conv1':
        build_conv_layer(conv_cfg, in_channels, channels, kernel_size,
                         stride=2, padding=kernel_size // 2, bias=False),
        stem_norm_name(norm_cfg, channels):
        build_norm_layer(norm_cfg, channels)[1],
        'relu': nn.ReLU(inplace=True),
    }
