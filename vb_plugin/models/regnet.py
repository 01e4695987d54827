"""RegNetX and RegNetY as a vb_plugin backbone.

"Designing Network Design Spaces", Radosavovic et al., CVPR 2020
(https://arxiv.org/abs/2003.13678). A RegNet is generated from six numbers:
the initial width ``w0``, the slope ``wa``, the log-step ``wm``, the depth,
the group width and the bottleneck ratio; RegNetY adds squeeze-and-excitation
(SE) after the grouped 3x3 conv. Here every architecture is a
:class:`RegNetCfg` row; the per-stage widths and depths are derived from it
by the pure functions :func:`generate_block_widths`, :func:`group_stages` and
:func:`adjust_widths_groups`, as in pycls.

Module names follow mmdet's ``RegNet`` (stem ``conv1``/``bn1``, stages
``layer1``..``layer4`` of bottlenecks with ``conv1..3``/``bn1..3`` and
``downsample``), so mmdet's RegNetX state dicts load unchanged. RegNetY's SE
lives in each block as ``se`` (``se.fc1``, ``se.fc2``). Checkpoints of pycls,
timm, torchvision and HF transformers load through the rules in
:mod:`vb_plugin.weights.regnet`. The ImageNet weights of the paper come from
pycls's model zoo (MIT licence), which mmdet, timm and HF redistribute
converted; torchvision trained its own (BSD-3-Clause), except the SWAG
weights of ``regnet_y_128gf`` (CC-BY-NC-4.0).
"""
import copy
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmengine.registry import MODELS
from timm.layers import SEModule
from torch import nn

from ..layers import check_norm_cfg
from ..weights.regnet import REGNET_SOURCES
from ..checks import check_int
from .base import OptConfigType, VBBackbone
from .common import (CONV_BN_INIT_CFG, conv_norm_relu_stem, stem_norm_name,
                     zero_init_norm)

__all__ = ['REGNET_ARCHS', 'VBRegNet']

#: Block widths are quantised to multiples of this (pycls ``QUANT``).
WIDTH_QUANT = 8
ROUNDINGS = ('pycls', 'torchvision')


@dataclass(frozen=True)
class RegNetCfg:
    """The generating parameters of one RegNet (one row of the table).

    Attributes:
        w0 (int): Initial width, a positive multiple of 8.
        wa (float): Slope of the linear width function, >= 0.
        wm (float): Log-step of the width quantisation, > 1.
        group_w (int): Width of each group of the 3x3 conv.
        depth (int): Total number of blocks.
        bot_mul (float): Bottleneck ratio. Defaults to 1.0.
        se_ratio (float): SE width relative to the block input width; 0
            means no SE (RegNetX), 0.25 is RegNetY. Defaults to 0.
        rounding (str): How bottleneck widths are made divisible by the
            group width: 'pycls' (``round``; pycls, mmdet, timm, HF) or
            'torchvision' (torchvision's ``_make_divisible``). They differ
            for a few archs, e.g. regnetx_400mf. Defaults to 'pycls'.
    """
    w0: int
    wa: float
    wm: float
    group_w: int
    depth: int
    bot_mul: float = 1.0
    se_ratio: float = 0.0
    rounding: str = 'pycls'

    def __post_init__(self) -> None:
        _check_cfg(self)


def _check_cfg(cfg: RegNetCfg) -> None:
    for name in ('w0', 'group_w', 'depth'):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f'arch {name} must be an int, got {value!r} '
                            f'({type(value).__name__})')
    for name in ('wa', 'wm', 'bot_mul', 'se_ratio'):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f'arch {name} must be a number, got {value!r} '
                            f'({type(value).__name__})')
    checks = (
        ('w0', cfg.w0 > 0 and cfg.w0 % WIDTH_QUANT == 0,
         f'a positive multiple of {WIDTH_QUANT}'),
        ('wa', cfg.wa >= 0, '>= 0'),
        ('wm', cfg.wm > 1, '> 1'),
        ('group_w', cfg.group_w >= 1, '>= 1'),
        ('depth', cfg.depth >= 1, '>= 1'),
        ('bot_mul', cfg.bot_mul > 0, '> 0'),
        ('se_ratio', 0 <= cfg.se_ratio < 1, 'in [0, 1)'),
        ('rounding', cfg.rounding in ROUNDINGS, f'one of {ROUNDINGS}'),
    )
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f'arch {name}={getattr(cfg, name)!r} is not '
                             f'valid; it must be {allowed}')


