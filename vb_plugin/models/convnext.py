"""ConvNeXt V1 and V2 as a vb_plugin backbone.

"A ConvNet for the 2020s", Liu et al., CVPR 2022, and "ConvNeXt V2:
Co-designing and Scaling ConvNets with Masked Autoencoders", Woo et al., CVPR
2023 (V2 adds Global Response Normalization in the MLP and drops layer
scale). The atto/femto/pico/nano sizes are timm's.

Module names are mmpretrain's ``ConvNeXt`` names (``downsample_layers.{i}``,
``stages.{i}.{j}.depthwise_conv`` ...), so mmpretrain and mmdet-trained
detector checkpoints load unchanged and mmdet's
``LearningRateDecayOptimizerConstructor`` recognises every parameter. Weights
in the official facebookresearch, timm and HF transformers layouts load
through the rules in :mod:`vb_plugin.weights.convnext`. The official V1
weights are MIT licensed, the official V2 weights CC-BY-NC 4.0 (not for
commercial use), timm's own atto..nano weights Apache-2.0.
"""
import copy
import math
import numbers
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.registry import MODELS
from timm.layers import DropPath
from torch import nn

from ..layers import check_norm_cfg
from ..weights.convnext import CONVNEXT_SOURCES
from .base import OptConfigType, VBBackbone

__all__ = ['CONVNEXT_ARCHS', 'VBConvNeXt']


@dataclass(frozen=True)
class ConvNeXtArch:
    """One row of the ConvNeXt table: blocks and channels per stage."""
    depths: Tuple[int, ...]
    channels: Tuple[int, ...]


_SIZES = {
    'atto': ConvNeXtArch((2, 2, 6, 2), (40, 80, 160, 320)),
    'femto': ConvNeXtArch((2, 2, 6, 2), (48, 96, 192, 384)),
    'pico': ConvNeXtArch((2, 2, 6, 2), (64, 128, 256, 512)),
    'nano': ConvNeXtArch((2, 2, 8, 2), (80, 160, 320, 640)),
    'tiny': ConvNeXtArch((3, 3, 9, 3), (96, 192, 384, 768)),
    'small': ConvNeXtArch((3, 3, 27, 3), (96, 192, 384, 768)),
    'base': ConvNeXtArch((3, 3, 27, 3), (128, 256, 512, 1024)),
    'large': ConvNeXtArch((3, 3, 27, 3), (192, 384, 768, 1536)),
    'xlarge': ConvNeXtArch((3, 3, 27, 3), (256, 512, 1024, 2048)),
}

#: Named sizes per version. V2 has no published xlarge but adds huge.
CONVNEXT_ARCHS: Dict[str, Dict[str, ConvNeXtArch]] = {
    'v1': dict(_SIZES),
    'v2': {
        **{k: v
           for k, v in _SIZES.items() if k != 'xlarge'},
        'huge': ConvNeXtArch((3, 3, 27, 3), (352, 704, 1408, 2816)),
    },
}

#: Layer-scale init value when ``layer_scale_init_value`` is not given.
_DEFAULT_LAYER_SCALE = {'v1': 1e-6, 'v2': 0.}


