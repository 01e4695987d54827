"""VBTimmBackbone over a broad sample of timm families.

timm's own ``features_only`` extractor, given the same weights file through
timm's own loading path, is the oracle. Models are the smallest variants (a
few are shrunk further through ``model_kwargs``) on 64x64 inputs.
"""
import copy
import math
import pickle
import re
from pathlib import Path

import pytest
import timm
import torch
from conftest import checked_train_step, max_abs_diff
from timm.layers import BatchNormAct2d, to_2tuple
from timm.models import adapt_input_conv

import vb_plugin
from vb_plugin import CheckpointError, VBTimmBackbone
from vb_plugin.layers import (FrozenBatchNorm2d, FrozenBatchNormAct2d,
                              is_batch_norm)
from vb_plugin.models.timm import plan_stages

ROOT = Path(__file__).resolve().parents[1]
MASK_RCNN = ROOT / 'configs/mask_rcnn/mask-rcnn_vb-timm-resnet50_fpn_1x_coco.py'

_SWIN = dict(img_size=64, window_size=4, embed_dim=24, depths=(1, 1, 1, 1),
             num_heads=(1, 1, 1, 1))

#: (family, model_name, model_kwargs, expected out_strides)
FAMILIES = [
    ('resnet', 'resnet10t', {}, (4, 8, 16, 32)),
    ('resnext', 'resnext26ts', {}, (4, 8, 16, 32)),
    ('res2net', 'res2net50_14w_8s', dict(layers=[1, 1, 1, 1]),
     (4, 8, 16, 32)),
    ('efficientnet', 'efficientnet_b0', {}, (4, 8, 16, 32)),
    ('mixnet', 'tf_mixnet_s', {}, (4, 8, 16, 32)),
    ('mobilenetv3', 'mobilenetv3_small_050', {}, (4, 8, 16, 32)),
    ('convnext', 'convnext_atto', {}, (4, 8, 16, 32)),
    ('regnet', 'regnetx_002', {}, (4, 8, 16, 32)),
    ('cspnet', 'cs3darknet_s', {}, (4, 8, 16, 32)),
    ('densenet', 'densenet121', dict(block_config=(1, 1, 1, 1)),
     (4, 8, 16, 32)),
    ('hrnet', 'hrnet_w18_small', {}, (4, 8, 16, 32)),
    ('swin', 'swin_tiny_patch4_window7_224', _SWIN, (4, 8, 16, 32)),
    ('vit', 'vit_tiny_patch16_224', dict(dynamic_img_size=True),
     (16, 16, 16, 16)),
    ('ghostnet', 'ghostnet_050', {}, (4, 8, 16, 32)),
    ('dla', 'dla46_c', {}, (4, 8, 16, 32)),
    ('vovnet', 'ese_vovnet19b_slim_dw', {}, (4, 8, 16, 32)),
    ('mobilevit', 'mobilevit_xxs', {}, (4, 8, 16, 32)),
    ('efficientvit', 'efficientvit_b0', {}, (4, 8, 16, 32)),
    ('pvt_v2', 'pvt_v2_b0', {}, (4, 8, 16, 32)),
    ('edgenext', 'edgenext_xx_small', {}, (4, 8, 16, 32)),
    ('mobileone', 'mobileone_s0', {}, (4, 8, 16, 32)),
    ('hgnetv2', 'hgnetv2_b0', {}, (4, 8, 16, 32)),
    ('rexnet', 'rexnet_100', {}, (4, 8, 16, 32)),
    ('fastvit', 'fastvit_t8', {}, (4, 8, 16, 32)),
    ('levit', 'levit_128s', dict(img_size=64), (16, 32, 64)),
]
FAMILY_PARAMS = [
    pytest.param(name, kwargs, strides, id=family)
    for family, name, kwargs, strides in FAMILIES
]
BN_FAMILY_PARAMS = [
    pytest.param(name, kwargs, strides, id=family)
    for family, name, kwargs, strides in FAMILIES
    if family in ('resnet', 'efficientnet', 'mobilenetv3', 'regnet',
                  'densenet', 'hrnet', 'cspnet', 'ghostnet')
]

#: Largest parity difference seen per model, printed at the end (-s).
PARITY = {}


def build(name, kwargs, **options):
    # NOTE: the raw levels, as timm's own extractor gives them (what this
    # file compares against); tests/test_transformers.py has the pyramids.
    options.setdefault('pyramid', None)
    return VBTimmBackbone(name, model_kwargs=copy.deepcopy(kwargs),
                          **options)


def save_timm_weights(name, kwargs, path):
    """Random weights of the full timm model, as timm saves them."""
    torch.save(timm.create_model(name, pretrained=False, **kwargs)
               .state_dict(), path)
    return path


def timm_features(name, kwargs, path, out_indices, **extra):
    """timm's own extractor, loading ``path`` through timm's own code."""
    return timm.create_model(name, pretrained=True, features_only=True,
                             out_indices=out_indices,
                             pretrained_cfg_overlay=dict(file=str(path)),
                             **kwargs, **extra)


def body_state(model):
    """The backbone's extractor weights under the names of timm's own
    extractor (keys without 'body.'; a pyramid's left out)."""
    return {k[len('body.'):]: v for k, v in model.state_dict().items()
            if k.startswith('body.')}


def diffs_to_timm(model, ref, x, state=None, pad=(0, 0)):
    """The backbone's outputs on ``x`` and, per output, the max abs
    difference from ``ref`` (timm's extractor, loaded with ``state`` or the
    backbone's own extractor weights) run on ``x`` padded by ``pad``
    (bottom, right), whose outputs are then cropped to the backbone's."""
    ref.load_state_dict(body_state(model) if state is None else state)
    with torch.no_grad():
        outs = model(x)
        refs = ref(torch.nn.functional.pad(x, (0, pad[1], 0, pad[0])))
    if pad != (0, 0):
        refs = [b[..., :a.shape[2], :a.shape[3]] for a, b in zip(outs, refs)]
    return outs, [max_abs_diff(a, b) for a, b in zip(outs, refs)]


def frozen_param_names(model):
    names = model.frozen_module_names()
    out = set()
    for n in names:
        out |= {f'{n}.{p}' for p, _ in model.get_submodule(n)
                .named_parameters()}
    return out


