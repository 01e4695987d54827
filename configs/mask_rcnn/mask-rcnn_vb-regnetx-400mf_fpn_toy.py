# Mask R-CNN with VBRegNet regnetx_400mf on the bundled toy dataset.
_base_ = './mask-rcnn_vb-r18_fpn_toy.py'

model = dict(
    backbone=dict(
        _delete_=True, type='VBRegNet', arch='regnetx_400mf', init_cfg=None))
