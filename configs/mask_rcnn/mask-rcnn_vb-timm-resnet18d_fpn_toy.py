# Mask R-CNN with a timm model (resnet18d) through VBTimmBackbone on the
# bundled toy dataset.
_base_ = './mask-rcnn_vb-r18_fpn_toy.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='VBTimmBackbone',
        model_name='resnet18d',
        init_cfg=None))
