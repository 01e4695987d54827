"""Backbone-to-neck-and-head wiring, checked wherever a model is built.

A detector config writes the backbone's geometry twice more: the neck's
``in_channels`` and the heads' strides (anchor/prior generators, RoI
extractors). When they disagree with the backbone, mmdet fails late (a conv
shape error at the first forward) or not at all (anchors and RoI pooling at
the wrong scale). :func:`wire_model` fills ``neck.in_channels='auto'`` from
the backbone's ``out_channels`` and raises a ``ValueError`` on any mismatch:
channels, strides, and the input size divisor the backbone needs against the
data preprocessor's padding.

:func:`install_build_hook` (run by ``import vb_plugin``, so by any config's
``custom_imports``) makes every OpenMMLab entry point do this: it wraps the
build function of mmengine's root ``MODELS`` registry and of its existing
children (mmdet's, mmseg's). A registry created later inherits the wrapped
function from its parent, as mmengine registries do. So mmdet's and mmseg's
``tools/train.py``, ``init_detector``, ``DetInferencer``, ``init_model`` and
``Runner.from_cfg`` all build wired, checked models. The wrapper only acts on
a config that has both a ``backbone`` and a ``neck`` or head strides, and
only when the backbone reports ``out_channels`` (every vb_plugin backbone);
it then builds the backbone once more on the ``meta`` device (no memory, no
initialisation).
"""
import copy
import math
import numbers
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from mmengine.registry import MODELS, Registry

#: Necks whose output strides follow from their config: the backbone levels
#: they use, then one stride-2 level per extra output (mmdet's FPN and
#: ChannelMapper, with or without extra convs).
_STRIDED_NECKS = ('FPN', 'PAFPN', 'ChannelMapper')


def _short_type(cfg: dict) -> str:
    t = cfg.get('type')
    name = t if isinstance(t, str) else getattr(t, '__name__', repr(t))
    return name.rpartition('.')[2]


def _backbone_class(backbone_cfg: dict, registry: Registry):
    t = backbone_cfg.get('type')
    if not isinstance(t, str):
        return t
    with registry.switch_scope_and_registry(
            backbone_cfg.get('_scope_')) as reg:
        return reg.get(t)


def meta_backbone(backbone_cfg: dict,
                  registry: Registry = MODELS) -> Optional[torch.nn.Module]:
    """Build ``backbone_cfg`` on the ``meta`` device (no memory, no
    initialisation, no weights loaded), or return None when its class does
    not report ``out_channels`` (e.g. mmdet's own ResNet) or is unknown.

    Example:
        >>> import vb_plugin  # noqa: F401
        >>> meta_backbone(dict(type='VBResNet', depth=18)).out_channels
        (64, 128, 256, 512)
    """
    cls = _backbone_class(backbone_cfg, registry)
    if not isinstance(cls, type) or not hasattr(cls, 'out_channels'):
        return None
    cfg = copy.deepcopy(dict(backbone_cfg))
    cfg.pop('init_cfg', None)
    try:
        with torch.device('meta'):
            return registry.build(cfg)
    except (NotImplementedError, RuntimeError):
        # NOTE: a backbone whose __init__ computes with tensor values cannot
        # be built on the meta device; build it for real.
        return registry.build(cfg)


