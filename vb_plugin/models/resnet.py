"""ResNet, ResNet-V1c and ResNet-V1d as a vb_plugin backbone.

"Deep Residual Learning for Image Recognition", He et al., CVPR 2016, and
"Bag of Tricks for Image Classification with Convolutional Neural Networks",
He et al., CVPR 2019 (the V1c deep stem and V1d average-pool shortcut).

The blocks are mmdet's own ``BasicBlock``/``Bottleneck`` and ``ResLayer``, so
module names, state-dict keys and numerics are those of mmdet's ``ResNet``:
its checkpoints load unchanged. Weights in torchvision, timm and HF
transformers layouts load through the rules in
:mod:`vb_plugin.weights.resnet`. The torchvision and timm ImageNet weights are
BSD-3-Clause and Apache-2.0 licensed respectively.
"""
import copy
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Type

import torch
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck
from mmdet.models.layers import ResLayer
from mmengine.registry import MODELS
from torch import nn

from ..layers import check_norm_cfg
from ..weights.resnet import RESNET_SOURCES
from ..checks import check_int
from .base import OptConfigType, VBBackbone
from .common import (CONV_BN_INIT_CFG, conv_norm_relu_stem, stem_norm_name,
                     zero_init_norm)

__all__ = ['DCNInputSizeError', 'RESNET_ARCHS', 'VBResNet']

#: mmcv's DeformConv2dPack (DCN v1) refuses maps smaller than its kernel.
DCN_SIZE_ERROR = 'input image is smaller than kernel'


class DCNInputSizeError(ValueError, RuntimeError):
    """mmcv's DCN (v1) got a feature map smaller than its 3x3 kernel.

    A ``ValueError`` (bad input size) that is also the ``RuntimeError``
    mmcv raises, so code that catches mmcv's error still catches it.
    """


@dataclass(frozen=True)
class ResNetArch:
    """One row of the ResNet table: block type and blocks per stage."""
    block: Type[nn.Module]
    stage_blocks: Tuple[int, ...]


RESNET_ARCHS = {
    18: ResNetArch(BasicBlock, (2, 2, 2, 2)),
    34: ResNetArch(BasicBlock, (3, 4, 6, 3)),
    50: ResNetArch(Bottleneck, (3, 4, 6, 3)),
    101: ResNetArch(Bottleneck, (3, 4, 23, 3)),
    152: ResNetArch(Bottleneck, (3, 8, 36, 3)),
}


def _check_per_stage(name: str, value: Sequence, num_stages: int) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) \
            or len(value) != num_stages:
        raise ValueError(f'{name} must have one entry per stage '
                         f'({num_stages}), got {value!r}')
    return tuple(value)