def resolve_arch(arch: Union[str, dict], version: str) -> ConvNeXtArch:
    """Turn ``arch`` (a name or a dict) into a checked :class:`ConvNeXtArch`.

    Args:
        arch (str | dict): A size name of ``CONVNEXT_ARCHS[version]``, or a
            dict with ``depths`` and ``channels`` (alias ``widths``), four
            positive ints each.
        version (str): 'v1' or 'v2'.

    Example:
        >>> resolve_arch('tiny', 'v1')
        ConvNeXtArch(depths=(3, 3, 9, 3), channels=(96, 192, 384, 768))
        >>> resolve_arch(dict(depths=[1, 1, 2, 1], widths=[8, 16, 32, 64]),
        ...              'v2').channels
        (8, 16, 32, 64)
    """
    table = CONVNEXT_ARCHS[version]
    if isinstance(arch, str):
        if arch not in table:
            other = [v for v, t in CONVNEXT_ARCHS.items() if arch in t]
            hint = f' ({arch!r} exists for version={other[0]!r})' \
                if other else ''
            raise ValueError(
                f'arch={arch!r} is not a ConvNeXt {version.upper()} size'
                f'{hint}; valid names for version={version!r} are '
                f'{list(table)}, or a dict with depths and channels')
        return table[arch]
    if not isinstance(arch, dict):
        raise TypeError(f'arch must be a size name (str) or a dict with '
                        f'depths and channels, got {arch!r} '
                        f'({type(arch).__name__})')
    keys = set(arch)
    width_key = 'channels' if 'channels' in arch else 'widths'
    if keys not in ({'depths', 'channels'}, {'depths', 'widths'}):
        raise ValueError(f'arch dict must have exactly the keys depths and '
                         f'channels (or widths), got {sorted(keys)}')
    values = {}
    for key in ('depths', width_key):
        value = arch[key]
        if isinstance(value, (str, bytes)) or not isinstance(
                value, Sequence) or len(value) != 4 or not all(
                    isinstance(v, numbers.Integral) and not isinstance(
                        v, bool) and v > 0 for v in value):
            raise ValueError(f'arch[{key!r}] must be 4 positive ints (one '
                             f'per stage), got {value!r}')
        values[key] = tuple(int(v) for v in value)
    return ConvNeXtArch(values['depths'], values[width_key])