def _x(w0, wa, wm, group_w, depth):
    return RegNetCfg(w0=w0, wa=wa, wm=wm, group_w=group_w, depth=depth)


def _y(w0, wa, wm, group_w, depth):
    return RegNetCfg(w0=w0, wa=wa, wm=wm, group_w=group_w, depth=depth,
                     se_ratio=0.25)


#: Every named model of the paper (its appendix tables; pycls model zoo).
REGNET_ARCHS: Dict[str, RegNetCfg] = {
    'regnetx_200mf': _x(24, 36.44, 2.49, 8, 13),
    'regnetx_400mf': _x(24, 24.48, 2.54, 16, 22),
    'regnetx_600mf': _x(48, 36.97, 2.24, 24, 16),
    'regnetx_800mf': _x(56, 35.73, 2.28, 16, 16),
    'regnetx_1.6gf': _x(80, 34.01, 2.25, 24, 18),
    'regnetx_3.2gf': _x(88, 26.31, 2.25, 48, 25),
    'regnetx_4.0gf': _x(96, 38.65, 2.43, 40, 23),
    'regnetx_6.4gf': _x(184, 60.83, 2.07, 56, 17),
    'regnetx_8.0gf': _x(80, 49.56, 2.88, 120, 23),
    'regnetx_12gf': _x(168, 73.36, 2.37, 112, 19),
    'regnetx_16gf': _x(216, 55.59, 2.1, 128, 22),
    'regnetx_32gf': _x(320, 69.86, 2.0, 168, 23),
    'regnety_200mf': _y(24, 36.44, 2.49, 8, 13),
    'regnety_400mf': _y(48, 27.89, 2.09, 8, 16),
    'regnety_600mf': _y(48, 32.54, 2.32, 16, 15),
    'regnety_800mf': _y(56, 38.84, 2.4, 16, 14),
    'regnety_1.6gf': _y(48, 20.71, 2.65, 24, 27),
    'regnety_3.2gf': _y(80, 42.63, 2.66, 24, 21),
    'regnety_4.0gf': _y(96, 31.41, 2.24, 64, 22),
    'regnety_6.4gf': _y(112, 33.22, 2.27, 72, 25),
    'regnety_8.0gf': _y(192, 76.82, 2.19, 56, 17),
    'regnety_12gf': _y(168, 73.36, 2.37, 112, 19),
    'regnety_16gf': _y(200, 106.23, 2.48, 112, 18),
    'regnety_32gf': _y(232, 115.89, 2.53, 232, 20),
}

#: torchvision's names: the paper's generating parameters with torchvision's
#: rounding, so its checkpoints fit exactly. regnet_y_128gf (SEER's
#: architecture) is beyond the paper.
TORCHVISION_ARCHS: Dict[str, RegNetCfg] = {
    **{
        tv_name: dataclasses.replace(REGNET_ARCHS[name],
                                     rounding='torchvision')
        for tv_name, name in (
            ('regnet_x_400mf', 'regnetx_400mf'),
            ('regnet_x_800mf', 'regnetx_800mf'),
            ('regnet_x_1_6gf', 'regnetx_1.6gf'),
            ('regnet_x_3_2gf', 'regnetx_3.2gf'),
            ('regnet_x_8gf', 'regnetx_8.0gf'),
            ('regnet_x_16gf', 'regnetx_16gf'),
            ('regnet_x_32gf', 'regnetx_32gf'),
            ('regnet_y_400mf', 'regnety_400mf'),
            ('regnet_y_800mf', 'regnety_800mf'),
            ('regnet_y_1_6gf', 'regnety_1.6gf'),
            ('regnet_y_3_2gf', 'regnety_3.2gf'),
            ('regnet_y_8gf', 'regnety_8.0gf'),
            ('regnet_y_16gf', 'regnety_16gf'),
            ('regnet_y_32gf', 'regnety_32gf'),
        )
    },
    'regnet_y_128gf': RegNetCfg(w0=456, wa=160.83, wm=2.52, group_w=264,
                                depth=27, se_ratio=0.25,
                                rounding='torchvision'),
}

