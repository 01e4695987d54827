# Mask R-CNN with VBConvNeXt-atto on the bundled toy dataset, trained with
# layer-wise learning-rate decay whose num_layers comes from the backbone.
_base_ = './mask-rcnn_vb-r18_fpn_toy.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='VBConvNeXt',
        arch='atto',
        drop_path_rate=0.1,
        init_cfg=None))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='VBLayerDecayOptimizerConstructor',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999),
                   weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.95, decay_type='layer_wise'),
    clip_grad=dict(max_norm=10, norm_type=2))