# ----------------------------------------------------------------------
# Channels.
def _check_neck_channels(model: dict,
                         backbone_name: str,
                         backbone: Optional[torch.nn.Module]
                         ) -> Optional[Tuple[int, ...]]:
    neck = model.get('neck')
    if isinstance(neck, (list, tuple)) and neck and all(
            isinstance(n, dict) for n in neck):
        for k, later in enumerate(neck[1:], start=1):
            if later.get('in_channels', None) == 'auto':
                raise ValueError(
                    f"model.neck[{k}].in_channels='auto': only the first "
                    "neck of a list takes the backbone's outputs and can be "
                    f"'auto'; model.neck[{k}] ({later.get('type')}) takes "
                    f'the outputs of model.neck[{k - 1}]: write its '
                    'in_channels')
        neck, short = neck[0], 'neck[0].in_channels'
    else:
        short = 'neck.in_channels'
    if not isinstance(neck, dict):
        return None
    name = f'model.{short}'
    given = neck.get('in_channels', 'auto')
    channels = getattr(backbone, 'out_channels', None)
    if channels is None:
        if given in (None, 'auto'):
            raise ValueError(
                f"{name}={given!r} needs a backbone that reports its "
                f'out_channels; {backbone_name} does not: write {short} as '
                'a list of ints, one per backbone output')
        return None
    channels = tuple(int(c) for c in channels)
    where = (f'{backbone_name} with out_indices='
             f'{tuple(getattr(backbone, "out_indices", ()))} gives '
             f'out_channels {list(channels)}')
    if given in (None, 'auto'):
        neck['in_channels'] = list(channels)
        return channels
    if isinstance(given, numbers.Integral) and not isinstance(given, bool):
        if len(channels) != 1:
            raise TypeError(
                f'{name}={given!r} is an int, but {where}, one map per '
                f"output: set {short}={list(channels)} or 'auto' (an int is "
                'for a neck that takes a single map, behind a backbone with '
                'one output)')
        if int(given) != channels[0]:
            raise ValueError(
                f'{name}={given!r} does not match the backbone: {where}. '
                f'Set {short}={channels[0]}.')
        return channels
    if isinstance(given, (str, bytes)) or not isinstance(
            given, (list, tuple)) or not all(
                isinstance(c, numbers.Integral) and not isinstance(c, bool)
                for c in given):
        raise TypeError(
            f"{name} must be 'auto' or a list of ints (one per backbone "
            f'output), got {given!r} ({type(given).__name__}); {where}')
    if [int(c) for c in given] != list(channels):
        raise ValueError(
            f'{name}={list(given)} does not match the backbone: {where}. '
            f"Set {short}={list(channels)} or 'auto'.")
    return channels


# ----------------------------------------------------------------------
# Strides.
def _neck_class(neck: dict, registry: Registry):
    try:
        return _backbone_class(neck, registry)
    except KeyError:
        return None


def neck_out_strides(neck: Optional[dict],
                     in_strides: Sequence[float],
                     registry: Registry = MODELS) -> Optional[List[float]]:
    """Strides of a neck's outputs, for the necks whose geometry follows
    from their config (FPN, PAFPN, ChannelMapper, and a neck class with a
    ``strides_from_config(cfg, in_strides)`` classmethod, as
    ``VBSimpleFeaturePyramid``); None for others.

    Without a neck the head sees the backbone's own strides.

    Example:
        >>> neck_out_strides(dict(type='FPN', num_outs=5), [4, 8, 16, 32])
        [4, 8, 16, 32, 64]
        >>> neck_out_strides(dict(type='FPN', start_level=1, num_outs=5),
        ...                  [4, 8, 16, 32])
        [8, 16, 32, 64, 128]
        >>> import vb_plugin  # noqa: F401
        >>> neck_out_strides(dict(type='VBSimpleFeaturePyramid',
        ...                       in_channels='auto', num_outs=5), [16])
        [4, 8, 16, 32, 64]
    """
    strides = list(in_strides)
    if neck is None:
        return strides
    if not isinstance(neck, dict):
        return None
    if _short_type(neck) not in _STRIDED_NECKS:
        # NOTE: a neck that states its geometry (found in the registry, so
        # this floor imports no neck).
        from_config = getattr(_neck_class(neck, registry),
                              'strides_from_config', None)
        out = from_config(neck, strides) if callable(from_config) else None
        return None if out is None else list(out)
    if _short_type(neck) == 'ChannelMapper':
        used = strides
        num_outs = neck.get('num_outs') or len(used)
    else:
        start = int(neck.get('start_level', 0))
        end = int(neck.get('end_level', -1))
        stop = len(strides) if end in (-1, len(strides) - 1) else end + 1
        used = strides[start:stop]
        num_outs = int(neck.get('num_outs', len(used)))
    out = list(used)
    while len(out) < num_outs:
        out.append(out[-1] * 2)
    return out