# ----------------------------------------------------------------------
# The contract over the family sample.
@pytest.mark.parametrize('name,kwargs,strides', FAMILY_PARAMS)
def test_parity_and_metadata(name, kwargs, strides, tmp_path):
    path = save_timm_weights(name, kwargs, tmp_path / 'w.pth')
    model = build(name, kwargs,
                  init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    model.eval()
    assert model.out_strides == strides
    assert model.out_indices == tuple(range(len(strides)))
    timm_idx = [model.plan.output_level(i) for i in model.out_indices]
    ref = timm_features(name, kwargs, path, timm_idx).eval()
    assert list(model.out_channels) == ref.feature_info.channels()
    assert list(model.out_strides) == ref.feature_info.reduction()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        outs, refs = model(x), ref(x)
    assert isinstance(outs, tuple) and len(outs) == len(refs)
    for out, c, s in zip(outs, model.out_channels, model.out_strides):
        assert out.shape == (2, c, 64 // s, 64 // s)  # NCHW, always
    if model._nhwc:
        refs = [r.permute(0, 3, 1, 2) for r in refs]
    diff = max_abs_diff(outs, tuple(refs))
    PARITY[name] = diff
    assert diff <= 1e-5


@pytest.mark.parametrize('name,kwargs,strides', FAMILY_PARAMS)
def test_frozen_stages_and_norm_eval(name, kwargs, strides):
    model = build(name, kwargs, frozen_stages=2, norm_eval=True)
    frozen = model.frozen_module_names()
    assert frozen[:len(model.stem_module_names())] == \
        model.stem_module_names()
    assert len(frozen) == len(model.stem_module_names()) + len(
        model.stage_module_names(0)) + len(model.stage_module_names(1))
    frozen_params = frozen_param_names(model)
    if isinstance(model.body, timm.models._features.FeatureGetterNet):
        # cls_token/pos_embed sit on the model itself; they are stem.
        frozen_params |= {f'body.model.{p}' for p, _ in
                          model.body.model.named_parameters(recurse=False)}
    assert frozen_params
    for pname, param in model.named_parameters():
        assert param.requires_grad == (pname not in frozen_params), pname
    model.train()
    for mname, module in model.named_modules():
        in_frozen = any(mname == f or mname.startswith(f + '.')
                        for f in frozen)
        if in_frozen or is_batch_norm(module):
            assert not module.training, mname
        else:
            assert module.training, mname
    before = {k: v.clone() for k, v in model.state_dict().items()
              if 'running' in k}
    loss = sum(o.float().mean() for o in model(torch.rand(2, 3, 64, 64)))
    loss.backward()
    for k, v in model.state_dict().items():
        if 'running' in k:
            assert torch.equal(v, before[k]), k  # norm_eval kept stats
    for pname, param in model.named_parameters():
        assert (param.grad is None) == (pname in frozen_params), pname


@pytest.mark.parametrize('name,kwargs,strides', BN_FAMILY_PARAMS)
def test_frozen_bn_keeps_norm_act(name, kwargs, strides):
    ref = build(name, kwargs, frozen_stages=1)
    with torch.no_grad():
        for m in ref.modules():
            if is_batch_norm(m):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    model = build(name, kwargs, frozen_stages=1, frozen_bn=True)
    model.load_state_dict(ref.state_dict())
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen
    had_norm_act = any(isinstance(m, BatchNormAct2d)
                       for n in ref.frozen_module_names()
                       for m in ref.get_submodule(n).modules())
    if had_norm_act:
        assert any(isinstance(m, FrozenBatchNormAct2d) for m in frozen)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert max_abs_diff(model.eval()(x), ref.eval()(x)) == 0


@pytest.mark.parametrize('name,kwargs,strides', [
    p for p in FAMILY_PARAMS if p.id != 'hrnet'  # see docs/timm.md
])
def test_pruned_model_every_param_used(name, kwargs, strides):
    full = build(name, kwargs)
    model = build(name, kwargs, out_indices=(1, ))
    assert model.num_built_stages == 2
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in full.parameters())
    model.train()
    (out, ) = model(torch.rand(2, 3, 64, 64))
    assert out.shape[1] == model.out_channels[0] == full.out_channels[1]
    out.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_parity_summary():
    """Runs last in file order; prints the per-family parity (pytest -s)."""
    if PARITY:
        print('\nparity max abs diff vs timm features_only:')
        for name, diff in PARITY.items():
            print(f'  {name}: {diff:.3g}')
        assert max(PARITY.values()) <= 1e-5


# ----------------------------------------------------------------------
# Indices.
def test_vb_indices_skip_timm_stride2_level():
    vb = VBTimmBackbone('resnet10t').eval()
    native = VBTimmBackbone('resnet10t', levels='timm').eval()
    native.load_state_dict(vb.state_dict())
    assert vb.out_strides == (4, 8, 16, 32)
    assert native.out_strides == (2, 4, 8, 16, 32)
    assert native.out_channels == (64, ) + vb.out_channels
    x = torch.rand(1, 3, 64, 64)
    assert max_abs_diff(vb(x), native(x)[1:]) == 0
    # ConvNeXt has no stride-2 level: both numberings agree.
    convnext = VBTimmBackbone('convnext_atto', levels='timm')
    assert convnext.out_strides == (4, 8, 16, 32)


def test_single_scale_vit_quarters():
    model = VBTimmBackbone('vit_tiny_patch16_224', frozen_stages=1,
                           pyramid=None,
                           model_kwargs=dict(dynamic_img_size=True))
    assert model.plan.stage_levels == ((0, 1, 2), (3, 4, 5), (6, 7, 8),
                                       (9, 10, 11))
    assert model.stage_module_names(1) == tuple(
        f'body.model.blocks.{i}' for i in (3, 4, 5))
    assert model.out_strides == (16, ) * 4
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {'body.model.cls_token', 'body.model.pos_embed'} <= frozen
    assert any(n.startswith('body.model.patch_embed.') for n in frozen)
    assert any(n.startswith('body.model.blocks.2.') for n in frozen)
    assert not any(n.startswith('body.model.blocks.3.') for n in frozen)
    outs = model.eval()(torch.rand(1, 3, 96, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 192, 6, 4)] * 4
    timm_levels = VBTimmBackbone('vit_tiny_patch16_224', levels='timm',
                                 out_indices=(-1, ))
    assert timm_levels.num_stages == 12 and timm_levels.out_strides == (16, )


def test_plan_stages_rules():
    assert plan_stages([16, 32, 64]).stage_levels == ((0, ), (1, ), (2, ))
    # output_stride=16 repeats a stride: still one stage per level.
    assert plan_stages([2, 4, 8, 16, 16]).stage_levels == ((1, ), (2, ), (3, ),
                                                           (4, ))
    assert plan_stages([2, 4, 8, 16, 16]).stem_levels == (0, )
    with pytest.raises(ValueError, match=r"levels='vb': the model has no "
                       r'feature level at stride >= 4'):
        plan_stages([1, 2])


def test_unbuilt_stages_pruned_by_timm():
    model = VBTimmBackbone('convnext_atto', out_indices=(1, ))
    names = dict(model.named_modules())
    assert [n for n in model.unbuilt_module_names()
            if n.startswith('body.')] == ['body.stages_2', 'body.stages_3']
    assert 'body.stages_1' in names and 'body.stages_2' not in names
    eff = VBTimmBackbone('efficientnet_b0', out_indices=(0, ))
    assert len(eff.body.blocks) == 2  # blocks 2..6 are not built


# ----------------------------------------------------------------------
# Options.
def test_output_stride():
    model = VBTimmBackbone('resnet10t', output_stride=16).eval()
    assert model.out_strides == (4, 8, 16, 16)
    outs = model(torch.rand(1, 3, 64, 64))
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 4]
    with pytest.raises(ValueError, match=r'output_stride=12 is not valid; '
                       r'use 8, 16, 32 or None'):
        VBTimmBackbone('resnet10t', output_stride=12)


def test_create_model_kwargs_pass_through():
    model = VBTimmBackbone('convnext_atto', drop_path_rate=0.1,
                           model_kwargs=dict(ls_init_value=0.5))
    block = model.body.stages_3.blocks[-1]
    assert block.drop_path.drop_prob == pytest.approx(0.1)
    assert torch.all(block.gamma == 0.5)
    with pytest.raises(ValueError, match=r"model_kwargs must not set "
                       r"\['features_only', 'in_chans'\]"):
        VBTimmBackbone('resnet10t', model_kwargs=dict(in_chans=4,
                                                      features_only=True))


