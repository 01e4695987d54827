# Mask R-CNN RegNetX-3.2GF-FPN 1x on COCO, with VBRegNet in place of mmdet's
# RegNet. Everything else is mmdet's own config, including pycls's BGR
# normalisation; the backbone options are mmdet's, and the pretrained weights
# (mmdet's regnetx_3.2gf ImageNet checkpoint, converted from pycls) load
# strictly (see docs/regnet.md).
_base_ = 'mmdet::regnet/mask-rcnn_regnetx-3.2GF_fpn_1x_coco.py'

custom_imports = dict(imports=['vb_plugin'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='VBRegNet',
        arch='regnetx_3.2gf',
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        # NOTE: the address behind mmdet's 'open-mmlab://regnetx_3.2gf'; the
        # loader reads it from torch's hub cache and never downloads.
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://download.openmmlab.com/pretrain/third_party/'
            'regnetx_3.2gf-c2599b0f.pth')))
