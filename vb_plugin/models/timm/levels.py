"""timm's feature levels mapped onto the contract's stages.

timm numbers its feature levels from its own first feature (for ResNet the
stride-2 stem, for ConvNeXt stage 0) and names the module that makes each
(``feature_info``). Here, with ``levels='vb'``, stage 0 is the first level
at stride >= 4, so stages 0..3 are strides 4..32 (C2..C5) as in
:class:`~vb_plugin.VBResNet`; single-scale models (every level at one
stride: ViT's blocks) get four stages of consecutive levels.
``levels='timm'`` keeps timm's numbering.

Stages for ``frozen_stages`` are cut at the modules that produce each level:
the extractor is read as a chain of module names (:func:`level_groups`), with
the quirks of the extractors that are not plain chains (HRNet, EfficientNet,
MobileNetV3: :data:`EXTRACTOR_QUIRKS`) and of timm's metadata
(:data:`LEVEL_MODULE_RENAMES`) written as data.
"""
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from timm.models._features import (FeatureDictNet, FeatureGetterNet,
                                   FeatureHookNet)
from timm.models.efficientnet import EfficientNetFeatures
from timm.models.hrnet import HighResolutionNetFeatures
from timm.models.mobilenetv3 import MobileNetV3Features
from torch import nn

from ...layers.pyramid import PYRAMID_STRIDES

#: How ``out_indices`` count (``levels``): see :func:`plan_stages`.
LEVEL_MODES = ('vb', 'timm')


#: Level module names timm's ``feature_info`` gets wrong (timm 1.0.31), by
#: timm model module: (wrong prefix, the model's own). Twins and MViTv2 name
#: their stages 'block.k', a module neither has.
LEVEL_MODULE_RENAMES = {
    'twins': ('block.', 'blocks.'),
    'mvitv2': ('block.', 'stages.'),
}


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


def level_groups(features: nn.Module,
                 levels: Sequence[TimmLevel]) -> List[List[str]]:
    """The extractor's modules that lead to each timm level, in order:
    group ``j`` holds the modules after level ``j - 1``'s up to level
    ``j``'s own module. A level whose module the model does not have (its
    metadata names none, e.g. MobileNetV5's stem 'bn1') gets the modules up
    to the next level's."""
    found = quirks(features)
    if found.level_groups is not None:
        return found.level_groups(list(_chain(features).names), len(levels))
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


def quirks(features: nn.Module) -> _Quirks:
    """The :data:`EXTRACTOR_QUIRKS` of ``features``' class (none: the
    generic code)."""
    for cls in type(features).__mro__:
        if cls in EXTRACTOR_QUIRKS:
            return EXTRACTOR_QUIRKS[cls]
    return _Quirks()


def feature_list(feats) -> List[torch.Tensor]:
    """timm's extractor's outputs as a list (FeatureDictNet gives a dict)."""
    return list(feats.values()) if isinstance(feats, dict) else list(feats)


def feature_levels(model: nn.Module) -> List[TimmLevel]:
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


def own_module(full: nn.Module, level: TimmLevel,
               names: Sequence[str]) -> int:
    """Position in ``names`` of the first module that is, contains or
    lies inside the level's own module."""
    chain = _chain(full)
    module = _resolve_modules(full, chain, [level])[0]
    for p, n in enumerate(names):
        if module is not None and chain.contains(n, module):
            return p
    return len(names) - 1


def prune_unused(body: nn.Module, kept_groups: Sequence[str],
                 levels: Sequence[int]) -> None:
    """Remove what an extractor built after the last requested level, where
    timm itself does not (:data:`EXTRACTOR_QUIRKS`): ``kept_groups`` are the
    module names of the last built stage, ``levels`` the extracted levels."""
    prune = quirks(body).prune
    if prune is not None:
        prune(body, kept_groups, levels)
