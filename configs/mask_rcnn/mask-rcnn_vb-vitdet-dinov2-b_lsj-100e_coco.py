# ViTDet's recipe on DINOv2 ViT-B/14 with registers: the windowed form
# (registers and class token removed, 14x14 windows, global blocks 2, 5, 8,
# 11, relative positions). The patch embedding is resampled from 14 to 16
# pixels when the checkpoint loads (timm's filter, as EVA-02's detector
# does for its 14-pixel patches), so the map is at stride 16 and ViTDet's
# pyramid gives strides 4..64; the position embedding stays at the
# checkpoint's 37x37 and is resized to the grid at every forward.
_base_ = './mask-rcnn_vb-vitdet-b_lsj-100e_coco.py'

model = dict(
    backbone=dict(
        model_name='vit_base_patch14_reg4_dinov2',
        model_kwargs=dict(patch_size=16, img_size=592),
        # The official release's layout (dinov2_vitb14_reg4_pretrain.pth)
        # or timm's, as a local file.
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/dinov2_vitb14_reg4_pretrain.pth')))
