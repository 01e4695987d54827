"""VBResNet: parity with mmdet, torchvision, timm and HF transformers.

Every reference is built here with random weights, saved, loaded into
VBResNet through the public loader, and compared output by output.
"""
import re

import pytest
import torch
from conftest import max_abs_diff, randomize_bn
from mmdet.models.backbones import ResNet as MMDetResNet

from vb_plugin import VBResNet, load_pretrained
from vb_plugin.models.resnet import RESNET_ARCHS

TOL = 1e-5



MMDET_VARIANTS = [
    *[dict(depth=d) for d in sorted(RESNET_ARCHS)],
    dict(depth=50, style='caffe'),
    dict(depth=50, deep_stem=True, avg_down=True),
    dict(depth=18, deep_stem=True, avg_down=True, base_channels=16,
         stem_channels=32),
    dict(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
         deep_stem=True),
    dict(depth=50, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2)),
    dict(depth=50, norm_cfg=dict(type='GN', num_groups=32,
                                 requires_grad=True)),
    dict(depth=50, dcn=dict(type='DCNv2', deform_groups=1,
                            fallback_on_stride=False),
         stage_with_dcn=(False, True, True, True)),
    dict(depth=34, num_stages=3, out_indices=(0, 1, 2), strides=(1, 2, 2),
         dilations=(1, 1, 1)),
]


@pytest.mark.parametrize('cfg', MMDET_VARIANTS,
                         ids=lambda c: ','.join(f'{k}={v}' for k, v in
                                                c.items()))
