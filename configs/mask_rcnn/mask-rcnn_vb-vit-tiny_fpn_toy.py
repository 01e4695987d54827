# Mask R-CNN with a small plain ViT (patch 16, 4 blocks of width 96) and
# ViTDet's simple feature pyramid on the bundled toy dataset, trained from
# scratch with layer-wise learning-rate decay by block.
_base_ = './mask-rcnn_vb-r18_fpn_toy.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='VBTimmBackbone',
        model_name='vit_tiny_patch16_224',
        model_kwargs=dict(depth=4, embed_dim=96, num_heads=3),
        pyramid='simple',
        init_cfg=None))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='VBLayerDecayOptimizerConstructor',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999),
                   weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.7, decay_type='layer_wise'),
    clip_grad=dict(max_norm=1.0, norm_type=2))
