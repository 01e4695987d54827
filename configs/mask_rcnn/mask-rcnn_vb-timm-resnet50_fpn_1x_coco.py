# Mask R-CNN R-50-FPN 1x on COCO, with timm's resnet50 through VBTimmBackbone.
# Everything else is mmdet's own config. out_indices, frozen_stages and
# norm_eval mean what they mean for VBResNet (0..3 = stride 4..32; the stem
# and stage 0 frozen), whatever timm's own numbering (see docs/timm.md).
# The weights are a local file in timm's layout (e.g. saved from
# timm.create_model('resnet50.a1_in1k', pretrained=True).state_dict() on a
# machine with internet); they load strictly through timm's loading code.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['vb_plugin'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='VBTimmBackbone',
        model_name='resnet50',
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_eval=True,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/timm_resnet50.a1_in1k.pth')),
    neck=dict(in_channels=[256, 512, 1024, 2048]))
