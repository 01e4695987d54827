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
import difflib
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import (Callable, Dict, Iterator, List, Optional, Sequence,
                    Tuple)

import timm
import torch
from mmengine.registry import MODELS
from timm.layers import (PatchEmbed, ndgrid, resample_abs_pos_embed,
                         resample_abs_pos_embed_nhwc,
                         resize_rel_pos_bias_table_simple, to_2tuple)
from timm.layers.pos_embed_rel import (RelPosBias, RelPosBiasTf, RelPosMlp,
                                       gen_relative_log_coords,
                                       generate_lookup_tensor)
from timm.layers.pos_embed_rel import \
    gen_relative_position_index as rel_pos_index
from timm.models import model_entrypoint, split_model_name_tag
from timm.models._features import (FeatureDictNet, FeatureGetterNet,
                                   FeatureHookNet)
from timm.models.beit import Attention as BeitAttention
from timm.models.convit import GPSA
from timm.models.efficientformer import Attention as EfficientFormerAttn
from timm.models.efficientformer_v2 import Attention2d as EfficientV2Attn
from timm.models.efficientformer_v2 import \
    Attention2dDownsample as EfficientV2AttnDownsample
from timm.models.efficientnet import EfficientNetFeatures
from timm.models.gcvit import GlobalContextVitBlock
from timm.models.hiera import Hiera, Reroll
from timm.models.hrnet import HighResolutionNetFeatures
from timm.models.levit import Attention as LevitAttention
from timm.models.levit import AttentionDownsample as LevitAttnDownsample
from timm.models.levit import Downsample as LevitDownsample
from timm.models.mobilenetv3 import MobileNetV3Features
from timm.models.mvitv2 import (MultiScaleAttention,
                                MultiScaleAttentionPoolFirst)
from timm.models.tnt import PixelEmbed
from torch import nn

from ..checks import check_int
from ..layers.pyramid import (PYRAMID_STRIDES, crop_to_stride,
                              pyramid_channels, pyramid_level,
                              resample_to_stride16, rescale_level,
                              rescaled_channels)
from ..weights.rules import WeightSource
from ..weights.timm import TimmLayout
from .base import OptConfigType, VBBackbone, round_up_to

#: create_model keywords this family sets itself; ``model_kwargs`` must not.
RESERVED_KWARGS = ('pretrained', 'features_only', 'out_indices', 'in_chans',
                   'num_classes', 'feature_cls', 'pretrained_cfg_overlay',
                   'output_stride', 'scriptable', 'exportable')

LEVEL_MODES = ('vb', 'timm')

PYRAMIDS = ('auto', 'simple', 'multilevel', 'fill', None)

#: What the input's height and width must be multiples of, by timm model
#: module, where it is not 1 (measured: these fail with a bare RuntimeError
#: at 225x301 or 272x336 and run at multiples of the divisor). HRNet's and
#: DLA's branches are fused by adding maps whose sizes must agree.
SIZE_DIVISORS = {
    'hrnet': 32,
    'dla': 32,
    'hieradet_sam2': 32,
    'csatv2': 16,
    'naflexvit': 16,
    'vision_transformer_hybrid': 16,
    'vitamin': 16,
}

#: Level module names timm's ``feature_info`` gets wrong (timm 1.0.31), by
#: timm model module: (wrong prefix, the model's own). Twins and MViTv2 name
#: their stages 'block.k', a module neither has.
LEVEL_MODULE_RENAMES = {
    'twins': ('block.', 'blocks.'),
    'mvitv2': ('block.', 'stages.'),
}

#: timm's MViTv2 attentions, whose relative position tables are resized
#: to each input (see _enter_mvit).
MVIT_ATTENTIONS = (MultiScaleAttention, MultiScaleAttentionPoolFirst)

#: timm's own options for inputs of any size, tried in this order; the
#: first set the model accepts is used (a model refuses unknown keywords).
#: ViT, DeiT, BEiT, EVA: the position embedding is resampled at forward
#: time, and the input padded to the patch size; Swin: windows are padded.
ANY_SIZE_OPTIONS = (
    dict(dynamic_img_size=True, dynamic_img_pad=True),
    dict(dynamic_img_size=True),
    dict(strict_img_size=False),
)


@dataclass(frozen=True)
class TimmLevel:
    """One of timm's feature levels (a row of ``feature_info``)."""
    index: int
    channels: int
    reduction: int
    module: str


@dataclass(frozen=True)
class StagePlan:
    """How timm's levels become VB stages.

    Attributes:
        stem_levels: timm levels inside the stem (``levels='vb'`` drops the
            levels finer than stride 4 into it).
        stage_levels: For each VB stage, the timm levels it spans; its
            output is the last one.
    """
    stem_levels: Tuple[int, ...]
    stage_levels: Tuple[Tuple[int, ...], ...]

    def source_stage(self, stage: int) -> int:
        """The stage whose map gives ``stage``'s output: itself, or, for a
        stage without levels (:func:`plan_filled_stages`), the nearest
        coarser stage that has some, else the nearest finer one."""
        if self.stage_levels[stage]:
            return stage
        own = [k for k, lv in enumerate(self.stage_levels) if lv]
        return next((k for k in own if k > stage), own[-1])

    def output_level(self, stage: int) -> int:
        return self.stage_levels[self.source_stage(stage)][-1]


def plan_stages(reductions: Sequence[int], levels: str = 'vb') -> StagePlan:
    """Group timm's feature levels into VB stages.

    Args:
        reductions (Sequence[int]): Stride of each timm level, in order.
        levels (str): 'vb' (index 0 is the first level at stride >= 4;
            single-scale models are cut into four stages) or 'timm' (one
            stage per timm level, timm's numbering). Defaults to 'vb'.

    Returns:
        StagePlan: The stem's levels and each stage's levels.

    Example:
        >>> plan_stages([2, 4, 8, 16, 32]).stage_levels
        ((1,), (2,), (3,), (4,))
        >>> plan_stages([16] * 12).stage_levels
        ((0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11))
        >>> plan_stages([2, 4, 8, 16, 32], levels='timm').stage_levels
        ((0,), (1,), (2,), (3,), (4,))
    """
    n = len(reductions)
    if levels == 'timm':
        return StagePlan((), tuple((i, ) for i in range(n)))
    first = next((i for i, r in enumerate(reductions) if r >= 4), None)
    if first is None:
        raise ValueError(
            f'levels={levels!r}: the model has no feature level at stride '
            f'>= 4 (strides {list(reductions)}); use levels=\'timm\'')
    rest = list(range(first, n))
    if len(rest) > 4 and len({reductions[i] for i in rest}) == 1:
        # NOTE: single-scale models (ViT-style) list every block as a level;
        # four stages of consecutive blocks keep frozen_stages meaningful
        # and give the usual four outputs (ViTDet takes the same quarters).
        bounds = [round(len(rest) * (k + 1) / 4) for k in range(4)]
        groups, start = [], 0
        for end in bounds:
            groups.append(tuple(rest[start:end]))
            start = end
    else:
        groups = [(i, ) for i in rest]
    return StagePlan(tuple(range(first)), tuple(groups))


def plan_filled_stages(reductions: Sequence[int]) -> StagePlan:
    """Four stages at strides 4, 8, 16 and 32 (``pyramid='fill'``): stage
    ``k`` holds the levels at stride ``4 * 2**k``; finer levels are the
    stem, coarser ones are left out, and a stride the model lacks gets a
    stage without levels (its output comes from
    :meth:`StagePlan.source_stage`).

    Example:
        >>> plan = plan_filled_stages([16, 32, 64])
        >>> plan.stage_levels, [plan.source_stage(k) for k in range(4)]
        (((), (), (0,), (1,)), [2, 2, 2, 3])
        >>> plan_filled_stages([4, 8, 8, 16]).stage_levels
        ((0,), (1, 2), (3,), ())
    """
    stem = tuple(i for i, r in enumerate(reductions) if r < 4)
    stages = tuple(
        tuple(i for i, r in enumerate(reductions) if r == s)
        for s in PYRAMID_STRIDES)
    return StagePlan(stem, stages)


