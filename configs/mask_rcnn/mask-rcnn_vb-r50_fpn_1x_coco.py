# Mask R-CNN R-50-FPN 1x on COCO, with VBResNet in place of mmdet's ResNet.
# Everything else is mmdet's own config; only the backbone type changes, and
# the pretrained weights load strictly (see docs/pretrained.md).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['vb_plugin'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='VBResNet',
        depth=50,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')))
