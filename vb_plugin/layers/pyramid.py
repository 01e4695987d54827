"""Feature pyramids for single-scale (plain ViT-style) backbones.

Li et al., "Exploring Plain Vision Transformer Backbones for Object
Detection" (ViTDet, ECCV 2022): a plain ViT's last map at stride 16 becomes
strides 4, 8, 16 and 32 with two 2x2 transposed convs (norm and GELU between
them), one, none and a 2x2 max-pool. ViTDet then projects each scale with a
1x1 and a 3x3 conv; under an mmdet config that is the FPN neck's lateral and
output convs, so they are not built here. The multi-level form (BEiT and
mmseg's ViT-UperNet) resamples four intermediate blocks the same way. A
multi-scale model that lacks some of the four strides (no stride-4 level:
Visformer, EfficientViT-MSRA) gets them the same way from its nearest
coarser level (:func:`rescale_level`).

A map at a stride other than 16 (patch 14 in DINOv2 and EVA-02) is first
resized to the stride-16 grid of the input, ``ceil(H / 16) x ceil(W / 16)``
(bilinear), so the pyramid's strides are truly 4, 8, 16 and 32.
"""
import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

#: The strides of the four pyramid levels.
PYRAMID_STRIDES = (4, 8, 16, 32)


def _ceil_div(size, stride):
    # NOTE: integer arithmetic, not math.ceil: under ONNX tracing a size is
    # a traced value, and math.ceil would freeze it into a constant (and
    # ONNX's integer division truncates: keep the operands positive).
    if isinstance(stride, int) or float(stride).is_integer():
        return (size + int(stride) - 1) // int(stride)
    return math.ceil(size / stride)


def resample_to_stride16(x: torch.Tensor, image_size: Sequence[int],
                         stride: float) -> torch.Tensor:
    """Resize a map at ``stride`` to the stride-16 grid of ``image_size``.

    Example:
        >>> resample_to_stride16(torch.rand(1, 8, 24, 37), (333, 517),
        ...                      14).shape
        torch.Size([1, 8, 21, 33])
    """
    grid = (_ceil_div(image_size[0], 16), _ceil_div(image_size[1], 16))
    if tuple(x.shape[-2:]) == grid and not torch.jit.is_tracing():
        return x
    if stride == 16:
        # NOTE: a stride-16 map of a padded input: crop, do not resample.
        return x[..., :grid[0], :grid[1]]
    return F.interpolate(x, size=grid, mode='bilinear', align_corners=False)


def _up(channels: int, out: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(channels, out, kernel_size=2, stride=2)


def rescale_level(channels: int, steps: int) -> nn.Module:
    """The module that moves a map ``steps`` octaves finer (``steps > 0``:
    2x2 transposed convs, each halving the channels, LayerNorm and GELU
    between them, as ViTDet's stride-4 level) or coarser (``steps < 0``: a
    max-pool); ``steps == 0`` is the identity.

    Example:
        >>> x = torch.rand(1, 64, 5, 7)
        >>> [tuple(rescale_level(64, s)(x).shape) for s in (2, 1, 0, -1)]
        [(1, 16, 20, 28), (1, 32, 10, 14), (1, 64, 5, 7), (1, 64, 2, 3)]
    """
    if steps < 0:
        return nn.MaxPool2d(kernel_size=2**-steps, stride=2**-steps)
    if steps == 0:
        return nn.Identity()
    layers = []
    for k in range(steps):
        if k:
            layers += [LayerNorm2d(channels), nn.GELU()]
        layers.append(_up(channels, channels // 2))
        channels //= 2
    return layers[0] if steps == 1 else nn.Sequential(*layers)


def rescaled_channels(channels: int, steps: int) -> int:
    """Channels of :func:`rescale_level`'s output.

    Example:
        >>> [rescaled_channels(64, s) for s in (2, 1, 0, -1)]
        [16, 32, 64, 64]
    """
    return channels // 2**max(steps, 0)


def pyramid_level(level: int, channels: int, kind: str) -> nn.Module:
    """The module that turns a stride-16 map into pyramid level ``level``.

    Args:
        level (int): 0..3, strides 4..32.
        channels (int): Channels of the stride-16 map.
        kind (str): 'simple' (ViTDet: :func:`rescale_level` by ``2 -
            level`` octaves, stride 4 and 8 at width/4 and width/2) or
            'multilevel' (BEiT: every level at full width, with BatchNorm
            and GELU between the two transposed convs).

    Example:
        >>> x = torch.rand(1, 64, 5, 7)
        >>> [tuple(pyramid_level(i, 64, 'simple')(x).shape) for i in range(4)]
        [(1, 16, 20, 28), (1, 32, 10, 14), (1, 64, 5, 7), (1, 64, 2, 3)]
    """
    if kind == 'simple':
        return rescale_level(channels, 2 - level)
    if level == 0:
        return nn.Sequential(_up(channels, channels),
                             nn.BatchNorm2d(channels), nn.GELU(),
                             _up(channels, channels))
    if level == 1:
        return _up(channels, channels)
    return rescale_level(channels, 2 - level)


def pyramid_channels(channels: int, kind: str) -> Tuple[int, ...]:
    """Channels of the four levels.

    Example:
        >>> pyramid_channels(192, 'simple'), pyramid_channels(192, 'multilevel')
        ((48, 96, 192, 192), (192, 192, 192, 192))
    """
    if kind == 'simple':
        return tuple(rescaled_channels(channels, 2 - i) for i in range(4))
    return (channels, ) * 4


def crop_to_stride(x: torch.Tensor, image_size: Sequence[int],
                   stride: int) -> torch.Tensor:
    """Crop a level to ``ceil(H / stride) x ceil(W / stride)``: the part that
    covers the image, not its padding.

    Example:
        >>> crop_to_stride(torch.rand(1, 4, 12, 12), (33, 47), 4).shape
        torch.Size([1, 4, 9, 12])
    """
    return x[..., :_ceil_div(image_size[0], stride),
             :_ceil_div(image_size[1], stride)]