def test_with_cp_uses_timm_checkpointing():
    ref = VBTimmBackbone('convnext_atto', frozen_stages=1).train()
    model = VBTimmBackbone('convnext_atto', frozen_stages=1,
                           with_cp=True).train()
    model.load_state_dict(ref.state_dict())
    assert model.body.grad_checkpointing
    x = torch.rand(2, 3, 64, 64)
    outs, refs = model(x), ref(x)
    assert max_abs_diff(outs, refs) <= 1e-5
    sum((o**2).mean() for o in outs).backward()
    sum((o**2).mean() for o in refs).backward()
    grads = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert max_abs_diff(p.grad, grads[n].grad) <= 1e-5, n
    with pytest.raises(ValueError, match=r"with_cp=True: timm does not "
                       r"support gradient checkpointing for "
                       r"'hrnet_w18_small'"):
        VBTimmBackbone('hrnet_w18_small', with_cp=True)


@pytest.mark.parametrize('in_channels', [1, 4])
def test_in_channels_adapts_pretrained_conv(in_channels, tmp_path):
    path = save_timm_weights('resnet10t', {}, tmp_path / 'w.pth')
    model = VBTimmBackbone(
        'resnet10t', in_channels=in_channels,
        init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    src = torch.load(path, weights_only=True)['conv1.0.weight']
    expect = adapt_input_conv(in_channels, src.clone())
    assert torch.equal(model.body.conv1[0].weight, expect)
    outs = model.eval()(torch.rand(1, in_channels, 64, 64))
    assert outs[0].shape == (1, 64, 16, 16)


# ----------------------------------------------------------------------
# Errors.
def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"model_name='resnet5O' is not a "
                       r"timm model; close matches: \[.*'resnet50'"):
        VBTimmBackbone('resnet5O')
    with pytest.raises(ValueError, match=r"model_name='zzzq' is not a timm "
                       r'model; see timm.list_models\(\)'):
        VBTimmBackbone('zzzq')
    with pytest.raises(TypeError, match=r'model_name must be a timm model '
                       r'name \(str\), got 3 \(int\)'):
        VBTimmBackbone(3)


def test_model_without_features_says_so():
    # timm cannot build a features_only InceptionV3 with aux logits.
    with pytest.raises(ValueError, match=r"model_name='inception_v3' cannot "
                       r'produce feature maps with these options \(timm '
                       r'features_only failed'):
        VBTimmBackbone('inception_v3', model_kwargs=dict(aux_logits=True))


def test_levels_option_error():
    with pytest.raises(ValueError, match=r"levels='mm' is not valid; use "
                       r"one of \('vb', 'timm'\)"):
        VBTimmBackbone('resnet10t', levels='mm')


# ----------------------------------------------------------------------
# Initialisation.
@pytest.mark.parametrize('name', ['resnet10t', 'hrnet_w18_small'])
def test_default_init_keeps_timms_weights(name):
    """init_cfg=None keeps timm's initialisation: init_weights changes
    nothing, not even for HRNet, whose features have timm's own
    init_weights (mmengine would call it and draw new weights)."""
    model = VBTimmBackbone(name, out_indices=(0, 1),
                           out_norm_cfg=dict(type='GN', num_groups=4))
    before = copy.deepcopy(model.state_dict())
    model.init_weights()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for norm in model.out_norms.values():
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


def test_non_pretrained_init_cfg_is_applied():
    """Any init_cfg other than 'Pretrained' is applied by mmengine, on top
    of timm's init, as in every family (it used to be ignored)."""
    model = VBTimmBackbone(
        'resnet10t', out_indices=(0, 1), out_norm_cfg=dict(type='LN2d'),
        init_cfg=[dict(type='Constant', layer='Conv2d', val=0.5),
                  dict(type='Constant', layer='LayerNorm', val=2.0,
                       bias=-1.0)])
    bn_keys = [k for k in model.state_dict() if '.bn' in k]
    before = copy.deepcopy(model.state_dict())
    model.init_weights()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(torch.all(m.weight == 0.5) for m in convs)
    for norm in model.out_norms.values():
        assert torch.all(norm.weight == 2) and torch.all(norm.bias == -1)
    # The BNs are not named by the init_cfg: timm's values (its zero-init of
    # each block's last BN included) stay.
    assert bn_keys and all(torch.equal(model.state_dict()[k], before[k])
                           for k in bn_keys)


# ----------------------------------------------------------------------
# Pretrained weights.
def test_load_report_and_detector_prefix(tmp_path):
    full = timm.create_model('resnet10t')
    path = tmp_path / 'det.pth'
    torch.save({'state_dict': {f'backbone.{k}': v
                               for k, v in full.state_dict().items()}},
               path)
    model = VBTimmBackbone('resnet10t', out_indices=(0, 1))
    report = vb_plugin.load_pretrained(model, path, verbose=False)
    assert report.source == 'timm' and report.prefix == 'backbone.'
    assert report.container == 'state_dict'
    assert report.dropped['classifier head and layers outside the '
                          'features'] == ['fc.weight', 'fc.bias']
    unbuilt = report.dropped['stage not built (past the last out_indices)']
    assert unbuilt and all(k.startswith(('layer3.', 'layer4.'))
                           for k in unbuilt)
    assert len(report.loaded) + len(unbuilt) + 2 == len(full.state_dict())
    assert torch.equal(model.body.layer2[0].conv1.weight,
                       full.layer2[0].conv1.weight)
    assert len(report.loaded) == len(model.state_dict()) == 48
    assert str(report).startswith(f'Loaded 48 tensors from {path}')


def test_load_is_strict(tmp_path):
    full = timm.create_model('resnet10t').state_dict()
    model = VBTimmBackbone('resnet10t')
    before = copy.deepcopy(model.state_dict())
    bad_shape = dict(full, **{'layer1.0.conv1.weight': torch.zeros(1)})
    missing = {k: v for k, v in full.items() if not k.startswith('layer4.')}
    extra = dict(full, **{'layer9.weight': torch.zeros(1)})
    for state, message in [(bad_shape, r'size mismatch for '
                            r'layer1.0.conv1.weight'),
                           (missing, r'Missing key\(s\) in state_dict: '
                            r'"layer4'),
                           (extra, r'Unexpected key\(s\) in state_dict: '
                            r'"layer9.weight"')]:
        path = tmp_path / 'bad.pth'
        torch.save(state, path)
        with pytest.raises(CheckpointError, match=r"nothing was loaded into "
                           r"VBTimmBackbone\('resnet10t'\); timm's strict "
                           r'load into the full model failed(.|\n)*'
                           + message):
            vb_plugin.load_pretrained(model, path, verbose=False)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k


