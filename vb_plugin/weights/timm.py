"""Strict, explained loading of timm checkpoints into a VBTimmBackbone.

A checkpoint in a timm model's layout (as timm saves it, or any layout the
model's ``checkpoint_filter_fn`` converts, such as the official ConvNeXt or
Swin releases) goes through timm's own pretrained pipeline: the family's
filter function, ``adapt_input_conv`` for ``in_channels != 3``, and a strict
``load_state_dict`` into the full model (classifier sized from the
checkpoint). The result then moves tensor by tensor into timm's feature
extractor inside the backbone, and a :class:`LoadReport` tells what was
loaded and what was dropped (classifier head, unbuilt stages).

The file itself is read by :func:`vb_plugin.weights.read_checkpoint`
(``weights_only=True`` with a strict allow-list, or safetensors), not by
timm, so the ``backbone.`` prefix of detector checkpoints is handled as for
every other family.
"""
import re
from typing import Dict, List, Optional

import torch
from mmengine.logging import print_log
from torch import nn

from .io import CheckpointError, PathLike, extract_state_dict, read_checkpoint
from .loader import LoadReport, _select_prefix, load_pretrained

SOURCES = ('auto', 'timm', 'vb-timm')


def _classifier_classes(state: Dict[str, torch.Tensor],
                        pretrained_cfg: dict) -> int:
    classifiers = pretrained_cfg.get('classifier') or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers, )
    for name in classifiers:
        weight = state.get(f'{name}.weight')
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return 0


def load_timm_pretrained(model: nn.Module,
                         checkpoint: PathLike,
                         prefix: Optional[str] = None,
                         source: str = 'auto',
                         verbose: bool = True) -> LoadReport:
    """Load a local checkpoint into a :class:`VBTimmBackbone`, strictly.

    Args:
        model (VBTimmBackbone): The backbone.
        checkpoint (str | Path): A local file (``.pth``, ``.safetensors``
            ...).
        prefix (str, optional): Keep only keys under this prefix. Defaults
            to 'backbone.' when any key has it, else none.
        source (str): 'auto', 'timm' (the timm model's own or
            filter-convertible layout) or 'vb-timm' (a VBTimmBackbone state
            dict, keys under ``body.``). Defaults to 'auto'.
        verbose (bool): Log the report. Defaults to True.

    Returns:
        LoadReport: What was loaded, kept and dropped.

    Raises:
        CheckpointError: If the file is refused or any tensor is missing,
            unexpected or wrongly shaped; nothing is loaded then.

    Example:
        >>> import tempfile, timm, torch
        >>> from vb_plugin import VBTimmBackbone
        >>> path = tempfile.mktemp(suffix='.pth')
        >>> torch.save(timm.create_model('resnet10t').state_dict(), path)
        >>> model = VBTimmBackbone('resnet10t', out_indices=(0, 1))
        >>> report = load_timm_pretrained(model, path, verbose=False)
        >>> report.source, len(report.loaded), sorted(report.dropped)
        ('timm', 48, ['classifier head and layers outside the features', 'stage not built (past the last out_indices)'])
    """
    if source not in SOURCES:
        raise CheckpointError(f'source={source!r} is not known for '
                              f'VBTimmBackbone; valid values are {SOURCES}')
    state, container = extract_state_dict(read_checkpoint(checkpoint))
    dropped: Dict[str, List[str]] = {}
    state, prefix = _select_prefix(state, prefix, dropped)
    own_layout = all(k.startswith('body.') or k.startswith('out_norms.')
                     for k in state)
    if source == 'vb-timm' or (source == 'auto' and own_layout):
        return load_pretrained(model, checkpoint, source='vb-timm',
                               prefix=prefix, verbose=verbose)

    import timm
    meta = model._create_on_meta()
    pretrained_cfg = dict(meta.pretrained_cfg)
    del meta
    # NOTE: timm loads strictly only when the model's classifier matches the
    # checkpoint's. Its size is read under timm's classifier name; a layout
    # that the filter function renames (official releases) is tried with
    # the pretrained config's class count, then without a classifier.
    found = _classifier_classes(state, pretrained_cfg)
    candidates = [found] if found else list(dict.fromkeys(
        [int(pretrained_cfg.get('num_classes') or 0), 0]))
    errors = []
    for num_classes in candidates:
        try:
            full = timm.create_model(
                model.model_name,
                pretrained=True,
                # NOTE: source='' so that the in-memory state dict wins
                # over an 'hf-hub' source: nothing is ever downloaded.
                pretrained_cfg_overlay=dict(state_dict=dict(state),
                                            num_classes=num_classes,
                                            source=''),
                num_classes=num_classes,
                **model.create_kwargs)
            break
        except RuntimeError as err:
            errors.append(f'with a {num_classes}-class classifier: {err}')
    else:
        raise CheckpointError(
            f'{checkpoint}: nothing was loaded into VBTimmBackbone('
            f'{model.model_name!r}); timm\'s strict load into the full model '
            'failed\n' + '\n'.join(errors))

    source_state = full.state_dict()
    key_map = model.body_key_map()
    target = model.state_dict()
    loaded, kept, missing, mismatched = [], [], [], []
    new_state = dict(target)
    for key, value in target.items():
        src = key_map.get(key)
        if src is None or src not in source_state:
            if any(re.search(p, key) for p in model.new_layer_patterns):
                kept.append(key)
            else:
                missing.append(f'{key} (timm {src})')
            continue
        if source_state[src].shape != value.shape:
            mismatched.append(f'{key}: checkpoint '
                              f'{tuple(source_state[src].shape)} vs model '
                              f'{tuple(value.shape)}')
            continue
        new_state[key] = source_state[src]
        loaded.append(key)
    if missing or mismatched:
        raise CheckpointError(
            f'{checkpoint}: nothing was loaded into VBTimmBackbone('
            f'{model.model_name!r}); the full timm model loaded, but its '
            f'tensors do not cover the feature extractor: missing '
            f'{missing[:8]}, wrong shape {mismatched[:8]}')
    model.load_state_dict(new_state, strict=True)

    used = {key_map[k] for k in loaded}
    probes = [f'{n}.weight' for n in model.unbuilt_module_names()]
    unbuilt = tuple(v[:-len('weight')]
                    for v in model.body_key_map(probes).values())
    rest = [k for k in source_state if k not in used]
    not_built = [k for k in rest if unbuilt and k.startswith(unbuilt)]
    head = [k for k in rest if k not in set(not_built)]
    if head:
        dropped['classifier head and layers outside the features'] = head
    if not_built:
        dropped['stage not built (past the last out_indices)'] = not_built
    report = LoadReport(checkpoint=str(checkpoint), source='timm',
                        prefix=prefix, container=container, loaded=loaded,
                        kept_initial=kept, dropped=dropped)
    if verbose:
        print_log(str(report), logger='current')
    return report