def _check_model_name(model_name: str) -> None:
    if not isinstance(model_name, str) or not model_name:
        raise TypeError(f'model_name must be a timm model name (str), got '
                        f'{model_name!r} ({type(model_name).__name__})')
    if timm.is_model(model_name):
        return
    close = difflib.get_close_matches(model_name, timm.list_models(), n=5,
                                      cutoff=0.6)
    hint = (f'; close matches: {close}' if close else
            '; see timm.list_models() for the available names')
    raise ValueError(f'model_name={model_name!r} is not a timm model{hint}')


def _flatten(module: nn.Module, prefix: str) -> List[str]:
    """Children of ``module``, one level of Sequential/ModuleList expanded
    (timm's own ``_module_list`` rule), as dotted names."""
    names = []
    for name, child in module.named_children():
        full = f'{prefix}{name}'
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child):
            names += [f'{full}.{c}' for c, _ in child.named_children()]
        else:
            names.append(full)
    return names


@dataclass(frozen=True)
class _Chain:
    """timm's extractor as a chain of module names in forward order
    (relative to the extractor), for grouping its modules into levels.

    ``root`` is the prefix of the wrapped model's own module names in the
    extractor ('model.' for FeatureGetterNet, 'body.' for a FeatureHookNet
    that hooks the whole model, '' otherwise); ``underscore``: FeatureDictNet's
    flattened names ('layer1_0' for 'layer1.0')."""
    names: Tuple[str, ...]
    root: str = ''
    underscore: bool = False

    def contains(self, element: str, module: str) -> bool:
        """Whether chain element ``element`` is, contains or lies inside the
        model's module ``module``."""
        if self.underscore:
            module = module.replace('.', '_')
            if module in self.names:
                # NOTE: a module that is itself an element was not
                # flattened: Inception-ResNet's 'repeat_1' and 'repeat_2'
                # are siblings of 'repeat', not inside it.
                return element == module
            sep = '_'
        else:
            element = element[len(self.root):] if element.startswith(
                self.root) else element
            sep = '.'
        return (module == element or module.startswith(element + sep)
                or element.startswith(module + sep))


def _chain(features: nn.Module,
           modules: Sequence[str] = ()) -> _Chain:
    """The extractor's chain; an element that holds two or more of
    ``modules`` (level modules nested in one container, e.g. an encoder's
    blocks) is replaced by its children, recursively. The chain only groups
    modules (timm's extractor runs them), so expanding changes nothing
    that runs."""
    if isinstance(features, FeatureDictNet):
        return _Chain(tuple(n for n, _ in features.named_children()),
                      underscore=True)
    if isinstance(features, FeatureHookNet):
        children = [n for n, _ in features.named_children()]
        if children != ['body']:
            return _Chain(tuple(children), underscore=True)
        root, names = 'body.', _flatten(features.body, 'body.')
    elif isinstance(features, FeatureGetterNet):
        root, names = 'model.', _flatten(features.model, 'model.')
    else:
        root, names = '', _flatten(features, '')
    chain = _Chain(tuple(names), root)
    expanded = True
    while expanded:
        expanded, names = False, []
        for element in chain.names:
            inner = {m for m in modules
                     if chain.contains(element, m)
                     and m != element[len(root):]}
            child = features.get_submodule(element)
            if len(inner) > 1 and len(list(child.children())):
                names += _flatten(child, element + '.')
                expanded = True
            else:
                names.append(element)
        chain = _Chain(tuple(names), root)
    return chain


def _resolve_modules(features: nn.Module, chain: _Chain,
                     levels: Sequence[TimmLevel]) -> List[Optional[str]]:
    """Each level's module as the model names it. timm's ``feature_info``
    sometimes names a module by its path inside a wrapper ('blocks.0' for
    'encoder.blocks.0'): a name that is no module of the model is taken as
    the unique module path that ends with it; None when there is none."""
    if chain.underscore:
        return [lv.module or None for lv in levels]
    root = features.get_submodule(chain.root[:-1]) if chain.root else features
    names = {n for n, _ in root.named_modules()}
    resolved = []
    for level in levels:
        module = level.module
        if not module:
            # NOTE: '' (TResNet's stride-2 level) names no module.
            module = None
        elif module not in names:
            ends = [n for n in names if n.endswith('.' + module)]
            module = ends[0] if len(ends) == 1 else None
        resolved.append(module)
    return resolved


def _hrnet_groups(chain: List[str], num_levels: int) -> List[List[str]]:
    # NOTE: HRNet's extractor is not a chain: every output passes through all
    # four network stages, then its own incre_modules[i]. Level 0 is the
    # first stem conv; level k >= 1 is network stage k (with the transition
    # that feeds the next one) plus incre_modules[k - 1].
    heads = [('conv1', 'bn1', 'act1'),
             ('conv2', 'bn2', 'act2', 'layer1', 'transition1'),
             ('stage2', 'transition2'), ('stage3', 'transition3'),
             ('stage4', )]
    groups = []
    for k in range(num_levels):
        names = [c for c in chain if c.split('.')[0] in heads[k]]
        if k >= 1:
            names += [c for c in chain if c == f'incre_modules.{k - 1}']
        groups.append(names)
    return groups


def _level_groups(features: nn.Module,
                  levels: Sequence[TimmLevel]) -> List[List[str]]:
    """The extractor's modules that lead to each timm level, in order:
    group ``j`` holds the modules after level ``j - 1``'s up to level
    ``j``'s own module. A level whose module the model does not have (its
    metadata names none, e.g. MobileNetV5's stem 'bn1') gets the modules up
    to the next level's."""
    quirks = _quirks(features)
    if quirks.level_groups is not None:
        return quirks.level_groups(list(_chain(features).names), len(levels))
    probe = _chain(features)
    modules = _resolve_modules(features, probe, levels)
    chain = _chain(features, [m for m in modules if m is not None])
    parallel = _parallel_elements(chain, modules)
    if parallel:
        chain = _Chain(tuple(e for e in chain.names if e not in parallel),
                       chain.root, chain.underscore)
    hits = [[p for p, e in enumerate(chain.names) if chain.contains(e, m)]
            if m is not None else None for m in modules]
    groups, start = [], 0
    for j, level in enumerate(levels):
        if hits[j] is None:
            later = next((h for h in hits[j + 1:] if h), None)
            end = later[0] if later else start
        else:
            end = hits[j][-1] + 1 if hits[j] else start
        if end <= start:
            raise ValueError(
                f'cannot map timm level {level.index} (module '
                f'{level.module!r}) onto the modules of '
                f'{type(features).__name__}: {list(chain.names)}')
        groups.append(list(chain.names[start:end]))
        start = end
    for element, (j, before) in parallel.items():
        if before:
            groups[j].insert(sum(parallel.get(e, (-1, False)) == (j, True)
                                 for e in groups[j]), element)
        else:
            groups[j].append(element)
    return groups


def _parallel_elements(chain: _Chain, modules: Sequence[Optional[str]]
                       ) -> Dict[str, Tuple[int, bool]]:
    """Elements of module lists that run beside the levels' own list.

    When the levels are ``P.0`` .. ``P.n-1`` (Twins' ``blocks.k``), the
    model keeps each stage's other parts in lists of the same length,
    registered apart from ``P`` (``patch_embeds.k``, ``pos_drops.k``,
    ``pos_block.k``): ``Q.k`` belongs to level ``k``, before its blocks if
    ``Q`` is registered before ``P``. Returns element -> (level, before).
    """
    match = [re.fullmatch(r'(.+)\.(\d+)', m or '') for m in modules]
    if not all(match) or len({m.group(1) for m in match}) != 1 or [
            int(m.group(2)) for m in match] != list(range(len(modules))):
        return {}
    own = chain.root + match[0].group(1)
    lists: Dict[str, List[str]] = {}
    for element in chain.names:
        head, _, index = element.rpartition('.')
        if head and head != own and index.isdigit():
            lists.setdefault(head, []).append(element)
    first = next((i for i, e in enumerate(chain.names)
                  if e.startswith(own + '.')), 0)
    parallel = {}
    for head, elements in lists.items():
        if [e.rpartition('.')[2] for e in elements] != [
                str(k) for k in range(len(modules))]:
            continue
        before = chain.names.index(elements[0]) < first
        parallel.update({e: (k, before) for k, e in enumerate(elements)})
    return parallel


def _prune_blocks(body: nn.Module, kept_groups: Sequence[str],
                  levels: Sequence[int]) -> None:
    """EfficientNet/MobileNetV3 extractors build every block; blocks after
    the last output would get no gradient (DDP): cut them."""
    keep = {n.split('.')[1] for n in kept_groups if n.startswith('blocks.')}
    if keep:
        body.blocks = body.blocks[:max(int(k) for k in keep) + 1]


