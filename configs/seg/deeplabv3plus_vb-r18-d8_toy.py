# DeepLabV3+ with a narrow dilated VBResNet-18 (V1c, output stride 8,
# contract_dilation as mmseg's ResNetV1c configs) on the bundled toy
# segmentation dataset: trains from scratch on a 2-core CPU in minutes.
_base_ = [
    'mmseg::_base_/models/deeplabv3plus_r50-d8.py',
    './_base_/toy_seg.py',
    './_base_/toy_schedule.py',
]
custom_imports = dict(imports=['vb_plugin'], allow_failed_imports=False)
norm_cfg = dict(type='BN', requires_grad=True)
data_preprocessor = dict(size=(128, 128))

model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='VBResNet',
        depth=18,
        base_channels=32,
        deep_stem=True,
        strides=(1, 2, 1, 1),
        dilations=(1, 1, 2, 4),
        contract_dilation=True,
        norm_cfg=norm_cfg,
        init_cfg=None),
    decode_head=dict(
        in_channels=256,
        channels=64,
        dilations=(1, 6, 12, 18),
        c1_in_channels=32,
        c1_channels=12,
        num_classes=4,
        norm_cfg=norm_cfg),
    auxiliary_head=dict(
        in_channels=128, channels=32, num_classes=4, norm_cfg=norm_cfg))
