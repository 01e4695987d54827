"""VB backbones inside real mmdet detectors, built from configs."""
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.registry import MODELS as ROOT_MODELS

from conftest import checked_train_step
from vb_plugin.apis import (build_detector, load_config,
                            synthetic_detection_batch)

ROOT = Path(__file__).resolve().parents[1]
MASK_RCNN = ROOT / 'configs/mask_rcnn/mask-rcnn_vb-r50_fpn_1x_coco.py'


def test_registered_in_root_registry_and_visible_from_mmdet_scope():
    from mmdet.registry import MODELS as MMDET_MODELS

    import vb_plugin
    for name in ('VBResNet', ):
        assert ROOT_MODELS.get(name) is getattr(vb_plugin, name)
        # mmdet's registry falls back to its root for unknown names.
        assert MMDET_MODELS.get(name) is getattr(vb_plugin, name)
        assert name not in MMDET_MODELS.module_dict  # no collision


def test_config_custom_imports_and_backbone():
    cfg = Config.fromfile(MASK_RCNN)
    assert cfg.custom_imports == dict(imports=['vb_plugin'],
                                      allow_failed_imports=False)
    assert cfg.default_scope == 'mmdet'
    assert cfg.model.backbone.type == 'VBResNet'
    assert 'num_stages' not in cfg.model.backbone  # _delete_ took effect


def test_mask_rcnn_trains_one_step_and_predicts():
    cfg = load_config(str(MASK_RCNN))
    model = build_detector(cfg, pretrained=False)
    assert type(model).__name__ == 'MaskRCNN'
    backbone = model.backbone
    assert type(backbone).__name__ == 'VBResNet'
    assert list(backbone.out_channels) == cfg.model.neck.in_channels
    assert backbone.out_strides == (4, 8, 16, 32)

    batch = synthetic_detection_batch(num_images=2, size=(160, 224))
    losses, preds, _ = checked_train_step(
        model, batch, frozen_prefixes=('conv1.', 'bn1.', 'layer1.'))
    # norm_eval: BN statistics did not move during the training step.
    assert backbone.layer2[0].bn1.num_batches_tracked.item() == 0

    assert len(preds) == 2
    pred = preds[0].pred_instances
    assert pred.bboxes.shape[1] == 4
    assert pred.masks.shape[1:] == (160, 224)
    assert len(pred.scores) == len(pred.labels) == len(pred.bboxes)
