"""ViTDet's simple feature pyramid as an mmdet/mmseg neck.

Li et al., "Exploring Plain Vision Transformer Backbones for Object
Detection" (ViTDet, ECCV 2022): a plain backbone's single stride-16 map
becomes a pyramid by rescaling it (2x2 transposed convs up, a max-pool
down: :func:`vb_plugin.layers.pyramid.rescale_level`), then projecting each
scale with a 1x1 and a 3x3 conv, each followed by a norm (LayerNorm over
channels in ViTDet); further levels are stride-2 subsamplings of the last
one (detectron2's ``LastLevelMaxPool``, mmdet FPN's ``num_outs``). The neck
owns these layers, so it works behind any backbone with one output.

Weights: detectron2's ViTDet model zoo (Apache-2.0) loads through
``init_cfg=dict(type='Pretrained', checkpoint='model_final_*.pkl')``
(layouts in :mod:`vb_plugin.weights.vitdet`).
"""
import inspect
import math
import numbers
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.registry import MODELS
from torch import nn

from ..checks import check_int
from ..layers import check_norm_cfg
from ..layers.pyramid import rescale_level, rescaled_channels
from ..weights.module import LoadableModule
from ..weights.vitdet import VITDET_SOURCES

#: ``scale_factors`` a level may have: 2**k for k in -2..2 (strides 4..64 of
#: a stride-16 input).
ALLOWED_SCALES = (4.0, 2.0, 1.0, 0.5, 0.25)


def check_scale_factors(scale_factors) -> Tuple[float, ...]:
    """``scale_factors`` checked: a non-empty, strictly decreasing sequence
    of values in :data:`ALLOWED_SCALES`.

    Example:
        >>> check_scale_factors([2, 1, 0.5])
        (2.0, 1.0, 0.5)
        >>> check_scale_factors((1.0, 2.0))
        Traceback (most recent call last):
            ...
        ValueError: scale_factors=(1.0, 2.0) must decrease strictly (finest level first, as the heads expect), e.g. (4.0, 2.0, 1.0, 0.5)
    """
    if isinstance(scale_factors, (str, bytes)) or not isinstance(
            scale_factors, Sequence) or not all(
                isinstance(s, numbers.Real) and not isinstance(s, bool)
                for s in scale_factors):
        raise TypeError(f'scale_factors must be a sequence of numbers, got '
                        f'{scale_factors!r} ({type(scale_factors).__name__})')
    if not scale_factors:
        raise ValueError('scale_factors=() is empty: give at least one of '
                         f'{ALLOWED_SCALES}')
    bad = [s for s in scale_factors if float(s) not in ALLOWED_SCALES]
    if bad:
        raise ValueError(
            f'scale_factors={tuple(scale_factors)!r}: {bad[0]!r} is not '
            f'allowed; each must be a power of two in {ALLOWED_SCALES} '
            '(strides 4..64 of the stride-16 input)')
    scales = tuple(float(s) for s in scale_factors)
    if any(a <= b for a, b in zip(scales, scales[1:])):
        raise ValueError(
            f'scale_factors={tuple(scale_factors)!r} must decrease strictly '
            '(finest level first, as the heads expect), e.g. (4.0, 2.0, '
            '1.0, 0.5)')
    return scales


def pyramid_strides(in_stride: float, scale_factors: Sequence[float],
                    num_outs: int) -> Tuple[int, ...]:
    """Output strides: ``in_stride / scale`` per scale, then doubling up to
    ``num_outs`` levels.

    Example:
        >>> pyramid_strides(16, (4.0, 2.0, 1.0, 0.5), 5)
        (4, 8, 16, 32, 64)
    """
    strides = [in_stride / s for s in scale_factors]
    while len(strides) < num_outs:
        strides.append(strides[-1] * 2)
    return tuple(int(s) if float(s).is_integer() else s for s in strides)