@MODELS.register_module()
class VBResNet(VBBackbone):
    """ResNet backbone (V1, V1c with ``deep_stem``, V1d with ``avg_down``).

    Module names follow mmdet's ``ResNet``, so its state dicts load as they
    are. Every option of the shared contract is described in
    :class:`VBBackbone`.

    Args:
        depth (int): 18, 34, 50, 101 or 152; anything else raises
            ``ValueError``. 18 and 34 use ``BasicBlock`` (expansion 1), the
            others ``Bottleneck`` (expansion 4).
        in_channels (int): Input image channels. Defaults to 3.
        stem_channels (int, optional): Width of the stem. ``None`` means
            ``base_channels``. Defaults to None.
        base_channels (int): Width of the first stage: stage ``i`` outputs
            ``base_channels * 2**i * expansion`` channels. Defaults to 64.
        num_stages (int): Stages of the architecture, 1 to 4 (as mmdet);
            ``out_indices`` and ``frozen_stages`` are checked against it.
            Defaults to 4.
        strides (Sequence[int], optional): Stride of the first block of each
            stage, one entry per stage. ``None`` means ``(1, 2, 2, 2)`` cut
            to ``num_stages``. ``out_strides`` follows. Defaults to None.
        dilations (Sequence[int], optional): Dilation of each stage, one
            entry per stage. ``None`` means all 1. With
            ``strides=(1, 2, 1, 1)`` and ``dilations=(1, 1, 2, 4)`` the
            output strides are ``(4, 8, 8, 8)``. Defaults to None.
        contract_dilation (bool): Halve the dilation of the first block of
            every stage whose dilation is > 1, as mmseg's ResNetV1c configs
            do (every one sets ``contract_dilation=True``; e.g. DeepLabV3+
            R-50-D8: stage 3 starts with dilation 1, stage 4 with 2).
            ``False`` is mmdet's behaviour, and mmseg's own default: every
            block gets the stage's dilation. Weights are the same either
            way; outputs are not. Must be a bool (else ``TypeError``).
            Defaults to False.
        style (str): ``'pytorch'`` puts the stride on the 3x3 conv,
            ``'caffe'`` on the first 1x1 conv; anything else raises
            ``ValueError``. Defaults to 'pytorch'.
        deep_stem (bool): Three 3x3 convs as the stem (V1c). Defaults to
            False.
        avg_down (bool): Average pool before the shortcut conv (V1d).
            Defaults to False.
        conv_cfg (dict, optional): mmcv convolution config. Defaults to
            None.
        norm_cfg (dict): mmcv norm config: BN, SyncBN, GN, ...; checked as
            ``out_norm_cfg`` is (:func:`vb_plugin.layers.check_norm_cfg`:
            ``'LN'`` and unregistered types raise ``ValueError``; use
            ``'LN2d'``). Defaults to ``dict(type='BN', requires_grad=True)``.
        dcn (dict, optional): Deformable conv config for the 3x3 convs, e.g.
            ``dict(type='DCNv2', deform_groups=1)``. Bottleneck depths (50,
            101, 152) only, else ``ValueError``. mmcv's ``'DCN'`` (v1) needs
            every DCN stage to output at least 3x3 (65x65 input pixels with
            DCN at stride 32); a smaller input raises ``ValueError`` naming
            the stage, the sizes and the minimum (``'DCNv2'`` has no such
            limit). The offset convs start at zero and keep their initial
            values when an ImageNet checkpoint is loaded. Defaults to None.
        stage_with_dcn (Sequence[bool], optional): Which stages use ``dcn``,
            one bool per stage. ``None`` means every stage (mmdet's default,
            ``(False, False, False, False)``, means none). Ignored without
            ``dcn``. Defaults to None.
        zero_init_residual (bool): Zero the last norm of each block, so each
            residual branch starts as identity. Defaults to True.
        frozen_stages (int): See :class:`VBBackbone`. The stem is ``conv1``,
            its norm, ``relu`` and ``maxpool`` (``stem`` and ``maxpool``
            with ``deep_stem``); stage ``i`` is ``layer{i+1}``.
        norm_eval (bool): See :class:`VBBackbone`. mmdet's ``ResNet``
            defaults to ``True``.
        init_cfg (dict | list[dict], optional): See :class:`VBBackbone`.
            ``None`` is mmdet's init: Kaiming for ``Conv2d``, constant 1 for
            batch and group norms.
        out_indices, frozen_bn, out_norm_cfg, with_cp: See
            :class:`VBBackbone`.

    Example:
        >>> import torch
        >>> from vb_plugin import VBResNet
        >>> model = VBResNet(depth=18, out_indices=(1, 3)).eval()
        >>> [tuple(o.shape) for o in model(torch.rand(1, 3, 64, 64))]
        [(1, 128, 8, 8), (1, 512, 2, 2)]
        >>> model.out_channels, model.out_strides
        ((128, 512), (8, 32))
    """

    default_init_cfg = CONV_BN_INIT_CFG
    weight_sources = RESNET_SOURCES

    def __init__(self,
                 depth: int,
                 in_channels: int = 3,
                 stem_channels: Optional[int] = None,
                 base_channels: int = 64,
                 num_stages: int = 4,
                 strides: Optional[Sequence[int]] = None,
                 dilations: Optional[Sequence[int]] = None,
                 contract_dilation: bool = False,
                 style: str = 'pytorch',
                 deep_stem: bool = False,
                 avg_down: bool = False,
                 conv_cfg: OptConfigType = None,
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 dcn: OptConfigType = None,
                 stage_with_dcn: Optional[Sequence[bool]] = None,
                 zero_init_residual: bool = True,
                 **kwargs) -> None:
        if depth not in RESNET_ARCHS:
            raise ValueError(f'depth={depth!r} is not a ResNet depth; valid '
                             f'values are {sorted(RESNET_ARCHS)}')
        if num_stages not in (1, 2, 3, 4):
            raise ValueError(
                f'num_stages={num_stages!r} is out of range; valid values '
                'are 1, 2, 3, 4')
        if style not in ('pytorch', 'caffe'):
            raise ValueError(f"style={style!r} is not valid; use 'pytorch' "
                             "or 'caffe'")
        self.in_channels = in_channels
        check_int('base_channels', base_channels, minimum=1)
        if stem_channels is not None:
            check_int('stem_channels', stem_channels, minimum=2)
        self.arch = RESNET_ARCHS[depth]
        if dcn is not None and self.arch.block is not Bottleneck:
            raise ValueError(f'dcn is only supported for Bottleneck depths '
                             f'(50, 101, 152), got depth={depth}')
        self.depth = depth
        self.base_channels = base_channels
        self.stem_channels = stem_channels or base_channels
        self.strides = _check_per_stage(
            'strides', (1, 2, 2, 2)[:num_stages] if strides is None else
            strides, num_stages)
        self.dilations = _check_per_stage(
            'dilations', (1, ) * num_stages if dilations is None else
            dilations, num_stages)
        self.stage_with_dcn = _check_per_stage(
            'stage_with_dcn', (True, ) * num_stages
            if stage_with_dcn is None else stage_with_dcn, num_stages)
        if not isinstance(contract_dilation, bool):
            raise TypeError(f'contract_dilation must be True or False, got '
                            f'{contract_dilation!r}')
        self.contract_dilation = contract_dilation
        self.style = style
        self.deep_stem = deep_stem
        self.avg_down = avg_down
        check_norm_cfg(norm_cfg, 'norm_cfg')
        self.conv_cfg = copy.deepcopy(conv_cfg)
        self.norm_cfg = copy.deepcopy(norm_cfg)
        self.dcn = copy.deepcopy(dcn)
        self.zero_init_residual = zero_init_residual
        self.norm1_name = stem_norm_name(norm_cfg, self.stem_channels)
        if dcn is not None:
            # NOTE: a checkpoint without DCN (e.g. ImageNet weights) has no
            # offset convs; they start at zero, i.e. as a plain conv.
            self.new_layer_patterns = self.new_layer_patterns + (
                r'\.conv_offset\.', )

        expansion = self.arch.block.expansion
        stage_channels, stage_strides, stride = [], [], 4
        for i in range(num_stages):
            stride *= self.strides[i]
            stage_channels.append(base_channels * 2**i * expansion)
            stage_strides.append(stride)
        super().__init__(
            stage_channels=stage_channels,
            stage_strides=stage_strides,
            **kwargs)

    def stage_module_names(self, i: int) -> Tuple[str, ...]:
        return (f'layer{i + 1}', )

    def build_stem(self) -> Dict[str, nn.Module]:
        half = self.stem_channels // 2
        if self.deep_stem:
            layers = []
            for cin, cout, stride in ((self.in_channels, half, 2),
                                      (half, half, 1),
                                      (half, self.stem_channels, 1)):
                layers += [
                    build_conv_layer(self.conv_cfg, cin, cout, 3,
                                     stride=stride, padding=1, bias=False),
                    build_norm_layer(self.norm_cfg, cout)[1],
                    nn.ReLU(inplace=True)
                ]
            stem = {'stem': nn.Sequential(*layers)}
        else:
            stem = conv_norm_relu_stem(self.conv_cfg, self.norm_cfg,
                                       self.in_channels, self.stem_channels,
                                       kernel_size=7)
        return dict(stem, maxpool=nn.MaxPool2d(kernel_size=3, stride=2,
                                               padding=1))

    def build_stage(self, i: int) -> Dict[str, nn.Module]:
        expansion = self.arch.block.expansion
        planes = self.base_channels * 2**i
        inplanes = (self.stem_channels
                    if i == 0 else self.base_channels * 2**(i - 1) * expansion)

        def res_layer(num_blocks: int, dilation: int) -> ResLayer:
            return ResLayer(
                block=self.arch.block,
                inplanes=inplanes,
                planes=planes,
                num_blocks=num_blocks,
                stride=self.strides[i],
                dilation=dilation,
                style=self.style,
                avg_down=self.avg_down,
                conv_cfg=self.conv_cfg,
                norm_cfg=self.norm_cfg,
                # NOTE: mmdet's Bottleneck pops keys from its dcn dict, so
                # each stage gets its own copy.
                dcn=copy.deepcopy(self.dcn) if self.stage_with_dcn[i] else
                None)

        dilation = self.dilations[i]
        layer = res_layer(self.arch.stage_blocks[i], dilation)
        if self.contract_dilation and dilation > 1:
            # NOTE: mmdet's ResLayer gives every block the same dilation;
            # mmseg's contracts the first one. Only the first block (with
            # the stage's stride and shortcut) is rebuilt, so module names
            # and parameter shapes stay those of mmdet's ResNet.
            layer[0] = res_layer(1, dilation // 2)[0]
        return {f'layer{i + 1}': layer}

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # NOTE: try costs nothing when nothing is raised (Python >= 3.11).
        try:
            return super()._run(module, x)
        except RuntimeError as err:
            if self.dcn is None or DCN_SIZE_ERROR not in str(err):
                raise
            raise self._dcn_size_error(module, x) from err

    def _dcn_size_error(self, stage: nn.Module,
                        x: torch.Tensor) -> DCNInputSizeError:
        """mmcv's "input image is smaller than kernel", with the stage, the
        option and the sizes that explain it."""
        i = next(j for j in range(self.num_built_stages)
                 if self.get_submodule(self._stage_names[j][0]) is stage)
        h, w = x.shape[-2:]
        s = self.strides[i]
        # Every conv, pool and shortcut of the stem and stages maps a side n
        # to ceil(n / stride): a stage of total stride S outputs
        # ceil(side / S), which is >= 3 from side 2 * S + 1 on.
        deepest = max(self.stage_strides[j]
                      for j in range(self.num_built_stages)
                      if self.stage_with_dcn[j])
        return DCNInputSizeError(
            f'VBResNet stage {i} (layer{i + 1}) has deformable convs '
            f'(dcn={dict(self.dcn)!r}, stage_with_dcn[{i}]=True), and '
            f"mmcv's {self.dcn['type']} (DeformConv2dPack) needs feature "
            f'maps of at least 3x3: this stage got a {h}x{w} map and '
            f'makes it {-(-h // s)}x{-(-w // s)}. Give inputs of at least '
            f'{2 * deepest + 1}x{2 * deepest + 1} pixels (DCN up to stride '
            f'{deepest}), leave stage {i} out of stage_with_dcn, or use '
            "dcn=dict(type='DCNv2', ...), which has no such limit")

    def init_default_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                if self.zero_init_residual:
                    zero_init_norm(m.norm3 if isinstance(m, Bottleneck)
                                   else m.norm2)
                offset = getattr(m.conv2, 'conv_offset', None)
                if offset is not None:
                    nn.init.zeros_(offset.weight)
                    nn.init.zeros_(offset.bias)
