"""Whole-detector rows: an mmdet detector timed as users call it.
"""
from pathlib import Path
from typing import List, Sequence

import torch
from torch import nn

# NOTE: FORMS (the --forms names) is the inference path's table.
from ..inference import FORMS, check_forms
from .schema import Row


# ----------------------------------------------------------------------
# Whole detector.
def detector_rows(config: str,
                  forms: Sequence[str] = ('optimized', )) -> List[Row]:
    """Rows timing a whole mmdet detector (``test_step`` on a synthetic
    batch, data preprocessing included) built from ``config`` without
    pretrained weights, and the same detector with its backbone optimised.
    """
    from ..apis import build_detector, load_config

    def build(train: bool = False) -> nn.Module:
        return _Detector(build_detector(load_config(config),
                                        pretrained=False))

    name = Path(config).stem
    rows = [Row('detector', name, 'vb', build)]
    check_forms(forms)
    for form in forms:
        rows.append(Row('detector', f'{name} {form}', form, build,
                        form=FORMS[form], ref=name))
    return rows


class _Detector(nn.Module):
    """A detector called with an image tensor: ``test_step`` on it."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x):
        from mmdet.structures import DetDataSample
        h, w = x.shape[-2:]
        samples = [DetDataSample(metainfo=dict(
            img_shape=(h, w), ori_shape=(h, w), scale_factor=(1., 1.),
            batch_input_shape=(h, w), pad_shape=(h, w)))
            for _ in range(x.shape[0])]
        inputs = [(img * 255).to(torch.uint8) for img in x.float()]
        preds = self.detector.test_step(dict(inputs=inputs,
                                             data_samples=samples))
        return tuple(p.pred_instances.bboxes for p in preds)
