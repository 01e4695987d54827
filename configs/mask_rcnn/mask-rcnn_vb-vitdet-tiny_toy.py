# ViTDet on the bundled toy dataset: a small plain ViT (patch 16, 4 blocks of
# width 96) in ViTDet's windowed form (window 4, blocks 1 and 3 global,
# relative positions), ViTDet's simple feature pyramid with LayerNorm and
# the 4conv1fc box head with LayerNorm, trained from scratch with AdamW and
# layer-wise lr decay by block (the plain-ViT toy's optimizer).
_base_ = './mask-rcnn_vb-vit-tiny_fpn_toy.py'

norm_cfg = dict(type='LN2d', eps=1e-6, requires_grad=True)
model = dict(
    # The plain-ViT toy's backbone, in the windowed form.
    backbone=dict(
        window_size=4,
        global_blocks=(1, 3),
        rel_pos=True,
        pyramid=None,
        out_indices=(3, )),
    neck=dict(
        _delete_=True,
        type='VBSimpleFeaturePyramid',
        in_channels='auto',
        out_channels=64,
        num_outs=5,
        norm_cfg=norm_cfg),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=64,
                       norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))