def _to_official_convnext(state):
    """timm ConvNeXt keys -> the official facebookresearch release layout
    (the inverse of timm's ``convnext.checkpoint_filter_fn``)."""
    out = {}
    for key, value in state.items():
        key = key.replace('stem.', 'downsample_layers.0.')
        key = re.sub(r'stages\.(\d+)\.downsample\.(\d+)',
                     r'downsample_layers.\1.\2', key)
        key = re.sub(r'stages\.(\d+)\.blocks\.(\d+)', r'stages.\1.\2', key)
        key = key.replace('conv_dw', 'dwconv').replace('mlp.fc', 'pwconv')
        key = key.replace('head.norm.', 'norm.').replace('head.fc.', 'head.')
        if 'pwconv' in key and value.ndim == 4:
            value = value.flatten(1)  # official: nn.Linear
        out[key] = value
    return out


def test_official_layout_goes_through_timm_filter_fn(tmp_path):
    full = timm.create_model('convnext_atto')
    official = _to_official_convnext(full.state_dict())
    assert 'downsample_layers.1.1.weight' in official
    assert 'stages.0.0.pwconv1.weight' in official
    path = tmp_path / 'convnext_atto_official.pth'
    torch.save({'model': official}, path)
    model = VBTimmBackbone('convnext_atto')
    report = vb_plugin.load_pretrained(model, path, verbose=False)
    assert report.source == 'timm' and report.container == 'model'
    assert report.dropped == {
        'classifier head and layers outside the features':
        ['head.norm.weight', 'head.norm.bias', 'head.fc.weight',
         'head.fc.bias']
    }
    timm_path = tmp_path / 'convnext_atto_timm.pth'
    torch.save(full.state_dict(), timm_path)
    ref = timm_features('convnext_atto', {}, timm_path, (0, 1, 2, 3)).eval()
    for key, value in full.state_dict().items():
        if not key.startswith('head.'):
            mapped = re.sub(r'^(stem|stages)\.(\d+)', r'\1_\2', key)
            assert torch.equal(model.state_dict()[f'body.{mapped}'], value)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert max_abs_diff(model.eval()(x), tuple(ref(x))) == 0


class _Evil:

    def __reduce__(self):
        return (print, ('pwned', ))


def test_load_refuses_pickled_code(tmp_path):
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': _Evil()}, f)
    with pytest.raises(CheckpointError, match=r'refused to read .* with '
                       r'weights_only=True'):
        vb_plugin.load_pretrained(VBTimmBackbone('resnet10t'), path)


def test_load_pretrained_takes_both_timm_layouts(tmp_path):
    """vb_plugin.load_pretrained, the one pipeline of every family, loads a
    timm-layout file (converted by timm's code) and a VBTimmBackbone state
    dict; the backbone then computes what timm's extractor computes."""
    full = timm.create_model('resnet10t')
    path = tmp_path / 'timm.pth'
    torch.save(full.state_dict(), path)
    model = VBTimmBackbone('resnet10t')
    report = vb_plugin.load_pretrained(model, path, verbose=False)
    assert report.source == 'timm'
    assert report.dropped == {
        'classifier head and layers outside the features':
        ['fc.weight', 'fc.bias']}
    ref = timm_features('resnet10t', {}, path, (1, 2, 3, 4)).eval()
    x = torch.rand(1, 3, 96, 160)
    with torch.no_grad():
        assert max_abs_diff(model.eval()(x), tuple(ref(x))) == 0
    own = tmp_path / 'vb.pth'
    torch.save({'state_dict': {f'backbone.{k}': v
                               for k, v in model.state_dict().items()}}, own)
    again = VBTimmBackbone('resnet10t')
    report = vb_plugin.load_pretrained(again, own, verbose=False)
    assert report.source == 'vb-timm' and report.prefix == 'backbone.'
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match=r"checkpoint layout not "
                       r"recognised \(source='timm'\)"):
        vb_plugin.load_pretrained(VBTimmBackbone('resnet10t'), own,
                                  source='timm', verbose=False)


def test_safetensors_file(tmp_path, save_state):
    full = timm.create_model('mobilenetv3_small_050')
    path = save_state(full.state_dict(), 'w.safetensors')
    model = VBTimmBackbone('mobilenetv3_small_050')
    report = vb_plugin.load_pretrained(model, path, verbose=False)
    assert report.source == 'timm'
    assert torch.equal(model.body.conv_stem.weight, full.conv_stem.weight)


# ----------------------------------------------------------------------
# In a detector.
def test_mask_rcnn_config_builds_and_trains_one_step():
    from mmengine.config import Config

    from vb_plugin.apis import (build_detector, load_config,
                                synthetic_detection_batch)
    raw = Config.fromfile(MASK_RCNN)
    assert raw.custom_imports == dict(imports=['vb_plugin'],
                                      allow_failed_imports=False)
    assert raw.model.backbone.type == 'VBTimmBackbone'
    assert 'depth' not in raw.model.backbone  # _delete_ took effect
    cfg = load_config(str(MASK_RCNN))
    model = build_detector(cfg, pretrained=False)
    backbone = model.backbone
    assert type(backbone).__name__ == 'VBTimmBackbone'
    assert list(backbone.out_channels) == cfg.model.neck.in_channels
    assert backbone.out_strides == (4, 8, 16, 32)
    batch = synthetic_detection_batch(num_images=1, size=(128, 160))
    losses, preds, _ = checked_train_step(
        model, batch,
        frozen_prefixes=('body.conv1.', 'body.bn1.', 'body.layer1.'))
    assert backbone.body.layer2[0].bn1.num_batches_tracked.item() == 0
    assert len(preds) == 1


