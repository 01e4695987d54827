"""Any timm model as a vb_plugin backbone, under the shared contract.

timm ("PyTorch Image Models", Ross Wightman, https://github.com/huggingface/
pytorch-image-models, Apache-2.0) builds each model's feature extractor with
``features_only=True``. This family wraps exactly that extractor, so outputs
are timm's own, and maps timm's structure onto the contract:

* **Levels.** timm numbers its feature levels from its own first feature
  (for ResNet the stride-2 stem, for ConvNeXt stage 0). Here, with the
  default ``levels='vb'``, index 0 is the first level with stride >= 4, so
  0..3 are the stride-4..32 levels (C2..C5) of a standard CNN, as in
  :class:`VBResNet`. Single-scale models (every level at one stride, e.g.
  ViT's blocks) get four stages of consecutive levels (quarters of the
  blocks). ``levels='timm'`` keeps timm's numbering. See docs/timm.md.
* **Stages** for ``frozen_stages`` are cut at the modules that produce each
  level (``feature_info.module_name()``): the stem is everything up to the
  last level finer than stride 4 (or up to stage 0 when there is none).
* Weights of the model's pretrained layout load through timm's own pipeline
  (``checkpoint_filter_fn``, ``adapt_input_conv``) into the full model,
  strictly, then move into the extractor; see :mod:`vb_plugin.weights.timm`.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
from mmengine.registry import MODELS
from timm.layers import PatchEmbed, to_2tuple
from timm.models import model_entrypoint, split_model_name_tag
from timm.models._features import FeatureGetterNet
from torch import nn

from ...layers.pyramid import (PYRAMID_STRIDES, crop_to_stride,
                               pyramid_channels, resample_to_stride16,
                               rescaled_channels)
from ...weights.timm import (VB_TIMM_SOURCE, VITDET_SOURCES, TimmLayout,
                             timm_key_map)
from ..base import VBBackbone
from .decay import block_count, block_layer_id
from .levels import (LEVEL_MODES, TimmLevel, feature_levels, feature_list,
                     level_groups, own_module, plan_filled_stages,
                     plan_stages, prune_unused)
from .options import check_model_name, model_options
from .positions import (PositionGrid, input_positions, install_grid_hooks,
                        relax_patch_embeds)
from .probe import (SIZE_DIVISORS, ProbeTarget, any_size_options,
                    create_on_meta, is_size_error, pad_same,
                    probe_input_sizes)
from .pyramid import build_pyramid, check_pyramid, resolve_pyramid
from .windows import install_windows, plan_windows, windowed_features

@MODELS.register_module()
class VBTimmBackbone(VBBackbone):
    """A timm model as a backbone: timm's own feature extractor
    (``features_only=True``) under the VB contract.

    Args:
        model_name (str): A name of ``timm.list_models()``, e.g.
            ``'resnet50'``, ``'convnext_tiny'``,
            ``'swin_tiny_patch4_window7_224'``, optionally with a
            pretrained tag (``'resnet50.a1_in1k'``), which selects that
            tag's config. An unknown name raises ``ValueError`` with close
            matches; a model without ``feature_info`` raises ``ValueError``.
        levels (str): How stages count. ``'vb'``: index 0 is timm's first
            feature level at stride >= 4, so 0..3 are the stride-4..32
            levels whatever timm's numbering; finer levels go into the stem;
            single-scale models (ViT) get four stages, the quarters of their
            blocks, all at the model's stride. ``'timm'``: one stage per
            timm feature level, in timm's numbering (for ResNet, 0 is the
            stride-2 stem). Defaults to 'vb'.
        in_channels (int): Input channels, a positive int. Pretrained
            weights are adapted by timm's ``adapt_input_conv``. Defaults to
            3.
        output_stride (int, optional): 8, 16 or 32: dilate the last stages,
            for models that support it. ``None`` keeps the model's own.
            ``out_strides`` reports the true strides. Defaults to None.
        drop_path_rate (float, optional): Stochastic depth, passed to
            ``timm.create_model``, for models that have it. ``None`` keeps
            timm's default. Defaults to None.
        model_kwargs (dict, optional): Other ``timm.create_model`` keywords
            (``act_layer``, ``img_size``, ...). timm's options for any input
            size (``dynamic_img_size``, ``dynamic_img_pad``,
            ``strict_img_size``) are set when the model takes them, unless
            given here. The keywords the wrapper sets itself
            (``pretrained``, ``features_only``, ``out_indices``,
            ``in_chans``, ``num_classes``, ``feature_cls``,
            ``pretrained_cfg_overlay``, ``output_stride``, ``scriptable``,
            ``exportable``) raise ``ValueError``. Defaults to None.
        pyramid (str, optional): How a single-scale model (ViT, DeiT,
            DINOv2, EVA-02, BEiT: every level at one stride) gives strides
            4..32: ``'simple'`` (ViTDet's simple feature pyramid from the
            last map), ``'multilevel'`` (four evenly spaced blocks, each
            resampled, as BEiT/mmseg's ViT-UperNet), ``None`` (the raw
            levels at the model's stride). A map at a stride other than 16
            (patch 14) is resized to the stride-16 grid first. ``'fill'``:
            a multi-scale model's own levels at strides 4..32, the strides
            it lacks made from its next coarser level (2x2 transposed
            convs), levels past 32 not built (Visformer: 8, 16, 32;
            EfficientViT-MSRA: 16, 32, 64). ``'auto'``: ``'simple'`` for
            single-scale models (and those with no level finer than 7 or
            coarser than 16: VOLO, Sequencer), ``'fill'`` for multi-scale
            ones that lack some of strides 4..32 or have a level past 32
            (unless ``output_stride`` is set), ``None`` for the others. On a
            multi-scale model, ``'simple'``/``'multilevel'`` raise
            ``ValueError`` (docs/timm.md#transformers-at-detection-sizes).
            Defaults to 'auto'.
        window_size (int): ViTDet's window attention, for plain ViTs (timm
            modules ``vision_transformer``, ``deit``, ``eva``; others raise
            ``ValueError``): blocks other than ``global_blocks`` attend in
            ``window_size``-square windows of the token grid; prefix tokens
            (class, registers) are removed and the position embedding is
            resized with plain bicubic, as ViTDet (docs/timm.md#vitdet).
            ``0``: every block attends globally. Defaults to 0.
        global_blocks (Sequence[int], optional): The blocks that stay global
            when ``window_size > 0``. ``None``: ViTDet's four evenly spaced
            ones (2, 5, 8, 11 for 12 blocks; 5, 11, 17, 23 for 24; 7, 15,
            23, 31 for 32). Defaults to None.
        rel_pos (bool): Add ViTDet's decomposed relative positions to every
            attention (tables ``attn.rel_pos_h``/``attn.rel_pos_w``,
            zero-initialised, ``2 * window_size - 1`` rows in windowed
            blocks, ``2 * (rel_pos_img_size / patch) - 1`` in global ones,
            resized linearly for other grids). Defaults to False.
        rel_pos_img_size (int, optional): The input size the global blocks'
            relative position tables are sized for (ViTDet-B: 1024, its
            checkpoints' 127 rows). ``None``: the model's ``img_size``.
            Defaults to None.
        out_indices (Sequence[int], optional): See :class:`VBBackbone`, in
            ``levels`` numbering. ``None`` means every stage (0..3 for a
            standard CNN with ``levels='vb'``). Defaults to None.
        frozen_stages (int): See :class:`VBBackbone`. Stage boundaries are
            the modules that produce each timm level;
            ``stem_module_names()`` and ``stage_module_names(i)`` list them.
        norm_eval (bool): See :class:`VBBackbone`; covers timm's norm-act
            layers (``BatchNormAct2d``).
        frozen_bn (bool): See :class:`VBBackbone`; a ``BatchNormAct2d``
            keeps its activation.
        out_norm_cfg (dict, optional): See :class:`VBBackbone`.
        with_cp (bool): Gradient checkpointing through timm's
            ``set_grad_checkpointing``; models where timm has none raise
            ``ValueError``. Defaults to False.
        init_cfg (dict | list[dict], optional): ``None`` keeps timm's own
            initialisation (output norms: weight 1, bias 0).
            ``dict(type='Pretrained', checkpoint=PATH)`` loads a local file
            strictly, through timm's loading code for timm layouts. Any
            other ``init_cfg`` (e.g. ``dict(type='Kaiming',
            layer='Conv2d')``) is applied by mmengine on top of timm's
            initialisation, as in every family. Defaults to None.

    Example:
        >>> import torch
        >>> from vb_plugin import VBTimmBackbone
        >>> model = VBTimmBackbone('resnet10t', out_indices=(1, 3)).eval()
        >>> [tuple(o.shape) for o in model(torch.rand(1, 3, 64, 64))]
        [(1, 128, 8, 8), (1, 512, 2, 2)]
        >>> model.out_channels, model.out_strides
        ((128, 512), (8, 32))
    """

    def __init__(self,
                 model_name: str,
                 levels: str = 'vb',
                 in_channels: int = 3,
                 output_stride: Optional[int] = None,
                 drop_path_rate: Optional[float] = None,
                 model_kwargs: Optional[dict] = None,
                 pyramid: Optional[str] = 'auto',
                 window_size: int = 0,
                 global_blocks: Optional[Sequence[int]] = None,
                 rel_pos: bool = False,
                 rel_pos_img_size: Optional[int] = None,
                 out_indices: Optional[Sequence[int]] = None,
                 **kwargs) -> None:
        check_model_name(model_name)
        if levels not in LEVEL_MODES:
            raise ValueError(f'levels={levels!r} is not valid; use one of '
                             f'{LEVEL_MODES}')
        self.in_channels = in_channels
        model_kwargs = model_options(model_kwargs, output_stride,
                                     drop_path_rate)
        self.model_name = model_name
        self.levels = levels
        self.output_stride = output_stride
        self.timm_module = model_entrypoint(
            split_model_name_tag(model_name)[0]).__module__.rpartition('.')[2]
        self.size_divisor = SIZE_DIVISORS.get(self.timm_module, 1)
        self.create_kwargs = dict(model_kwargs, in_chans=self.in_channels)
        self.create_kwargs.update(any_size_options(self.create_timm_model,
                                                   model_kwargs))
        check_pyramid(pyramid)

        # NOTE: the full-level structure is read from models on the meta
        # device: no memory, no initialisation, and stage_module_names can
        # answer for stages that are never built.
        self.timm_levels = self._read_levels()
        self.window_plan = plan_windows(
            self.create_timm_model_on_meta, model_name, self.timm_module,
            window_size, global_blocks, rel_pos, rel_pos_img_size)
        self.new_layer_patterns += self.window_plan.new_layer_patterns
        reductions = [lv.reduction for lv in self.timm_levels]
        self.pyramid_kind = resolve_pyramid(pyramid, levels, reductions,
                                            self.output_stride,
                                            self.model_name)
        self.plan = (plan_filled_stages(reductions)
                     if self.pyramid_kind == 'fill' else
                     plan_stages(reductions, levels))
        if (self.pyramid_kind in ('simple', 'multilevel')
                and len(self.plan.stage_levels) != 4):
            # NOTE: frozen_stages counts four stages (quarters of the
            # blocks), one per pyramid level.
            raise ValueError(
                f'pyramid={self.pyramid_kind!r} needs at least 4 blocks (four '
                'stages, one per pyramid level); '
                f'{self.model_name!r} has {len(self.plan.stage_levels)} '
                'feature levels: use pyramid=None')
        all_levels = self._extracted_levels
        try:
            with torch.device('meta'):
                full = self._create_features(all_levels)
        except ValueError as err:
            if not isinstance(err.__cause__, (RuntimeError,
                                              NotImplementedError)):
                raise
            full = self._create_features(all_levels)
        groups = level_groups(full, self.timm_levels)
        self._stem_groups = tuple(n for j in self.plan.stem_levels
                                  for n in groups[j])
        self._stage_groups = [
            tuple(n for j in stage_levels for n in groups[j])
            for stage_levels in self.plan.stage_levels
        ]
        if not self.plan.stem_levels:
            k = self.plan.source_stage(0)
            first = self._stage_groups[k]
            own = own_module(full, self.timm_levels[
                self.plan.stage_levels[k][0]], first)
            self._stem_groups = first[:own]
            self._stage_groups[k] = first[own:]
        self._stage_groups = tuple(self._stage_groups)
        self._nhwc = str(getattr(full, 'output_fmt', 'NCHW')).endswith('NHWC')
        self.position_grids: Tuple[PositionGrid, ...] = ()
        self.same_padding = False
        if 'img_size' not in model_kwargs:
            self._probe_input_sizes(full)
        del full

        levels_out = [self.timm_levels[self.plan.output_level(k)]
                      for k in range(len(self.plan.stage_levels))]
        stage_channels = [lv.channels for lv in levels_out]
        stage_strides = [lv.reduction for lv in levels_out]
        if self.pyramid_kind is not None:
            stage_strides = list(PYRAMID_STRIDES)
            self.new_layer_patterns = self.new_layer_patterns + (
                r'^pyramid\.', )
        if self.pyramid_kind == 'fill':
            stage_channels = [
                rescaled_channels(lv.channels, self._fill_steps(k))
                for k, lv in enumerate(levels_out)]
        elif self.pyramid_kind is not None:
            self.native_stride = levels_out[-1].reduction
            stage_channels = list(pyramid_channels(levels_out[-1].channels,
                                                   self.pyramid_kind))
        if out_indices is None:
            out_indices = tuple(range(len(levels_out)))
        super().__init__(
            stage_channels=stage_channels,
            stage_strides=stage_strides,
            out_indices=out_indices,
            **kwargs)

    # ------------------------------------------------------------------
    # timm models.
    @property
    def weight_sources(self) -> Tuple[object, ...]:
        """ViTDet's layouts (windowed form with ``rel_pos``), the timm
        model's (converted by timm's own code), this backbone's own."""
        vitdet = VITDET_SOURCES if self.window_plan.rel_pos else ()
        return (*vitdet, TimmLayout(self), VB_TIMM_SOURCE)

    def create_timm_model(self, state_dict: Optional[dict] = None,
                          **kwargs) -> nn.Module:
        """The whole timm model this backbone wraps, with the options it was
        built with (``kwargs`` added). With ``state_dict``, timm's own
        pretrained pipeline loads it (the model's filter function,
        ``adapt_input_conv``, a strict load); it replaces any hub source, so
        nothing is downloaded.

        Example:
            >>> import timm
            >>> m = VBTimmBackbone('resnet10t')
            >>> sd = timm.create_model('resnet10t').state_dict()
            >>> full = m.create_timm_model(state_dict=sd)
            >>> bool((full.fc.weight == sd['fc.weight']).all())
            True
        """
        if state_dict is None:
            return timm.create_model(self.model_name, pretrained=False,
                                     **self.create_kwargs, **kwargs)
        # NOTE: source='' so that the in-memory state dict wins over an
        # 'hf-hub' source of the pretrained config.
        overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {},
                       state_dict=dict(state_dict), source='')
        return timm.create_model(self.model_name, pretrained=True,
                                 pretrained_cfg_overlay=overlay,
                                 **self.create_kwargs, **kwargs)

    def timm_pretrained_cfg(self) -> dict:
        """timm's pretrained config of the model, read on the meta device."""
        return dict(self.create_timm_model_on_meta().pretrained_cfg)

    def create_timm_model_on_meta(self, **kwargs) -> nn.Module:
        """:meth:`create_timm_model` on the meta device, when timm can."""
        return create_on_meta(self.create_timm_model, **kwargs)

    def _read_levels(self) -> List[TimmLevel]:
        model = self.create_timm_model_on_meta()
        if not hasattr(model, 'feature_info'):
            raise ValueError(
                f'model_name={self.model_name!r} cannot produce feature maps: '
                f'timm\'s {type(model).__name__} has no feature_info, so it '
                'has no features_only extractor')
        # NOTE: a patch embedding that does not pad (Swin) needs the input
        # to be a multiple of its patch size: the input is padded (as
        # mmdet's Swin pads in its patch embedding) and outputs cropped.
        embed = getattr(model, 'patch_embed', None)
        patch = getattr(embed, 'patch_size', None)
        self.input_pad = 1
        # NOTE: only timm's PatchEmbed (non-overlapping patches) needs it;
        # overlapping conv embeddings (PVT v2) take any size.
        if isinstance(embed, PatchEmbed) and not embed.dynamic_img_pad:
            self.input_pad = int(max(to_2tuple(patch)))
        self._embed_pad = self.input_pad
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        size = self.create_kwargs.get('img_size') or cfg.get(
            'input_size', (3, 224, 224))[-2:]
        self.pretrained_input_size = tuple(size) if isinstance(
            size, (tuple, list)) else (size, size)
        return feature_levels(model)

    def _probe_input_sizes(self, full: nn.Module) -> None:
        """Learn which input sizes the model takes, before any forward
        (:func:`~.probe.probe_input_sizes`): ``size_divisor``,
        ``input_pad``, ``position_grids`` and ``same_padding``.

        Raises:
            ValueError: If the model takes one input size only, or gives
                maps smaller than its strides say.
        """
        extracted = self._extracted_levels
        outputs = []
        for k in range(len(self.plan.stage_levels)):
            level = self.timm_levels[self.plan.output_level(k)]
            outputs.append((extracted.index(level.index)
                            if level.index in extracted else None,
                            level.reduction))
        target = ProbeTarget(
            model_name=self.model_name, in_channels=self.in_channels,
            native=tuple(self.pretrained_input_size),
            divisor=self.size_divisor, pad=self.input_pad,
            reductions=tuple(lv.reduction for lv in self.timm_levels),
            outputs=tuple(outputs), nhwc=self._nhwc)
        key = (self.model_name, repr(sorted(self.create_kwargs.items())),
               self.in_channels)
        found = probe_input_sizes(full, target, key)
        if found.message:
            raise ValueError(found.message)
        self.size_divisor = max(self.size_divisor, found.divisor)
        self.input_pad = max(self.input_pad, found.pad)
        self.position_grids = found.positions
        self.same_padding = found.same_padding

    @property
    def _extracted_levels(self) -> Tuple[int, ...]:
        """The timm levels of the full extractor: timm cannot extract a
        level whose module is '' (TResNet's stride-2 level)."""
        return tuple(lv.index for lv in self.timm_levels if lv.module)

    def _fill_steps(self, stage: int) -> int:
        """Octaves from the map that gives ``stage``'s output to the stage
        (``pyramid='fill'``): > 0 finer, < 0 coarser."""
        return self.plan.source_stage(stage) - stage

    def _source_level(self, stage: int) -> int:
        """The timm level whose map gives ``stage``'s output."""
        if self.pyramid_kind == 'simple':
            # NOTE: every level of the simple pyramid is made from the
            # last block's map.
            return self.plan.output_level(self.num_stages - 1)
        return self.plan.output_level(stage)

    def stages_to_build(self) -> int:
        # NOTE: the simple pyramid is built on the last block's map, so
        # every block is built whatever out_indices asks for.
        if self.pyramid_kind == 'simple':
            return self.num_stages
        # NOTE: a filled stage's output comes from a later stage.
        return max(self.plan.source_stage(i) for i in self.out_indices) + 1

    def _create_features(self, timm_indices: Tuple[int, ...]) -> nn.Module:
        try:
            return self.create_timm_model(features_only=True,
                                          out_indices=tuple(timm_indices))
        except (RuntimeError, AssertionError, TypeError,
                NotImplementedError) as err:
            raise ValueError(
                f'model_name={self.model_name!r} cannot produce feature maps '
                f'with these options (timm features_only failed: {err})'
            ) from err

    # ------------------------------------------------------------------
    # The contract's structure.
    def stem_module_names(self) -> Tuple[str, ...]:
        return tuple(f'body.{n}' for n in self._stem_groups)

    def stage_module_names(self, i: int) -> Tuple[str, ...]:
        return tuple(f'body.{n}' for n in self._stage_groups[i])

    def build_stem(self) -> Dict[str, nn.Module]:
        """timm's extractor, built whole and pruned after the last requested
        level (by timm, and by :data:`EXTRACTOR_QUIRKS`), then the pyramid:
        :meth:`stem_module_names` and :meth:`stage_module_names` name the
        groups of the extractor's modules that make the stem and stages."""
        indices = tuple(sorted({self._source_level(i)
                                for i in self.out_indices}))
        self._body_levels = indices
        body = self._create_features(indices)
        # NOTE: timm initialised the extractor when it built it. mmengine's
        # BaseModule.init_weights calls the init_weights of any child that
        # has one and is not marked is_init (timm's HRNet features have
        # one): it would draw timm's init again, over a user's init_cfg.
        body.is_init = True
        if self.window_plan.enabled:
            install_windows(body.model, self.window_plan)
        if self.position_grids:
            relax_patch_embeds(body)
        #: The extractor's modules given SAME padding (see pad_same).
        self.same_padded = pad_same(body) if self.same_padding else ()
        if self.position_grids:
            # NOTE: the input is padded to the strides of the position
            # state the built extractor keeps (LeViT's stride-64 stage is
            # not built under pyramid='fill': 32, not 64).
            names = {n for n, _ in body.named_modules()} | {
                n for n, _ in body.named_parameters()}
            self.position_grids = tuple(g for g in self.position_grids
                                        if g.name in names)
            self.input_pad = max([self._embed_pad] + [
                g.stride for g in self.position_grids])
        # NOTE: BEiT's tables, ConViT's indices (and the like) are swapped
        # in by hooks on their attentions, for the grid forward_features
        # sets.
        self._window_names = install_grid_hooks(body, self.position_grids)
        prune_unused(body, self._stage_groups[self.num_built_stages - 1],
                     indices)
        if self.with_cp:
            try:
                # NOTE: FeatureGetterNet (ViT-style models) runs the model
                # itself: checkpointing is the model's own switch.
                target = (body.model if isinstance(body, FeatureGetterNet)
                          else body)
                target.set_grad_checkpointing(True)
            except (AssertionError, AttributeError,
                    NotImplementedError) as err:
                raise ValueError(
                    f'with_cp=True: timm does not support gradient '
                    f'checkpointing for {self.model_name!r} ({err})') from err
        modules = {'body': body}
        if self.pyramid_kind is not None:
            # NOTE: 'simple' and 'multilevel' levels are all made from the
            # stride-16 map of the last extracted level.
            fill = self.pyramid_kind == 'fill'
            modules['pyramid'] = build_pyramid(
                self.pyramid_kind, self.out_indices, [
                    self.timm_levels[self._source_level(i) if fill else
                                     indices[-1]].channels
                    for i in range(self.num_stages)],
                [self._fill_steps(i) for i in range(self.num_stages)])
        return modules

    def build_stage(self, i: int) -> Dict[str, nn.Module]:
        return {}  # built in build_stem

    def unbuilt_module_names(self) -> Tuple[str, ...]:
        names = dict(self.named_modules())
        return tuple(n for n in super().unbuilt_module_names()
                     if n not in names)

    def frozen_module_names(self) -> Tuple[str, ...]:
        names = dict(self.named_modules())
        # NOTE: the pyramid is not a stage: like the output norms, it is
        # never frozen by frozen_stages (the contract's meaning).
        return tuple(n for n in super().frozen_module_names() if n in names)

    def stem_parameter_names(self) -> Tuple[str, ...]:
        # NOTE: ViT-style models keep cls_token/pos_embed on the model
        # itself, outside any named module; they belong to the stem.
        if isinstance(self.body, FeatureGetterNet):
            return tuple(f'body.model.{n}' for n, _ in
                         self.body.model.named_parameters(recurse=False))
        return ()

    def stage_output(self, i: int, x: torch.Tensor,
                     input_size: Tuple[int, int]) -> torch.Tensor:
        """NCHW, through the pyramid level when there is one, cropped to the
        input's size at the stage's stride (undoing the input pad)."""
        out = x.permute(0, 3, 1, 2).contiguous() if self._nhwc else x
        if self.pyramid_kind == 'fill':
            out = self.pyramid[str(i)](out)
        elif self.pyramid_kind is not None:
            out = self.pyramid[str(i)](resample_to_stride16(
                out, input_size, self.native_stride))
        return crop_to_stride(out, input_size, self.stage_strides[i])

    def describe(self) -> str:
        """Error messages name the timm model."""
        return repr(self.model_name)

    def prepare_export(self) -> None:
        """Pad the input here rather than in timm's patch embedding.

        timm's ``dynamic_img_pad`` computes the token grid with
        ``math.ceil``, which the ONNX tracer records as a constant (the
        export would then only run at the example's size). Padding the
        input with the same zeros at the bottom and right before the patch
        embedding gives the same outputs, with the grid traced.
        """
        for module in self.modules():
            if isinstance(module, PatchEmbed) and module.dynamic_img_pad:
                module.dynamic_img_pad = False
                self.input_pad = max(self.input_pad,
                                     int(max(to_2tuple(module.patch_size))))

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """timm's extractor runs as timm runs it (its forward is not always
        a chain of modules: HRNet branches, ViT tokens), on the input padded
        to the patch size where the model needs it."""
        size = tuple(x.shape[-2:])
        pad = self.input_pad
        # NOTE: traced for ONNX, the pad is always recorded (its amounts
        # are shape ops, zero at multiples of the patch).
        if pad > 1 and (torch.jit.is_tracing() or size[0] % pad
                        or size[1] % pad):
            x = torch.nn.functional.pad(
                x, (0, -size[1] % pad, 0, -size[0] % pad))
        try:
            with input_positions(self.body, self.position_grids,
                                 self._window_names, x.shape[-2:]):
                feats = (windowed_features(self.body, x)
                         if self.window_plan.enabled else self.body(x))
        except (AssertionError, RuntimeError) as err:
            native = tuple(self.pretrained_input_size)
            if tuple(x.shape[-2:]) == native or not is_size_error(err):
                raise
            # NOTE: timm asserts (or fails on a reshape) deep inside models
            # that take one input size only (fixed position or attention
            # biases): say so, with the size they take.
            raise ValueError(
                f'{self.model_name!r} cannot take a {size[0]}x{size[1]} input '
                f'(timm: {type(err).__name__}: {err}); it was built for '
                f'{native[0]}x{native[1]} inputs and timm offers it no '
                'option for other sizes: use that size, or another model') \
                from err
        # NOTE: the extractor gives each level once; a level can feed more
        # than one output (the simple pyramid, filled strides).
        by_level = dict(zip(self._body_levels, feature_list(feats)))
        return [by_level[self._source_level(i)] for i in self.out_indices]

    # ------------------------------------------------------------------
    # Layer-wise learning-rate decay (ViT-style models).
    @property
    def lr_decay_num_layers(self) -> Optional[int]:
        """The number of built blocks of a ViT-style model (see
        :func:`~.decay.block_count`); None for other models."""
        return block_count(self.body)

    def no_layer_decay(self) -> ValueError:
        return ValueError(
            f'layer-wise lr decay by block is for single-scale models '
            f'(ViT-style); {self.model_name!r} has no blocks list')

    def lr_decay_layer_id(self, name: str) -> int:
        """Layer id of parameter ``name`` (relative to the backbone), as
        ViTDet and BEiT count (:func:`~.decay.block_layer_id`)."""
        num = self.lr_decay_num_layers
        if num is None:
            raise self.no_layer_decay()
        return block_layer_id(name, num, tuple(
            f'{n}.' for n in self.stem_module_names()) + tuple(
                self.stem_parameter_names()))

    # ------------------------------------------------------------------
    # Weights.
    def body_key_map(self,
                     keys: Optional[Sequence[str]] = None) -> Dict[str, str]:
        """Map this backbone's state-dict keys (or ``keys``, names under
        ``body.``) to the full timm model's.

        Example:
            >>> m = VBTimmBackbone('convnext_atto', out_indices=(0, ))
            >>> m.body_key_map()['body.stages_0.blocks.0.gamma']
            'stages.0.blocks.0.gamma'
        """
        return timm_key_map(self, keys)
