# ViTDet-style Mask R-CNN on COCO (Li et al. 2022): a plain ViT-B/16 from
# timm under VBTimmBackbone, ViTDet's simple feature pyramid (strides 4..32
# from the last block's map; FPN's lateral and output convs are ViTDet's 1x1
# and 3x3 projections), any input size (timm's dynamic_img_size), layer-wise
# learning-rate decay 0.7 by transformer block and drop path 0.1, as ViTDet
# trains ViT-B. mmdet's 1x schedule and augmentation are kept (ViTDet trains
# 100 epochs with large-scale jitter at 1024).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['vb_plugin'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='VBTimmBackbone',
        model_name='vit_base_patch16_224',
        pyramid='simple',
        drop_path_rate=0.1,
        # timm's ImageNet weights, saved as a local file (vb_plugin never
        # downloads): torch.save(timm.create_model('vit_base_patch16_224',
        # pretrained=True).state_dict(), 'checkpoints/vit_base_patch16_224.pth')
        init_cfg=dict(type='Pretrained',
                      checkpoint='checkpoints/vit_base_patch16_224.pth')),
    # [192, 384, 768, 768]: width/4, width/2, width, width.
    neck=dict(in_channels='auto'))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    # num_layers comes from the backbone (12 blocks): embeddings are layer
    # 0, block i is layer i + 1, the pyramid, neck and heads layer 13.
    constructor='VBLayerDecayOptimizerConstructor',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                   weight_decay=0.1),
    paramwise_cfg=dict(decay_rate=0.7, decay_type='layer_wise'),
    clip_grad=dict(max_norm=1.0, norm_type=2))
