# DETR with a narrow VBResNet-18 on the bundled toy dataset (boxes only): a
# quick configuration for tests and experiments, not a tuned schedule.
_base_ = './detr_vb-r50_8xb2-150e_coco.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='VBResNet',
        depth=18,
        base_channels=32,
        out_indices=(3, ),
        init_cfg=None),
    neck=dict(out_channels=128),
    encoder=dict(
        num_layers=2,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=128),
            ffn_cfg=dict(embed_dims=128, feedforward_channels=256))),
    decoder=dict(
        num_layers=2,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=128),
            cross_attn_cfg=dict(embed_dims=128),
            ffn_cfg=dict(embed_dims=128, feedforward_channels=256))),
    positional_encoding=dict(num_feats=64),
    bbox_head=dict(num_classes=3, embed_dims=128))

data_root = 'data/toy_coco/'
metainfo = dict(classes=('square', 'disc', 'triangle'))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(160, 160), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                    'scale_factor'))
]
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/train.json',
                 data_prefix=dict(img='train/'), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,  # mmdet's DETR sets True: needs workers
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/val.json',
                 data_prefix=dict(img='val/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json')
test_evaluator = val_evaluator

max_iters = 600
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop',
                 max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters,
         milestones=[400], gamma=0.1)
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=200,
                    max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
