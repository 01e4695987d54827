"""Whole-detector rows: an mmdet detector timed as users call it.

Inference rows call mmdet's :func:`~mmdet.apis.inference_detector` on a
synthetic image (the config's test pipeline, resize included, then
``test_step``); training rows run the detector's losses and a backward on a
synthetic batch with boxes and masks. With ``native=True`` the same config
is also built with mmdet's own backbone (``ResNet`` for ``VBResNet``, and
the other way round) holding the same weights, so the two detectors differ
only in the backbone's code.

A form replaces the backbone (``part='backbone'``) or backbone and neck
(``part='backbone+neck'``, the neck then becomes None) with the result of
:func:`vb_plugin.optimize_for_inference`.
"""
import copy
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..deploy.parts import BackboneWithNeck, check_part
# NOTE: FORMS (the --forms names) is the inference path's table.
from ..inference import FORMS, check_forms
from .schema import Row

#: mmdet's backbone type -> its VB twin (and back): same options, same
#: state dict keys.
NATIVE_TWINS = {'ResNet': 'VBResNet', 'RegNet': 'VBRegNet'}
NATIVE_TWINS.update({vb: native for native, vb in list(NATIVE_TWINS.items())})


def twin_config(cfg, path: str = 'model.backbone'):
    """A copy of ``cfg`` whose backbone is the twin of its backbone.

    Raises:
        ValueError: If the backbone has no twin.

    Example:
        >>> from mmengine.config import Config
        >>> cfg = Config(dict(model=dict(backbone=dict(type='ResNet',
        ...                                            depth=50))))
        >>> twin_config(cfg).model.backbone.type
        'VBResNet'
    """
    cfg = copy.deepcopy(cfg)
    backbone = cfg.model.backbone
    kind = backbone.get('type')
    if kind not in NATIVE_TWINS:
        raise ValueError(f'native=True needs a backbone with an mmdet twin; '
                         f'{path}.type={kind!r} has none (twins: '
                         f'{sorted(NATIVE_TWINS)})')
    backbone.type = NATIVE_TWINS[kind]
    return cfg


