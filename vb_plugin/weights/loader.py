"""Strict, explained loading of pretrained weights into a VB backbone or
neck."""
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
from mmengine.logging import print_log
from torch import nn

from .io import (CheckpointError, PathLike, extract_state_dict,
                 read_checkpoint)
from .rules import select_source

_SHOW = 12
#: How reports and errors name a checkpoint given as a dict.
IN_MEMORY = '<in memory>'


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        checkpoint (str): The file that was read.
        source (str): The recognised layout, e.g. 'torchvision'.
        prefix (str): The key prefix that was selected ('' for none).
        container (str): Where the state dict sat in the file, e.g.
            'state_dict' ('' for a bare state dict).
        loaded (list[str]): Model keys that received a checkpoint tensor.
        kept_initial (list[str]): Model keys the checkpoint does not have and
            that keep their initial values by design (new layers such as
            output norms).
        dropped (dict[str, list[str]]): Checkpoint keys that were not loaded,
            by reason (classifier head, outside the prefix, stage not built).
    """
    checkpoint: str
    source: str
    prefix: str
    container: str = ''
    loaded: List[str] = field(default_factory=list)
    kept_initial: List[str] = field(default_factory=list)
    dropped: Dict[str, List[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f'Loaded {len(self.loaded)} tensors from {self.checkpoint} '
                 f'(layout: {self.source}'
                 + (f", under '{self.container}'" if self.container else '')
                 + (f", prefix '{self.prefix}'" if self.prefix else '') + ')']
        for reason, keys in self.dropped.items():
            lines.append(f'  dropped as expected, {reason}: {len(keys)} '
                         f'{_sample(keys)}')
        if self.kept_initial:
            lines.append(f'  kept initial values (not in the checkpoint by '
                         f'design): {len(self.kept_initial)} '
                         f'{_sample(self.kept_initial)}')
        return '\n'.join(lines)


def _sample(keys: List[str]) -> str:
    more = f' ... (+{len(keys) - _SHOW})' if len(keys) > _SHOW else ''
    return '[' + ', '.join(keys[:_SHOW]) + more + ']'


def _select_prefix(state: Dict[str, torch.Tensor], prefix: Optional[str],
                   report_dropped: Dict[str, List[str]]) -> tuple:
    if prefix is None:
        prefix = 'backbone.' if any(
            k.startswith('backbone.') for k in state) else ''
    if not prefix:
        return state, ''
    inside = {k[len(prefix):]: v for k, v in state.items()
              if k.startswith(prefix)}
    if not inside:
        raise CheckpointError(f"prefix={prefix!r}: no key starts with it; "
                              f'first keys: {list(state)[:6]}')
    outside = [k for k in state if not k.startswith(prefix)]
    if outside:
        report_dropped[f"outside prefix '{prefix}'"] = outside
    return inside, prefix


def load_pretrained(model: nn.Module,
                    checkpoint: Union[PathLike, Mapping],
                    source: str = 'auto',
                    prefix: Optional[str] = None,
                    verbose: bool = True) -> LoadReport:
    """Load a checkpoint from any supported ecosystem into a VB backbone.

    The file is read safely (``weights_only=True`` or safetensors), or an
    in-memory checkpoint is taken as it is; the state dict is found inside
    it, a ``backbone.`` prefix is selected when
    present (detector and mmpretrain checkpoints), the layout is recognised
    from its keys and renamed onto the model. Loading is strict: every model
    tensor must come from the checkpoint (except the model's declared new
    layers) with the right shape, and every checkpoint tensor must be used
    (except those dropped as expected: classifier heads, keys outside the
    prefix, stages that ``out_indices`` left unbuilt, output norms of stages
    that are not outputs). Otherwise nothing is
    loaded and :class:`CheckpointError` lists the problems.

    Args:
        model (LoadableModule): A backbone (:class:`VBBackbone`) or a neck
            (:class:`VBSimpleFeaturePyramid`): its ``weight_sources`` and
            loader hooks (:class:`vb_plugin.weights.module.LoadableModule`).
        checkpoint (str | Path | Mapping): A local file, a
            ``torchvision://`` or URL address already in torch's hub cache,
            or a checkpoint in memory (a state dict, or a dict holding one
            under ``state_dict``, ``model``, ...), reported as
            ``'<in memory>'``.
        source (str): 'auto' or a layout name such as 'torchvision', 'timm',
            'hf', 'mmdet'. Defaults to 'auto'.
        prefix (str, optional): Keep only keys under this prefix (stripped).
            Defaults to 'backbone.' when any key has it, else none.
        verbose (bool): Log the report. Defaults to True.

    Returns:
        LoadReport: What was loaded, kept and dropped.

    Raises:
        CheckpointError: If the file is refused, its layout not recognised,
            or any tensor is missing, unexpected or wrongly shaped.

    Example:
        >>> import tempfile, torch, torchvision
        >>> from vb_plugin import VBResNet, load_pretrained
        >>> path = tempfile.mktemp(suffix='.pth')
        >>> torch.save(torchvision.models.resnet18().state_dict(), path)
        >>> report = load_pretrained(VBResNet(depth=18), path, verbose=False)
        >>> report.source, len(report.loaded), report.dropped
        ('mmdet', 120, {'classifier head': ['fc.weight', 'fc.bias']})
        >>> state = torchvision.models.resnet18().state_dict()
        >>> report = load_pretrained(VBResNet(depth=18), state, verbose=False)
        >>> report.checkpoint
        '<in memory>'
    """
    # NOTE: getattr: a module that is not a LoadableModule (which declares
    # the layouts and the hooks used below, with defaults) is refused here.
    sources = getattr(model, 'weight_sources', ())
    if not sources:
        raise CheckpointError(f'{type(model).__name__} declares no '
                              'weight_sources to convert checkpoints with')
    if isinstance(checkpoint, Mapping):
        state, container = extract_state_dict(checkpoint)
        checkpoint = IN_MEMORY
    else:
        state, container = extract_state_dict(read_checkpoint(checkpoint))
    dropped: Dict[str, List[str]] = {}
    state, prefix = _select_prefix(state, prefix, dropped)
    layout = select_source(sources, list(state), source)
    try:
        converted, head = layout.convert(state)
    except CheckpointError as err:
        raise CheckpointError(f'{checkpoint}: {err}') from err
    dropped.update(layout.explain_dropped(head))

    target = model.state_dict()
    unbuilt = tuple(n + '.' for n in model.unbuilt_module_names())
    not_built = [k for k in converted if k.startswith(unbuilt)]
    if not_built:
        dropped['stage not built (past the last out_indices)'] = not_built
    # Built layers that are not used (a backbone's output norms of stages
    # that are not outputs: a detector trained with other out_indices has
    # them).
    not_output = tuple(model.unused_output_prefixes())
    unused_norms = [k for k in converted
                    if k not in target and k.startswith(not_output)]
    if unused_norms:
        dropped['output norm of a stage not in out_indices'] = unused_norms
    unexpected = [
        k for k in converted if k not in target
        and not k.startswith(unbuilt) and not k.startswith(not_output)
    ]
    missing, kept = [], []
    for k in target:
        if k not in converted:
            new_layer = any(
                re.search(p, k) for p in model.new_layer_patterns)
            (kept if new_layer else missing).append(k)
    mismatched = [
        f'{k}: checkpoint {tuple(converted[k].shape)} vs model '
        f'{tuple(v.shape)}' for k, v in target.items()
        if k in converted and converted[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        for what, keys in (('missing from the checkpoint', missing),
                           ('unexpected (not in the model)', unexpected),
                           ('wrong shape', mismatched)):
            if keys:
                problems.append(f'  {what}: {len(keys)} {_sample(keys)}')
        hint = model.load_hint(layout.name)
        if hint:
            problems.append(f'  hint: {hint}')
        raise CheckpointError(
            f'{checkpoint}: nothing was loaded into {type(model).__name__}; '
            f'the checkpoint (layout {layout.name!r}'
            + (f", prefix '{prefix}'" if prefix else '') +
            ') does not match the model strictly:\n' + '\n'.join(problems))

    full = dict(target)
    full.update({k: v for k, v in converted.items() if k in target})
    model.load_state_dict(full, strict=True)
    report = LoadReport(
        checkpoint=str(checkpoint),
        source=layout.name,
        prefix=prefix,
        container=container,
        loaded=[k for k in target if k in converted],
        kept_initial=kept,
        dropped=dropped)
    if verbose:
        print_log(str(report), logger='current')
    return report
