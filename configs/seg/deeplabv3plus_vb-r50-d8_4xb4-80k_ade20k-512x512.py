# DeepLabV3+ with a dilated VBResNet-50 (V1c: deep stem; output stride 8:
# strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)) on ADE20K, 512x512.
# The backbone is mmseg's ResNetV1c in every respect: contract_dilation=True
# as in mmseg's configs (the first block of stages 3 and 4 has dilation 1 and
# 2), the same module names, so mmseg's ResNetV1c checkpoints (e.g.
# open-mmlab://resnet50_v1c) load unchanged, and the same outputs
# (tests/test_segmentation.py). Everything else is mmseg's config.
_base_ = 'mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb4-80k_ade20k-512x512.py'  # noqa

custom_imports = dict(imports=['vb_plugin'], allow_failed_imports=False)
norm_cfg = dict(type='SyncBN', requires_grad=True)

model = dict(
    # The deprecated `pretrained` of mmseg's EncoderDecoder would be passed
    # to the backbone; VBResNet takes its weights from init_cfg.
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='VBResNet',
        depth=50,
        deep_stem=True,
        strides=(1, 2, 1, 1),
        dilations=(1, 1, 2, 4),
        contract_dilation=True,
        out_indices=(0, 1, 2, 3),
        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch',
        init_cfg=dict(type='Pretrained',
                      checkpoint='open-mmlab://resnet50_v1c')))