def test_parity_with_mmdet_resnet(cfg, save_state):
    ref = randomize_bn(MMDetResNet(**cfg))
    ref.eval()  # mmdet's ResNet.train() returns None: no chaining
    if cfg.get('dcn'):
        with torch.no_grad():  # non-zero offsets, so DCN really deforms
            for m in ref.modules():
                if hasattr(m, 'conv_offset'):
                    m.conv_offset.weight.normal_(0, 0.01)
    model = VBResNet(**cfg).eval()
    # The state dict of mmdet's ResNet loads unchanged...
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict(), strict=True)
    # ...and through the loader, as a detector checkpoint would.
    model2 = VBResNet(**cfg).eval()
    report = load_pretrained(model2, save_state(ref.state_dict()),
                             verbose=False)
    assert report.source == 'mmdet' and report.dropped == {}
    x = torch.randn(1, 3, 97, 64)
    outs_ref = ref(x)
    assert len(outs_ref) == len(model.out_indices)
    assert max_abs_diff(model(x), outs_ref) <= TOL
    assert max_abs_diff(model2(x), outs_ref) <= TOL
    for out, c, s in zip(model(x), model.out_channels, model.out_strides):
        assert out.shape[1] == c
        assert out.shape[3] == -(-64 // s)


def test_dilated_out_strides():
    model = VBResNet(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
    assert model.out_strides == (4, 8, 8, 8)
    model = VBResNet(depth=50, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))
    assert model.out_strides == (4, 8, 16, 16)


def torchvision_features(model, x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    outs = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        outs.append(x)
    return tuple(outs)


@pytest.mark.parametrize('depth', sorted(RESNET_ARCHS))
def test_parity_with_torchvision(depth, save_state):
    import torchvision
    ref = randomize_bn(getattr(torchvision.models, f'resnet{depth}')()).eval()
    model = VBResNet(depth=depth).eval()
    report = load_pretrained(model, save_state(ref.state_dict()),
                             source='torchvision', verbose=False)
    assert report.dropped == {'classifier head': ['fc.weight', 'fc.bias']}
    x = torch.randn(1, 3, 64, 80)
    assert max_abs_diff(model(x), torchvision_features(ref, x)) <= TOL


TIMM_VARIANTS = {
    'resnet18': dict(depth=18),
    'resnet34': dict(depth=34),
    'resnet50': dict(depth=50),
    'resnet50c': dict(depth=50, deep_stem=True),
    'resnet50d': dict(depth=50, deep_stem=True, avg_down=True),
    'resnet101d': dict(depth=101, deep_stem=True, avg_down=True),
}


@pytest.mark.parametrize('name', sorted(TIMM_VARIANTS))
def test_parity_with_timm(name, save_state):
    import timm
    ref = randomize_bn(timm.create_model(name, pretrained=False))
    path = save_state(ref.state_dict())
    feats = timm.create_model(name, pretrained=False, features_only=True,
                              out_indices=(1, 2, 3, 4)).eval()
    feats.load_state_dict(
        {k: v for k, v in ref.state_dict().items()
         if not k.startswith('fc.')})
    model = VBResNet(**TIMM_VARIANTS[name]).eval()
    report = load_pretrained(model, path, verbose=False)
    expected = 'timm-deep-stem' if 'deep_stem' in TIMM_VARIANTS[name] \
        else 'mmdet'
    assert report.source == expected
    x = torch.randn(1, 3, 64, 64)
    assert max_abs_diff(model(x), tuple(feats(x))) <= TOL


def test_timm_depth_not_in_table_fails_strictly(save_state):
    # timm's resnet26d has 2 blocks per stage; no VBResNet depth does.
    import timm
    from vb_plugin import CheckpointError
    path = save_state(timm.create_model('resnet26d').state_dict())
    model = VBResNet(depth=50, deep_stem=True, avg_down=True)
    with pytest.raises(CheckpointError, match=r'missing from the checkpoint'):
        load_pretrained(model, path, verbose=False)


HF_VARIANTS = {
    'bottleneck': (dict(layer_type='bottleneck', embedding_size=8,
                        hidden_sizes=[32, 64, 128, 256],
                        depths=[3, 4, 6, 3]),
                   dict(depth=50, base_channels=8)),
    'basic': (dict(layer_type='basic', embedding_size=16,
                   hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2]),
              dict(depth=18, base_channels=16)),
}


@pytest.mark.parametrize('variant', sorted(HF_VARIANTS))
def test_parity_with_transformers(variant, save_state, tmp_path):
    transformers = pytest.importorskip(
        'transformers', reason='transformers is a test-only parity oracle')
    hf_cfg, vb_cfg = HF_VARIANTS[variant]
    config = transformers.ResNetConfig(
        out_features=['stage1', 'stage2', 'stage3', 'stage4'], **hf_cfg)
    ref = randomize_bn(transformers.ResNetBackbone(config)).eval()
    model = VBResNet(**vb_cfg).eval()
    report = load_pretrained(model, save_state(ref.state_dict()),
                             verbose=False)
    assert report.source == 'hf' and report.dropped == {}
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref_outs = tuple(ref(x).feature_maps)
    assert max_abs_diff(model(x), ref_outs) <= TOL

    # The classification model, saved as safetensors by save_pretrained:
    # 'resnet.' prefix and a classifier head.
    clf = transformers.ResNetForImageClassification(config).eval()
    clf.resnet.load_state_dict(ref.state_dict(), strict=False)
    clf.save_pretrained(tmp_path / 'hf')
    model = VBResNet(**vb_cfg).eval()
    report = load_pretrained(model, tmp_path / 'hf' / 'model.safetensors',
                             verbose=False)
    assert report.source == 'hf'
    assert sorted(report.dropped['classifier head']) == [
        'classifier.1.bias', 'classifier.1.weight'
    ] and len(report.dropped) == 1
    assert max_abs_diff(model(x), ref_outs) <= TOL


@pytest.mark.parametrize('cfg,message', [
    (dict(depth=26), r'depth=26 is not a ResNet depth; valid values are '
     r'\[18, 34, 50, 101, 152\]'),
    (dict(depth=50, style='tf'), r"style='tf' is not valid; use 'pytorch' "
     r"or 'caffe'"),
    (dict(depth=50, strides=(1, 2, 2)), r'strides must have one entry per '
     r'stage \(4\), got \(1, 2, 2\)'),
    (dict(depth=50, num_stages=5), r'num_stages=5 is out of range; valid '
     r'values are 1, 2, 3, 4'),
    (dict(depth=18, dcn=dict(type='DCNv2')), r'dcn is only supported for '
     r'Bottleneck depths \(50, 101, 152\), got depth=18'),
    (dict(depth=18, base_channels=0), r'^base_channels=0 is not valid; it '
     r'must be a positive int$'),
    (dict(depth=18, stem_channels=1), r'^stem_channels=1 is not valid; it '
     r'must be an int >= 2$'),
])
def test_resnet_option_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        VBResNet(**cfg)


def test_zero_init_residual_and_dcn_offsets():
    model = VBResNet(depth=50, dcn=dict(type='DCNv2', deform_groups=1),
                     stage_with_dcn=(False, False, True, True))
    model.init_weights()
    for name, block in model.named_modules():
        if type(block).__name__ == 'Bottleneck':
            assert torch.all(block.norm3.weight == 0), name
            if hasattr(block.conv2, 'conv_offset'):
                assert torch.all(block.conv2.conv_offset.weight == 0), name
    model = VBResNet(depth=18, zero_init_residual=False)
    model.init_weights()
    assert torch.all(model.layer1[0].norm2.weight == 1)


def test_dcn_on_too_small_maps_names_stage_sizes_and_minimum():
    """mmcv's DCN (v1) refuses maps smaller than 3x3 with a bare
    "input image is smaller than kernel"; VBResNet says which stage, which
    option, the sizes and the smallest input that works."""
    model = VBResNet(depth=50, base_channels=8,
                     dcn=dict(type='DCN', deform_groups=1),
                     stage_with_dcn=(False, True, True, True)).eval()
    outs = model(torch.rand(1, 3, 65, 65))   # the minimum given below
    assert tuple(outs[-1].shape[-2:]) == (3, 3)
    with pytest.raises(ValueError, match='^' + re.escape(
            "VBResNet stage 3 (layer4) has deformable convs (dcn={'type': "
            "'DCN', 'deform_groups': 1}, stage_with_dcn[3]=True), and mmcv's "
            'DCN (DeformConv2dPack) needs feature maps of at least 3x3: this '
            'stage got a 6x4 map and makes it 3x2. Give inputs of at least '
            '65x65 pixels (DCN up to stride 32), leave stage 3 out of '
            "stage_with_dcn, or use dcn=dict(type='DCNv2', ...), which has "
            'no such limit') + '$') as info:
        model(torch.rand(1, 3, 96, 64))
    cause = info.value.__cause__
    assert isinstance(cause, RuntimeError)
    assert str(cause) == 'input image is smaller than kernel'
    # The minimum follows the deepest DCN stage that is built; training with
    # activation checkpointing goes through the same path.
    model = VBResNet(depth=50, base_channels=8,
                     dcn=dict(type='DCN', deform_groups=1),
                     stage_with_dcn=(False, True, True, True),
                     out_indices=(2, ), with_cp=True).train()
    model(torch.rand(2, 3, 33, 33))
    with pytest.raises(ValueError, match=re.escape(
            'stage 2 (layer3) has deformable convs') + '.*' + re.escape(
            'this stage got a 3x8 map and makes it 2x4. Give inputs of at '
            'least 33x33 pixels (DCN up to stride 16), leave stage 2 out')):
        model(torch.rand(2, 3, 20, 64))


def test_dcn_loads_imagenet_weights_with_offsets_kept(save_state):
    import torchvision
    ref = randomize_bn(torchvision.models.resnet50()).eval()
    # DCN (v1) with zero offsets samples exactly the plain conv's grid.
    # (DCNv2 would also scale by its zero-init mask, sigmoid(0) = 0.5.)
    model = VBResNet(depth=50, dcn=dict(type='DCN', deform_groups=1),
                     stage_with_dcn=(False, True, True, True)).eval()
    model.init_weights()
    report = load_pretrained(model, save_state(ref.state_dict()),
                             verbose=False)
    assert report.kept_initial and all('conv_offset' in k
                                       for k in report.kept_initial)
    # Zero offsets: the deformable convs compute exactly the plain convs.
    # (mmcv's DeformConv2dPack needs maps of at least 3x3: input >= 65.)
    # im2col + GEMM and a direct conv sum in different orders; activations
    # reach ~1e3 here, so the bound is relative to their size.
    x = torch.randn(1, 3, 128, 96)
    for out, ref_out in zip(model(x), torchvision_features(ref, x)):
        assert max_abs_diff(out, ref_out) <= TOL * ref_out.abs().max()


@pytest.mark.parametrize('cfg', [
    dict(depth=18), dict(depth=50, norm_cfg=dict(type='GN', num_groups=8,
                                                  requires_grad=True))],
    ids=['bn', 'gn'])
def test_norm1_is_the_stem_norm_as_in_mmdet(cfg):
    """mmdet's ResNet exposes its stem norm as ``norm1`` (freezing hooks and
    inspection code read it)."""
    ref = MMDetResNet(**cfg)
    model = VBResNet(**cfg)
    model.load_state_dict(ref.state_dict())
    assert model.norm1 is getattr(model, ref.norm1_name)
    assert type(model.norm1) is type(ref.norm1)
    for a, b in zip(model.norm1.state_dict().values(),
                    ref.norm1.state_dict().values()):
        assert torch.equal(a, b)
    # frozen_bn swaps the module; norm1 follows.
    frozen = VBResNet(depth=18, frozen_stages=0, frozen_bn=True)
    assert type(frozen.norm1).__name__ == 'FrozenBatchNorm2d'
    # A deep stem has no single norm, in mmdet too.
    with pytest.raises(AttributeError):
        MMDetResNet(depth=18, deep_stem=True).norm1
    with pytest.raises(AttributeError):
        VBResNet(depth=18, deep_stem=True).norm1


def test_dcn_size_error_is_also_mmcvs_runtime_error():
    """Code written against mmcv catches RuntimeError; code written against
    vb_plugin catches ValueError: both catch the one error."""
    from vb_plugin.models import DCNInputSizeError
    model = VBResNet(depth=50, base_channels=8,
                     dcn=dict(type='DCN', deform_groups=1),
                     stage_with_dcn=(False, False, False, True)).eval()
    for kind in (RuntimeError, ValueError, DCNInputSizeError):
        with pytest.raises(kind, match='^VBResNet stage 3 \\(layer4\\)'):
            model(torch.rand(1, 3, 40, 40))


def test_with_cp_checkpoints_in_the_base_class_not_in_mmdets_blocks():
    """One mechanism (documented in docs/migration.md): VBBackbone wraps each
    block in torch.utils.checkpoint; the blocks' own with_cp flag stays False,
    so nothing is checkpointed twice. Gradients equal the plain run's."""
    import torch.utils.checkpoint as cp
    calls = []
    original = cp.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(type(fn).__name__)
        return original(fn, *args, **kwargs)

    x = torch.rand(1, 3, 64, 96)
    plain = VBResNet(depth=18, base_channels=8).train()
    model = VBResNet(depth=18, base_channels=8, with_cp=True).train()
    model.load_state_dict(plain.state_dict())
    assert all(not b.with_cp for i in range(4)
               for b in getattr(model, f'layer{i + 1}'))
    cp.checkpoint = counting
    try:
        sum(o.sum() for o in model(x)).backward()
    finally:
        cp.checkpoint = original
    assert calls == ['BasicBlock'] * 8   # each block once, by the base
    sum(o.sum() for o in plain(x)).backward()
    for (n, a), b in zip(model.named_parameters(), plain.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n
