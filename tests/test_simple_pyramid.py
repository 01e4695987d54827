"""VBSimpleFeaturePyramid: ViTDet's simple feature pyramid as a neck.

The oracle is an independent reference written here in plain torch from the
ViTDet paper's description, with detectron2's module names; its weights
reach the neck through a detectron2-layout ``.pkl`` file read by the
restricted unpickler and the strict loader (``init_cfg`` of type
'Pretrained').
"""
import math
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from torch import nn

import vb_plugin
from conftest import max_abs_diff
from vb_plugin import CheckpointError, VBSimpleFeaturePyramid
from vb_plugin.apis import synthetic_detection_batch
from vb_plugin.weights import read_checkpoint
from vb_plugin.wiring import neck_out_strides

C, OUT = 32, 16  # tiny widths: in_channels, out_channels


# ---------------------------------------------------------------- reference
class ChannelLN(nn.Module):
    """LayerNorm over dim 1 of NCHW, written out (eps 1e-6)."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvWithNorm(nn.Conv2d):
    """detectron2's Conv2d(norm=...): weight at ``.weight``, norm at
    ``.norm``, no bias."""

    def __init__(self, cin, cout, k):
        super().__init__(cin, cout, k, padding=k // 2, bias=False)
        self.norm = ChannelLN(cout)

    def forward(self, x):
        return self.norm(super().forward(x))


class Identity(nn.Module):
    def forward(self, x):
        return x


class MaxPool(nn.Module):
    def forward(self, x):
        return F.max_pool2d(x, kernel_size=2, stride=2)


class ReferencePyramid(nn.Module):
    """simfp_2..5 for scales 4, 2, 1, 0.5, then a stride-2 1x1 max-pool."""

    def __init__(self, c, out):
        super().__init__()
        self.simfp_2 = nn.Sequential(
            nn.ConvTranspose2d(c, c // 2, 2, stride=2), ChannelLN(c // 2),
            nn.GELU(), nn.ConvTranspose2d(c // 2, c // 4, 2, stride=2),
            ConvWithNorm(c // 4, out, 1), ConvWithNorm(out, out, 3))
        self.simfp_3 = nn.Sequential(
            nn.ConvTranspose2d(c, c // 2, 2, stride=2),
            ConvWithNorm(c // 2, out, 1), ConvWithNorm(out, out, 3))
        self.simfp_4 = nn.Sequential(ConvWithNorm(c, out, 1),
                                     ConvWithNorm(out, out, 3))
        self.simfp_5 = nn.Sequential(MaxPool(), ConvWithNorm(c, out, 1),
                                     ConvWithNorm(out, out, 3))

    def forward(self, x):
        outs = [self.simfp_2(x), self.simfp_3(x), self.simfp_4(x),
                self.simfp_5(x)]
        return outs + [F.max_pool2d(outs[-1], kernel_size=1, stride=2)]


def random_reference(seed=0):
    torch.manual_seed(seed)
    ref = ReferencePyramid(C, OUT).eval()
    with torch.no_grad():
        for p in ref.parameters():  # norms away from identity
            p.copy_(torch.randn_like(p) * 0.2 + (1 if p.dim() == 1 else 0))
    return ref


def write_d2_pkl(ref, path):
    """A detectron2 model-zoo file: numpy arrays under 'model', the ViT
    under backbone.net, heads outside the backbone."""
    model = {f'backbone.{k}': v.numpy() for k, v in ref.state_dict().items()}
    model['backbone.net.pos_embed'] = torch.zeros(1, 4, C).numpy()
    model['backbone.net.blocks.0.attn.qkv.weight'] = torch.zeros(
        3 * C, C).numpy()
    model['roi_heads.box_predictor.cls_score.weight'] = torch.zeros(
        3, OUT).numpy()
    with open(path, 'wb') as f:
        pickle.dump({'model': model, '__author__': 'test',
                     'matching_heuristics': True}, f)
    return path


# -------------------------------------------------------------------- tests
def test_equals_reference_through_d2_pkl(tmp_path):
    ref = random_reference()
    path = write_d2_pkl(ref, tmp_path / 'model_final_vitdet.pkl')
    neck = VBSimpleFeaturePyramid(
        in_channels=C, out_channels=OUT,
        init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    neck.init_weights()
    neck.eval()
    # Stride-16 maps of 161x227 and 333x517 images padded to 32.
    for hw in ((6, 8), (11, 17)):
        x = torch.randn(2, C, *hw)
        with torch.no_grad():
            outs, refs = neck((x, )), ref(x)
        diff = max_abs_diff(outs, tuple(refs))
        print(f'max abs difference at {hw}: {diff:.2e}')
        assert diff <= 1e-5


def test_load_report_of_d2_pkl(tmp_path):
    path = write_d2_pkl(random_reference(), tmp_path / 'd2.pkl')
    neck = VBSimpleFeaturePyramid(in_channels=C, out_channels=OUT)
    report = vb_plugin.load_pretrained(neck, path, verbose=False)
    assert report.source == 'detectron2-vitdet'
    assert report.prefix == 'backbone.' and report.container == 'model'
    assert report.dropped == {
        "outside prefix 'backbone.'": [
            'roi_heads.box_predictor.cls_score.weight'],
        'the ViT (VBTimmBackbone takes it)': [
            'net.pos_embed', 'net.blocks.0.attn.qkv.weight'],
    }
    assert 'dropped as expected, the ViT (VBTimmBackbone takes it): 2' in \
        str(report)
    assert sorted(report.loaded) == sorted(neck.state_dict())
    assert not report.kept_initial


def test_own_layout_round_trip_and_strictness(tmp_path):
    src = VBSimpleFeaturePyramid(in_channels=C, out_channels=OUT)
    path = tmp_path / 'neck.pth'
    torch.save(src.state_dict(), path)
    dst = VBSimpleFeaturePyramid(in_channels=C, out_channels=OUT)
    assert vb_plugin.load_pretrained(dst, path, verbose=False).source == 'vb'
    x = torch.randn(1, C, 4, 6)
    assert max_abs_diff(src(x), dst(x)) == 0
    # A pyramid without the stride-4 level: keys of p2 are unexpected.
    small = VBSimpleFeaturePyramid(in_channels=C, out_channels=OUT,
                                   scale_factors=(2, 1, 0.5))
    with pytest.raises(CheckpointError, match=r'unexpected .*p2\.0\.weight'):
        vb_plugin.load_pretrained(small, path, verbose=False)


def test_d2_subset_of_scales_lands_on_the_right_levels(tmp_path):
    """Levels are named by stride: a neck without scale 4 loads simfp_3..5
    onto its first three levels (and equals the reference's last four
    outputs)."""
    ref = random_reference()
    state = {k: v for k, v in ref.state_dict().items()
             if not k.startswith('simfp_2.')}
    path = tmp_path / 'd2.pkl'
    with open(path, 'wb') as f:
        pickle.dump({'model': {f'backbone.{k}': v.numpy()
                               for k, v in state.items()}}, f)
    neck = VBSimpleFeaturePyramid(in_channels=C, out_channels=OUT,
                                  scale_factors=(2.0, 1.0, 0.5), num_outs=4)
    vb_plugin.load_pretrained(neck, path, verbose=False)
    x = torch.randn(1, C, 6, 10)
    with torch.no_grad():
        assert max_abs_diff(neck.eval()(x), tuple(ref(x)[1:])) <= 1e-5


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def test_malicious_pkl_is_refused(tmp_path):
    marker = tmp_path / 'MARKER'
    path = tmp_path / 'evil.pkl'
    with open(path, 'wb') as f:
        pickle.dump({'model': {'backbone.simfp_4.0.weight': Exploit(marker)}},
                    f)
    name = f'{os.system.__module__}.system'  # posix.system
    with pytest.raises(CheckpointError,
                       match=rf'refused to unpickle the global {name}'):
        read_checkpoint(path)
    neck = VBSimpleFeaturePyramid(
        in_channels=C, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        neck.init_weights()
    assert not marker.exists()


def test_pkl_reader_gives_tensors(tmp_path):
    path = tmp_path / 'a.pkl'
    arr = torch.arange(6, dtype=torch.float32).reshape(2, 3).numpy()
    with open(path, 'wb') as f:
        pickle.dump({'model': {'w': arr[:, ::2], 'n': arr.dtype.type(2.5)},
                     '__author__': 'x'}, f)
    got = read_checkpoint(path)
    assert got['__author__'] == 'x'
    assert torch.equal(got['model']['w'], torch.tensor([[0., 2.], [3., 5.]]))
    assert torch.is_tensor(got['model']['n']) and got['model']['n'] == 2.5


@pytest.mark.parametrize('image', [(161, 227), (333, 517)])
def test_channels_and_strides(image):
    """An image padded to a multiple of 32 (mmdet's pad_size_divisor=32)
    gives a stride-16 map of Hp/16 x Wp/16; output s is ceil(Hp/s) x
    ceil(Wp/s) for s in 4..64 (64 from the 1x1 stride-2 max-pool, which
    rounds up)."""
    neck = VBSimpleFeaturePyramid(in_channels=C, out_channels=OUT).eval()
    assert neck.out_channels == OUT
    assert neck.out_strides == (4, 8, 16, 32, 64)
    hp, wp = (math.ceil(d / 32) * 32 for d in image)
    with torch.no_grad():
        outs = neck(torch.randn(1, C, hp // 16, wp // 16))
    assert [tuple(o.shape) for o in outs] == [
        (1, OUT, math.ceil(hp / s), math.ceil(wp / s))
        for s in neck.out_strides]
    # A bare tensor is taken too; other options.
    x = torch.randn(1, C, 5, 7)
    assert max_abs_diff(neck(x), neck([x])) == 0
    neck = VBSimpleFeaturePyramid(in_channels=[C], out_channels=8,
                                  scale_factors=(1, 0.5, 0.25), num_outs=4,
                                  norm_cfg=None)
    assert neck.out_strides == (16, 32, 64, 128)
    assert [tuple(o.shape[-2:]) for o in neck(torch.randn(1, C, 8, 12))] == [
        (8, 12), (4, 6), (2, 3), (1, 2)]
    assert neck.levels.p4[0].bias is not None  # no norm: convs with bias


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(in_channels='auto'), ValueError,
     r"^in_channels='auto' reached VBSimpleFeaturePyramid: 'auto' is filled "
     r"by vb_plugin's wiring"),
    (dict(in_channels=[32, 64]), ValueError,
     r'^in_channels=\[32, 64\]: VBSimpleFeaturePyramid takes a single map'),
    (dict(in_channels=30), ValueError,
     r'^in_channels=30 is not divisible by 4: scale factor 4 halves the '
     r'channels 2 time\(s\)'),
    (dict(in_channels=32.0), TypeError, r'^in_channels'),
    (dict(in_channels=32, scale_factors=(4, 3, 1)), ValueError,
     r'^scale_factors=\(4, 3, 1\): 3 is not allowed; each must be a power '
     r'of two in \(4.0, 2.0, 1.0, 0.5, 0.25\)'),
    (dict(in_channels=32, scale_factors=(1, 2)), ValueError,
     r'^scale_factors=\(1, 2\) must decrease strictly'),
    (dict(in_channels=32, scale_factors=()), ValueError,
     r'^scale_factors=\(\) is empty'),
    (dict(in_channels=32, scale_factors='4'), TypeError,
     r'^scale_factors must be a sequence of numbers'),
    (dict(in_channels=32, num_outs=3), ValueError, r'^num_outs'),
    (dict(in_channels=32, out_channels=0), ValueError, r'^out_channels'),
    (dict(in_channels=32, norm_cfg=dict(type='LN')), ValueError,
     r"^norm_cfg=\{'type': 'LN'\}: norm type 'LN' normalises the last dim"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        VBSimpleFeaturePyramid(**kwargs)


def test_more_than_one_map_is_refused():
    neck = VBSimpleFeaturePyramid(in_channels=C)
    x = torch.randn(1, C, 4, 4)
    with pytest.raises(ValueError, match='takes one map, got 2'):
        neck((x, x))


def test_neck_out_strides_for_the_wiring():
    cfg = dict(type='VBSimpleFeaturePyramid', in_channels='auto')
    assert neck_out_strides(cfg, [16]) == [4, 8, 16, 32, 64]
    assert neck_out_strides(dict(cfg, scale_factors=(2, 1), num_outs=3),
                            [32]) == [16, 32, 64]
    assert neck_out_strides(cfg, [8, 16]) is None  # the channel check fails


# -------------------------------------------------------------- mmdet build
def mask_rcnn_cfg(**neck):
    from mmdet.utils import register_all_modules
    register_all_modules()
    import mmdet
    base = (Path(mmdet.__file__).parent / '.mim' / 'configs' / '_base_' /
            'models' / 'mask-rcnn_r50_fpn.py')
    model = Config.fromfile(str(base)).model
    model.backbone = dict(
        type='VBTimmBackbone',
        model_name='vit_tiny_patch16_224', pyramid=None, out_indices=(3, ),
        model_kwargs=dict(depth=4, embed_dim=C, num_heads=2))
    model.neck = dict(type='VBSimpleFeaturePyramid', in_channels='auto',
                      out_channels=OUT, num_outs=5, **neck)
    model.rpn_head.in_channels = OUT
    model.roi_head.bbox_roi_extractor.out_channels = OUT
    model.roi_head.bbox_head.in_channels = OUT
    model.roi_head.mask_roi_extractor.out_channels = OUT
    model.roi_head.mask_head.in_channels = OUT
    model.roi_head.mask_head.conv_out_channels = OUT
    model.roi_head.bbox_head.fc_out_channels = 32
    return model


def test_mask_rcnn_with_the_neck_gives_finite_losses():
    from mmdet.registry import MODELS as DET
    cfg = mask_rcnn_cfg()
    model = DET.build(cfg)
    assert model.backbone.out_strides == (16, )
    assert model.neck.in_channels == C
    assert model.neck.out_strides == (4, 8, 16, 32, 64)
    batch = synthetic_detection_batch(num_images=2, size=(192, 256),
                                      num_objects=1)
    model.train()
    data = model.data_preprocessor(batch, training=True)
    losses = model.loss(data['inputs'], data['data_samples'])
    values = [v for k, v in losses.items() if 'loss' in k]
    total = sum(sum(v) if isinstance(v, (list, tuple)) else v
                for v in values)
    assert torch.isfinite(total)
    total.backward()
    assert model.neck.levels.p2[0].weight.grad is not None


def test_mask_rcnn_wrong_in_channels_is_caught():
    from mmdet.registry import MODELS as DET
    cfg = mask_rcnn_cfg()
    cfg.neck.in_channels = 64
    with pytest.raises(ValueError, match=re.escape(
            'model.neck.in_channels=64 does not match the backbone: '
            'VBTimmBackbone with out_indices=(3,) gives out_channels [32]. '
            'Set neck.in_channels=32.')):
        DET.build(cfg)


def test_mask_rcnn_wrong_head_strides_are_caught():
    from mmdet.registry import MODELS as DET
    cfg = mask_rcnn_cfg(scale_factors=(2.0, 1.0, 0.5))
    with pytest.raises(ValueError, match=re.escape(
            'model.rpn_head.anchor_generator.strides=[4, 8, 16, 32, 64] does '
            'not match the feature maps it gets: VBTimmBackbone gives '
            'out_strides [16], which through VBSimpleFeaturePyramid '
            '(model.neck) become strides [8, 16, 32, 64, 128]')):
        DET.build(cfg)