class ConvNorm(nn.Conv2d):
    """A conv followed by its norm, the norm held at ``.norm`` (no bias
    when there is a norm): state-dict keys ``weight`` and ``norm.*``, as
    detectron2's ``Conv2d(norm=...)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 norm_cfg) -> None:
        super().__init__(in_channels, out_channels, kernel_size,
                         padding=kernel_size // 2, bias=norm_cfg is None)
        self.norm = (nn.Identity() if norm_cfg is None else
                     build_norm_layer(norm_cfg, out_channels)[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


def _level(in_channels: int, out_channels: int, scale: float,
           norm_cfg) -> nn.Sequential:
    """The rescaling layers, flattened, then the 1x1 and the 3x3 conv."""
    steps = int(round(math.log2(scale)))
    rescale = rescale_level(in_channels, steps)
    layers = (list(rescale) if isinstance(rescale, nn.Sequential) else
              [] if isinstance(rescale, nn.Identity) else [rescale])
    width = rescaled_channels(in_channels, steps)
    return nn.Sequential(*layers,
                         ConvNorm(width, out_channels, 1, norm_cfg),
                         ConvNorm(out_channels, out_channels, 3, norm_cfg))


def _check_in_channels(in_channels) -> int:
    if in_channels == 'auto':
        raise ValueError(
            "in_channels='auto' reached VBSimpleFeaturePyramid: 'auto' is "
            "filled by vb_plugin's wiring when an mmdet/mmseg model is built "
            "(neck.in_channels from the backbone's out_channels); building "
            'the neck alone, give the backbone map\'s channels as an int')
    if isinstance(in_channels, (list, tuple)):
        if len(in_channels) != 1:
            raise ValueError(
                f'in_channels={list(in_channels)!r}: VBSimpleFeaturePyramid '
                'takes a single map (a backbone with one output, e.g. '
                'out_indices=(3,) of a plain ViT); give one int or a '
                'one-element list')
        in_channels = in_channels[0]
    return check_int('in_channels', in_channels, minimum=1)


@MODELS.register_module()
class VBSimpleFeaturePyramid(LoadableModule):
    """ViTDet's simple feature pyramid: one stride-16 map in, ``num_outs``
    maps of ``out_channels`` out, at strides 4, 8, 16, 32, 64 by default.

    Each level rescales the input by its scale factor (4: a 2x2 transposed
    conv to C/2, LayerNorm, GELU and another to C/4; 2: one to C/2; 1: the
    identity; 0.5: a 2x2 max-pool; 0.25: a 4x4 max-pool), then a 1x1 conv
    to ``out_channels`` and a 3x3 conv, each followed by ``norm_cfg``'s
    norm. Levels past the scales subsample the last output by 2 (a 1x1
    max-pool of stride 2).

    Args:
        in_channels (int | list[int]): Channels of the input map: an int, or
            a one-element list as vb_plugin's wiring fills ``'auto'`` from
            the backbone (``'auto'`` itself is for configs: it raises
            ``ValueError`` here).
        out_channels (int): Channels of every output. Defaults to 256.
        scale_factors (Sequence[float]): The pyramid levels, finest first:
            each a power of two among 4, 2, 1, 0.5, 0.25 (strides 4..64 of
            the stride-16 input), strictly decreasing. A scale of 4 needs
            ``in_channels`` divisible by 4 (2: by 2). Defaults to
            (4.0, 2.0, 1.0, 0.5).
        num_outs (int): Outputs; at least ``len(scale_factors)``, the rest
            stride-2 subsamplings of the last. Defaults to 5.
        norm_cfg (dict, optional): mmcv norm config of the 1x1 and 3x3
            convs, checked as every family's (``'LN'`` raises: use
            ``'LN2d'``). None: convs with a bias, no norm. ViTDet's
            channel LayerNorm has eps 1e-6; mmcv's ``build_norm_layer``
            gives 1e-5 unless ``eps`` is written. The LayerNorm between the
            two transposed convs of scale 4 is always timm's
            ``LayerNorm2d`` (eps 1e-6), as in ViTDet. Defaults to
            dict(type='LN2d', eps=1e-6).
        init_cfg (dict | list[dict], optional): mmengine init configs;
            ``dict(type='Pretrained', checkpoint=PATH)``, with optional
            ``prefix`` and ``source``, loads strictly through
            :func:`vb_plugin.load_pretrained` (layouts: detectron2 ViTDet
            ``.pkl``, the neck's own state dict; a detector checkpoint of
            this neck needs ``prefix='neck.'``). Defaults to None.

    Attributes:
        out_channels (int): Channels of every output.
        out_strides (tuple[int]): Output strides for a stride-16 input.
            With an input padded to a multiple of 32 (mmdet's
            ``pad_size_divisor=32``), output ``s`` is ``H / s x W / s`` of
            the padded size.

    Example:
        >>> neck = VBSimpleFeaturePyramid(in_channels=64, out_channels=32)
        >>> neck.out_strides
        (4, 8, 16, 32, 64)
        >>> [tuple(o.shape) for o in neck((torch.rand(1, 64, 12, 16), ))]
        [(1, 32, 48, 64), (1, 32, 24, 32), (1, 32, 12, 16), (1, 32, 6, 8), (1, 32, 3, 4)]
    """

    weight_sources = VITDET_SOURCES

    def __init__(self,
                 in_channels: Union[int, Sequence[int]],
                 out_channels: int = 256,
                 scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                 num_outs: int = 5,
                 norm_cfg=dict(type='LN2d', eps=1e-6),
                 init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.in_channels = _check_in_channels(in_channels)
        self.out_channels = check_int('out_channels', out_channels,
                                      minimum=1)
        self.scale_factors = check_scale_factors(scale_factors)
        self.num_outs = check_int('num_outs', num_outs,
                                  minimum=len(self.scale_factors))
        divisor = int(max(self.scale_factors[0], 1))
        if self.in_channels % divisor:
            raise ValueError(
                f'in_channels={self.in_channels} is not divisible by '
                f'{divisor}: scale factor {self.scale_factors[0]:g} halves '
                f'the channels {int(math.log2(divisor))} time(s); give '
                f'in_channels divisible by {divisor} or drop that scale')
        if norm_cfg is not None:
            check_norm_cfg(norm_cfg, 'norm_cfg')
        self.norm_cfg = norm_cfg
        self.out_strides = pyramid_strides(16, self.scale_factors,
                                           self.num_outs)
        # NOTE: named by stride (p{k}: stride 2**k) as detectron2's
        # simfp_{k}, so a checkpoint's levels land on the right scales
        # whatever subset of scales is built.
        self.levels = nn.ModuleDict({
            f'p{int(math.log2(16 / s))}': _level(
                self.in_channels, self.out_channels, s, norm_cfg)
            for s in self.scale_factors
        })

    @classmethod
    def strides_from_config(cls, cfg: dict, in_strides: Sequence[float]
                            ) -> Union[Tuple[float, ...], None]:
        """The output strides a config of this neck gives behind a backbone
        with ``in_strides`` (for :mod:`vb_plugin.wiring`'s head-stride
        check); None unless the backbone has one output.

        Example:
            >>> VBSimpleFeaturePyramid.strides_from_config(
            ...     dict(num_outs=5, scale_factors=(2, 1, 0.5)), [16])
            (8, 16, 32, 64, 128)
        """
        if len(in_strides) != 1:
            return None
        defaults = {n: p.default for n, p in inspect.signature(
            cls.__init__).parameters.items()}
        scales = check_scale_factors(
            cfg.get('scale_factors', defaults['scale_factors']))
        num_outs = check_int('num_outs', cfg.get('num_outs',
                                                 defaults['num_outs']),
                             minimum=len(scales))
        return pyramid_strides(in_strides[0], scales, num_outs)

    def forward(self, inputs) -> Tuple[torch.Tensor, ...]:
        """Map a stride-16 map (a bare tensor, or a one-element tuple or
        list as mmdet passes backbone outputs) to the pyramid."""
        if isinstance(inputs, (tuple, list)):
            if len(inputs) != 1:
                raise ValueError(
                    f'VBSimpleFeaturePyramid takes one map, got '
                    f'{len(inputs)}: use a backbone with one output (e.g. '
                    'out_indices=(3,) of a plain ViT)')
            inputs = inputs[0]
        outs = [level(inputs) for level in self.levels.values()]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return tuple(outs)