def _as_level_strides(value) -> Optional[List[float]]:
    if not isinstance(value, (list, tuple)):
        return None
    out = []
    for s in value:
        if isinstance(s, (list, tuple)) and len(s) == 2 and s[0] == s[1]:
            s = s[0]
        if not isinstance(s, numbers.Real) or isinstance(s, bool):
            return None
        out.append(s)
    return out


def head_strides(model: dict) -> List[Tuple[str, List[float], bool]]:
    """The strides that a model's heads expect, from their configs.

    Returns:
        list: ``(option, strides, prefix)`` triples; ``prefix`` is True for
        RoI extractors, which use the first ``len(strides)`` neck levels,
        False for anchor/prior generators, which need every level.

    Example:
        >>> head_strides(dict(rpn_head=dict(anchor_generator=dict(
        ...     strides=[4, 8, 16, 32, 64]))))
        [('model.rpn_head.anchor_generator.strides', [4, 8, 16, 32, 64], False)]
    """
    found = []
    for head in ('rpn_head', 'bbox_head'):
        cfg = model.get(head)
        if not isinstance(cfg, dict):
            continue
        for gen in ('anchor_generator', 'prior_generator'):
            g = cfg.get(gen)
            strides = _as_level_strides(
                g.get('strides') if isinstance(g, dict) else None)
            if strides is not None:
                found.append((f'model.{head}.{gen}.strides', strides, False))
    roi = model.get('roi_head')
    if isinstance(roi, dict):
        for ext in ('bbox_roi_extractor', 'mask_roi_extractor'):
            cfgs = roi.get(ext)
            items = cfgs if isinstance(cfgs, (list, tuple)) else [cfgs]
            for k, c in enumerate(items):
                if not isinstance(c, dict):
                    continue
                strides = _as_level_strides(c.get('featmap_strides'))
                where = ext if len(items) == 1 else f'{ext}[{k}]'
                if strides is not None:
                    found.append((f'model.roi_head.{where}.featmap_strides',
                                  strides, True))
    return found


def _fmt(strides: Sequence[float]) -> str:
    return '[' + ', '.join(f'{s:g}' for s in strides) + ']'


def _check_strides(model: dict, backbone_name: str,
                   backbone: torch.nn.Module,
                   registry: Registry = MODELS) -> None:
    in_strides = getattr(backbone, 'out_strides', None)
    if in_strides is None:
        return
    neck = model.get('neck')
    if isinstance(neck, (list, tuple)):
        neck = neck[0] if len(neck) == 1 else 'unknown'
    given = neck_out_strides(neck, in_strides, registry)
    if given is None:
        return
    via = ('' if neck is None else
           f' through {_short_type(neck)} (model.neck)')
    for option, wanted, prefix in head_strides(model):
        seen = given[:len(wanted)] if prefix else given
        if [float(s) for s in seen] != [float(s) for s in wanted]:
            raise ValueError(
                f'{option}={_fmt(wanted)} does not match the feature maps it '
                f'gets: {backbone_name} gives out_strides '
                f'{_fmt(in_strides)}, which{via} become strides '
                f'{_fmt(given)}. Set {option.rpartition(".")[2]} to '
                f'{_fmt(given[:len(wanted)] if prefix else given)}, or '
                "change the backbone's out_indices/strides.")