def drop_path_rates(drop_path_rate: float,
                    depths: Sequence[int]) -> Tuple[Tuple[float, ...], ...]:
    """Stochastic depth per block: linear from 0 over all blocks, per stage.

    Example:
        >>> drop_path_rates(0.3, (1, 2, 1))
        ((0.0,), (0.1, 0.2), (0.3,))
    """
    # NOTE: plain floats (not torch.linspace) so that building under
    # ``torch.device('meta')`` works.
    total = sum(depths)
    rates = [round(drop_path_rate * k / max(total - 1, 1), 10)
             for k in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(tuple(rates[start:start + d]))
        start += d
    return tuple(out)


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt V2), mmpretrain's names.

    Args:
        channels (int): Number of channels.
        eps (float): Added to the mean norm. Defaults to 1e-6.

    Example:
        >>> grn = GRN(8)
        >>> x = torch.randn(2, 5, 5, 8)
        >>> torch.equal(grn(x), x)  # zero-initialised: identity
        True
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
        """``channel_dim`` is -1 for NHWC and 1 for NCHW inputs."""
        if channel_dim == -1:
            spatial, shape = (1, 2), (1, 1, 1, -1)
        else:
            spatial, shape = (2, 3), (1, -1, 1, 1)
        gx = torch.linalg.vector_norm(x, 2, dim=spatial, keepdim=True)
        nx = gx / (gx.mean(dim=channel_dim, keepdim=True) + self.eps)
        return x + torch.addcmul(
            self.beta.view(shape), self.gamma.view(shape), x * nx)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise conv, norm, MLP (4x), layer scale.

    The MLP weights are ``nn.Linear`` (mmpretrain's and the official keys).
    Two equivalent forms compute it:

    * default: permute to NHWC, LayerNorm and ``nn.Linear`` (as mmpretrain
      and the official code).
    * ``conv_mlp=True``: the same weights used as 1x1 convolutions on NCHW.
      In ``channels_last`` memory this needs no copies and is the faster
      inference form (:meth:`VBConvNeXt.set_fast_layers`); it is also
      the form a norm other than LayerNorm (e.g. BN) needs.

    Args:
        channels (int): Channels of the block.
        norm_cfg (dict): Config of the norm after the depthwise conv.
        mlp_ratio (float): Hidden width of the MLP. Defaults to 4.
        drop_path_rate (float): Stochastic depth rate. Defaults to 0.
        layer_scale_init_value (float): Initial layer scale; 0 disables it.
            Defaults to 1e-6.
        use_grn (bool): Global Response Norm in the MLP (V2). Defaults to
            False.

    Example:
        >>> block = ConvNeXtBlock(16, dict(type='LN2d', eps=1e-6)).eval()
        >>> x = torch.randn(1, 16, 8, 8)
        >>> ref = block(x)
        >>> block.conv_mlp = True
        >>> bool((block(x) - ref).abs().max() < 1e-5)
        True
    """

    def __init__(self,
                 channels: int,
                 norm_cfg: dict,
                 mlp_ratio: float = 4.,
                 drop_path_rate: float = 0.,
                 layer_scale_init_value: float = 1e-6,
                 use_grn: bool = False) -> None:
        super().__init__()
        hidden = int(mlp_ratio * channels)
        self.depthwise_conv = nn.Conv2d(channels, channels, kernel_size=7,
                                        padding=3, groups=channels)
        self.norm = build_norm_layer(norm_cfg, channels)[1]
        self.pointwise_conv1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.grn = GRN(hidden) if use_grn else None
        self.pointwise_conv2 = nn.Linear(hidden, channels)
        self.gamma = nn.Parameter(
            layer_scale_init_value * torch.ones(channels)) \
            if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path_rate) \
            if drop_path_rate > 0 else nn.Identity()
        # NOTE: a LayerNorm can run on NHWC directly; any other norm (BN,
        # GN) needs NCHW, hence the conv form.
        self.ln_channels_last = isinstance(self.norm, nn.LayerNorm)
        self.conv_mlp = not self.ln_channels_last

    def _mlp_conv(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        w1, w2 = self.pointwise_conv1.weight, self.pointwise_conv2.weight
        x = F.conv2d(x, w1.view(*w1.shape, 1, 1), self.pointwise_conv1.bias)
        x = self.act(x)
        if self.grn is not None:
            x = self.grn(x, channel_dim=1)
        return F.conv2d(x, w2.view(*w2.shape, 1, 1), self.pointwise_conv2.bias)

    def _mlp_linear(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.norm.normalized_shape, self.norm.weight,
                         self.norm.bias, self.norm.eps)
        x = self.act(self.pointwise_conv1(x))
        if self.grn is not None:
            x = self.grn(x, channel_dim=-1)
        return self.pointwise_conv2(x).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.depthwise_conv(x)
        x = self._mlp_conv(x) if self.conv_mlp else self._mlp_linear(x)
        if self.gamma is not None:
            x = x * self.gamma.view(1, -1, 1, 1)
        return shortcut + self.drop_path(x)


@MODELS.register_module()
class VBConvNeXt(VBBackbone):
    """ConvNeXt V1/V2 backbone with mmpretrain's module names.

    Stage 0 of the contract is ``stages.0`` behind the stem
    ``downsample_layers.0`` (4x4 stride-4 conv + norm); stage ``i > 0`` is
    ``downsample_layers.i`` (norm + 2x2 stride-2 conv) then ``stages.i``.
    ``frozen_stages=0`` therefore freezes the patchify stem only. Every
    option of the shared contract is described in :class:`VBBackbone`.

    Args:
        arch (str | dict): A size: ``'atto'``, ``'femto'``, ``'pico'``,
            ``'nano'``, ``'tiny'``, ``'small'``, ``'base'``, ``'large'``,
            plus ``'xlarge'`` (V1 only) or ``'huge'`` (V2 only); or a dict
            with exactly ``depths`` and ``channels`` (alias ``widths``), 4
            positive ints each. Defaults to 'tiny'.
        version (str): ``'v1'`` or ``'v2'``. V2 turns on GRN and turns off
            layer scale unless ``use_grn`` / ``layer_scale_init_value`` say
            otherwise. Defaults to 'v1'.
        in_channels (int): Input image channels. Defaults to 3.
        norm_cfg (dict): Norm of the stem, the downsampling layers and the
            blocks (every published model has the default); checked as
            ``out_norm_cfg`` is (``'LN'``, which would normalise the width
            of NCHW maps, and unregistered types raise ``ValueError``). A
            norm other than a LayerNorm (e.g. BN) runs the blocks in their
            1x1-conv form. Defaults to ``dict(type='LN2d', eps=1e-6)``.
        drop_path_rate (float): Stochastic depth of the last block, rising
            linearly from 0 over all blocks of the full architecture (built
            or not). Must be in [0, 1). Defaults to 0.0.
        layer_scale_init_value (float, optional): Initial layer scale.
            ``None`` means 1e-6 for V1 and 0 for V2; 0 disables layer scale
            (no ``gamma`` parameters). mmdet's ConvNeXt configs use 1.0.
            Defaults to None.
        use_grn (bool, optional): Global Response Norm in every block.
            ``None`` means ``True`` for V2 and ``False`` for V1. Defaults to
            None.
        out_norm_cfg (dict, optional): See :class:`VBBackbone`. On by
            default, as mmpretrain's ConvNeXt (with
            ``gap_before_final_norm=False``) and HF's ``ConvNextBackbone``
            do for detection; ``None`` gives raw stage outputs, as timm's
            ``features_only``. Defaults to ``dict(type='LN2d', eps=1e-6)``.
        frozen_stages (int): See :class:`VBBackbone`. The stem is
            ``downsample_layers.0``; stage 0 is ``stages.0``, stage
            ``i > 0`` is ``downsample_layers.i`` plus ``stages.i``.
        norm_eval (bool): See :class:`VBBackbone`; it acts only on batch
            norms, e.g. with ``norm_cfg=dict(type='BN')``.
        init_cfg (dict | list[dict], optional): See :class:`VBBackbone`.
            ``None`` is mmpretrain's init: truncated normal (std 0.02, bias
            0) for ``Conv2d`` and ``Linear``, constant 1 for ``LayerNorm``.
        out_indices, frozen_bn, with_cp: See :class:`VBBackbone`.

    Example:
        >>> import torch
        >>> from vb_plugin import VBConvNeXt
        >>> model = VBConvNeXt(arch='atto', out_indices=(1, 3)).eval()
        >>> [tuple(o.shape) for o in model(torch.rand(1, 3, 64, 64))]
        [(1, 80, 8, 8), (1, 320, 2, 2)]
        >>> model.out_channels, model.out_strides, model.lr_decay_num_layers
        ((80, 320), (8, 32), 5)
    """

    weight_sources = CONVNEXT_SOURCES
    default_init_cfg = (
        dict(type='TruncNormal', layer=['Conv2d', 'Linear'], std=.02, bias=0.),
        dict(type='Constant', layer=['LayerNorm'], val=1., bias=0.),
    )

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 version: str = 'v1',
                 in_channels: int = 3,
                 norm_cfg: dict = dict(type='LN2d', eps=1e-6),
                 drop_path_rate: float = 0.,
                 layer_scale_init_value: Optional[float] = None,
                 use_grn: Optional[bool] = None,
                 out_norm_cfg: OptConfigType = dict(type='LN2d', eps=1e-6),
                 **kwargs) -> None:
        if version not in CONVNEXT_ARCHS:
            raise ValueError(f'version={version!r} is not valid; use '
                             f"{' or '.join(map(repr, CONVNEXT_ARCHS))}")
        self.arch = resolve_arch(arch, version)
        self.version = version
        if isinstance(drop_path_rate, bool) or not isinstance(
                drop_path_rate, numbers.Real) or not 0 <= drop_path_rate < 1:
            raise ValueError(f'drop_path_rate must be a float in [0, 1), got '
                             f'{drop_path_rate!r}')
        if layer_scale_init_value is None:
            layer_scale_init_value = _DEFAULT_LAYER_SCALE[version]
        if isinstance(layer_scale_init_value, bool) or not isinstance(
                layer_scale_init_value,
                numbers.Real) or layer_scale_init_value < 0:
            raise ValueError(f'layer_scale_init_value must be a float >= 0 '
                             f'(0 disables layer scale), got '
                             f'{layer_scale_init_value!r}')
        if use_grn is None:
            use_grn = version == 'v2'
        check_norm_cfg(norm_cfg, 'norm_cfg')
        self.in_channels = in_channels
        self.norm_cfg = copy.deepcopy(norm_cfg)
        self.drop_path_rate = float(drop_path_rate)
        self.layer_scale_init_value = float(layer_scale_init_value)
        self.use_grn = bool(use_grn)
        self.dp_rates = drop_path_rates(self.drop_path_rate, self.arch.depths)
        super().__init__(
            stage_channels=self.arch.channels,
            stage_strides=(4, 8, 16, 32),
            out_norm_cfg=out_norm_cfg,
            **kwargs)

    # ------------------------------------------------------------------
    # Architecture.
    def stage_module_names(self, i: int) -> Tuple[str, ...]:
        return ('stages.0', ) if i == 0 else (f'downsample_layers.{i}',
                                              f'stages.{i}')

    def build_stem(self) -> Dict[str, nn.Module]:
        c0 = self.arch.channels[0]
        return {
            'downsample_layers.0':
            nn.Sequential(
                nn.Conv2d(self.in_channels, c0, kernel_size=4, stride=4),
                build_norm_layer(self.norm_cfg, c0)[1])
        }

    def build_stage(self, i: int) -> Dict[str, nn.Module]:
        channels = self.arch.channels
        modules = {}
        if i > 0:
            modules[f'downsample_layers.{i}'] = nn.Sequential(
                build_norm_layer(self.norm_cfg, channels[i - 1])[1],
                nn.Conv2d(channels[i - 1], channels[i], kernel_size=2,
                          stride=2))
        modules[f'stages.{i}'] = nn.Sequential(*[
            ConvNeXtBlock(channels[i], self.norm_cfg,
                          drop_path_rate=rate,
                          layer_scale_init_value=self.layer_scale_init_value,
                          use_grn=self.use_grn)
            for rate in self.dp_rates[i]
        ])
        return modules

    # ------------------------------------------------------------------
    # Faster layers (the contract's hook).
    def set_fast_layers(self, enable: bool = True) -> None:
        """Every block's MLP as 1x1 convs (``conv_mlp``): faster in
        ``channels_last`` and in ONNX Runtime (measured on ConvNeXt-T at
        640x640, 2 threads, interleaved medians: ONNX Runtime fp32 400 vs
        437 ms and int8 216 vs 263 ms for the Linear form; OpenVINO fp32,
        bf16 and int8 within 2%).

        Example:
            >>> model = VBConvNeXt(arch=dict(depths=[1, 1, 1, 1],
            ...                    channels=[8, 16, 32, 64])).eval()
            >>> model.set_fast_layers()
            >>> all(m.conv_mlp for m in model.modules()
            ...     if isinstance(m, ConvNeXtBlock))
            True
        """
        # NOTE: blocks whose LayerNorm runs on NCHW have only the conv form.
        for block in self.modules():
            if isinstance(block, ConvNeXtBlock):
                block.conv_mlp = enable or not block.ln_channels_last

    # ------------------------------------------------------------------
    # Layer-wise learning-rate decay (mmdet's ConvNeXt constructor).
    @property
    def lr_decay_num_layers(self) -> int:
        """``paramwise_cfg['num_layers']`` of mmdet's
        ``LearningRateDecayOptimizerConstructor`` for this architecture:
        3 + ceil(stage-2 blocks / 3), e.g. 6 for tiny, 12 for small..huge."""
        return 3 + math.ceil(self.arch.depths[2] / 3)

    def lr_decay_layer_id(self, name: str) -> int:
        """Layer id (0 = stem .. ``lr_decay_num_layers + 1``) that mmdet's
        layer-wise decay gives to parameter ``name`` of this backbone (a name
        relative to the backbone, e.g. 'stages.2.4.gamma'). Output norms and
        anything outside the backbone get ``lr_decay_num_layers + 1``.

        Example:
            >>> model = VBConvNeXt(arch='tiny')
            >>> [model.lr_decay_layer_id(n) for n in (
            ...     'downsample_layers.0.0.weight', 'stages.0.1.gamma',
            ...     'stages.2.4.gamma', 'stages.3.0.gamma',
            ...     'out_norms.1.bias')]
            [0, 1, 4, 6, 7]
        """
        from mmdet.engine.optimizers.layer_decay_optimizer_constructor \
            import get_layer_id_for_convnext
        return get_layer_id_for_convnext(f'backbone.{name}',
                                         self.lr_decay_num_layers)

    def init_default_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, ConvNeXtBlock):
                if m.gamma is not None:
                    nn.init.constant_(m.gamma, self.layer_scale_init_value)
                if m.grn is not None:
                    nn.init.zeros_(m.grn.gamma)
                    nn.init.zeros_(m.grn.beta)