def test_a_model_with_a_size_divisor_names_it_at_forward():
    """HRNet fuses branches by adding maps whose sizes must agree: timm
    fails at 225x301 with a bare RuntimeError; the backbone states its
    divisor and refuses that size with a ValueError before timm runs."""
    model = VBTimmBackbone('hrnet_w18_small').eval()
    assert (model.timm_module, model.size_divisor) == ('hrnet', 32)
    with pytest.raises(ValueError) as err:
        model(torch.rand(1, 3, 225, 301))
    assert str(err.value) == (
        "'hrnet_w18_small' needs inputs whose height and width are multiples "
        'of 32 (size_divisor=32), got 225x301: pad them (mmdet: '
        'data_preprocessor.pad_size_divisor=32 or a multiple)')
    outs = model(torch.rand(1, 3, 256, 320))
    assert [o.shape[-2:] for o in outs] == [(256 // s, 320 // s)
                                            for s in model.out_strides]


def test_a_model_of_one_input_size_is_refused_at_build_naming_it():
    """gMLP mixes its 196 tokens with Linear layers (weights, not state
    made for a grid) and timm offers no option for other sizes: refused
    when built (a probe on the meta device), with the size it takes and
    what to do."""
    with pytest.raises(ValueError) as err:
        VBTimmBackbone('gmlp_ti16_224')
    assert re.fullmatch(
        r"model_name='gmlp_ti16_224' takes only 224x224 inputs: at 288x352 "
        r'timm fails \(AssertionError: .*\), and at multiples of 64 to 512 '
        r'too; timm offers it no option for other sizes\. Detection inputs '
        r'vary in size: choose another model, or '
        r'pass model_kwargs=dict\(img_size=\.\.\.\) to build it for the one '
        r'size you will feed \(other sizes then raise at forward\)',
        str(err.value)), str(err.value)


def test_a_model_of_blocks_gets_the_divisor_its_blocks_need():
    """HaloNet attends within blocks: every HaloAttn's input must be a
    multiple of its block size. The probe finds the divisor that follows
    (read here from timm's own modules: block size x the stride of the
    map it sees), the wiring and the forward check it, and multiples of it
    give the metadata's sizes."""
    full = timm.create_model('halonet_h1').eval()
    need = []
    hooks = [m.register_forward_pre_hook(
        lambda m, args: need.append(m.block_size * 512 // args[0].shape[-2]))
             for m in full.modules() if type(m).__name__ == 'HaloAttn']
    with torch.no_grad():
        full(torch.rand(1, 3, 512, 512))
    for h in hooks:
        h.remove()
    div = max(need)
    assert need and all(div % n == 0 for n in need)

    model = VBTimmBackbone('halonet_h1').eval()
    assert model.size_divisor == div == 256
    with pytest.raises(ValueError, match=(
            r"^'halonet_h1' needs inputs whose height and width are "
            r'multiples of 256 \(size_divisor=256\), got 256x320: ')):
        model(torch.rand(1, 3, 256, 320))
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 256, 512))
    assert [tuple(o.shape[1:]) for o in outs] == [
        (c, 256 // s, 512 // s)
        for c, s in zip(model.out_channels, model.out_strides)]
    # NOTE: timm itself fails at a multiple of half the divisor.
    with pytest.raises(AssertionError):
        with torch.no_grad():
            full(torch.rand(1, 3, 384, 512))


def test_a_model_whose_maps_are_smaller_than_its_strides_is_refused():
    """Inception v3's convolutions do not pad: its maps are smaller than
    input / stride, so anchors at that stride would miss part of the
    image; SAME padding on its modules does not help (its blocks also pool
    by function calls). Refused at build, with the sizes timm's extractor
    gives."""
    with torch.device('meta'):
        feats = timm.create_model('inception_v3', features_only=True)
    info = feats.feature_info.get_dicts()
    k = next(i for i, r in enumerate(info) if r['reduction'] == 4)
    got = feats(torch.empty(1, 3, 384, 448, device='meta'))[k].shape[-2:]
    assert tuple(got) != (96, 112)
    with pytest.raises(ValueError) as err:
        VBTimmBackbone('inception_v3')
    assert str(err.value) == (
        "model_name='inception_v3' gives maps smaller than its strides say: "
        f'at 384x448 its stride-4 level is {got[0]}x{got[1]}, not 96x112 '
        '(its convolutions do not pad, and SAME padding on its convolution '
        'and pool modules does not line its maps up either). Anchors and '
        'RoI pooling placed at that stride would cover only part of the '
        'image: choose another model')


@pytest.mark.parametrize('name,padded', [
    # Xception's entry flow: two 3x3 convolutions without padding (timm's
    # extractor holds the model as 'body').
    ('legacy_xception', ('body.conv1', 'body.conv2')),
    ('inception_v4', None),
    # Its levels 'repeat' and 'repeat_1' are siblings, not one inside the
    # other: its stages map.
    ('inception_resnet_v2', None),
])
def test_convolutions_that_do_not_pad_get_same_padding(name, padded):
    """Xception's and Inception v4's convolutions and pools do not pad
    (VALID): timm's maps are smaller than input / stride. They get SAME
    padding, as TF's detection API gives its Inception backbones
    (align_feature_maps): maps are ceil(size / stride) at odd sizes, a
    timm checkpoint loads strictly, and outputs equal timm's extractor on
    the same weights with padding k // 2 on the modules that had none."""
    with torch.device('meta'):
        feats = timm.create_model(name, features_only=True)
    model = VBTimmBackbone(name).eval()
    assert model.same_padding and model.out_strides == (4, 8, 16, 32)
    if padded is not None:
        assert model.same_padded == padded
    ref = timm.create_model(name, features_only=True,
                            out_indices=model.body.feature_info.out_indices
                            ).eval()
    for key in model.same_padded:
        module = ref.get_submodule(key)
        assert tuple(to_2tuple(feats.get_submodule(key).padding)) == (0, 0)
        module.padding = tuple(k // 2 for k in to_2tuple(module.kernel_size))
    outs, diffs = diffs_to_timm(model, ref, torch.rand(1, 3, 225, 301))
    assert [tuple(o.shape[-2:]) for o in outs] == [
        (-(-225 // s), -(-301 // s)) for s in (4, 8, 16, 32)]
    diff = max(diffs)
    print(f'{name} (SAME padding) at 225x301: max abs diff {diff:.3g}')
    assert diff <= 1e-5


def test_a_model_whose_metadata_names_no_module_maps_its_stages():
    """MobileNetV5's feature_info names its stride-2 level 'bn1', which the
    model does not have (the norm is inside conv_stem): that level takes
    the modules up to the next one's, so the stem is conv_stem and stages
    are its four block groups; outputs equal timm's extractor on the same
    weights, and frozen_stages=1 freezes exactly the stem and stage 0."""
    model = VBTimmBackbone('mobilenetv5_base', frozen_stages=1).eval()
    assert model.stem_module_names() == ('body.model.conv_stem', )
    assert [model.stage_module_names(i) for i in range(4)] == [
        (f'body.model.blocks.{i}', ) for i in range(4)]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith(('body.model.conv_stem.',
                                       'body.model.blocks.0.'))}
    ref = timm.create_model('mobilenetv5_base', features_only=True,
                            out_indices=(1, 2, 3, 4)).eval()
    _, diffs = diffs_to_timm(model, ref, torch.rand(1, 3, 160, 224))
    assert len(diffs) == 4 and max(diffs) == 0


def test_a_model_of_one_input_size_built_for_it_refuses_others_at_forward():
    """With img_size given the user has chosen the one size: it builds, and
    timm's RuntimeError at another size becomes a ValueError naming it."""
    model = VBTimmBackbone('gmlp_ti16_224',
                           model_kwargs=dict(img_size=224)).eval()
    assert model.pretrained_input_size == (224, 224)
    with pytest.raises(ValueError, match=(
            r"^'gmlp_ti16_224' cannot take a 256x320 input \(timm: "
            r'AssertionError: .*\); it was built for 224x224 inputs and timm '
            r'offers it no option for other sizes: use that size, or '
            r'another model$')):
        model(torch.rand(1, 3, 256, 320))
    outs = model(torch.rand(1, 3, 224, 224))
    assert [tuple(o.shape[1:]) for o in outs] == [
        (c, -(-224 // s), -(-224 // s))
        for c, s in zip(model.out_channels, model.out_strides)]


def test_fixed_position_embeddings_are_resampled_as_timms_vit_does():
    """A ViT built without timm's any-size options has a fixed position
    embedding and strict patch embedding, like CaiT: the probe finds the
    embedding on the 14x14 grid (one class token first), and each input's
    grid gets it resampled. Outputs equal timm's own dynamic_img_size ViT
    (dynamic_img_pad too) on the same weights at odd and non-square sizes;
    gradients reach the parameter, which keeps its pretraining shape."""
    kwargs = dict(depth=4, embed_dim=32, num_heads=2)
    model = VBTimmBackbone('vit_tiny_patch16_224', pyramid=None,
                           model_kwargs=dict(kwargs, dynamic_img_size=False,
                                             dynamic_img_pad=False)).eval()
    assert [(g.name, g.layout, g.stride, g.grid, g.prefix)
            for g in model.position_grids] == [
                ('model.pos_embed', 'NLC', 16, (14, 14), 1)]
    assert model.input_pad == 16
    ref = timm.create_model('vit_tiny_patch16_224', features_only=True,
                            out_indices=(0, 1, 2, 3), dynamic_img_size=True,
                            dynamic_img_pad=True, **kwargs).eval()
    ref.load_state_dict(body_state(model))
    for size in ((256, 320), (225, 301), (333, 517), (224, 224)):
        x = torch.rand(1, 3, *size)
        with torch.no_grad():
            outs, refs = model(x), ref(x)
        assert [tuple(o.shape[-2:]) for o in outs] == [
            (-(-size[0] // 16), -(-size[1] // 16))] * 4
        assert max(max_abs_diff(a, b) for a, b in zip(outs, refs)) <= 1e-5
    model.train()
    sum(o.sum() for o in model(torch.rand(1, 3, 225, 301))).backward()
    pos = model.body.model.pos_embed
    assert isinstance(pos, torch.nn.Parameter) and pos.shape == (1, 197, 32)
    assert pos.grad is not None and pos.grad.abs().sum() > 0
    assert model.state_dict()['body.model.pos_embed'].shape == (1, 197, 32)


@pytest.mark.parametrize('name,layout,strides', [
    ('visformer_tiny', 'NCHW', (8, 16, 32)),
    ('volo_d1_224', 'NHWC', (16, )),
])
def test_position_embeddings_of_other_layouts_are_resampled(name, layout,
                                                             strides):
    """Visformer (three NCHW embeddings, strides 8/16/32) and VOLO (NHWC)
    take only 224x224 in timm. Here they run at 256x320: outputs equal
    timm's model built for 256x320 whose embeddings were resampled by
    torch's bicubic antialiased interpolation (as timm resamples). (VOLO's
    raw levels: its default is the simple pyramid on the last one.)"""
    model = VBTimmBackbone(name, pyramid=None).eval()
    assert [(g.layout, g.stride) for g in model.position_grids] == [
        (layout, s) for s in strides]
    size = (256, 320)
    ref = timm.create_model(name, features_only=True, img_size=size,
                            out_indices=model.body.feature_info.out_indices
                            ).eval()
    state = body_state(model)
    for g in model.position_grids:
        pos = state[g.name]
        new = (size[0] // g.stride, size[1] // g.stride)
        if layout == 'NHWC':
            pos = pos.permute(0, 3, 1, 2)
        pos = torch.nn.functional.interpolate(pos, size=new, mode='bicubic',
                                              antialias=True)
        state[g.name] = pos.permute(0, 2, 3, 1) if layout == 'NHWC' else pos
    ref.load_state_dict(state)
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        outs, refs = model(x), ref(x)
    assert [tuple(o.shape[-2:]) for o in outs] == [
        (size[0] // s, size[1] // s) for s in model.out_strides]
    assert max(max_abs_diff(a, b) for a, b in zip(outs, refs)) <= 1e-5


def test_stage_parts_kept_in_parallel_lists_join_their_stage():
    """Twins keeps each stage's patch embedding, dropout and position
    block in lists beside its blocks (registered apart from them), and
    timm's feature_info names the stages 'block.k', a module it does not
    have: stage k is patch_embeds.k, pos_drops.k, blocks.k, pos_block.k
    (the stem is stage 0's embedding), frozen_stages freezes exactly those,
    and outputs equal timm's extractor on the same weights."""
    kwargs = dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 2, 4),
                  depths=(1, 1, 2, 1))
    model = VBTimmBackbone('twins_svt_small', frozen_stages=2,
                           model_kwargs=kwargs).eval()
    parts = ('patch_embeds', 'pos_drops', 'blocks', 'pos_block')
    assert model.stem_module_names() == ('body.model.patch_embeds.0',
                                         'body.model.pos_drops.0')
    assert model.stage_module_names(0) == ('body.model.blocks.0',
                                           'body.model.pos_block.0')
    for k in (1, 2, 3):
        assert model.stage_module_names(k) == tuple(
            f'body.model.{p}.{k}' for p in parts)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {
        n for n, _ in model.named_parameters()
        if n.startswith(tuple(f'body.model.{p}.{k}.' for p in parts
                              for k in (0, 1)))}
    ref = timm.create_model('twins_svt_small', features_only=True,
                            **kwargs).eval()
    outs, diffs = diffs_to_timm(model, ref, torch.rand(1, 3, 225, 301))
    assert model.out_strides == (4, 8, 16, 32)
    assert [tuple(o.shape[-2:]) for o in outs] == [
        (225 // s, 301 // s) for s in model.out_strides]
    assert max(diffs) == 0


def test_a_model_whose_maps_end_at_stride_16_gets_the_simple_pyramid():
    """VOLO's levels are at strides 8, 16, 16, 16: no stride-4 level and
    none coarser than 16, so no pyramid of its own. 'auto' builds ViTDet's
    simple pyramid on its last map, as on a ViT's: strides 4..32, and the
    stride-16 output is timm's last map itself (here at 225x301, where its
    fixed position embedding is resampled to the padded input's grid)."""
    model = VBTimmBackbone('volo_d1_224').eval()
    assert [lv.reduction for lv in model.timm_levels] == [8, 16, 16, 16]
    assert model.pyramid_kind == 'simple'
    assert model.out_strides == (4, 8, 16, 32)
    ref = timm.create_model('volo_d1_224', features_only=True,
                            img_size=(240, 304)).eval()
    state = body_state(model)
    state['model.pos_embed'] = torch.nn.functional.interpolate(
        state['model.pos_embed'].permute(0, 3, 1, 2), size=(15, 19),
        mode='bicubic', antialias=True).permute(0, 2, 3, 1)
    ref.load_state_dict(state)
    x = torch.rand(1, 3, 225, 301)
    with torch.no_grad():
        outs = model(x)
        last = ref(torch.nn.functional.pad(x, (0, 3, 0, 15)))[-1]
    # NOTE: stride 32 is the 2x2 max-pool of the stride-16 map (floor).
    assert [tuple(o.shape[-2:]) for o in outs] == [
        (57, 76), (29, 38), (15, 19), (7, 9)]
    assert max_abs_diff(outs[2], last) == 0


def test_beit_relative_position_tables_follow_the_input():
    """BEiT's per-block relative position tables span its 14x14 window, the
    whole token grid, and timm offers no option for other sizes. Each
    forward resizes them to the input's grid (timm's bicubic table resize)
    with the index and window for that grid: outputs equal timm's BEiT
    built for the padded size with the tables resized by torch's bicubic
    interpolation; gradients reach the tables, which keep their shape."""
    kwargs = dict(depth=4, embed_dim=32, num_heads=2)
    model = VBTimmBackbone('beit_base_patch16_224', pyramid=None,
                           model_kwargs=kwargs).eval()
    assert [(g.name, g.layout, g.grid) for g in model.position_grids] == [
        (f'model.blocks.{i}.attn', 'REL', (14, 14)) for i in range(4)]
    size, padded = (225, 301), (240, 304)
    ref = timm.create_model('beit_base_patch16_224', features_only=True,
                            out_indices=(0, 1, 2, 3), img_size=padded,
                            **kwargs).eval()
    state = body_state(model)
    for i in range(4):
        key = f'model.blocks.{i}.attn.relative_position_bias_table'
        table = state[key]
        grid = torch.nn.functional.interpolate(
            table[:-3].T.reshape(1, 2, 27, 27), size=(29, 37),
            mode='bicubic', align_corners=False)
        state[key] = torch.cat([grid.reshape(2, -1).T, table[-3:]])
    ref.load_state_dict(state)
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        outs = model(x)
        refs = ref(torch.nn.functional.pad(x, (0, 3, 0, 15)))
    assert [tuple(o.shape[-2:]) for o in outs] == [(15, 19)] * 4
    assert max(max_abs_diff(a, b) for a, b in zip(outs, refs)) <= 1e-5
    model.train()
    sum(o.sum() for o in model(x)).backward()
    table = model.body.model.blocks[0].attn.relative_position_bias_table
    assert table.shape == (27 * 27 + 3, 2)
    assert table.grad is not None and table.grad.abs().sum() > 0


@pytest.mark.parametrize('name,layout', [
    ('test_coatnet', 'RPB'),          # maxxvit: relative bias, whole map
    ('levit_128s', 'OFFSET'),         # biases by |offset|, subsampling
    ('efficientformerv2_s0', 'OFFSET'),
    ('efficientformer_l1', 'OFFSET'),
    # Windows a fixed fraction of the map (its global query is the map
    # after fixed halvings): windows and their biases follow the input.
    ('gcvit_xxtiny', 'GCVIT'),
])
def test_attention_bias_tables_follow_the_input(name, layout):
    """CoAtNet's relative position biases over a whole map, GCViT's window
    biases (its windows are a fixed fraction of the map) and the biases
    by token offset of LeViT and EfficientFormer (V1, V2) are tables made
    for the pretraining grid, and timm offers no option for other sizes.
    Each forward resizes them to the input's grid, with their index: at
    225x301 (padded to 256x320), outputs equal timm's model built for
    256x320 (EfficientFormer's attention, which timm makes for 7x7 whatever
    the size, made by timm for 8x10) whose tables the test resized with
    torch's bicubic interpolation; gradients reach the tables, which keep
    their shape."""
    from timm.models.efficientformer import Attention
    model = VBTimmBackbone(name, pyramid=None).eval()
    assert {g.layout for g in model.position_grids} == {layout}
    # NOTE: timm starts LeViT's biases at zero and its attention's output
    # norm at weight 0: random ones, so that the biases count.
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith(('attention_biases', 'bias_table')):
                param.normal_(0, 0.5)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
    ref = timm.create_model(name, features_only=True, img_size=(256, 320),
                            out_indices=model.body.feature_info.out_indices
                            ).eval()
    if name == 'efficientformer_l1':
        old = ref.model.stages[3].blocks[4].token_mixer
        ref.model.stages[3].blocks[4].token_mixer = Attention(
            old.qkv.in_features, key_dim=old.key_dim,
            num_heads=old.num_heads, attn_ratio=old.attn_ratio,
            resolution=(8, 10))
        ref.eval()  # NOTE: timm's Attention.train returns None
    state, want = body_state(model), ref.state_dict()
    grids = {(256 // s) * (320 // s): (256 // s, 320 // s)
             for s in (16, 32, 64)}
    grids.update({(512 // s - 1) * (640 // s - 1): (2 * h - 1, 2 * w - 1)
                  for s, (h, w) in zip((16, 32, 64), grids.values())})
    resized = []
    for key, value in want.items():
        if state[key].shape == value.shape:
            continue
        if key.endswith('attention_bias_idxs'):
            state[key] = value  # timm's own index for 8x10
            continue
        table = state[key]
        rel = key.endswith('relative_position_bias_table')
        heads = table.shape[1] if rel else table.shape[0]
        side = math.isqrt(table.numel() // heads)
        grid = torch.nn.functional.interpolate(
            (table.T if rel else table).reshape(1, heads, side, side),
            size=grids[value.numel() // heads], mode='bicubic',
            align_corners=False).reshape(heads, -1)
        state[key] = grid.T if rel else grid
        resized.append(key)
    assert resized
    x = torch.rand(1, 3, 225, 301)
    outs, diffs = diffs_to_timm(model, ref, x, state, pad=(31, 19))
    assert [tuple(o.shape[-2:]) for o in outs] == [
        (-(-225 // s), -(-301 // s)) for s in model.out_strides]
    diff = max(diffs)
    print(f'{name} at 225x301: max abs diff {diff:.3g}')
    assert diff <= 1e-5
    model.train()
    sum(o.sum() for o in model(x)).backward()
    table = model.body.get_parameter(resized[0])
    assert table.shape == body_state(model)[resized[0]].shape
    assert table.grad is not None and table.grad.abs().sum() > 0


@pytest.mark.parametrize('name,kwargs', [
    ('beit_base_patch16_224', dict(depth=4, embed_dim=32, num_heads=2)),
    ('levit_128s', dict(embed_dim=(32, 48, 64), key_dim=16,
                        depth=(1, 1, 1), num_heads=(2, 3, 4))),
])
def test_position_state_made_in_inference_mode_trains(name, kwargs):
    """The relative position indices made for a grid are cached across
    forwards. One made first under torch.inference_mode (an evaluation
    before training, as mmdet's val loop runs it) must still serve a
    training forward at that grid: before, the backward failed with
    "Inference tensors cannot be saved for backward"."""
    model = VBTimmBackbone(name, model_kwargs=kwargs)
    x = torch.rand(1, 3, 100, 131)
    with torch.inference_mode():
        model.eval()(x)
    model.train()
    sum(o.sum() for o in model(x)).backward()
    assert all(p.grad is not None for n, p in model.named_parameters()
               if n.endswith(('relative_position_bias_table',
                              'attention_biases')))


def test_hiera_token_order_follows_the_input():
    """Hiera unrolls its tokens into 8x8 mask units by a schedule made for
    its 7x7 grid of units, and adds a position embedding for the 56x56
    token grid: timm offers no option for other sizes. Each forward makes
    the schedule for the input's grid (input padded to 32) and resamples
    the embedding: at 225x301, outputs equal timm's Hiera built for 256x320
    whose embedding the test resampled (bicubic, antialiased, as timm
    does)."""
    kwargs = dict(embed_dim=16, num_heads=1, stages=(1, 1, 2, 1))
    model = VBTimmBackbone('hiera_tiny_224', pyramid=None,
                           model_kwargs=kwargs).eval()
    assert [(g.name, g.layout, g.stride) for g in model.position_grids] == [
        ('model.pos_embed', 'NLC', 4), ('model', 'UNROLL', 32)]
    ref = timm.create_model('hiera_tiny_224', features_only=True,
                            img_size=(256, 320), **kwargs).eval()
    state = body_state(model)
    pos = state['model.pos_embed'].reshape(1, 56, 56, -1).permute(0, 3, 1, 2)
    state['model.pos_embed'] = torch.nn.functional.interpolate(
        pos, size=(64, 80), mode='bicubic', antialias=True,
        align_corners=False).flatten(2).transpose(1, 2)
    outs, diffs = diffs_to_timm(model, ref, torch.rand(1, 3, 225, 301),
                                state, pad=(31, 19))
    assert [tuple(o.shape[-2:]) for o in outs] == [
        (-(-225 // s), -(-301 // s)) for s in (4, 8, 16, 32)]
    diff = max(diffs)
    print(f'hiera at 225x301: max abs diff {diff:.3g}')
    assert diff <= 1e-5
    # The model's own state is untouched after the forward.
    assert model.body.model.unroll.size == [56, 56]


def test_a_level_named_by_no_module_stays_in_the_stem():
    """TResNet's feature_info names its stride-2 level '' (timm's own
    features_only with every level fails: "Return layers ({''}) are not
    present in model"). That level is not an output: it stays in the stem,
    whose modules run up to stage 0's; outputs equal timm's extractor of
    the four other levels on the same weights (input padded to its
    space-to-depth block, 4)."""
    with pytest.raises(AssertionError, match='Return layers'):
        with torch.device('meta'):
            timm.create_model('tresnet_m', features_only=True,
                              out_indices=(0, 1, 2, 3, 4))
    model = VBTimmBackbone('tresnet_m').eval()
    assert model.stem_module_names() == ('body.body_s2d', 'body.body_conv1')
    assert [model.stage_module_names(i) for i in range(4)] == [
        (f'body.body_layer{i}', ) for i in range(1, 5)]
    assert (model.out_strides, model.input_pad) == ((4, 8, 16, 32), 4)
    ref = timm.create_model('tresnet_m', features_only=True,
                            out_indices=(1, 2, 3, 4)).eval()
    _, diffs = diffs_to_timm(model, ref, torch.rand(1, 3, 256, 320))
    assert len(diffs) == 4 and max(diffs) == 0


def test_mvitv2_relative_position_tables_follow_the_input():
    """MViTv2's per-axis relative position tables are sized for its
    pretraining grid: timm indexes past their end on a larger input (an
    IndexError at 320x320), and its feature_info names stages 'block.k'.
    Here stages are 'stages.k', and each attention's tables are linearly
    resized to the grid it sees (as detectron2's MViTv2 does): outputs
    equal timm's MViTv2 built for 320x320 whose tables were resized the
    same way, and equal timm's extractor at 224x224, where nothing is
    resized."""
    model = VBTimmBackbone('mvitv2_tiny').eval()
    assert [model.stage_module_names(i) for i in range(4)] == [
        (f'body.model.stages.{i}', ) for i in range(4)]
    state = body_state(model)
    native = timm.create_model('mvitv2_tiny', features_only=True).eval()
    native.load_state_dict(state)
    x = torch.rand(1, 3, 320, 320)
    with pytest.raises(IndexError):
        with torch.no_grad():
            native(x)
    ref = timm.create_model('mvitv2_tiny', features_only=True,
                            img_size=320).eval()
    sizes = {k: v.shape[0] for k, v in ref.state_dict().items()
             if k.endswith(('rel_pos_h', 'rel_pos_w'))}
    assert sizes and any(n != state[k].shape[0] for k, n in sizes.items())
    for key, n in sizes.items():
        state[key] = torch.nn.functional.interpolate(
            state[key].T[None], size=n, mode='linear')[0].T
    ref.load_state_dict(state)
    small = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert max(max_abs_diff(a, b) for a, b in zip(
            model(x), ref(x))) <= 1e-5
        assert max(max_abs_diff(a, b) for a, b in zip(
            model(small), native(small))) == 0


def test_convit_positional_attention_takes_non_square_grids():
    """ConViT's gated positional attention makes relative indices for a
    square grid of N tokens only (a non-square input fails in timm), and
    its position embedding is fixed to 14x14. Here both follow the input:
    at 256x256 outputs equal timm's ConViT built for 256 with the
    embedding resampled by torch's bicubic antialiased interpolation
    (timm's own square indices), and non-square inputs run, where timm's
    ConViT built for one fails."""
    model = VBTimmBackbone('convit_tiny', pyramid=None).eval()
    assert sorted({g.layout for g in model.position_grids}) == [
        'GPSA', 'NLC']
    ref = timm.create_model('convit_tiny', features_only=True,
                            out_indices=model.body.feature_info.out_indices,
                            img_size=256).eval()
    state = body_state(model)
    pos = state['model.pos_embed'].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    state['model.pos_embed'] = torch.nn.functional.interpolate(
        pos, size=(16, 16), mode='bicubic', antialias=True).flatten(
            2).transpose(1, 2)
    ref.load_state_dict(state)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert max(max_abs_diff(a, b)
                   for a, b in zip(model(x), ref(x))) <= 1e-5
    # NOTE: timm's ConViT built for 256x320 fails in its attention.
    wide = timm.create_model('convit_tiny', features_only=True,
                             img_size=(256, 320)).eval()
    with pytest.raises(RuntimeError, match='must match the existing size'):
        with torch.no_grad():
            wide(torch.rand(1, 3, 256, 320))
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 225, 301))
    assert [tuple(o.shape[-2:]) for o in outs] == [(15, 19)] * len(outs)


def test_vit_relpos_bias_mlp_reads_the_inputs_window():
    """ViT-RelPos computes its biases by an MLP from the coordinates of a
    window fixed to the pretraining grid (its patch embedding also refuses
    other sizes). Here each attention's MLP gets the input's window: equal
    to timm's own set_input_size (which changes buffers only) on the same
    weights, at a non-square size and at an odd one (padded to 16)."""
    model = VBTimmBackbone('test_vit_relpos', pyramid=None).eval()
    assert {g.layout for g in model.position_grids} == {'MLP'}
    state = body_state(model)
    for size, padded in (((256, 320), (256, 320)), ((225, 301), (240, 304))):
        ref = timm.create_model(
            'test_vit_relpos', features_only=True,
            out_indices=model.body.feature_info.out_indices).eval()
        ref.load_state_dict(state)
        ref.model.set_input_size(img_size=padded)
        x = torch.rand(1, 3, *size)
        pad = (0, padded[1] - size[1], 0, padded[0] - size[0])
        with torch.no_grad():
            outs = model(x)
            refs = ref(torch.nn.functional.pad(x, pad))
        grid = (-(-size[0] // 16), -(-size[1] // 16))
        assert [tuple(o.shape[-2:]) for o in outs] == [grid] * len(outs)
        assert max(max_abs_diff(a, b) for a, b in zip(outs, refs)) <= 1e-5


def test_tnt_pixel_embedding_follows_the_input():
    """TNT's pixel embedding asserts its pretraining size and, with the
    model, reshapes by its patch count; its patch position embedding (a
    class token first) is fixed to 14x14. Here all follow the input:
    outputs equal timm's TNT built for 256x320 with the embedding
    resampled by torch's bicubic antialiased interpolation."""
    name = 'tnt_s_legacy_patch16_224'
    model = VBTimmBackbone(name, pyramid=None).eval()
    assert sorted(g.layout for g in model.position_grids) == ['NLC', 'TNT']
    ref = timm.create_model(name, features_only=True, img_size=(256, 320),
                            out_indices=model.body.feature_info.out_indices
                            ).eval()
    state = body_state(model)
    pos = state['model.patch_pos']
    grid = pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(16, 20),
                                           mode='bicubic', antialias=True)
    state['model.patch_pos'] = torch.cat(
        [pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    ref.load_state_dict(state)
    x = torch.rand(1, 3, 256, 320)
    with torch.no_grad():
        outs, refs = model(x), ref(x)
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 20)] * len(outs)
    assert max(max_abs_diff(a, b) for a, b in zip(outs, refs)) <= 1e-5