ArchType = Union[str, Mapping, RegNetCfg]


def resolve_arch(arch: ArchType) -> RegNetCfg:
    """Turn ``arch`` (a name, a dict of generating parameters or a
    :class:`RegNetCfg`) into a :class:`RegNetCfg`.

    Raises:
        ValueError: For an unknown name, or missing or invalid parameters.
        TypeError: For another type, unknown keys or wrongly typed values.

    Example:
        >>> resolve_arch('regnetx_3.2gf').group_w
        48
        >>> resolve_arch(dict(w0=88, wa=26.31, wm=2.25, group_w=48, depth=25,
        ...                   bot_mul=1.0)) == resolve_arch('regnetx_3.2gf')
        True
    """
    if isinstance(arch, RegNetCfg):
        return arch
    if isinstance(arch, str):
        table = {**REGNET_ARCHS, **TORCHVISION_ARCHS}
        if arch not in table:
            raise ValueError(
                f'arch={arch!r} is not a known RegNet; valid names are '
                f'{list(REGNET_ARCHS)} and torchvision\'s '
                f'{list(TORCHVISION_ARCHS)}, or give a dict of the '
                'generating parameters')
        return table[arch]
    if isinstance(arch, Mapping):
        fields = [f.name for f in dataclasses.fields(RegNetCfg)]
        required = [f.name for f in dataclasses.fields(RegNetCfg)
                    if f.default is dataclasses.MISSING]
        unknown = sorted(set(arch) - set(fields))
        if unknown:
            raise TypeError(f'arch has unknown keys {unknown}; allowed keys '
                            f'are {fields}')
        missing = [k for k in required if k not in arch]
        if missing:
            raise ValueError(f'arch={dict(arch)!r} lacks {missing}; required '
                             f'keys are {required}')
        return RegNetCfg(**arch)
    raise TypeError(f'arch must be a name (str), a dict of generating '
                    f'parameters or a RegNetCfg, got {arch!r} '
                    f'({type(arch).__name__})')


def generate_block_widths(w0: int, wa: float, wm: float, depth: int,
                          quant: int = WIDTH_QUANT) -> List[int]:
    """Per-block widths: the linear function ``w0 + wa * j`` snapped to the
    nearest power of ``wm`` times ``w0`` (in log space), then to a multiple
    of ``quant``.

    Example:
        >>> generate_block_widths(24, 36.44, 2.49, 13)
        [24, 56, 152, 152, 152, 152, 368, 368, 368, 368, 368, 368, 368]
    """
    widths = []
    for j in range(depth):
        exponent = round(math.log((w0 + wa * j) / w0) / math.log(wm))
        widths.append(int(round(w0 * wm**exponent / quant) * quant))
    return widths


def group_stages(block_widths: Sequence[int]) -> Tuple[List[int], List[int]]:
    """Split per-block widths into stages: (stage widths, blocks per stage).

    Example:
        >>> group_stages([24, 56, 56, 152, 152, 152])
        ([24, 56, 152], [1, 2, 3])
    """
    widths, depths = [], []
    for w in block_widths:
        if widths and widths[-1] == w:
            depths[-1] += 1
        else:
            widths.append(w)
            depths.append(1)
    return widths, depths


