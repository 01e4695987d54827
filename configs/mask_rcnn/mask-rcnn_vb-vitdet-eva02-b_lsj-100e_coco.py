# ViTDet's recipe on EVA-02 ViT-B (MIM-pretrained on IN-22k): the windowed
# form with RoPE made for each window's grid, as EVA-02's detector does
# (it builds Cascade Mask R-CNN on it; this is ViTDet's Mask R-CNN), and
# 16-pixel patches resampled from the checkpoint's 14 when it loads.
_base_ = './mask-rcnn_vb-vitdet-b_lsj-100e_coco.py'

model = dict(
    backbone=dict(
        model_name='eva02_base_patch14_224',
        model_kwargs=dict(patch_size=16, img_size=256),
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/eva02_B_pt_in21k_p14.pt')))