def _prune_hrnet(body: nn.Module, kept_groups: Sequence[str],
                 levels: Sequence[int]) -> None:
    """HRNet's extractor keeps the incre_module of every branch; those of
    levels that are not outputs would get no gradient."""
    if getattr(body, 'incre_modules', None) is None:
        return
    for i, _ in enumerate(body.incre_modules):
        if i + 1 not in levels:
            body.incre_modules[i] = nn.Identity()


@dataclass(frozen=True)
class _Quirks:
    """What one kind of timm feature extractor needs beyond the generic
    code: how its modules group into levels (None: in module order), and
    what to remove after the last requested level (None: timm pruned it)."""
    level_groups: Optional[Callable[[List[str], int], List[List[str]]]] = None
    prune: Optional[Callable[[nn.Module, Sequence[str], Sequence[int]],
                             None]] = None


#: Quirks by timm's feature-extractor class (subclasses included).
EXTRACTOR_QUIRKS: Dict[type, _Quirks] = {
    HighResolutionNetFeatures: _Quirks(level_groups=_hrnet_groups,
                                       prune=_prune_hrnet),
    EfficientNetFeatures: _Quirks(prune=_prune_blocks),
    MobileNetV3Features: _Quirks(prune=_prune_blocks),
}


def _quirks(features: nn.Module) -> _Quirks:
    for cls in type(features).__mro__:
        if cls in EXTRACTOR_QUIRKS:
            return EXTRACTOR_QUIRKS[cls]
    return _Quirks()


#: A VBTimmBackbone's own state dict (keys under ``body.``).
VB_TIMM_SOURCE = WeightSource(
    name='vb-timm',
    description='a VBTimmBackbone state dict (keys under body.)',
    detect=r'^body\.')


@dataclass(frozen=True)
class _PositionGrid:
    """Position state made for the token grid of one stride: ``name``
    (relative to the extractor) of a learned absolute position embedding
    or of a module that holds such state, its ``layout``
    (``'NLC'`` with ``prefix`` class/distillation tokens first, ``'NCHW'``
    or ``'NHWC'``; ``'REL'``: ``name`` is a BEiT attention whose relative
    position table spans its window; ``'GPSA'``: a ConViT attention;
    ``'MLP'``: a ViT-RelPos attention, whose bias MLP reads its window;
    ``'TNT'``: TNT's pixel embedding, which checks the size and counts
    patches) and the ``grid`` it has at the
    pretraining size."""
    name: str
    layout: str
    stride: int
    grid: Tuple[int, int]
    prefix: int = 0


@dataclass(frozen=True)
class _SizeProbe:
    """What the meta-device probe of a timm model found about input sizes:
    the build error (or ''), the divisor its input needs, the patch size
    to pad its input to, the position embeddings to resample per input."""
    message: str = ''
    divisor: int = 1
    pad: int = 1
    positions: Tuple[_PositionGrid, ...] = ()
    same_padding: bool = False


#: (model name, create keywords, in_channels) -> what the probe found; the
#: meta-device probe runs once per process.
_SIZE_PROBES: Dict[tuple, _SizeProbe] = {}

_SIZE_ERROR_HINTS = ('match', 'shape', 'size', 'Input height',
                     'Input image', 'divisible', 'invalid for input')


def _feature_list(feats) -> List[torch.Tensor]:
    """timm's extractor's outputs as a list (FeatureDictNet gives a dict)."""
    return list(feats.values()) if isinstance(feats, dict) else list(feats)


def _is_size_error(err: Exception) -> bool:
    """Whether timm's error is about the input's spatial size."""
    text = str(err)
    return isinstance(err, AssertionError) or any(h in text
                                                  for h in _SIZE_ERROR_HINTS)


def _timm_levels(model: nn.Module) -> List[TimmLevel]:
    """The model's feature levels, module names corrected by
    :data:`LEVEL_MODULE_RENAMES`."""
    info = model.feature_info
    rows = info.get_dicts() if hasattr(info, 'get_dicts') else list(info)
    wrong, right = LEVEL_MODULE_RENAMES.get(
        type(model).__module__.rpartition('.')[2], (None, None))
    levels = []
    for i, r in enumerate(rows):
        module = str(r['module'])
        if wrong is not None and module.startswith(wrong):
            module = right + module[len(wrong):]
        levels.append(TimmLevel(i, int(r['num_chs']), int(r['reduction']),
                                module))
    return levels