def make_divisible(value: float, divisor: int, rounding: str = 'pycls') -> int:
    """Round ``value`` to a multiple of ``divisor``.

    'pycls' rounds to the nearest multiple (ties to even, as Python's
    ``round``); 'torchvision' rounds ties up, never below ``divisor``, and
    never more than 10% down.

    Example:
        >>> make_divisible(40, 16), make_divisible(40, 16, 'torchvision')
        (32, 48)
    """
    if rounding == 'pycls':
        return int(round(value / divisor) * divisor)
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def adjust_widths_groups(widths: Sequence[int], bot_mul: float, group_w: int,
                         rounding: str = 'pycls'
                         ) -> Tuple[List[int], List[int]]:
    """Make each stage's bottleneck width a multiple of its group width.

    The group width is capped at the bottleneck width; the bottleneck width
    is rounded to a multiple of it and the stage width follows.

    Returns:
        tuple: Adjusted stage widths and group widths.

    Example:
        >>> adjust_widths_groups([24, 56, 152, 368], 1.0, 8)
        ([24, 56, 152, 368], [8, 8, 8, 8])
        >>> adjust_widths_groups([32, 64], 1.0, 48)
        ([32, 48], [32, 48])
    """
    bottlenecks = [int(w * bot_mul) for w in widths]
    groups = [min(group_w, b) for b in bottlenecks]
    bottlenecks = [make_divisible(b, g, rounding)
                   for b, g in zip(bottlenecks, groups)]
    return [int(b / bot_mul) for b in bottlenecks], groups


@dataclass(frozen=True)
class RegNetStages:
    """What a :class:`RegNetCfg` derives to: one entry per stage."""
    widths: Tuple[int, ...]
    depths: Tuple[int, ...]
    group_widths: Tuple[int, ...]


def derive_stages(cfg: RegNetCfg) -> RegNetStages:
    """Per-stage widths, depths and group widths of ``cfg``.

    Example:
        >>> derive_stages(REGNET_ARCHS['regnetx_3.2gf'])
        RegNetStages(widths=(96, 192, 432, 1008), depths=(2, 6, 15, 2),
                     group_widths=(48, 48, 48, 48))
    """
    widths, depths = group_stages(
        generate_block_widths(cfg.w0, cfg.wa, cfg.wm, cfg.depth))
    widths, groups = adjust_widths_groups(widths, cfg.bot_mul, cfg.group_w,
                                          cfg.rounding)
    return RegNetStages(tuple(widths), tuple(depths), tuple(groups))


