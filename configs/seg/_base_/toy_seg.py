# The bundled toy segmentation dataset (vb_plugin.datasets.make_toy_seg;
# `python tools/make_toy_seg_data.py` writes it to data/toy_seg): 128x128
# images, background + square, disc, triangle, in mmseg's folder format.
# mmseg's BaseSegDataset reads it; the classes are given here.
dataset_type = 'BaseSegDataset'
data_root = 'data/toy_seg/'
metainfo = dict(
    classes=('background', 'square', 'disc', 'triangle'),
    palette=[(0, 0, 0), (220, 20, 60), (0, 128, 255), (0, 170, 0)])
crop_size = (128, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
_dataset = dict(
    type=dataset_type,
    data_root=data_root,
    metainfo=metainfo,
    img_suffix='.png',
    seg_map_suffix='.png',
    reduce_zero_label=False)
# NOTE: one worker process, seeded from the config's seed, so a resumed run
# replays the same augmentations. Batch 2 at least: PPM's pooled branch has
# batch norm on 1x1 maps, which needs more than one sample in training.
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        **_dataset,
        data_prefix=dict(img_path='img_dir/train',
                         seg_map_path='ann_dir/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        **_dataset,
        data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