def _position_grids(model: nn.Module, native: Tuple[int, int],
                    strides: Sequence[int]) -> Tuple[_PositionGrid, ...]:
    """The model's position state made for the token grid of its
    pretraining size ``native``, at one of its feature ``strides``:
    absolute position embeddings (parameters named ``*pos*`` whose shape
    holds the grid), and modules that hold a grid-sized window or count
    (BEiT's and ViT-RelPos's attentions, ConViT's, TNT's pixel embedding).

    Example:
        >>> import timm
        >>> model = timm.create_model('cait_xxs24_224', features_only=True)
        >>> _position_grids(model, (224, 224), (16, ))
        (_PositionGrid(name='model.pos_embed', layout='NLC', stride=16, \
grid=(14, 14), prefix=0),)
    """
    grids = {stride: (native[0] // stride, native[1] // stride)
             for stride in sorted(set(strides))}
    found = []
    for name, param in model.named_parameters():
        if 'pos' not in name.rpartition('.')[2] or param.dim() not in (
                3, 4) or param.shape[0] != 1:
            continue
        shape = tuple(param.shape[1:])
        for stride, grid in grids.items():
            if native[0] % stride or native[1] % stride:
                continue
            tokens = grid[0] * grid[1]
            if param.dim() == 4 and shape[1:] == grid:
                found.append(_PositionGrid(name, 'NCHW', stride, grid))
            elif param.dim() == 4 and shape[:2] == grid:
                found.append(_PositionGrid(name, 'NHWC', stride, grid))
            elif param.dim() == 3 and 0 <= shape[0] - tokens <= 8:
                found.append(_PositionGrid(name, 'NLC', stride, grid,
                                           shape[0] - tokens))
            else:
                continue
            break
    # NOTE: module state made for the token grid: Hiera's token order
    # (unrolled into mask units by a schedule made for its grid of mask
    # units, at stride patch x mask unit); GCViT's blocks (windows a fixed
    # fraction of the map, their relative position biases with them);
    # CoAtNet's relative position biases over a whole map (named by their
    # attention, which calls their get_bias with fused attention; square
    # ones only: a window of MaxViT's that equals a grid is not told apart,
    # but then the model does not run and stays refused); LeViT's and
    # EfficientFormer's attention biases by token offset; BEiT's per-block
    # relative position tables span their window, the whole grid (timm's
    # resize takes square windows only); ViT-RelPos's bias MLPs read their
    # window's coordinates (named by their attention, which calls them, or
    # their get_bias with fused attention, inside its forward; a
    # model-level shared one is called outside any forward, where no hook
    # sees it); TNT's pixel embedding checks the input size and, with the
    # model, reshapes by its patch count; ConViT's gated attention makes
    # its relative indices for a square grid of N tokens.
    # NOTE: a grid made by padded stride-2 steps is rounded up (LeViT: 4x4
    # at stride 64 of 224).
    stride_of: Dict[Tuple[int, int], int] = {}
    for stride in grids:  # the finest stride first
        grid = (-(-native[0] // stride), -(-native[1] // stride))
        stride_of.setdefault(grid, stride)
    single = len(set(strides)) == 1
    shared = any(n.endswith('shared_rel_pos') for n, m in
                 model.named_modules() if isinstance(m, RelPosMlp))
    gcvit = {f'{n}.attn' for n, m in model.named_modules()
             if isinstance(m, GlobalContextVitBlock)}
    for name, module in model.named_modules():
        if isinstance(module, (BeitAttention, RelPosMlp)):
            window = tuple(module.window_size or ())
            stride = stride_of.get(window)
            if stride is None:
                continue
            if isinstance(module, BeitAttention) and window[0] == window[1]:
                found.append(_PositionGrid(name, 'REL', stride, window))
            elif isinstance(module, RelPosMlp) and not shared:
                found.append(_PositionGrid(name.rpartition('.')[0], 'MLP',
                                           stride, window))
        elif isinstance(module, GlobalContextVitBlock):
            window = tuple(module.window_size)
            if window in stride_of:
                found.append(_PositionGrid(name, 'GCVIT', stride_of[window],
                                           window))
        elif isinstance(module, (RelPosBias, RelPosBiasTf)) and not getattr(
                module, 'prefix_tokens', 0) and name.endswith('.rel_pos') and (
                    name.rpartition('.')[0] not in gcvit):
            window = tuple(module.window_size)
            if window in stride_of and window[0] == window[1]:
                found.append(_PositionGrid(name.rpartition('.')[0], 'RPB',
                                           stride_of[window], window))
        elif isinstance(module, OFFSET_MODULES):
            window = _offset_grid(module)
            if window in stride_of:
                found.append(_PositionGrid(name, 'OFFSET', stride_of[window],
                                           window))
        elif isinstance(module, Hiera) and getattr(
                module, 'pos_embed_spatial', None) is None:
            stride = module.patch_stride[0] * module.mask_unit_size[0]
            if tuple(module.mask_spatial_shape) == (native[0] // stride,
                                                    native[1] // stride):
                found.append(_PositionGrid(name, 'UNROLL', stride, tuple(
                    module.mask_spatial_shape)))
        elif isinstance(module, PixelEmbed) and single:
            found.append(_PositionGrid(name, 'TNT', strides[0],
                                       tuple(module.grid_size)))
        elif isinstance(module, GPSA) and single and (
                not native[0] % strides[0]):
            found.append(_PositionGrid(name, 'GPSA', strides[0],
                                       grids[strides[0]]))
    return tuple(found)


def _resampled_positions(model: nn.Module, grids: Sequence[_PositionGrid],
                         size: Sequence[int]) -> Dict[str, object]:
    """The position state for the token grids of an input of ``size`` (a
    multiple of every grid's stride), by name: embeddings resampled
    (bicubic, antialiased: timm's own functions), :data:`GRID_MODULES`'
    state as :func:`_grid_values` makes it, TNT's size and patch counts.
    Computed from the parameters, so gradients reach them; modules and
    parameters the extractor no longer has (pruned) are skipped."""
    if not grids:
        return {}
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    out: Dict[str, object] = {}
    for g in grids:
        new = [size[0] // g.stride, size[1] // g.stride]
        if g.layout in GRID_MODULES:
            attn = modules.get(g.name)
            if attn is not None:
                out.update({f'{g.name}.{k}': v for k, v in _grid_values(
                    attn, g.layout, g.grid, new).items()})
            continue
        if g.layout == 'UNROLL':
            hiera = modules.get(g.name)
            if hiera is not None:
                out.update(_unroll_values(hiera, g.name, new))
            continue
        if g.layout == 'TNT':
            owner = g.name.rpartition('.')[0]
            out.update({f'{g.name}.img_size': (new[0] * g.stride,
                                               new[1] * g.stride),
                        f'{g.name}.num_patches': new[0] * new[1],
                        f'{owner}.num_patches'.lstrip('.'): new[0] * new[1]})
            continue
        param = params.get(g.name)
        if param is None:
            continue
        if g.layout == 'NLC':
            out[g.name] = resample_abs_pos_embed(
                param, new, list(g.grid), num_prefix_tokens=g.prefix)
        elif g.layout == 'NHWC':
            out[g.name] = resample_abs_pos_embed_nhwc(param, new)
        else:
            out[g.name] = resample_abs_pos_embed_nhwc(
                param.permute(0, 2, 3, 1), new).permute(0, 3, 1, 2)
    return out


def _unroll_values(hiera: nn.Module, name: str,
                   grid: Sequence[int]) -> Dict[str, object]:
    """Hiera's token order for a ``grid`` of mask units: the sizes its
    unroll and reroll use and the reroll's schedule, as timm makes them
    for that input size (its blocks read the number of mask units from
    the tokens)."""
    unit, patch = hiera.mask_unit_size, hiera.patch_stride
    tokens = [n * u for n, u in zip(grid, unit)]
    reroll = Reroll([n * p for n, p in zip(tokens, patch)], patch,
                    hiera.unroll.schedule, hiera.stage_ends, hiera.q_pool)
    prefix = f'{name}.' if name else ''
    return {f'{prefix}{k}': v for k, v in (
        ('unroll.size', tokens), ('reroll.size', reroll.size),
        ('reroll.schedule', reroll.schedule),
        ('tokens_spatial_shape', tokens),
        ('mask_spatial_shape', list(grid)))}


@lru_cache(maxsize=4)
def _rel_index(grid: Tuple[int, int],
               class_token: bool = False) -> torch.Tensor:
    """timm's relative position index for a token grid (``class_token``:
    BEiT's, with one class token), made once per grid: it is the same for
    every block, and large ((h * w + 1)^2 entries). Made outside inference
    mode, so that a training forward after an inference one can save it
    for the backward."""
    with torch.inference_mode(False):
        return rel_pos_index(grid, class_token=class_token, device='cpu')


def _window_values(attn: nn.Module, native: Tuple[int, int],
                   grid: Sequence[int]) -> Dict[str, object]:
    """A BEiT attention's relative position table, index and window for a
    token ``grid``: the table resized by
    timm's bicubic resize, not the geometric one timm's ``set_input_size``
    uses (a per-head Python loop: for BEiT-B's 12 tables at 800x1216,
    about 1 s per forward here against 0.03 s)."""
    grid = tuple(grid)
    table = attn.relative_position_bias_table
    return {
        'relative_position_bias_table': resize_rel_pos_bias_table_simple(
            table, new_window_size=grid,
            new_bias_shape=((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3,
                            table.shape[1])),
        'relative_position_index': _rel_index(grid, True).to(table.device),
        'window_size': grid,
    }


def _gpsa_values(attn: nn.Module, native: Tuple[int, int],
                 grid: Sequence[int]) -> Dict[str, object]:
    """A ConViT attention's relative indices (x offset, y offset, squared
    distance between every two tokens) for a token ``grid`` of any shape;
    timm makes them for a square one."""
    grid = tuple(grid)
    weight = attn.qk.weight
    index = torch.arange(grid[0] * grid[1], device=weight.device)
    row, col = index // grid[1], index % grid[1]
    dx = (col[None, :] - col[:, None]).to(weight.dtype)
    dy = (row[None, :] - row[:, None]).to(weight.dtype)
    return {'rel_indices': torch.stack([dx, dy, dx ** 2 + dy ** 2], -1)[None]}


def _mlp_values(attn: nn.Module, native: Tuple[int, int],
                grid: Sequence[int]) -> Dict[str, object]:
    """A ViT-RelPos attention's bias MLP (``rel_pos``): its window, index
    and log coordinates for a token ``grid``, as its ``set_window_size``
    makes them (the MLP's weights do not depend on the window)."""
    grid = tuple(grid)
    rel_pos = attn.rel_pos
    coords = rel_pos.rel_coords_log
    area = grid[0] * grid[1]
    values = {
        'window_size': grid, 'window_area': area,
        'bias_shape': (area, area, rel_pos.num_heads),
        'rel_coords_log': gen_relative_log_coords(
            grid, rel_pos.pretrained_window_size, mode=rel_pos.mode,
            device=coords.device, dtype=coords.dtype),
    }
    if rel_pos.relative_position_index is not None:
        values['relative_position_index'] = _rel_index(grid).view(-1).to(
            coords.device)
    return {f'rel_pos.{k}': v for k, v in values.items()}


#: Modules whose attention biases are a table over token offsets (LeViT's,
#: EfficientFormer's and EfficientFormerV2's), or that reshape tokens to
#: their grid (LeViT's subsampling).
OFFSET_MODULES = (EfficientFormerAttn, EfficientV2Attn,
                  EfficientV2AttnDownsample, LevitAttention,
                  LevitAttnDownsample, LevitDownsample)


def _offset_grid(module: nn.Module) -> Tuple[int, int]:
    """The token grid an :data:`OFFSET_MODULES` module was made for
    (EfficientFormer keeps no resolution: its square table tells it)."""
    if hasattr(module, 'resolution'):
        return tuple(to_2tuple(module.resolution))
    side = math.isqrt(module.attention_biases.shape[1])
    return (side, side) if side * side == module.attention_biases.shape[
        1] else (0, 0)


@lru_cache(maxsize=8)
def _offset_index(grid: Tuple[int, int], stride: int) -> torch.Tensor:
    """LeViT's (and EfficientFormer's) bias index for a grid: the bias of a
    query and a key token is the table's entry at their absolute offset
    ``(|dy|, |dx|)``; queries are every ``stride``-th token (LeViT's
    subsampling attention), as timm makes them. Made outside inference
    mode, as :func:`_rel_index`."""
    with torch.inference_mode(False):
        keys = torch.stack(ndgrid(torch.arange(grid[0]),
                                  torch.arange(grid[1]))).flatten(1)
        queries = torch.stack(ndgrid(
            torch.arange(0, grid[0], stride),
            torch.arange(0, grid[1], stride))).flatten(1)
        rel = (queries[..., :, None] - keys[..., None, :]).abs()
        return rel[0] * grid[1] + rel[1]


def _rpb_values(attn: nn.Module, native: Tuple[int, int],
                grid: Sequence[int]) -> Dict[str, object]:
    """A relative position bias over a whole map (CoAtNet's ``RelPosBias``
    or ``RelPosBiasTf``) for a token ``grid``: the table resized as BEiT's
    (timm's bicubic resize), its index or lookups, window and shapes, as
    its ``set_window_size`` makes them (without replacing the
    parameter). ``attn`` is the attention that holds it as ``rel_pos``."""
    bias = attn.rel_pos
    grid = tuple(grid)
    table = bias.relative_position_bias_table
    vocab = (2 * grid[0] - 1, 2 * grid[1] - 1)
    area = grid[0] * grid[1]
    values: Dict[str, object] = {'window_size': grid, 'window_area': area}
    if isinstance(bias, RelPosBiasTf):
        shape = (bias.num_heads, *vocab)
        lookup = bias.height_lookup
        values.update(
            bias_shape=shape,
            height_lookup=generate_lookup_tensor(
                grid[0], device=lookup.device, dtype=lookup.dtype),
            width_lookup=generate_lookup_tensor(
                grid[1], device=lookup.device, dtype=lookup.dtype))
    else:
        heads = table.shape[-1]
        shape = (vocab[0] * vocab[1], heads)
        values.update(bias_shape=(area, area, heads),
                      relative_position_index=_rel_index(grid).view(-1).to(
                          table.device))
    values['relative_position_bias_table'] = (
        resize_rel_pos_bias_table_simple(table, new_window_size=grid,
                                         new_bias_shape=shape))
    return {f'rel_pos.{k}': v for k, v in values.items()}


def _offset_values(attn: nn.Module, native: Tuple[int, int],
                   grid: Sequence[int]) -> Dict[str, object]:
    """An :data:`OFFSET_MODULES` module's state for a token ``grid``: its
    resolution; its bias table over offsets ``0..r-1`` on each axis
    resized (bicubic, as the relative tables above) to ``0..h-1`` and
    ``0..w-1``, with the index for the grid; its per-device cache of
    biases emptied, so the native ones are not reused."""
    grid = tuple(grid)
    values: Dict[str, object] = {}
    if hasattr(attn, 'resolution'):
        values['resolution'] = grid
    if hasattr(attn, 'N'):
        values['N'] = grid[0] * grid[1]
    # NOTE: queries every other token (EfficientFormerV2's downsampling
    # attention keeps their grid as resolution2).
    step = 2 if isinstance(attn, EfficientV2AttnDownsample) else getattr(
        attn, 'stride', 1)
    if hasattr(attn, 'resolution2'):
        half = (-(-grid[0] // 2), -(-grid[1] // 2))
        values.update(resolution2=half, N2=half[0] * half[1])
    table = getattr(attn, 'attention_biases', None)
    if table is None:
        return values
    heads = table.shape[0]
    values.update(
        attention_biases=torch.nn.functional.interpolate(
            table.reshape(1, heads, *native), size=grid, mode='bicubic',
            align_corners=False).reshape(heads, grid[0] * grid[1]),
        attention_bias_idxs=_offset_index(grid, step).to(table.device),
        attention_bias_cache={})
    return values


def _gcvit_values(block: nn.Module, native: Tuple[int, int],
                  grid: Sequence[int]) -> Dict[str, object]:
    """A GCViT block's windows for an input whose grid at the window's
    stride is ``grid``: windows that grow with the input, as timm makes
    them for that size (``window_ratio``), so that the stage's global query
    (its map after a fixed number of halvings) still has a window's size;
    the window attention's relative position bias made for them."""
    grid = tuple(grid)
    return {'window_size': grid, 'attn.window_size': grid,
            **{f'attn.{k}': v for k, v in _rpb_values(
                block.attn, native, grid).items()}}


#: Attentions whose position state is made for a token grid, by the layout
#: of their _PositionGrid: the values for a grid (see _grid_values).
GRID_MODULES: Dict[str, Callable[..., Dict[str, object]]] = {
    'REL': _window_values,
    'GPSA': _gpsa_values,
    'MLP': _mlp_values,
    'RPB': _rpb_values,
    'OFFSET': _offset_values,
    'GCVIT': _gcvit_values,
}


def _grid_values(attn: nn.Module, layout: str, native: Tuple[int, int],
                 grid: Sequence[int]) -> Dict[str, object]:
    """The position state of a :data:`GRID_MODULES` attention for a token
    ``grid``; nothing at its ``native`` grid (its own state), except when
    traced for ONNX, where the grid is a traced shape."""
    if not torch.jit.is_tracing() and tuple(grid) == tuple(native):
        return {}
    return GRID_MODULES[layout](attn, native, grid)


def _swap(model: nn.Module, values: Dict[str, object], saved: list) -> None:
    """Set ``model``'s parameters, buffers or attributes named in
    ``values`` to those values; ``saved`` gets what :func:`_restore` puts
    back."""
    for name, value in values.items():
        owner, _, attr = name.rpartition('.')
        module = model.get_submodule(owner)
        for kind in ('_parameters', '_buffers'):
            table = getattr(module, kind)
            if attr in table:
                saved.append((module, attr, kind, table.pop(attr)))
                break
        else:
            saved.append((module, attr, None, getattr(module, attr)))
        setattr(module, attr, value)


def _restore(saved: list) -> None:
    for module, attr, kind, old in reversed(saved):
        if kind is None:
            setattr(module, attr, old)
        else:
            delattr(module, attr)
            getattr(module, kind)[attr] = old


@contextmanager
def _replaced(model: nn.Module,
              values: Dict[str, object]) -> Iterator[None]:
    """Within the block, ``model``'s parameters, buffers or attributes named
    in ``values`` are those values (tensors computed from the parameters,
    so gradients flow back to them); restored on exit. torch's
    ``functional_call`` does this for tensors, but not under the ONNX
    tracer ("The stateless API can't be used with Jitted modules")."""
    saved: list = []
    try:
        _swap(model, values, saved)
        yield
    finally:
        _restore(saved)


def _swap_in(attn: nn.Module, values: Dict[str, object]) -> None:
    """Swap ``values`` into ``attn`` until :func:`_exit_window` (kept on
    the module, since a pre-hook and a forward hook share nothing else)."""
    attn.vb_saved = []
    _swap(attn, values, attn.vb_saved)


def _enter_window(attn: nn.Module, args) -> None:
    """Forward pre-hook of an attention of :data:`GRID_MODULES` (BEiT's,
    ConViT's, ViT-RelPos's): its position state for the grid the backbone set
    (``vb_grid``). A hook, not a swap around the whole model, so that
    gradient checkpointing, which runs the block again during the
    backward, gets it again."""
    _swap_in(attn, _grid_values(attn, attn.vb_layout, attn.vb_native,
                                attn.vb_grid))


def _exit_window(attn: nn.Module, args, output) -> None:
    """Forward hook: puts back what a pre-hook swapped in."""
    _restore(attn.__dict__.pop('vb_saved', []))


def _pooled(pool: Optional[nn.Module], n: int, axis: int) -> int:
    if pool is None:
        return n
    kernel, stride, pad = (to_2tuple(getattr(pool, a))[axis]
                           for a in ('kernel_size', 'stride', 'padding'))
    return (n + 2 * pad - kernel) // stride + 1


def _enter_mvit(attn: nn.Module, args) -> None:
    """Forward pre-hook of an MViTv2 attention: its relative position
    tables (one per axis, sized ``2 * max(q, k) - 1`` for the pretraining
    grid) linearly resized to the grid it is called with, as detectron2's
    MViTv2 resizes them (timm indexes past their end on a larger grid)."""
    values = {}
    for name, axis in (('rel_pos_h', 0), ('rel_pos_w', 1)):
        n = args[1][axis]
        length = 2 * max(_pooled(attn.pool_q, n, axis),
                         _pooled(attn.pool_k, n, axis)) - 1
        table = getattr(attn, name)
        if torch.jit.is_tracing() or length != table.shape[0]:
            values[name] = torch.nn.functional.interpolate(
                table.T.unsqueeze(0), size=length, mode='linear',
                align_corners=False)[0].T
    _swap_in(attn, values)


def _pad_same(model: nn.Module) -> Tuple[str, ...]:
    """Give the convolutions and pools that do not pad (VALID) SAME
    padding, ``(k - 1) * dilation / 2`` (odd kernels; pools do not count
    the padding), so that a level at stride s is ``ceil(H / s)`` and its
    cells line up with the image's grid, as TF's object detection API does
    with ``align_feature_maps=True`` for its Inception backbones. Weights
    are unchanged. Returns the names of the modules changed.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.Conv2d(8, 8, 1),
        ...                   nn.MaxPool2d(3, 2, padding=1))
        >>> _pad_same(m), m[0].padding
        (('0',), (1, 1))
    """
    changed = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            continue
        kernel = to_2tuple(module.kernel_size)
        dilation = to_2tuple(getattr(module, 'dilation', 1))
        if (to_2tuple(module.padding) != (0, 0) or max(kernel) == 1
                or not all(k % 2 for k in kernel)):
            continue
        module.padding = tuple((k - 1) * d // 2
                               for k, d in zip(kernel, dilation))
        if isinstance(module, nn.AvgPool2d):
            module.count_include_pad = False
        changed.append(name)
    return tuple(changed)


def _relax_patch_embeds(model: nn.Module) -> None:
    """timm's patch embeddings stop checking the input against their
    pretraining size (the position embeddings are resampled instead)."""
    for module in model.modules():
        if isinstance(module, PatchEmbed):
            module.strict_img_size = False


@MODELS.register_module()
class VBTimmBackbone(VBBackbone):
    """A timm model as a backbone: timm's own feature extractor
    (``features_only=True``) under the VB contract.

    Args:
        model_name (str): A timm model name, e.g. 'resnet50',
            'convnext_tiny', 'swin_tiny_patch4_window7_224'. A pretrained
            tag ('resnet50.a1_in1k') selects that tag's config.
        levels (str): How ``out_indices`` count. 'vb': 0..3 are the
            stride-4..32 levels whatever timm's numbering (levels finer
            than stride 4 go into the stem); single-scale models (ViT) get
            four stages, the quarters of their blocks, all at the model's
            stride. 'timm': timm's own feature levels and numbering (for
            ResNet, 0 is the stride-2 stem). Defaults to 'vb'.
        in_channels (int): Input channels; pretrained weights are adapted
            by timm's ``adapt_input_conv``. Defaults to 3.
        output_stride (int, optional): Dilate the last stages to this stride
            (8 or 16), for models that support it; ``out_strides`` follows.
            Defaults to None (the model's own).
        drop_path_rate (float, optional): Stochastic depth rate, for models
            that have it. Defaults to None (timm's default).
        pyramid (str, optional): How a single-scale model (every level at
            one stride: ViT, DeiT, DINOv2, EVA-02, BEiT) gives strides
            4..32. 'simple': ViTDet's simple feature pyramid from the last
            map, also for models with no level finer than stride 7 or
            coarser than 16 (VOLO, Sequencer); 'multilevel': four evenly
            spaced blocks, each resampled (BEiT, mmseg's ViT-UperNet);
            None: the raw levels at the model's own stride. A map at
            another stride than 16 (patch 14) is first resized to the
            stride-16 grid. 'fill': a multi-scale model's own levels at
            strides 4..32, the strides it lacks made from its next
            coarser level (2x2 transposed convs), levels past 32 not
            built (Visformer: 8, 16, 32; EfficientViT-MSRA: 16, 32, 64).
            'auto' is 'simple' where 'simple' applies, 'fill' for
            multi-scale models that lack some of strides 4..32 or have a
            level past 32 (without ``output_stride``), and None for the
            others. Defaults to 'auto'.
        model_kwargs (dict, optional): Other ``timm.create_model`` keywords
            (e.g. ``act_layer``, ``img_size``). timm's options for any
            input size (``dynamic_img_size``, ``dynamic_img_pad``,
            ``strict_img_size``) are set when the model takes them, unless
            given here. Defaults to None.
        out_indices (Sequence[int], optional): Stages to output, see
            ``levels``. Defaults to None: every stage (0..3 for a standard
            CNN).
        frozen_stages, norm_eval, frozen_bn, out_norm_cfg, init_cfg: See
            :class:`VBBackbone`. ``norm_eval`` and ``frozen_bn``
            cover timm's ``BatchNormAct2d`` (frozen BN keeps its act).
            ``init_cfg=dict(type='Pretrained', checkpoint=PATH)`` loads a
            local file strictly, through timm's loading code; None keeps
            timm's initialisation; any other ``init_cfg`` is applied by
            mmengine on top of it.
        with_cp (bool): Gradient checkpointing through timm's own
            ``set_grad_checkpointing``. Defaults to False.

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
                 out_indices: Optional[Sequence[int]] = None,
                 **kwargs) -> None:
        _check_model_name(model_name)
        if levels not in LEVEL_MODES:
            raise ValueError(f'levels={levels!r} is not valid; use one of '
                             f'{LEVEL_MODES}')
        check_int('in_channels', in_channels, minimum=1)
        model_kwargs = dict(model_kwargs or {})
        reserved = sorted(set(model_kwargs) & set(RESERVED_KWARGS))
        if reserved:
            raise ValueError(
                f'model_kwargs must not set {reserved}: VBTimmBackbone sets '
                'them itself (use in_channels, output_stride, out_indices, '
                'init_cfg)')
        if output_stride is not None:
            if output_stride not in (8, 16, 32):
                raise ValueError(f'output_stride={output_stride!r} is not '
                                 'valid; use 8, 16, 32 or None')
            model_kwargs['output_stride'] = output_stride
        if drop_path_rate is not None:
            model_kwargs['drop_path_rate'] = drop_path_rate
        self.model_name = model_name
        self.levels = levels
        self.in_channels = int(in_channels)
        self.output_stride = output_stride
        self.timm_module = model_entrypoint(
            split_model_name_tag(model_name)[0]).__module__.rpartition('.')[2]
        self.size_divisor = SIZE_DIVISORS.get(self.timm_module, 1)
        self.create_kwargs = dict(model_kwargs, in_chans=self.in_channels)
        self.create_kwargs.update(self._any_size_options(model_kwargs))
        if not (pyramid is None or isinstance(pyramid, str)):
            raise TypeError(f'pyramid must be one of {PYRAMIDS}, got '
                            f'{pyramid!r} ({type(pyramid).__name__})')
        if pyramid not in PYRAMIDS:
            raise ValueError(f'pyramid={pyramid!r} is not valid; use one of '
                             f'{PYRAMIDS}')

        # NOTE: the full-level structure is read from models on the meta
        # device: no memory, no initialisation, and stage_module_names can
        # answer for stages that are never built.
        self.timm_levels = self._read_levels()
        reductions = [lv.reduction for lv in self.timm_levels]
        self.pyramid_kind = self._resolve_pyramid(pyramid, levels)
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
        groups = _level_groups(full, self.timm_levels)
        self._stem_groups = tuple(n for j in self.plan.stem_levels
                                  for n in groups[j])
        self._stage_groups = [
            tuple(n for j in stage_levels for n in groups[j])
            for stage_levels in self.plan.stage_levels
        ]
        if not self.plan.stem_levels:
            k = self.plan.source_stage(0)
            first = self._stage_groups[k]
            own = self._own_module(full, self.timm_levels[
                self.plan.stage_levels[k][0]], first)
            self._stem_groups = first[:own]
            self._stage_groups[k] = first[own:]
        self._stage_groups = tuple(self._stage_groups)
        self._nhwc = str(getattr(full, 'output_fmt', 'NCHW')).endswith('NHWC')
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
        """The timm model's layout (converted by timm's own code), then
        this backbone's own state dict."""
        return (TimmLayout(self), VB_TIMM_SOURCE)

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
        """timm's pretrained config of the model (classifier name, class
        count, input size), read from a model on the meta device."""
        return dict(self._create_on_meta().pretrained_cfg)

    def _create_on_meta(self, **kwargs) -> nn.Module:
        try:
            with torch.device('meta'):
                return self.create_timm_model(**kwargs)
        except (NotImplementedError, RuntimeError):
            # NOTE: a model whose __init__ computes with tensor values
            # cannot be built on the meta device; build it for real.
            return self.create_timm_model(**kwargs)

    def _any_size_options(self, model_kwargs: dict) -> dict:
        """The first set of :data:`ANY_SIZE_OPTIONS` the model takes
        (none given in ``model_kwargs`` by the user)."""
        for options in ANY_SIZE_OPTIONS:
            if set(options) & set(model_kwargs):
                continue
            try:
                with torch.device('meta'):
                    self.create_timm_model(**options)
            except TypeError:
                continue
            except (NotImplementedError, RuntimeError):
                pass   # it took the keywords; meta just cannot build it
            return dict(options)
        return {}

    def _read_levels(self) -> List[TimmLevel]:
        model = self._create_on_meta()
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
        self.same_padding = False
        self.position_grids: Tuple[_PositionGrid, ...] = ()
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
        return _timm_levels(model)

    def _probe_input_sizes(self, full: nn.Module) -> None:
        """Learn which input sizes the model takes, before any forward.

        The extractor runs on the meta device (no memory, no compute): at
        its pretraining size; at a larger, non-square one that is a
        multiple of every divisor it states (``probe``); and at an odd one.

        * A size error at the odd size only: the smallest patch size
          (2..28) whose multiples run becomes :attr:`input_pad` (the input
          is padded to it and outputs cropped, as for Swin); if none does,
          :attr:`size_divisor` becomes ``probe``'s step.
        * A size error at ``probe``: multiples of ``32 * k`` (k = 2..16)
          are tried at two non-square sizes each, and the smallest that
          runs becomes :attr:`size_divisor` (HaloNet's blocks: 256); if
          none does, position state made for the pretraining token grid
          (:func:`_position_grids`: CaiT's, VOLO's, Visformer's
          embeddings, BEiT's tables, ...) is made for each input's grid
          instead (:attr:`position_grids`, with the input padded to their
          largest stride); if that does not run either, the model takes
          one size only (token-mixing layers, block grids, and no timm
          option for others): ``ValueError`` naming it, instead of timm's
          error at the first forward.
        * Maps smaller than ``size / stride`` at ``probe`` (convolutions
          that do not pad, Inception): SAME padding
          (:attr:`same_padding`, :func:`_pad_same`) if it gives such maps
          at ``probe`` and at an odd size; otherwise ``ValueError``.

        Models that meta cannot run (or that were built for real) are left
        to the forward's check. A user who passes
        ``model_kwargs=dict(img_size=...)`` has chosen the one size and is
        not probed. Results are cached per process.
        """
        key = (self.model_name, repr(sorted(self.create_kwargs.items())),
               self.in_channels)
        if key not in _SIZE_PROBES:
            _SIZE_PROBES[key] = self._probe(full)
        found = _SIZE_PROBES[key]
        if found.message:
            raise ValueError(found.message)
        self.size_divisor = max(self.size_divisor, found.divisor)
        self.input_pad = max(self.input_pad, found.pad)
        self.position_grids = found.positions
        self.same_padding = found.same_padding

    def _probe(self, full: nn.Module) -> _SizeProbe:
        param = next(full.parameters(), None)
        if param is None or not param.is_meta:
            return _SizeProbe()
        native = tuple(self.pretrained_input_size)
        step = max(32, self.size_divisor, self.input_pad)

        # NOTE: run_at reads positions when it runs: empty until the
        # model's position state is found (below).
        positions: Tuple[_PositionGrid, ...] = ()

        def run_at(size) -> Tuple[Optional[list], Optional[Exception]]:
            x = torch.empty(1, self.in_channels, *size, device='meta')
            try:
                with torch.no_grad(), _replaced(
                        full, _resampled_positions(full, positions, size)):
                    return _feature_list(full.eval()(x)), None
            except Exception as err:  # noqa: BLE001 - classified below
                return None, err

        # NOTE: some models cannot finish on meta (Gemma4's ViT calls
        # .item()); past their size checks, they stop with the same error
        # at every size: that error counts as running.
        _, at_native = run_at(native)
        if at_native is not None and _is_size_error(at_native):
            return _SizeProbe()

        def ran(err: Optional[Exception]) -> bool:
            return err is None or (at_native is not None
                                   and str(err) == str(at_native))

        def runs(div: int) -> bool:
            # NOTE: two non-square multiples of div, larger than the native
            # size (so a one-size model cannot pass by chance), one side an
            # odd multiple.
            a = -(-max(native) // div) + 1
            return all(ran(run_at(size)[1])
                       for size in ((a * div, (a + 1) * div),
                                    ((a + 1) * div, a * div)))

        probe = round_up_to(tuple(n + extra
                                for n, extra in zip(native, (64, 128))), step)
        outs, err = run_at(probe)
        if ran(err):
            message = self._map_size_message(probe, outs) if outs else ''
            if message and _pad_same(full):
                # NOTE: convolutions that do not pad (Xception, Inception
                # v4): SAME padding, as TF's detection API does for them.
                odd = (probe[0] - 31, probe[1] - 29)
                checked = [(size, run_at(size)) for size in (probe, odd)]
                if all(o is not None and not self._map_size_message(size, o)
                       for size, (o, _) in checked):
                    return _SizeProbe(same_padding=True)
                message = message.replace(
                    '(its convolutions do not pad)',
                    '(its convolutions do not pad, and SAME padding on its '
                    'convolution and pool modules does not line its maps up '
                    'either)')
            if message or self.input_pad > 1:
                return _SizeProbe(message)
            _, err = run_at((probe[0] - 31, probe[1] - 29))
            if ran(err) or not _is_size_error(err):
                return _SizeProbe()
            pad = next((d for d in (2, 4, 7, 8, 14, 16, 28) if runs(d)), 1)
            return _SizeProbe(pad=pad, divisor=1 if pad > 1 else step)
        if not _is_size_error(err):
            return _SizeProbe()
        tried = [32 * k for k in range(2, 17)
                 if 32 * k > step and 32 * k % step == 0]
        for div in tried:
            if runs(div):
                return _SizeProbe(divisor=div)
        # NOTE: fixed learned position embeddings (CaiT, VOLO, Visformer)
        # are resampled per input from the pretraining grid, as timm does
        # for ViT; the input is padded to their largest stride.
        positions = _position_grids(
            full, native, [lv.reduction for lv in self.timm_levels])
        if positions:
            _relax_patch_embeds(full)
            pad = max(g.stride for g in positions)
            if runs(pad):
                return _SizeProbe(pad=pad, positions=positions)
        reason = (str(err).splitlines() or [''])[0][:160]
        return _SizeProbe(
            f'model_name={self.model_name!r} takes only {native[0]}x'
            f'{native[1]} inputs: at {probe[0]}x{probe[1]} timm fails '
            f'({type(err).__name__}: {reason}), and at multiples of '
            f'{tried[0] if tried else step} to {tried[-1] if tried else step}'
            ' too; timm offers it no option for other sizes. Detection '
            'inputs vary in size: choose another model, or pass '
            'model_kwargs=dict(img_size=...) to build it for the one size '
            'you will feed (other sizes then raise at forward)')

    @property
    def _extracted_levels(self) -> Tuple[int, ...]:
        """The timm levels of the full extractor: timm cannot extract a
        level whose module is '' (TResNet's stride-2 level)."""
        return tuple(lv.index for lv in self.timm_levels if lv.module)

    def _map_size_message(self, size: Tuple[int, int], outs: list) -> str:
        """The build error for maps that are not ``size / stride`` (floor
        or ceil) at the levels this backbone outputs, or ''."""
        for k in range(len(self.plan.stage_levels)):
            level = self.timm_levels[self.plan.output_level(k)]
            extracted = self._extracted_levels
            at = (extracted.index(level.index)
                  if level.index in extracted else len(outs))
            out = outs[at] if at < len(outs) else None
            if out is None:
                continue
            got = tuple(out.shape[1:3] if self._nhwc else out.shape[2:4])
            want = tuple(-(-n // level.reduction) for n in size)
            if all(g in (n // level.reduction, w)
                   for g, n, w in zip(got, size, want)):
                continue
            return (
                f'model_name={self.model_name!r} gives maps smaller than its '
                f'strides say: at {size[0]}x{size[1]} its stride-'
                f'{level.reduction} level is {got[0]}x{got[1]}, not '
                f'{want[0]}x{want[1]} (its convolutions do not pad). '
                'Anchors and RoI pooling placed at that stride would cover '
                'only part of the image: choose another model')
        return ''

    def _resolve_pyramid(self, pyramid: Optional[str],
                         levels: str) -> Optional[str]:
        strides = [lv.reduction for lv in self.timm_levels]
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
            self.output_stride is None)
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
                raise self._levels_error(pyramid, levels)
            if not fillable:
                raise ValueError(
                    f"pyramid='fill' completes a model's own levels at "
                    'strides 4, 8, 16, 32 to all four; '
                    f'{self.model_name!r} has timm strides {strides}'
                    + (f' (output_stride={self.output_stride})'
                       if self.output_stride is not None else '')
                    + ": use pyramid=None or 'auto'")
            return pyramid
        if pyramid == 'multilevel' and not single:
            raise ValueError(
                f'pyramid={pyramid!r} is for single-scale models (ViT-style, '
                f'every level at one stride); {self.model_name!r} is already '
                f'multi-scale (timm strides {strides}): use pyramid=None or '
                "'auto'")
        if not plain:
            raise ValueError(
                f'pyramid={pyramid!r} is for models without a pyramid of '
                'their own (ViT-style: no level finer than stride 7 or '
                f'coarser than 16); {self.model_name!r} is already '
                f'multi-scale (timm strides {strides}): use pyramid=None or '
                "'auto'")
        if levels != 'vb':
            raise self._levels_error(pyramid, levels)
        return pyramid

    @staticmethod
    def _levels_error(pyramid: str, levels: str) -> ValueError:
        return ValueError(f'pyramid={pyramid!r} needs levels=\'vb\' (its '
                         'outputs are strides 4..32), got '
                         f'levels={levels!r}')

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

    @staticmethod
    def _own_module(full: nn.Module, level: TimmLevel,
                    names: Sequence[str]) -> int:
        """Position in ``names`` of the first module that is, contains or
        lies inside the level's own module."""
        chain = _chain(full)
        module = _resolve_modules(full, chain, [level])[0]
        for p, n in enumerate(names):
            if module is not None and chain.contains(n, module):
                return p
        return len(names) - 1

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
        if self.position_grids:
            _relax_patch_embeds(body)
        #: The extractor's modules given SAME padding (see _pad_same).
        self.same_padded = _pad_same(body) if self.same_padding else ()
        # NOTE: BEiT's tables and ConViT's indices are swapped by hooks on
        # their attentions (see _enter_window), for the grid
        # forward_features sets.
        modules = dict(body.named_modules())
        if self.position_grids:
            # NOTE: the input is padded to the strides of the position
            # state the built extractor keeps (LeViT's stride-64 stage is
            # not built under pyramid='fill': 32, not 64).
            names = set(modules) | {n for n, _ in body.named_parameters()}
            self.position_grids = tuple(g for g in self.position_grids
                                        if g.name in names)
            self.input_pad = max([self._embed_pad] + [
                g.stride for g in self.position_grids])
        grids = [g for g in self.position_grids
                 if g.layout in GRID_MODULES and g.name in modules]
        self._window_names = tuple(g.name for g in grids)
        for g in grids:
            attn = modules[g.name]
            attn.vb_layout = g.layout
            attn.vb_native = attn.vb_grid = g.grid
            attn.register_forward_pre_hook(_enter_window)
            attn.register_forward_hook(_exit_window)
        mvit = tuple(n for n, m in modules.items()
                     if isinstance(m, MVIT_ATTENTIONS)
                     and m.rel_pos_type == 'spatial')
        for name in mvit:
            modules[name].register_forward_pre_hook(_enter_mvit)
            modules[name].register_forward_hook(_exit_window)
        self._window_names += mvit
        prune = _quirks(body).prune
        if prune is not None:
            prune(body, self._stage_groups[self.num_built_stages - 1],
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
        if self.pyramid_kind == 'fill':
            modules['pyramid'] = nn.ModuleDict({
                str(i): rescale_level(
                    self.timm_levels[self._source_level(i)].channels,
                    self._fill_steps(i))
                for i in self.out_indices
            })
        elif self.pyramid_kind is not None:
            width = self.timm_levels[indices[-1]].channels
            modules['pyramid'] = nn.ModuleDict({
                str(i): pyramid_level(i, width, self.pyramid_kind)
                for i in self.out_indices
            })
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
            padded = x.shape[-2:]
            for g in self.position_grids:
                if g.layout in GRID_MODULES and g.name in self._window_names:
                    self.body.get_submodule(g.name).vb_grid = (
                        padded[0] // g.stride, padded[1] // g.stride)
            with _replaced(self.body, _resampled_positions(
                    self.body, [g for g in self.position_grids
                                if g.layout not in GRID_MODULES], padded)):
                feats = self.body(x)
        except (AssertionError, RuntimeError) as err:
            # NOTE: a block that failed mid-way never ran its exit hook.
            for name in self._window_names:
                _exit_window(self.body.get_submodule(name), None, None)
            native = tuple(self.pretrained_input_size)
            if tuple(x.shape[-2:]) == native or not _is_size_error(err):
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
        by_level = dict(zip(self._body_levels, _feature_list(feats)))
        return [by_level[self._source_level(i)] for i in self.out_indices]

    # ------------------------------------------------------------------
    # Layer-wise learning-rate decay (ViT-style models).
    def _blocks(self) -> nn.Module:
        model = getattr(self.body, 'model', None)
        blocks = getattr(model, 'blocks', None)
        if not isinstance(self.body, FeatureGetterNet) or blocks is None:
            raise AttributeError(
                f'layer-wise lr decay by block is for single-scale models '
                f'(ViT-style); {self.model_name!r} has no blocks list')
        return blocks

    @property
    def lr_decay_num_layers(self) -> int:
        """``paramwise_cfg['num_layers']`` of layer-wise decay for a
        ViT-style model: its number of (built) blocks.

        Example:
            >>> VBTimmBackbone('vit_tiny_patch16_224').lr_decay_num_layers
            12
        """
        return len(self._blocks())

    def lr_decay_layer_id(self, name: str) -> int:
        """Layer id of parameter ``name`` (relative to the backbone), as
        ViTDet and BEiT count: the patch and position embeddings and the
        class token are 0, block ``i`` is ``i + 1``, everything else (the
        pyramid, output norms, and after the backbone) ``num_layers + 1``.

        Example:
            >>> m = VBTimmBackbone('vit_tiny_patch16_224')
            >>> [m.lr_decay_layer_id(n) for n in ('body.model.pos_embed',
            ...     'body.model.blocks.3.mlp.fc1.weight', 'pyramid.0.0.weight')]
            [0, 4, 13]
        """
        num = self.lr_decay_num_layers
        if name.startswith('body.model.blocks.'):
            return int(name.split('.')[3]) + 1
        stem = tuple(f'{n}.' for n in self.stem_module_names()) + tuple(
            self.stem_parameter_names())
        if name.startswith(stem) or name in stem:
            return 0
        return num + 1

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
        renames: Dict[str, str] = {}
        if isinstance(self.body, (FeatureDictNet, FeatureHookNet)):
            full = self._create_on_meta()
            from timm.models._features import _module_list
            for flat in (True, False):
                for new, old, _ in _module_list(full, flat):
                    renames.setdefault(new, old)
        out = {}
        for key in self.state_dict() if keys is None else keys:
            if not key.startswith('body.'):
                continue
            rest = key[len('body.'):]
            if isinstance(self.body, FeatureGetterNet):
                out[key] = rest[len('model.'):]
            elif renames:
                head, _, tail = rest.partition('.')
                out[key] = f'{renames.get(head, head)}.{tail}'
            else:
                out[key] = rest
        return out
