"""The pyramid a timm model gets (``pyramid``) and the layers that make it.

A plain, single-scale model (ViT, DeiT, DINOv2, EVA-02, BEiT; also VOLO and
Sequencer, whose levels all lie between strides 7 and 16) has no pyramid of
its own: 'simple' builds ViTDet's from its last map, 'multilevel' BEiT's
from four evenly spaced blocks. A multi-scale model that lacks some of
strides 4..32 or has a level past 32 gets 'fill': its own levels, the
missing ones made from the next coarser level. :func:`resolve_pyramid`
decides (for 'auto') and checks (for the others); :func:`build_pyramid`
makes the modules from the layers of :mod:`vb_plugin.layers.pyramid`.
"""
from typing import Optional, Sequence

from torch import nn

from ...layers.pyramid import PYRAMID_STRIDES, pyramid_level, rescale_level

#: Values of ``pyramid``.
PYRAMIDS = ('auto', 'simple', 'multilevel', 'fill', None)


def check_pyramid(pyramid: Optional[str]) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``pyramid`` is one of
    :data:`PYRAMIDS`.

    Example:
        >>> check_pyramid('fill')
    """
    if not (pyramid is None or isinstance(pyramid, str)):
        raise TypeError(f'pyramid must be one of {PYRAMIDS}, got '
                        f'{pyramid!r} ({type(pyramid).__name__})')
    if pyramid not in PYRAMIDS:
        raise ValueError(f'pyramid={pyramid!r} is not valid; use one of '
                         f'{PYRAMIDS}')


def resolve_pyramid(pyramid: Optional[str], levels: str,
                    strides: Sequence[int], output_stride: Optional[int],
                    model_name: str) -> Optional[str]:
    """The pyramid a model with timm level ``strides`` gets for the
    ``pyramid`` option ('auto' decided, the others checked).

    Raises:
        TypeError, ValueError: As :func:`check_pyramid`; ``ValueError``
            also when it does not apply to the model or to ``levels``.

    Example:
        >>> resolve_pyramid('auto', 'vb', [16] * 12, None, 'vit')
        'simple'
        >>> resolve_pyramid('auto', 'vb', [8, 16, 32], None, 'visformer')
        'fill'
        >>> resolve_pyramid('auto', 'vb', [2, 4, 8, 16, 32], None, 'resnet')
    """
    check_pyramid(pyramid)
    single = len(set(strides)) == 1
    # NOTE: a model with no level finer than stride 7 and none coarser
    # than 16 (VOLO: 8, 16, 16, 16; Sequencer: 7, 14, 14, 14) has no
    # pyramid of its own either: the simple pyramid is built on its
    # last map, as on a ViT's.
    plain = single or (min(strides) > 4 and max(strides) <= 16)
    # NOTE: a multi-scale model whose levels from stride 4 to 32 are at
    # some of 4, 8, 16, 32 (Visformer: 8, 16, 32; EfficientViT-MSRA: 16,
    # 32, 64) can be completed to all four ('fill'); a dilated one
    # (output_stride) keeps its strides.
    kept = [s for s in strides if 4 <= s <= 32]
    fillable = bool(kept) and set(kept) <= set(PYRAMID_STRIDES) and (
        output_stride is None)
    if pyramid == 'auto':
        if levels != 'vb':
            return None
        if plain:
            return 'simple'
        if fillable and (set(kept) != set(PYRAMID_STRIDES)
                         or max(strides) > 32):
            return 'fill'
        return None
    if pyramid is None:
        return None
    if pyramid == 'fill':
        if levels != 'vb':
            raise _levels_error(pyramid, levels)
        if not fillable:
            raise ValueError(
                f"pyramid='fill' completes a model's own levels at "
                'strides 4, 8, 16, 32 to all four; '
                f'{model_name!r} has timm strides {strides}'
                + (f' (output_stride={output_stride})'
                   if output_stride is not None else '')
                + ": use pyramid=None or 'auto'")
        return pyramid
    if pyramid == 'multilevel' and not single:
        raise ValueError(
            f'pyramid={pyramid!r} is for single-scale models (ViT-style, '
            f'every level at one stride); {model_name!r} is already '
            f'multi-scale (timm strides {strides}): use pyramid=None or '
            "'auto'")
    if not plain:
        raise ValueError(
            f'pyramid={pyramid!r} is for models without a pyramid of '
            'their own (ViT-style: no level finer than stride 7 or '
            f'coarser than 16); {model_name!r} is already '
            f'multi-scale (timm strides {strides}): use pyramid=None or '
            "'auto'")
    if levels != 'vb':
        raise _levels_error(pyramid, levels)
    return pyramid


def _levels_error(pyramid: str, levels: str) -> ValueError:
    return ValueError(f'pyramid={pyramid!r} needs levels=\'vb\' (its '
                      'outputs are strides 4..32), got '
                      f'levels={levels!r}')


def build_pyramid(kind: str, out_indices: Sequence[int],
                  channels: Sequence[int],
                  fill_steps: Sequence[int] = ()) -> nn.ModuleDict:
    """The pyramid's module for each output, by output index.

    Args:
        kind (str): 'simple', 'multilevel' or 'fill'.
        out_indices (Sequence[int]): The outputs (stages 0..3).
        channels (Sequence[int]): Per output index: the channels of the
            map it is made from ('simple', 'multilevel': the stride-16
            map, the same for all).
        fill_steps (Sequence[int]): Per output index ('fill' only):
            octaves from its map to its stride (> 0 finer).

    Example:
        >>> p = build_pyramid('simple', (0, 3), [64] * 4)
        >>> [type(p[k]).__name__ for k in p]
        ['Sequential', 'MaxPool2d']
    """
    if kind == 'fill':
        return nn.ModuleDict({str(i): rescale_level(channels[i],
                                                    fill_steps[i])
                              for i in out_indices})
    return nn.ModuleDict({str(i): pyramid_level(i, channels[i], kind)
                          for i in out_indices})
