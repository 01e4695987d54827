"""VBConvNeXt: parity with timm, HF transformers and the official FB layout,
mmpretrain key layout, layer-wise LR decay and a Mask R-CNN training step.

Every reference is built here with random weights, saved, loaded into
VBConvNeXt through the public loader, and compared output by output.
"""
import re
from pathlib import Path

import pytest
import torch
from conftest import checked_train_step, max_abs_diff

from vb_plugin import CheckpointError, VBConvNeXt, load_pretrained
from vb_plugin.models.convnext import CONVNEXT_ARCHS, ConvNeXtBlock

TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]
MASK_RCNN = ROOT / 'configs/mask_rcnn/mask-rcnn_vb-convnext-t_fpn_1x_coco.py'
SMALL = dict(depths=[1, 1, 2, 1], channels=[8, 16, 32, 64])


def randomize(model):
    """Random values everywhere (layer scale, GRN, norms, biases), so that a
    wrong mapping or a skipped parameter shows. Scales are those of trained
    models (weights std 0.02, layer scale well below 1), so activations stay
    in a realistic range for an absolute tolerance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'grn' in name:
                p.uniform_(-0.5, 0.5)
            elif p.ndim > 1:
                p.normal_(0, 0.02)
            elif re.search(r'(^|\.)(gamma|layer_scale_parameter)$', name):
                p.uniform_(0.05, 0.5)  # layer scale
            elif name.endswith('weight'):
                p.uniform_(0.5, 1.5)  # norms
            else:
                p.uniform_(-0.5, 0.5)  # biases
    return model


# ----------------------------------------------------------------------
# Architecture table.
def timm_name(version, arch):
    return f"convnext{'v2' if version == 'v2' else ''}_{arch}"


@pytest.mark.parametrize('version,arch', [
    (v, a) for v, table in CONVNEXT_ARCHS.items() for a in table
])
def test_every_named_arch_matches_timm_layout(version, arch):
    # Built on the meta device: shapes only, no memory, no init.
    import timm
    from vb_plugin.weights.convnext import CONVNEXT_SOURCES
    with torch.device('meta'):
        ref = timm.create_model(timm_name(version, arch), pretrained=False)
        model = VBConvNeXt(arch=arch, version=version, out_norm_cfg=None)
    timm_src = [s for s in CONVNEXT_SOURCES if s.name == 'timm'][0]
    converted, head = timm_src.convert(ref.state_dict())
    assert sorted(head) == ['head.fc.bias', 'head.fc.weight',
                            'head.norm.bias', 'head.norm.weight']
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert model.stage_channels == CONVNEXT_ARCHS[version][arch].channels
    assert [len(s) for s in model.stages] == list(
        CONVNEXT_ARCHS[version][arch].depths)
    assert all((b.grn is not None) == (version == 'v2') and
               (b.gamma is None) == (version == 'v2')
               for b in model.modules() if isinstance(b, ConvNeXtBlock))


def test_default_out_norms_and_metadata():
    model = VBConvNeXt(arch=SMALL)
    assert sorted(model.out_norms) == ['0', '1', '2', '3']
    norm = model.out_norms['3']
    assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-6
    assert model.out_channels == (8, 16, 32, 64)
    assert model.out_strides == (4, 8, 16, 32)
    assert not hasattr(VBConvNeXt(arch=SMALL, out_norm_cfg=None),
                       'out_norms')
    assert model.stem_module_names() == ('downsample_layers.0', )
    assert model.stage_module_names(0) == ('stages.0', )
    assert model.stage_module_names(2) == ('downsample_layers.2', 'stages.2')


def test_drop_path_is_linear_over_all_blocks():
    import timm
    model = VBConvNeXt(arch='atto', drop_path_rate=0.3)
    ref = timm.create_model('convnext_atto', drop_path_rate=0.3)
    ours = [b.drop_path.drop_prob if hasattr(b.drop_path, 'drop_prob')
            else 0.0 for s in model.stages for b in s]
    theirs = [b.drop_path.drop_prob if hasattr(b.drop_path, 'drop_prob')
              else 0.0 for s in ref.stages for b in s.blocks]
    assert len(ours) == 12 and ours[0] == 0.0 and ours[-1] == 0.3
    assert ours == pytest.approx(theirs, abs=1e-7)
    # Rates follow the full architecture even when stages are pruned.
    pruned = VBConvNeXt(arch='atto', drop_path_rate=0.3, out_indices=(1, ))
    assert [b.drop_path.drop_prob for b in pruned.stages[1]] == ours[2:4]


def test_layer_scale_and_grn_options():
    v1 = VBConvNeXt(arch=SMALL, layer_scale_init_value=0.5)
    v1.init_weights()
    assert torch.all(v1.stages[0][0].gamma == 0.5)
    assert v1.stages[0][0].grn is None
    assert VBConvNeXt(arch=SMALL, layer_scale_init_value=0).stages[0][
        0].gamma is None
    v2 = VBConvNeXt(arch=SMALL, version='v2')
    v2.init_weights()
    block = v2.stages[1][0]
    assert block.gamma is None
    assert torch.all(block.grn.gamma == 0) and block.grn.gamma.shape == (64, )


@pytest.mark.parametrize('kwargs,error,message', [
    (dict(arch='medium'), ValueError, r"arch='medium' is not a ConvNeXt V1 "
     r"size; valid names for version='v1' are \['atto', 'femto', 'pico', "
     r"'nano', 'tiny', 'small', 'base', 'large', 'xlarge'\]"),
    (dict(arch='huge'), ValueError, r"arch='huge' is not a ConvNeXt V1 size "
     r"\('huge' exists for version='v2'\)"),
    (dict(arch='xlarge', version='v2'), ValueError, r"arch='xlarge' is not a "
     r"ConvNeXt V2 size \('xlarge' exists for version='v1'\)"),
    (dict(arch=7), TypeError, r'arch must be a size name \(str\) or a dict '
     r'with depths and channels, got 7 \(int\)'),
    (dict(arch=dict(depths=[1, 1, 1, 1])), ValueError, r'arch dict must have '
     r"exactly the keys depths and channels \(or widths\), got \['depths'\]"),
    (dict(arch=dict(depths=[1, 1, 1], channels=[8, 16, 32])), ValueError,
     r"arch\['depths'\] must be 4 positive ints \(one per stage\), got "
     r'\[1, 1, 1\]'),
    (dict(arch=dict(depths=[1, 1, 1, 1], widths=[8, 16, 0, 32])), ValueError,
     r"arch\['widths'\] must be 4 positive ints"),
    (dict(version='v3'), ValueError, r"version='v3' is not valid; use 'v1' "
     r"or 'v2'"),
    (dict(drop_path_rate=1.0), ValueError, r'drop_path_rate must be a float '
     r'in \[0, 1\), got 1.0'),
    (dict(drop_path_rate='0.1'), ValueError, r"drop_path_rate must be a "
     r"float in \[0, 1\), got '0.1'"),
    (dict(layer_scale_init_value=-1.0), ValueError, r'layer_scale_init_value '
     r'must be a float >= 0 \(0 disables layer scale\), got -1.0'),
    (dict(norm_cfg=dict(type='LN')), ValueError, r"norm_cfg=\{'type': "
     r"'LN'\}: norm type 'LN' normalises the last dim, i\.e\. the width of "
     r"NCHW maps; use 'LN2d' \(channel LayerNorm\)$"),
    (dict(norm_cfg='LN2d'), TypeError, r"norm_cfg must be a dict with a "
     r"'type' \(a registered norm type, e\.g\. 'BN', 'GN', 'LN2d'\), got "
     r"'LN2d' \(str\)$"),
])
def test_option_errors(kwargs, error, message):
    kwargs.setdefault('arch', SMALL)
    with pytest.raises(error, match=message):
        VBConvNeXt(**kwargs)


def test_batch_norm_blocks_and_frozen_bn():
    # The contract's frozen-BN test covers BN families only; ConvNeXt has BN
    # only with norm_cfg=BN (blocks then run in their 1x1-conv form).
    from vb_plugin.layers import FrozenBatchNorm2d, is_batch_norm
    kwargs = dict(arch=SMALL, norm_cfg=dict(type='BN'), frozen_stages=1,
                  out_norm_cfg=None)
    ref = randomize(VBConvNeXt(**kwargs))
    with torch.no_grad():
        for m in ref.modules():
            if is_batch_norm(m):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    model = VBConvNeXt(frozen_bn=True, **kwargs)
    model.load_state_dict(ref.state_dict())
    frozen = [n for n, m in model.named_modules()
              if isinstance(m, FrozenBatchNorm2d)]
    assert frozen == ['downsample_layers.0.1', 'stages.0.0.norm']
    assert all(b.conv_mlp for b in model.modules()
               if isinstance(b, ConvNeXtBlock))
    x = torch.randn(2, 3, 64, 64)
    assert max_abs_diff(model.eval()(x), ref.eval()(x)) == 0


def test_dict_arch_accepts_widths_alias():
    a = VBConvNeXt(arch=dict(depths=[1, 1, 2, 1], widths=[8, 16, 32, 64]))
    b = VBConvNeXt(arch=SMALL)
    assert a.arch == b.arch


# ----------------------------------------------------------------------
# timm.
TIMM_VARIANTS = {
    # atto/femto are timm's conv-MLP models (1x1-conv weights, LayerNorm2d)
    'convnext_atto': dict(arch='atto'),
    'convnextv2_femto': dict(arch='femto', version='v2'),
    # tiny/v2-tiny layouts (nn.Linear MLP) at a small width
    'convnext_tiny': dict(arch=SMALL),
    'convnextv2_tiny': dict(arch=SMALL, version='v2'),
}


def timm_pair(name):
    import timm
    kw = {} if 'tiny' not in name else dict(depths=SMALL['depths'],
                                             dims=SMALL['channels'])
    ref = randomize(timm.create_model(name, pretrained=False, **kw)).eval()
    feats = timm.create_model(name, pretrained=False, features_only=True,
                              out_indices=(0, 1, 2, 3), **kw).eval()
    return ref, feats


def load_features(feats, ref):
    """Load a timm model's weights into its features_only twin (whose
    first-level names are flattened: stem_0, stages_1), strictly."""
    feats.load_state_dict({
        re.sub(r'^(stem|stages)\.(\d+)\.', r'\1_\2.', k): v
        for k, v in ref.state_dict().items() if not k.startswith('head.')
    })


@pytest.mark.parametrize('name', sorted(TIMM_VARIANTS))
def test_parity_with_timm(name, save_state):
    ref, feats = timm_pair(name)
    load_features(feats, ref)
    model = VBConvNeXt(**TIMM_VARIANTS[name], out_norm_cfg=None).eval()
    report = load_pretrained(model, save_state(ref.state_dict()),
                             verbose=False)
    assert report.source == 'timm'
    assert report.dropped == {'classifier head': [
        'head.norm.weight', 'head.norm.bias', 'head.fc.weight',
        'head.fc.bias']}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        diff = max_abs_diff(model(x), tuple(feats(x)))
    print(f'timm {name}: max abs diff {diff:.2e}')
    assert diff <= TOL
    # A features_only state dict (stem_0, stages_1 ...) loads too.
    model2 = VBConvNeXt(**TIMM_VARIANTS[name], out_norm_cfg=None).eval()
    report = load_pretrained(model2, save_state(feats.state_dict()),
                             verbose=False)
    assert report.source == 'timm' and report.dropped == {}
    with torch.no_grad():
        assert max_abs_diff(model2(x), tuple(feats(x))) <= TOL


# ----------------------------------------------------------------------
# Official facebookresearch layout: timm's checkpoint_filter_fn is the oracle.
def timm_to_fb(state):
    """Write a timm state dict in the official release's key layout
    (facebookresearch/ConvNeXt models/convnext.py and ConvNeXt-V2
    models/convnextv2.py): downsample_layers, stages.{i}.{j}.dwconv/norm/
    pwconv1/pwconv2/gamma, grn.gamma/beta as (1, 1, 1, C), norm, head."""
    fb = {}
    for k, v in state.items():
        k = re.sub(r'^stem\.', 'downsample_layers.0.', k)
        k = re.sub(r'^stages\.(\d+)\.downsample\.', r'downsample_layers.\1.',
                   k)
        k = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.', k)
        k = k.replace('.conv_dw.', '.dwconv.').replace('.mlp.fc', '.pwconv')
        if '.mlp.grn.' in k:
            k = k.replace('.mlp.grn.weight', '.grn.gamma').replace(
                '.mlp.grn.bias', '.grn.beta')
            v = v.reshape(1, 1, 1, -1)
        if '.pwconv' in k and k.endswith('weight'):
            v = v.flatten(1)  # the official MLP is nn.Linear
        k = k.replace('head.norm.', 'norm.').replace('head.fc.', 'head.')
        fb[k] = v
    return fb


FB_VARIANTS = {
    'convnext_tiny': dict(arch=SMALL),
    'convnextv2_atto': dict(arch='atto', version='v2'),
}


@pytest.mark.parametrize('name', sorted(FB_VARIANTS))
def test_parity_with_official_fb_layout_via_timm_filter(name, save_state):
    from timm.models.convnext import checkpoint_filter_fn
    ref, feats = timm_pair(name)
    fb = timm_to_fb(ref.state_dict())
    # The published key names.
    v2 = 'v2' in name
    expected = {'downsample_layers.0.0.weight', 'downsample_layers.0.1.bias',
                'downsample_layers.3.0.weight', 'downsample_layers.3.1.bias',
                'stages.0.0.dwconv.weight', 'stages.0.0.norm.weight',
                'stages.0.0.pwconv1.weight', 'stages.3.0.pwconv2.bias',
                'norm.weight', 'norm.bias', 'head.weight', 'head.bias'}
    expected |= {'stages.0.0.grn.gamma', 'stages.0.0.grn.beta'} if v2 else \
        {'stages.0.0.gamma'}
    assert expected <= set(fb)
    assert not any('.gamma' in k and 'grn' not in k for k in fb) if v2 \
        else not any('grn' in k for k in fb)
    if v2:
        assert fb['stages.0.0.grn.gamma'].shape[:3] == (1, 1, 1)
    # timm's own filter maps this layout back onto timm, strictly.
    timm_model = timm_pair(name)[0]
    timm_model.load_state_dict(checkpoint_filter_fn(fb, timm_model),
                               strict=True)
    load_features(feats, timm_model)
    # An official checkpoint file holds the state dict under 'model'.
    model = VBConvNeXt(**FB_VARIANTS[name], out_norm_cfg=None).eval()
    report = load_pretrained(model, save_state({'model': fb}), verbose=False)
    assert report.source == 'fb' and report.container == 'model'
    assert sorted(report.dropped['classifier head']) == [
        'head.bias', 'head.weight', 'norm.bias', 'norm.weight']
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        diff = max_abs_diff(model(x), tuple(feats(x)))
    print(f'fb (via timm filter) {name}: max abs diff {diff:.2e}')
    assert diff <= TOL


def test_official_fb_detection_backbone_out_norms(save_state):
    # The official detection/segmentation backbones add norm{i} per output.
    src = randomize(VBConvNeXt(arch=SMALL)).eval()
    fb = {}
    for k, v in src.state_dict().items():
        k = k.replace('.depthwise_conv.', '.dwconv.').replace(
            '.pointwise_conv', '.pwconv')
        fb['backbone.' + re.sub(r'^out_norms\.(\d)\.', r'norm\1.', k)] = v
    fb['decode_head.conv_seg.weight'] = torch.zeros(2, 8, 1, 1)
    model = VBConvNeXt(arch=SMALL).eval()
    report = load_pretrained(model, save_state({'state_dict': fb}),
                             verbose=False)
    assert report.source == 'fb' and report.kept_initial == []
    x = torch.randn(1, 3, 64, 64)
    assert max_abs_diff(model(x), src(x)) == 0


# ----------------------------------------------------------------------
# mmpretrain / mmdet: key layout as published, round trip.
def mmpretrain_keys(depths, v2, out_indices):
    """State-dict keys of mmpretrain's ConvNeXt (mmpretrain/models/backbones/
    convnext.py, 1.x), written from its module structure."""
    keys = ['downsample_layers.0.0.weight', 'downsample_layers.0.0.bias',
            'downsample_layers.0.1.weight', 'downsample_layers.0.1.bias']
    for i, depth in enumerate(depths):
        if i > 0:
            keys += [f'downsample_layers.{i}.{m}.{p}' for m in (0, 1)
                     for p in ('weight', 'bias')]
        for j in range(depth):
            b = f'stages.{i}.{j}.'
            keys += [b + 'gamma'] if not v2 else []
            keys += [b + f'{m}.{p}' for m in ('depthwise_conv', 'norm',
                                               'pointwise_conv1')
                     for p in ('weight', 'bias')]
            keys += [b + 'grn.gamma', b + 'grn.beta'] if v2 else []
            keys += [b + 'pointwise_conv2.weight', b + 'pointwise_conv2.bias']
        if i in out_indices:
            keys += [f'norm{i}.weight', f'norm{i}.bias']
    return keys


@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_mmpretrain_layout_and_detector_round_trip(version, save_state):
    src = randomize(VBConvNeXt(arch=SMALL, version=version)).eval()
    mm = {re.sub(r'^out_norms\.(\d)\.', r'norm\1.', k): v
          for k, v in src.state_dict().items()}
    assert sorted(mm) == sorted(
        mmpretrain_keys(SMALL['depths'], version == 'v2', (0, 1, 2, 3)))
    # An mmdet detector checkpoint: backbone., neck., heads, meta.
    ckpt = {'state_dict': {**{'backbone.' + k: v for k, v in mm.items()},
                           'neck.lateral_convs.0.conv.weight':
                           torch.zeros(4, 8, 1, 1)},
            'meta': {'epoch': 12}}
    model = VBConvNeXt(arch=SMALL, version=version).eval()
    report = load_pretrained(model, save_state(ckpt), verbose=False)
    assert report.source == 'mmpretrain' and report.prefix == 'backbone.'
    assert report.kept_initial == []
    assert report.dropped == {"outside prefix 'backbone.'": [
        'neck.lateral_convs.0.conv.weight']}
    x = torch.randn(1, 3, 64, 64)
    assert max_abs_diff(model(x), src(x)) == 0
    # Into a pruned model: the unbuilt stages and their norms are dropped.
    pruned = VBConvNeXt(arch=SMALL, version=version,
                        out_indices=(0, 1)).eval()
    report = load_pretrained(pruned, save_state(ckpt), verbose=False)
    unbuilt = report.dropped['stage not built (past the last out_indices)']
    assert 'out_norms.3.weight' in unbuilt and 'stages.3.0.pointwise_conv2.' \
        'bias' in unbuilt
    assert max_abs_diff(pruned(x), src(x)[:2]) == 0
    # And back: VBConvNeXt's own state dict (out_norms) loads as 'mmpretrain'.
    again = VBConvNeXt(arch=SMALL, version=version).eval()
    report = load_pretrained(again, save_state(model.state_dict()),
                             verbose=False)
    assert report.source == 'mmpretrain'
    assert max_abs_diff(again(x), src(x)) == 0


def test_mmpretrain_classifier_checkpoint(save_state):
    # mmpretrain's ImageNet checkpoints (the mmdet ConvNeXt configs'
    # init_cfg) hold backbone.norm3 (the final norm) and head.fc.
    src = randomize(VBConvNeXt(arch=SMALL, out_indices=(3, )))
    state = {'backbone.' + re.sub(r'^out_norms\.', 'norm', k): v
             for k, v in src.state_dict().items()}
    state['head.fc.weight'] = torch.zeros(10, 64)
    path = save_state({'state_dict': state})
    model = VBConvNeXt(arch=SMALL)
    report = load_pretrained(model, path, verbose=False)
    assert report.source == 'mmpretrain'
    assert sorted(report.kept_initial) == [
        f'out_norms.{i}.{p}' for i in range(3) for p in ('bias', 'weight')]
    assert torch.equal(model.out_norms['3'].weight, src.out_norms['3'].weight)
    # The same through init_cfg, as in the Mask R-CNN config.
    model = VBConvNeXt(arch=SMALL, init_cfg=dict(
        type='Pretrained', checkpoint=str(path), prefix='backbone.')).eval()
    model.init_weights()
    for key, value in src.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.all(model.out_norms['0'].weight == 1)
    assert torch.all(model.out_norms['0'].bias == 0)
    # Without output norms norm3 has nowhere to go: strict failure, no guess.
    plain = VBConvNeXt(arch=SMALL, out_norm_cfg=None)
    with pytest.raises(CheckpointError,
                       match=r"unexpected \(not in the model\): 2 "
                       r"\[out_norms.3.weight, out_norms.3.bias\]"):
        load_pretrained(plain, save_state({'state_dict': state}),
                        verbose=False)


def test_wrong_arch_fails_strictly(save_state):
    import timm
    path = save_state(timm.create_model('convnext_atto').state_dict())
    with pytest.raises(CheckpointError, match=r'wrong shape'):
        load_pretrained(VBConvNeXt(arch='femto'), path, verbose=False)
    with pytest.raises(CheckpointError, match=r'missing from the checkpoint'):
        load_pretrained(VBConvNeXt(arch='atto', version='v2',
                                   out_norm_cfg=None), path, verbose=False)


# ----------------------------------------------------------------------
# HF transformers.
@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_parity_with_transformers(version, save_state, tmp_path):
    transformers = pytest.importorskip(
        'transformers', reason='transformers is a test-only parity oracle')
    prefix = 'ConvNextV2' if version == 'v2' else 'ConvNext'
    config = getattr(transformers, prefix + 'Config')(
        hidden_sizes=SMALL['channels'], depths=SMALL['depths'],
        out_features=['stage1', 'stage2', 'stage3', 'stage4'])
    ref = randomize(getattr(transformers, prefix + 'Backbone')(config)).eval()
    # ConvNextBackbone normalises every output: VBConvNeXt's default.
    model = VBConvNeXt(arch=SMALL, version=version).eval()
    report = load_pretrained(model, save_state(ref.state_dict()),
                             verbose=False)
    assert report.source == 'hf' and report.dropped == {}
    assert report.kept_initial == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref_outs = tuple(ref(x).feature_maps)
        diff = max_abs_diff(model(x), ref_outs)
    print(f'transformers {prefix}Backbone: max abs diff {diff:.2e}')
    assert diff <= TOL

    # The classifier, saved as safetensors by save_pretrained: a
    # 'convnext(v2).' prefix, a final layernorm and a classifier head.
    clf = getattr(transformers, prefix + 'ForImageClassification')(config)
    randomize(clf).eval()
    clf.save_pretrained(tmp_path / 'hf')
    model = VBConvNeXt(arch=SMALL, version=version, out_norm_cfg=None).eval()
    report = load_pretrained(model, tmp_path / 'hf' / 'model.safetensors',
                             verbose=False)
    assert report.source == 'hf'
    name = prefix.lower()
    assert sorted(report.dropped['classifier head']) == [
        'classifier.bias', 'classifier.weight', f'{name}.layernorm.bias',
        f'{name}.layernorm.weight']
    with torch.no_grad():
        hidden = getattr(clf, name)(x, output_hidden_states=True)
        diff = max_abs_diff(model(x), tuple(hidden.hidden_states[1:]))
    print(f'transformers {prefix}Model: max abs diff {diff:.2e}')
    assert diff <= TOL


# ----------------------------------------------------------------------
# Faster inference form.
@pytest.mark.parametrize('kwargs', [dict(arch='atto'),
                                    dict(arch='atto', version='v2')],
                         ids=['v1', 'v2'])
def test_fast_inference_form_same_keys_same_outputs(kwargs):
    model = randomize(VBConvNeXt(**kwargs)).eval()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        fast = model.to_fast_inference()(x)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    assert all(b.conv_mlp for b in model.modules()
               if isinstance(b, ConvNeXtBlock))
    assert model.downsample_layers[0][0].weight.is_contiguous(
        memory_format=torch.channels_last)
    diff = max_abs_diff(fast, ref)
    print(f"fast inference form {kwargs}: max abs diff {diff:.2e}")
    assert diff <= TOL
    # A state dict saved from the fast form loads into the default form.
    plain = VBConvNeXt(**kwargs).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert max_abs_diff(plain(x), ref) == 0
        back = model.to_fast_inference(False)(x)
    assert not any(b.conv_mlp for b in model.modules()
                   if isinstance(b, ConvNeXtBlock))
    assert max_abs_diff(back, ref) == 0


# ----------------------------------------------------------------------
# Layer-wise learning-rate decay and Mask R-CNN.
@pytest.fixture(scope='module')
def detector():
    from vb_plugin.apis import build_detector, load_config
    cfg = load_config(str(MASK_RCNN))
    return cfg, build_detector(cfg, pretrained=False)


@pytest.mark.parametrize('arch', ['atto', 'nano', 'tiny', 'small', 'base'])
def test_lr_decay_layer_ids_cover_every_layer(arch):
    # The ids come from mmdet's own parser of parameter names: if the module
    # names did not follow mmpretrain's, everything would land on n + 1.
    with torch.device('meta'):
        model = VBConvNeXt(arch=arch)
    n = model.lr_decay_num_layers
    assert n == {'atto': 5, 'nano': 6, 'tiny': 6}.get(arch, 12)
    ids = set()
    for name, _ in model.named_parameters():
        ids.add(model.lr_decay_layer_id(name))
    # Every id from the stem (0) to the out norms (n + 1) is used.
    assert ids == set(range(n + 2))
    assert model.layer_decay_paramwise_cfg(0.9) == dict(
        decay_rate=0.9, decay_type='layer_wise', num_layers=n)


def test_layer_decay_constructor_learning_rates(detector):
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    cfg, model = detector
    init_default_scope('mmdet')
    optim_cfg = cfg.optim_wrapper.copy()
    assert optim_cfg.constructor == 'LearningRateDecayOptimizerConstructor'
    assert optim_cfg.paramwise_cfg == dict(decay_rate=0.95,
                                           decay_type='layer_wise',
                                           num_layers=6)
    # AmpOptimWrapper needs a GPU; the constructor and its config are kept.
    optim_cfg.type = 'OptimWrapper'
    optim = build_optim_wrapper(model, optim_cfg)
    backbone = model.backbone
    assert backbone.lr_decay_num_layers == optim_cfg.paramwise_cfg.num_layers
    base_lr, rate, n = 1e-4, 0.95, 6
    group_of = {id(p): g for g in optim.optimizer.param_groups
                for p in g['params']}
    params = dict(model.named_parameters())
    for name, layer_id in [
        ('backbone.downsample_layers.0.0.weight', 0),
        ('backbone.stages.0.2.pointwise_conv1.weight', 1),
        ('backbone.downsample_layers.2.1.weight', 3),
        ('backbone.stages.2.4.depthwise_conv.weight', 4),
        ('backbone.stages.2.8.gamma', 5),
        ('backbone.stages.3.1.pointwise_conv2.weight', 6),
        ('backbone.out_norms.2.weight', 7),
        ('neck.lateral_convs.0.conv.weight', 7),
    ]:
        group = group_of[id(params[name])]
        assert group['lr'] == pytest.approx(
            base_lr * rate**(n + 1 - layer_id), rel=1e-12), name
        if name.startswith('backbone.'):
            assert backbone.lr_decay_layer_id(
                name[len('backbone.'):]) == layer_id, name
    # Norms, biases and layer scale get no weight decay.
    assert group_of[id(params['backbone.stages.2.8.gamma'])][
        'weight_decay'] == 0
    assert group_of[id(params['backbone.stages.2.4.depthwise_conv.weight'])][
        'weight_decay'] == 0.05


def test_vb_constructor_reads_num_layers_from_the_backbone(detector):
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    cfg, model = detector
    init_default_scope('mmdet')
    groups = {}
    for constructor, paramwise in [
        ('LearningRateDecayOptimizerConstructor',
         dict(decay_rate=0.9, decay_type='layer_wise', num_layers=6)),
        ('VBLayerDecayOptimizerConstructor',
         dict(decay_rate=0.9, decay_type='layer_wise')),
    ]:
        optim = build_optim_wrapper(model, dict(
            type='OptimWrapper', constructor=constructor,
            optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
            paramwise_cfg=paramwise))
        groups[constructor] = [
            (g['lr'], g['weight_decay'], [id(p) for p in g['params']])
            for g in optim.optimizer.param_groups]
    assert groups['VBLayerDecayOptimizerConstructor'] == groups[
        'LearningRateDecayOptimizerConstructor']
    assert len({lr for lr, _, _ in groups[
        'VBLayerDecayOptimizerConstructor']}) == 8  # layer ids 0..7


def test_mask_rcnn_config_trains_one_step(detector):
    from mmengine.config import Config
    from vb_plugin.apis import synthetic_detection_batch
    raw = Config.fromfile(MASK_RCNN)
    assert raw.custom_imports == dict(imports=['vb_plugin'],
                                      allow_failed_imports=False)
    assert raw.model.backbone.type == 'VBConvNeXt'
    assert 'gap_before_final_norm' not in raw.model.backbone  # _delete_
    cfg, model = detector
    backbone = model.backbone
    assert type(backbone).__name__ == 'VBConvNeXt'
    assert list(backbone.out_channels) == cfg.model.neck.in_channels
    assert backbone.out_strides == (4, 8, 16, 32)
    assert sorted(backbone.out_norms) == ['0', '1', '2', '3']
    batch = synthetic_detection_batch(num_images=1, size=(128, 160))
    losses, preds, before = checked_train_step(model, batch)
    params = dict(backbone.named_parameters())
    for name in ('downsample_layers.0.0.weight', 'stages.3.2.gamma',
                 'out_norms.0.weight'):
        assert not torch.equal(params[name], before[name]), name
    pred = preds[0].pred_instances
    assert pred.masks.shape[1:] == (128, 160)
