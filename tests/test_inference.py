"""optimize_for_inference: every form equals fp32 eager, on every family.

Tolerances (vb_plugin.outputs): fp32 forms 1e-4 absolute on outputs of
magnitude <= 1 (scaled by the largest |output| beyond that); bf16 forms 5%
of the largest |output|, since bf16 keeps 8 significand bits and the
rounding adds up over tens of layers.
"""
import pytest
import torch
from backbone_cases import build, case_id, iter_cases
from conftest import max_abs_diff, randomize_bn
from torch import nn

import vb_plugin
from vb_plugin.folding import fold_batch_norms
from vb_plugin.inference import InferenceModel, optimize_for_inference
from vb_plugin.layers import is_batch_norm
from vb_plugin.outputs import FP32_TOLERANCE, tolerance_for

CASES = [
    pytest.param(name, case, id=f'{name}[{case_id(case)}]')
    for name, case in iter_cases()
]


def _model(name, case, **overrides):
    return randomize_bn(build(name, case, **overrides)).eval()


def _scale(outs):
    return max(max(o.abs().max().item() for o in outs), 1.)


def test_exported_from_package():
    assert vb_plugin.optimize_for_inference is optimize_for_inference
    assert 'optimize_for_inference' in vb_plugin.__all__


@pytest.mark.parametrize('name,case', CASES)
def test_fp32_form_equals_eager(name, case):
    model = _model(name, case)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        fast = optimize_for_inference(model)
        out = fast(x)
    assert isinstance(fast, InferenceModel) and not fast.training
    assert max_abs_diff(ref, out) <= FP32_TOLERANCE * _scale(ref)
    # NCHW-contiguous, as the eager model's (mmcv's RoIAlign needs it)
    assert all(o.is_contiguous() for o in out)
    # Every BN that is fed by a conv is gone from the optimised module.
    n_bn = sum(is_batch_norm(m) for m in model.modules())
    left = sum(is_batch_norm(m) for m in fast.modules())
    assert left == n_bn - len(fast.folded)
    assert fast.out_channels == model.out_channels


@pytest.mark.parametrize('name,case', [
    pytest.param('VBResNet', dict(depth=18, base_channels=8), id='resnet18'),
    pytest.param('VBResNet', dict(depth=50, base_channels=8), id='resnet50'),
    pytest.param('VBRegNet', dict(arch=dict(w0=8, wa=8.0, wm=1.5, group_w=4,
                                            depth=6, bot_mul=0.5,
                                            se_ratio=0.25), stem_channels=8),
                 id='regnet'),
])
def test_absolute_tolerance_on_vb_families(name, case):
    # The bound, absolute: <= 1e-4 for the fp32 form.
    model = _model(name, case)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        diff = max_abs_diff(model(x), optimize_for_inference(model)(x))
    assert diff <= 1e-4


def test_every_bn_folds_on_resnet_with_frozen_bn():
    model = _model('VBResNet', dict(depth=50, base_channels=8),
                   frozen_stages=2, frozen_bn=True)
    n_bn = sum(is_batch_norm(m) or type(m).__name__ == 'FrozenBatchNorm2d'
               for m in model.modules())
    fast = optimize_for_inference(model)
    assert len(fast.folded) == n_bn  # conv1/bn1 pairs and downsample too
    names = dict(fast.folded)
    assert names['conv1'] == 'bn1'
    assert names['layer1.0.downsample.0'] == 'layer1.0.downsample.1'
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert max_abs_diff(model(x), fast(x)) <= 1e-4


def test_convnext_uses_conv_mlp_and_channels_last():
    model = _model('VBConvNeXt', dict(arch=dict(depths=[1, 1, 2, 1],
                                                channels=[8, 16, 32, 64])))
    fast = optimize_for_inference(model)
    blocks = [m for m in fast.modules() if hasattr(m, 'conv_mlp')]
    assert blocks and all(b.conv_mlp for b in blocks)
    assert not any(b.conv_mlp for b in model.modules()
                   if hasattr(b, 'conv_mlp'))  # the original is untouched
    w = fast.module.downsample_layers[0][0].weight
    assert w.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('name,case', CASES[::2])
def test_bf16_form_within_documented_tolerance(name, case):
    model = _model(name, case)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        out = optimize_for_inference(model, dtype='bf16')(x)
    assert all(o.dtype == torch.float32 and o.is_contiguous() for o in out)
    assert max_abs_diff(ref, out) <= tolerance_for(torch.bfloat16, ref)


def test_original_is_unchanged_and_train_mode_is_refused():
    model = _model('VBResNet', dict(depth=18, base_channels=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.warns(UserWarning, match='ignored'):
        fast.train()
    assert not fast.training


def test_fold_only_conv_fed_bn():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn_after_relu = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn_after_relu(torch.relu(self.conv(x)))
            return self.bn2(self.conv2(y))

    model = randomize_bn(Branchy()).eval()
    x = torch.rand(1, 3, 8, 8)
    ref = model(x)
    pairs = fold_batch_norms(model, x)
    assert pairs == [('conv2', 'bn2')]
    assert isinstance(model.bn_after_relu, nn.BatchNorm2d)
    assert max_abs_diff(ref, model(x)) <= 1e-5


def test_training_mode_bn_without_running_stats_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 1),
                          nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert fold_batch_norms(model, torch.rand(2, 3, 4, 4)) == []


def test_errors_name_the_option():
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="dtype='fp16'"):
        optimize_for_inference(model, dtype='fp16')
    with pytest.raises(TypeError, match='backbone must be an nn.Module'):
        optimize_for_inference('resnet50')


@pytest.mark.slow
@pytest.mark.parametrize('name,case', [
    pytest.param('VBResNet', dict(depth=18, base_channels=8), id='resnet'),
    pytest.param('VBConvNeXt', dict(arch=dict(depths=[1, 1, 1, 1],
                                              channels=[8, 16, 32, 64])),
                 id='convnext'),
])
def test_compiled_form_equals_eager(name, case):
    model = _model(name, case)
    x = torch.rand(1, 3, 64, 64)
    fast = optimize_for_inference(model, compile=True)
    with torch.inference_mode():
        ref = model(x)
        out = fast(x)
    assert max_abs_diff(ref, out) <= FP32_TOLERANCE * _scale(ref)
