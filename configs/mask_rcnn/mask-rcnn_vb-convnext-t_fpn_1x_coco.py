# Mask R-CNN with a ConvNeXt-T backbone (VBConvNeXt) and FPN on COCO.
# mmdet's own ConvNeXt config needs mmpretrain (type='mmpretrain.ConvNeXt');
# here VBConvNeXt, with mmpretrain's module names, takes its place, so the
# layer-wise LR decay constructor below works unchanged and mmpretrain's
# checkpoint loads strictly (see docs/convnext.md). Its augmentation is kept;
# the schedule is shortened to 1x (12 epochs).
_base_ = 'mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py'  # noqa

custom_imports = dict(imports=['vb_plugin'], allow_failed_imports=False)

checkpoint_file = 'https://download.openmmlab.com/mmclassification/v0/convnext/downstream/convnext-tiny_3rdparty_32xb128-noema_in1k_20220301-795e9634.pth'  # noqa

model = dict(
    backbone=dict(
        _delete_=True,
        type='VBConvNeXt',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.4,
        layer_scale_init_value=1.0,
        # Output norms (LN2d, eps 1e-6) are VBConvNeXt's default, as
        # mmpretrain's ConvNeXt with gap_before_final_norm=False.
        init_cfg=dict(
            type='Pretrained', checkpoint=checkpoint_file,
            prefix='backbone.')),
    neck=dict(in_channels=[96, 192, 384, 768]))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
        end=1000),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[8, 11],
        gamma=0.1)
]
# optim_wrapper (AdamW, lr 1e-4, LearningRateDecayOptimizerConstructor with
# decay_rate=0.95, layer_wise, num_layers=6) is inherited unchanged; for
# another size, VBConvNeXt(arch=...).lr_decay_num_layers gives num_layers.
