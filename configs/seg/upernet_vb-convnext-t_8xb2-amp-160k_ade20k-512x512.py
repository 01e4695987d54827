# UperNet with a ConvNeXt-T backbone (VBConvNeXt) on ADE20K, 512x512.
# mmseg's own config needs mmpretrain (type='mmpretrain.ConvNeXt'); here
# VBConvNeXt takes its place. Its module names are mmpretrain's, so mmseg's
# LearningRateDecayOptimizerConstructor (stage_wise, decay 0.9, inherited
# unchanged) assigns every backbone parameter as it does for mmpretrain's
# ConvNeXt, and mmpretrain's checkpoint loads strictly (see docs/convnext.md).
# Everything else (data, AMP, 160k schedule) is mmseg's config.
_base_ = 'mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py'  # noqa

# Replaces the base's custom_imports (mmpretrain.models).
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
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
