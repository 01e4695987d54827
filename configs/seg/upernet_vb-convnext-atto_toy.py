# UperNet with VBConvNeXt-atto on the bundled toy segmentation dataset, with
# mmseg's layer-wise learning-rate decay (stage_wise, as in mmseg's ConvNeXt
# configs): the toy counterpart of
# upernet_vb-convnext-t_8xb2-amp-160k_ade20k-512x512.py, for tests and a demo.
_base_ = [
    'mmseg::_base_/models/upernet_convnext.py',
    './_base_/toy_seg.py',
    './_base_/toy_schedule.py',
]
# Replaces the model base's custom_imports (mmpretrain.models).
custom_imports = dict(imports=['vb_plugin'], allow_failed_imports=False)
norm_cfg = dict(type='BN', requires_grad=True)
data_preprocessor = dict(size=(128, 128))

model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        _delete_=True,
        type='VBConvNeXt',
        arch='atto',
        drop_path_rate=0.1,
        init_cfg=None),
    decode_head=dict(
        in_channels=[40, 80, 160, 320],
        channels=64,
        num_classes=4,
        norm_cfg=norm_cfg),
    auxiliary_head=dict(
        in_channels=160, channels=32, num_classes=4, norm_cfg=norm_cfg))

# AdamW replaces the schedule's SGD.
optim_wrapper = dict(
    optimizer=dict(
        _delete_=True,
        type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='LearningRateDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise',
                       num_layers=6))
