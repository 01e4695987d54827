# Mask R-CNN with a small Swin transformer from timm (one block per stage,
# width 32) on the bundled toy dataset. Swin's input is padded to its patch
# size and its windows by timm, so any image size works.
_base_ = './mask-rcnn_vb-r18_fpn_toy.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='VBTimmBackbone',
        model_name='swin_tiny_patch4_window7_224',
        model_kwargs=dict(depths=(1, 1, 1, 1), embed_dim=32,
                          num_heads=(1, 2, 4, 8)),
        init_cfg=None))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999),
                   weight_decay=0.05),
    clip_grad=dict(max_norm=1.0, norm_type=2))
