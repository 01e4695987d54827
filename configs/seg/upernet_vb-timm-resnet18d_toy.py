# UperNet with timm's resnet18d through VBTimmBackbone on the bundled toy
# segmentation dataset: the toy counterpart of
# upernet_vb-timm-resnet50d_4xb4-160k_ade20k-512x512.py.
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
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
        type='VBTimmBackbone',
        model_name='resnet18d',
        init_cfg=None),
    decode_head=dict(
        in_channels=[64, 128, 256, 512],
        channels=64,
        num_classes=4,
        norm_cfg=norm_cfg),
    auxiliary_head=dict(
        in_channels=256, channels=32, num_classes=4, norm_cfg=norm_cfg))
