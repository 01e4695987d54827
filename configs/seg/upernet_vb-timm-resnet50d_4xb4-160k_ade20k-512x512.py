# UperNet on ADE20K, 512x512, with timm's resnet50d (deep stem, average-pool
# shortcut) through VBTimmBackbone. out_indices 0..3 are the stride-4..32
# levels, as for VBResNet, whatever timm's own numbering (see docs/timm.md).
# The weights are a local file in timm's layout (e.g. saved from
# timm.create_model('resnet50d.ra2_in1k', pretrained=True).state_dict() on a
# machine with internet); they load strictly through timm's loading code.
# Everything else is mmseg's UperNet R-50 config.
_base_ = 'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py'

custom_imports = dict(imports=['vb_plugin'], allow_failed_imports=False)

model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='VBTimmBackbone',
        model_name='resnet50d',
        out_indices=(0, 1, 2, 3),
        # NOTE: timm's BatchNorm2d; for multi-GPU training with small
        # per-GPU batches set `sync_bn='torch'` in the config (mmengine
        # converts the model's batch norms) or norm_eval=True.
        norm_eval=False,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/timm_resnet50d.ra2_in1k.pth')),
    decode_head=dict(in_channels=[256, 512, 1024, 2048]),
    auxiliary_head=dict(in_channels=1024))
