"""Pieces shared by the conv families (ResNet, RegNet): mmdet's default
initialisation and the zero-init of residual branches.

Example:
    >>> from torch import nn
    >>> bn = nn.BatchNorm2d(4)
    >>> zero_init_norm(bn)
    >>> float(bn.weight.abs().sum())
    0.0
"""
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