def _state_into(detector: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load a twin's state dict: the backbone through vb_plugin's strict
    loader (mmdet's layout), the rest unchanged and strictly."""
    from ..weights import load_pretrained
    rest = {k: v for k, v in state.items() if not k.startswith('backbone.')}
    missing, unexpected = detector.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not k.startswith('backbone.')]
    if missing or unexpected:
        raise RuntimeError(f'twin detectors differ outside the backbone: '
                           f'missing {missing[:5]}, unexpected '
                           f'{unexpected[:5]}')
    backbone = {k: v for k, v in state.items() if k.startswith('backbone.')}
    if hasattr(detector.backbone, 'weight_sources'):
        load_pretrained(detector.backbone, backbone, source='mmdet',
                        verbose=False)
    else:
        detector.backbone.load_state_dict(
            {k[len('backbone.'):]: v for k, v in backbone.items()})


def detector_rows(config: str,
                  forms: Sequence[str] = ('optimized', ),
                  native: bool = False,
                  part: str = 'backbone') -> List[Row]:
    """Rows timing a whole mmdet detector built from ``config`` without
    pretrained weights: optionally the same detector with mmdet's native
    backbone first (``native``), then the config's, then each form.

    Args:
        config (str): A config file or ``mmdet::`` name.
        forms (Sequence[str]): Names in :data:`vb_plugin.inference.FORMS`.
        native (bool): Add the twin-backbone detector (same weights); the
            row with mmdet's backbone comes first, so ratios are to it.
            Defaults to False.
        part (str): What a form replaces: 'backbone' or 'backbone+neck'.

    Example:
        >>> rows = detector_rows('configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py',
        ...                      forms=['openvino'], native=True,
        ...                      part='backbone+neck')
        >>> [(r.name, r.kind) for r in rows]
        ... # doctest: +NORMALIZE_WHITESPACE
        [('mask-rcnn_vb-r18_fpn_toy ResNet', 'peer'),
         ('mask-rcnn_vb-r18_fpn_toy', 'vb'),
         ('mask-rcnn_vb-r18_fpn_toy openvino backbone+neck', 'openvino')]
    """
    from ..apis import build_detector, load_config, wire_neck_channels
    check_forms(forms)
    check_part(part)
    cfg = load_config(config)
    # NOTE: neck.in_channels='auto' is filled from the config's backbone
    # first, so that the twin (which may not report its channels) gets the
    # same list.
    wire_neck_channels(cfg)
    name = Path(config.split('::')[-1]).stem
    shared: Dict[str, Dict[str, torch.Tensor]] = {}

    def builder(cfg, keep: bool):
        def build(train: bool = False) -> nn.Module:
            detector = build_detector(copy.deepcopy(cfg), pretrained=False)
            if keep:
                shared['state'] = detector.state_dict()
            elif 'state' in shared:
                _state_into(detector, shared['state'])
            detector.cfg = cfg
            return _Detector(detector, part)
        return build

    if native:
        # NOTE: mmdet's backbone first, so ratios are to it; the row built
        # first keeps its random weights and the other loads them.
        twin = twin_config(cfg)
        labelled = [(name, cfg), (f'{name} {twin.model.backbone.type}', twin)]
        if not twin.model.backbone.type.startswith('VB'):
            labelled.reverse()
        rows = [Row('detector', label, 'peer' if i == 0 else 'vb',
                    builder(c, keep=i == 0))
                for i, (label, c) in enumerate(labelled)]
    else:
        rows = [Row('detector', name, 'vb', builder(cfg, keep=False))]
    # NOTE: forms are made from the config's own detector.
    build = next(r.build for r in rows if r.name == name)
    suffix = '' if part == 'backbone' else f' {part}'
    for form in forms:
        rows.append(Row('detector', f'{name} {form}{suffix}', form, build,
                        form=FORMS[form], ref=name))
    return rows


class _Detector(nn.Module):
    """A detector called with an image tensor, as users call it.

    In eval mode: mmdet's ``inference_detector`` on the batch's images as
    uint8 HWC arrays; it returns the predicted boxes. In train mode: the
    detector's losses on a synthetic batch of the input's size (boxes and
    masks, fixed seed) after its data preprocessor; it returns the loss
    terms, whose sum is mmdet's total loss.
    """

    def __init__(self, detector: nn.Module, part: str = 'backbone') -> None:
        super().__init__()
        self.detector = detector
        self.part = part
        self._batch: Optional[dict] = None

    def form_target(self) -> nn.Module:
        """The module a form replaces."""
        if self.part == 'backbone+neck' and self.detector.neck is not None:
            return BackboneWithNeck(self.detector.backbone,
                                    self.detector.neck)
        return self.detector.backbone

    def with_form(self, fast: nn.Module) -> '_Detector':
        """A copy whose backbone (and neck) is ``fast``."""
        detector = copy.deepcopy(self.detector)
        detector.backbone = fast
        if self.part == 'backbone+neck':
            detector.neck = None
        return _Detector(detector, self.part)

    def _synthetic(self, x: torch.Tensor) -> dict:
        from ..apis import synthetic_detection_batch
        size = tuple(x.shape[-2:])
        if self._batch is None or self._batch['size'] != size:
            # NOTE: a two-stage detector's classes are its RoI head's, a
            # single-stage one's (DETR, RetinaNet) its bbox head's.
            head = getattr(getattr(self.detector, 'roi_head', None),
                           'bbox_head', None) or getattr(
                               self.detector, 'bbox_head', None)
            num_classes = getattr(head, 'num_classes', 80)
            batch = synthetic_detection_batch(num_images=x.shape[0],
                                              size=size,
                                              num_classes=num_classes)
            self._batch = dict(size=size, batch=batch, images=[
                np.ascontiguousarray(img.permute(1, 2, 0).numpy())
                for img in batch['inputs']])
        return self._batch

    def forward(self, x):
        synthetic = self._synthetic(x)
        if self.training:
            data = self.detector.data_preprocessor(synthetic['batch'],
                                                   training=True)
            losses = self.detector(**data, mode='loss')
            terms = []
            for key, value in losses.items():
                if 'loss' in key:
                    terms.extend(value if isinstance(value, (list, tuple))
                                 else [value])
            return tuple(terms)
        from mmdet.apis import inference_detector
        preds = inference_detector(self.detector, synthetic['images'])
        return tuple(p.pred_instances.bboxes for p in preds)
