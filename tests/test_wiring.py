"""The wiring checks of :mod:`vb_plugin.wiring`, through mmdet's registry
(the hook) and directly: head strides and the input size divisor."""
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import init_default_scope

from vb_plugin import VBResNet
from vb_plugin.wiring import (head_strides, install_build_hook,
                              neck_out_strides, wire_model)

TOY = 'configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py'


def mmdet_models():
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    return MODELS


def toy_model_cfg(**backbone):
    cfg = Config.fromfile(TOY).model
    cfg.backbone.update(backbone)
    return cfg


def test_hook_is_installed_once_on_every_model_registry():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS
    for reg in (ROOT_MODELS, MMDET_MODELS, MMSEG_MODELS):
        assert reg.build_func is ROOT_MODELS.build_func
        assert hasattr(reg.build_func, '__wrapped__')
    assert install_build_hook() == 0
    assert not hasattr(ROOT_MODELS.build_func.__wrapped__, '__wrapped__')


def test_auto_is_filled_and_the_users_config_is_left_alone():
    cfg = toy_model_cfg()
    model = mmdet_models().build(cfg)
    assert cfg.neck.in_channels == 'auto'
    assert [c.conv.in_channels for c in model.neck.lateral_convs] == list(
        model.backbone.out_channels) == [32, 64, 128, 256]


def test_strides_mismatch_in_mmdet_build():
    """A dilated last stage keeps stride 16: the RPN's default strides
    [4, 8, 16, 32, 64] would put anchors at the wrong scale without a word."""
    cfg = toy_model_cfg(strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))
    with pytest.raises(ValueError, match='^' + re.escape(
            'model.rpn_head.anchor_generator.strides=[4, 8, 16, 32, 64] does '
            'not match the feature maps it gets: VBResNet gives out_strides '
            '[4, 8, 16, 16], which through FPN (model.neck) become strides '
            '[4, 8, 16, 16, 32]. Set strides to [4, 8, 16, 16, 32], or '
            "change the backbone's out_indices/strides.") + '$'):
        mmdet_models().build(cfg)


def test_roi_extractor_strides_are_checked_on_the_levels_it_reads():
    cfg = toy_model_cfg()
    cfg.roi_head.mask_roi_extractor.featmap_strides = [8, 16, 32, 64]
    with pytest.raises(ValueError, match=re.escape(
            'model.roi_head.mask_roi_extractor.featmap_strides=[8, 16, 32, '
            '64] does not match the feature maps it gets') + '.*' +
            re.escape('Set featmap_strides to [4, 8, 16, 32]')):
        mmdet_models().build(cfg)


def test_matching_strides_build():
    """Out indices (1, 2, 3) with FPN start_level 0 and strides written to
    match: builds, and the head strides are what the FPN gives."""
    cfg = toy_model_cfg(out_indices=(1, 2, 3))
    cfg.rpn_head.anchor_generator.strides = [8, 16, 32, 64, 128]
    for ext in ('bbox_roi_extractor', 'mask_roi_extractor'):
        cfg.roi_head[ext].featmap_strides = [8, 16, 32, 64]
    model = mmdet_models().build(cfg)
    assert model.backbone.out_strides == (8, 16, 32)
    assert model.rpn_head.prior_generator.strides == [
        (s, s) for s in (8, 16, 32, 64, 128)]


def test_neck_out_strides():
    assert neck_out_strides(None, [4, 8]) == [4, 8]
    assert neck_out_strides(dict(type='FPN', num_outs=4,
                                 end_level=2), [4, 8, 16, 32]) == [4, 8, 16,
                                                                   32]
    assert neck_out_strides(dict(type='ChannelMapper', num_outs=4),
                            [8, 16, 32]) == [8, 16, 32, 64]
    assert neck_out_strides(dict(type='mmdet.FPN', num_outs=1), [32]) == [32]
    assert neck_out_strides(dict(type='DyHead'), [4, 8]) is None
    assert head_strides(dict(bbox_head=dict(prior_generator=dict(
        strides=[(8, 8), 16])))) == [
            ('model.bbox_head.prior_generator.strides', [8, 16], False)]


@pytest.fixture
def divisible_backbone():
    """A VBResNet that states it needs inputs divisible by 14 (as a patch-14
    ViT does), registered for the test only."""
    name = 'VBResNetNeeds14'

    class Needs14(VBResNet):
        size_divisor = 14

    ROOT_MODELS.register_module(name=name, module=Needs14, force=True)
    yield name
    ROOT_MODELS._module_dict.pop(name)


def test_size_divisor_against_pad_size_divisor(divisible_backbone):
    cfg = toy_model_cfg(type=divisible_backbone)
    assert cfg.data_preprocessor.pad_size_divisor == 32
    with pytest.raises(ValueError, match='^' + re.escape(
            'model.data_preprocessor.pad_size_divisor=32 does not suit the '
            'backbone: VBResNetNeeds14 needs inputs whose height and width '
            'are multiples of 14 (size_divisor=14). Set '
            'pad_size_divisor=224.') + '$'):
        mmdet_models().build(cfg)
    cfg.data_preprocessor.pad_size_divisor = 224
    model = mmdet_models().build(cfg)
    assert model.data_preprocessor.pad_size_divisor == 224
    del cfg.data_preprocessor['pad_size_divisor']
    with pytest.raises(ValueError, match='^' + re.escape(
            'model.data_preprocessor does not pad: VBResNetNeeds14 needs '
            'inputs whose height and width are multiples of 14')):
        mmdet_models().build(cfg)


def test_auto_behind_a_backbone_without_out_channels():
    model = dict(backbone=dict(type='mmdet.ResNet', depth=18),
                 neck=dict(type='FPN', in_channels='auto', out_channels=8,
                           num_outs=4))
    with pytest.raises(ValueError, match='^' + re.escape(
            "model.neck.in_channels='auto' needs a backbone that reports its "
            'out_channels; ResNet does not: write neck.in_channels as a list '
            'of ints, one per backbone output') + '$'):
        wire_model(model)
    model['neck']['in_channels'] = [64, 128, 256, 512]
    assert wire_model(model) is None


def test_meta_build_costs_no_memory():
    model = dict(backbone=dict(type='VBResNet', depth=50,
                               init_cfg=dict(type='Pretrained',
                                             checkpoint='/nonexistent.pth')),
                 neck=dict(type='FPN', in_channels='auto', out_channels=8,
                           num_outs=5))
    assert wire_model(model) == (256, 512, 1024, 2048)
    assert torch.get_default_device() == torch.device('cpu')