class RegNetBottleneck(nn.Module):
    """RegNet residual bottleneck: 1x1, grouped 3x3 (with the stride),
    optional SE, 1x1; projection shortcut when the shape changes.

    Module names are those of mmdet's ResNeXt ``Bottleneck`` with expansion
    1, as mmdet's ``RegNet`` builds it.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        stride (int): Stride of the 3x3 conv and the shortcut.
        group_w (int): Channels per group of the 3x3 conv.
        bot_mul (float): Bottleneck ratio.
        se_channels (int): Width of the SE gate; 0 for no SE.
        conv_cfg (dict, optional): Convolution config.
        norm_cfg (dict): Norm config.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 stride: int,
                 group_w: int,
                 bot_mul: float = 1.0,
                 se_channels: int = 0,
                 conv_cfg: OptConfigType = None,
                 norm_cfg: dict = dict(type='BN')) -> None:
        super().__init__()
        width = int(round(out_channels * bot_mul))
        self.norm1_name, norm1 = build_norm_layer(norm_cfg, width, postfix=1)
        self.norm2_name, norm2 = build_norm_layer(norm_cfg, width, postfix=2)
        self.norm3_name, norm3 = build_norm_layer(norm_cfg, out_channels,
                                                  postfix=3)
        self.conv1 = build_conv_layer(conv_cfg, in_channels, width, 1,
                                      bias=False)
        self.add_module(self.norm1_name, norm1)
        self.conv2 = build_conv_layer(conv_cfg, width, width, 3,
                                      stride=stride, padding=1,
                                      groups=width // group_w, bias=False)
        self.add_module(self.norm2_name, norm2)
        self.se = SEModule(width, rd_channels=se_channels) \
            if se_channels else None
        self.conv3 = build_conv_layer(conv_cfg, width, out_channels, 1,
                                      bias=False)
        self.add_module(self.norm3_name, norm3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                build_conv_layer(conv_cfg, in_channels, out_channels, 1,
                                 stride=stride, bias=False),
                build_norm_layer(norm_cfg, out_channels)[1])

    @property
    def norm1(self) -> nn.Module:
        return getattr(self, self.norm1_name)

    @property
    def norm2(self) -> nn.Module:
        return getattr(self, self.norm2_name)

    @property
    def norm3(self) -> nn.Module:
        return getattr(self, self.norm3_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        if self.se is not None:
            out = self.se(out)
        out = self.norm3(self.conv3(out))
        return self.relu(out + identity)


@MODELS.register_module()
class VBRegNet(VBBackbone):
    """RegNetX / RegNetY backbone: every named model of the paper, or any
    custom arch given by its generating parameters.

    Module names follow mmdet's ``RegNet``, so its state dicts load as they
    are; pycls, timm, torchvision and HF transformers checkpoints are
    converted (see :mod:`vb_plugin.weights.regnet`). Every option of the
    shared contract is described in :class:`VBBackbone`.

    Args:
        arch (str | dict | RegNetCfg): A name of :data:`REGNET_ARCHS`
            (``'regnetx_200mf'`` .. ``'regnety_32gf'``, e.g.
            ``'regnetx_3.2gf'``) or of torchvision's names,
            :data:`TORCHVISION_ARCHS` (``'regnet_x_400mf'`` ..
            ``'regnet_y_128gf'``), a dict with the keys of
            :class:`RegNetCfg`: ``w0``, ``wa``, ``wm``, ``group_w``,
            ``depth`` and optionally ``bot_mul`` (1.0), ``se_ratio`` (0.0)
            and ``rounding`` ('pycls') (mmdet's arch dicts are valid), or a
            :class:`RegNetCfg`. It must generate 1 to 4 stages.
        in_channels (int): Input image channels, a positive int. Defaults
            to 3.
        stem_channels (int): Width of the 3x3 stride-2 stem conv, a positive
            int. Defaults to 32.
        conv_cfg (dict, optional): mmcv convolution config, as for
            :class:`VBResNet`. Defaults to None.
        norm_cfg (dict): mmcv norm config, checked as for
            :class:`VBResNet` (``'LN'`` and unregistered types raise
            ``ValueError``; use ``'LN2d'``). Defaults to
            ``dict(type='BN', requires_grad=True)``.
        zero_init_residual (bool): Zero the last norm of each block at init,
            so each residual branch starts as identity. Defaults to True.
        frozen_stages (int): See :class:`VBBackbone`. The stem is ``conv1``,
            its norm and ``relu``; stage ``i`` is ``layer{i+1}``.
        norm_eval (bool): See :class:`VBBackbone`. mmdet's ``RegNet``
            defaults to ``True``; here it is ``False``, as in every VB
            backbone, and detection configs set it.
        init_cfg (dict | list[dict], optional): See :class:`VBBackbone`;
            ``None`` is the conv families' init (mmdet's, as for
            :class:`VBResNet`).
        out_indices, frozen_bn, out_norm_cfg, with_cp: See
            :class:`VBBackbone`.

    Example:
        >>> import torch
        >>> from vb_plugin import VBRegNet
        >>> model = VBRegNet(arch='regnetx_400mf').eval()
        >>> [tuple(o.shape) for o in model(torch.rand(1, 3, 64, 64))]
        [(1, 32, 16, 16), (1, 64, 8, 8), (1, 160, 4, 4), (1, 384, 2, 2)]
        >>> model.stage_blocks, model.out_strides
        ((1, 2, 7, 12), (4, 8, 16, 32))
        >>> tiny = VBRegNet(arch=dict(w0=8, wa=8.0, wm=1.5, group_w=8,
        ...                           depth=6, se_ratio=0.25),
        ...                 out_indices=(1, 2))
        >>> tiny.stage_channels, tiny.out_channels
        ((8, 16, 24, 40), (16, 24))
    """

    default_init_cfg = CONV_BN_INIT_CFG
    weight_sources = REGNET_SOURCES

    def __init__(self,
                 arch: ArchType,
                 in_channels: int = 3,
                 stem_channels: int = 32,
                 conv_cfg: OptConfigType = None,
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 zero_init_residual: bool = True,
                 **kwargs) -> None:
        self.arch = resolve_arch(arch)
        self.in_channels = in_channels
        check_int('stem_channels', stem_channels, minimum=1)
        stages = derive_stages(self.arch)
        if not 1 <= len(stages.widths) <= 4:
            raise ValueError(
                f'arch={self.arch!r} generates {len(stages.widths)} stages '
                f'(widths {list(stages.widths)}); a RegNet backbone has 1 to '
                '4 stages (strides 4 to 32)')
        self.stage_blocks = stages.depths
        self.group_widths = stages.group_widths
        self.stem_channels = stem_channels
        check_norm_cfg(norm_cfg, 'norm_cfg')
        self.conv_cfg = copy.deepcopy(conv_cfg)
        self.norm_cfg = copy.deepcopy(norm_cfg)
        self.zero_init_residual = zero_init_residual
        self.norm1_name = stem_norm_name(norm_cfg, stem_channels)
        super().__init__(
            stage_channels=stages.widths,
            stage_strides=[4 * 2**i for i in range(len(stages.widths))],
            **kwargs)

    def stage_module_names(self, i: int) -> Tuple[str, ...]:
        return (f'layer{i + 1}', )

    def build_stem(self) -> Dict[str, nn.Module]:
        return conv_norm_relu_stem(self.conv_cfg, self.norm_cfg,
                                   self.in_channels, self.stem_channels,
                                   kernel_size=3)

    def build_stage(self, i: int) -> Dict[str, nn.Module]:
        in_channels = self.stem_channels if i == 0 \
            else self.stage_channels[i - 1]
        out_channels = self.stage_channels[i]
        blocks = []
        for j in range(self.stage_blocks[i]):
            block_in = in_channels if j == 0 else out_channels
            blocks.append(
                RegNetBottleneck(
                    block_in,
                    out_channels,
                    stride=2 if j == 0 else 1,
                    group_w=self.group_widths[i],
                    bot_mul=self.arch.bot_mul,
                    # NOTE: pycls sizes the SE from the block's input width,
                    # not from the bottleneck width it gates.
                    se_channels=int(round(block_in * self.arch.se_ratio)),
                    conv_cfg=self.conv_cfg,
                    norm_cfg=self.norm_cfg))
        return {f'layer{i + 1}': nn.Sequential(*blocks)}

    def load_hint(self, source: str) -> str:
        """torchvision rounds bottleneck widths its own way: its weights
        fit only the torchvision archs; name the twin of this one."""
        if source != 'torchvision' or self.arch.rounding == 'torchvision':
            return ''
        twins = [name for name, cfg in TORCHVISION_ARCHS.items()
                 if dataclasses.replace(cfg, rounding=self.arch.rounding)
                 == self.arch]
        twin = (f"arch={twins[0]!r} is torchvision's form of this arch"
                if twins else "use one of torchvision's archs "
                f'{list(TORCHVISION_ARCHS)}')
        return ('torchvision rounds RegNet widths its own way, so its '
                f"checkpoints fit torchvision's archs only: {twin}")

    def init_default_weights(self) -> None:
        if not self.zero_init_residual:
            return
        for m in self.modules():
            if isinstance(m, RegNetBottleneck):
                zero_init_norm(m.norm3)