# ----------------------------------------------------------------------
# Input size.
def _check_size_divisor(model: dict, backbone_name: str,
                        backbone: torch.nn.Module) -> None:
    need = int(getattr(backbone, 'size_divisor', 1) or 1)
    pre = model.get('data_preprocessor')
    if need <= 1 or not isinstance(pre, dict):
        return
    for key in ('pad_size_divisor', 'size_divisor'):
        if key in pre and pre[key] is not None:
            have = int(pre[key])
            if have % need:
                raise ValueError(
                    f'model.data_preprocessor.{key}={have} does not suit the '
                    f'backbone: {backbone_name} needs inputs whose height and '
                    f'width are multiples of {need} (size_divisor={need}). '
                    f'Set {key}={have * need // math.gcd(have, need)}.')
            return
    if _short_type(pre) in ('DetDataPreprocessor', 'SegDataPreProcessor'):
        raise ValueError(
            f'model.data_preprocessor does not pad: {backbone_name} needs '
            f'inputs whose height and width are multiples of {need} '
            f'(size_divisor={need}). Set pad_size_divisor (mmdet) or '
            f'size_divisor (mmseg) to a multiple of {need}.')


# ----------------------------------------------------------------------
def wire_model(model: dict, registry: Registry = MODELS
               ) -> Optional[Tuple[int, ...]]:
    """Fill ``neck.in_channels='auto'`` and check the wiring of a model
    config in place: neck channels, head strides, input size divisor.

    Args:
        model (dict): A model config with a ``backbone`` (a detector's or a
            segmentor's). Others are left alone.
        registry (Registry): The registry that builds it. Defaults to
            mmengine's root ``MODELS`` (the current default scope applies).

    Returns:
        tuple | None: The backbone's out_channels, or None when the model
        has no backbone or its backbone does not report them.

    Raises:
        ValueError: On a mismatch, naming both sides.
        TypeError: If ``neck.in_channels`` is neither ``'auto'``, a list of
            ints nor (for one backbone output) an int.

    Example:
        >>> model = dict(
        ...     backbone=dict(type='VBResNet', depth=18, out_indices=(1, 2, 3)),
        ...     neck=dict(type='FPN', in_channels='auto', out_channels=8,
        ...               num_outs=3))
        >>> wire_model(model), model['neck']['in_channels']
        ((128, 256, 512), [128, 256, 512])
    """
    backbone_cfg = model.get('backbone') if isinstance(model, dict) else None
    if not isinstance(backbone_cfg, dict):
        return None
    neck = model.get('neck')
    needs = (neck is not None or head_strides(model)
             or isinstance(model.get('data_preprocessor'), dict))
    if not needs:
        return None
    backbone = meta_backbone(backbone_cfg, registry)
    name = _short_type(backbone_cfg)
    if backbone is None:
        # NOTE: still refuses in_channels='auto', which needs out_channels.
        _check_neck_channels(model, name, None)
        return None
    channels = _check_neck_channels(model, name, backbone)
    _check_strides(model, name, backbone, registry)
    _check_size_divisor(model, name, backbone)
    return channels


def _needs_wiring(cfg) -> bool:
    return (isinstance(cfg, dict) and isinstance(cfg.get('backbone'), dict)
            and 'type' in cfg)


def _wrap(build: Callable) -> Callable:

    def build_wired(cfg, *args, registry: Registry, **kwargs):
        if _needs_wiring(cfg):
            cfg = copy.deepcopy(cfg)
            wire_model(cfg, registry)
        return build(cfg, *args, registry=registry, **kwargs)

    build_wired.__wrapped__ = build
    build_wired.__doc__ = (f'{build.__name__}, after vb_plugin.wiring.'
                           'wire_model fills and checks the model wiring.')
    return build_wired


def _walk(registry: Registry):
    yield registry
    for child in registry.children.values():
        yield from _walk(child)


def install_build_hook(root: Registry = MODELS) -> int:
    """Make ``root`` and its descendants wire models as they build them.

    Every registry whose build function is the root's original one gets the
    wrapped function; registries created later copy it from their parent.
    Calling it again changes nothing.

    Returns:
        int: How many registries were changed by this call.

    Example:
        >>> install_build_hook()  # import vb_plugin already did it
        0
    """
    original = getattr(root.build_func, '__wrapped__', root.build_func)
    wrapped = (root.build_func if hasattr(root.build_func, '__wrapped__')
               else _wrap(original))
    changed = 0
    for reg in _walk(root):
        if reg.build_func is original:
            reg.build_func = wrapped
            changed += 1
    return changed
