# ViTDet-B Mask R-CNN on COCO as published (Li et al. 2022, "Exploring Plain
# Vision Transformer Backbones for Object Detection"; detectron2's
# mask_rcnn_vitdet_b_100ep): an MAE-pretrained plain ViT-B/16 in ViTDet's
# windowed form (14x14 window attention, global blocks 2, 5, 8, 11,
# decomposed relative positions sized for 1024 inputs, no class token),
# ViTDet's simple feature pyramid with LayerNorm, an RPN with 2 convs, the
# 4conv1fc box head and the mask head with LayerNorm; 1024x1024 large-scale
# jitter, 100 epochs (184375 iterations at 64 images), AdamW lr 1e-4, weight
# decay 0.1, layer-wise lr decay 0.7, drop path 0.1, fp16 AMP (needs a GPU).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::common/lsj-100e_coco-instance.py',
]
custom_imports = dict(imports=['vb_plugin'], allow_failed_imports=False)

image_size = (1024, 1024)
norm_cfg = dict(type='LN2d', eps=1e-6, requires_grad=True)

model = dict(
    data_preprocessor=dict(
        pad_size_divisor=32,
        batch_augments=[dict(type='BatchFixedSizePad', size=image_size,
                             pad_mask=True)]),
    backbone=dict(
        _delete_=True,
        type='VBTimmBackbone',
        model_name='vit_base_patch16_224',
        window_size=14,
        rel_pos=True,
        # The global blocks' tables span a 1024 input (127 rows), as in
        # ViTDet's checkpoints; the position embedding stays at 14x14 and
        # is resized to the grid at every forward.
        rel_pos_img_size=1024,
        drop_path_rate=0.1,
        pyramid=None,
        out_indices=(3, ),
        # MAE's ViT-B, saved as a local file (vb_plugin never downloads):
        # mae_pretrain_vit_base.pth from the MAE release. detectron2's
        # ViTDet model-zoo .pkl and mmdet's projects/ViTDet checkpoints load
        # here too (docs/timm.md#checkpoints).
        init_cfg=dict(type='Pretrained',
                      checkpoint='checkpoints/mae_pretrain_vit_base.pth')),
    neck=dict(
        _delete_=True,
        type='VBSimpleFeaturePyramid',
        in_channels='auto',
        out_channels=256,
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        num_outs=5,
        norm_cfg=norm_cfg),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=256,
            norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))

# ViTDet evaluates at 1024 on the long side, padded to 1024x1024.
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='Pad', size=image_size, pad_val=dict(img=(114, 114, 114))),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                    'scale_factor'))
]
train_dataloader = dict(batch_size=4, num_workers=8)  # 16 GPUs x 4 = 64
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    dtype='float16',
    loss_scale='dynamic',
    # num_layers comes from the backbone (12 blocks): the embeddings are
    # layer 0, block i (its relative position tables included) layer i + 1,
    # the neck and heads layer 13.
    constructor='VBLayerDecayOptimizerConstructor',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                   weight_decay=0.1),
    paramwise_cfg=dict(decay_rate=0.7, decay_type='layer_wise'))

max_iters = 184375
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop',
                 max_iters=max_iters, val_interval=5000)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
         end=250),
    dict(type='MultiStepLR', begin=0, end=max_iters, by_epoch=False,
         milestones=[163889, 177546], gamma=0.1)
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(by_epoch=False, interval=5000, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
auto_scale_lr = dict(enable=False, base_batch_size=64)
