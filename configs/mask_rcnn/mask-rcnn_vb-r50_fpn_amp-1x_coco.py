# Mask R-CNN R-50-FPN 1x on COCO with VBResNet, trained with fp16 automatic
# mixed precision, as mmdet's mask-rcnn_r50_fpn_amp-1x_coco.py: mmengine's
# AmpOptimWrapper autocasts the forward to float16 over fp32 weights and
# scales the loss dynamically. Needs a GPU (AmpOptimWrapper refuses the
# CPU). Not bfloat16: mmcv 2.1.0's RoIAlign has no bf16 kernel (and its CPU
# nms takes float only), so Mask R-CNN under bf16 autocast fails inside
# mmcv; see docs/performance.md.
_base_ = './mask-rcnn_vb-r50_fpn_1x_coco.py'

optim_wrapper = dict(type='AmpOptimWrapper', dtype='float16',
                     loss_scale='dynamic')
