"""VBRegNet: the design space, parity with every checkpoint source, options.

Every reference (mmdet, timm, torchvision, HF transformers) is built here with
random weights, saved, loaded into VBRegNet through the public loader and
compared stage by stage. pycls cannot be installed; its layout (pycls
``anynet.py``: ``s{i}.b{j}.f.a``/``a_bn``, ``f.se.f_ex.0/2``, ``proj``/``bn``)
is written from a timm model, and timm is the oracle for its outputs.
"""
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from conftest import checked_train_step, max_abs_diff, randomize_bn
from mmengine.config import Config

from vb_plugin import CheckpointError, VBRegNet, load_pretrained
from vb_plugin.apis import (build_detector, load_config,
                            synthetic_detection_batch)
from vb_plugin.models.regnet import (REGNET_ARCHS, TORCHVISION_ARCHS,
                                     RegNetCfg, derive_stages)

TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]
MASK_RCNN = ROOT / 'configs/mask_rcnn' / \
    'mask-rcnn_vb-regnetx-3.2gf_fpn_1x_coco.py'


def timm_name(name: str) -> str:
    """'regnetx_3.2gf' -> timm's 'regnetx_032' (three digits of 100 MF)."""
    xy, size = name.split('_')
    mf = float(size[:-2]) * (1000 if size.endswith('gf') else 1)
    return f'{xy}_{round(mf / 100):03d}'



def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------
# The design space.
def test_every_paper_model_is_named():
    sizes = ['200mf', '400mf', '600mf', '800mf', '1.6gf', '3.2gf', '4.0gf',
             '6.4gf', '8.0gf', '12gf', '16gf', '32gf']
    assert list(REGNET_ARCHS) == [f'regnet{xy}_{s}' for xy in 'xy'
                                  for s in sizes]
    assert all(cfg.se_ratio == (0.25 if name[6] == 'y' else 0)
               for name, cfg in REGNET_ARCHS.items())


@pytest.mark.parametrize('name', list(REGNET_ARCHS))
def test_widths_and_param_counts_match_timm(name):
    import timm
    with torch.device('meta'):
        ref = timm.create_model(timm_name(name))
        model = VBRegNet(arch=name)
    assert model.stage_channels == tuple(
        f['num_chs'] for f in ref.feature_info[1:])
    assert model.stage_blocks == tuple(
        len(list(getattr(ref, f's{i + 1}').children())) for i in range(4))
    # The classification model: backbone plus a 1000-way linear head.
    ours = num_params(model) + model.stage_channels[-1] * 1000 + 1000
    assert abs(ours - num_params(ref)) / num_params(ref) < 0.01
    assert ours == num_params(ref)


@pytest.mark.parametrize('name', list(TORCHVISION_ARCHS))
def test_torchvision_names_match_torchvision(name, monkeypatch):
    import torchvision
    from torchvision.models.regnet import BlockParams

    # torchvision derives its widths with tensor ops, which need real data:
    # only the layers are built on the meta device.
    derive = BlockParams.from_init_params.__func__

    def derive_on_cpu(cls, *args, **kwargs):
        with torch.device('cpu'):
            return derive(cls, *args, **kwargs)

    monkeypatch.setattr(BlockParams, 'from_init_params',
                        classmethod(derive_on_cpu))
    with torch.device('meta'):
        ref = getattr(torchvision.models, name)()
        model = VBRegNet(arch=name)
    assert model.stage_channels == tuple(
        stage[0].f.c[0].out_channels for stage in ref.trunk_output)
    assert model.stage_blocks == tuple(len(s) for s in ref.trunk_output)
    assert num_params(model) + model.stage_channels[-1] * 1000 + 1000 == \
        num_params(ref)


def test_torchvision_rounding_differs_where_torchvision_does():
    # torchvision rounds bottleneck widths up on ties: regnet_x_400mf's last
    # stage has 400 channels where pycls, mmdet and timm have 384.
    assert derive_stages(REGNET_ARCHS['regnetx_400mf']).widths[-1] == 384
    assert derive_stages(TORCHVISION_ARCHS['regnet_x_400mf']).widths[-1] == 400
    differ = [n for n, c in TORCHVISION_ARCHS.items() if n != 'regnet_y_128gf'
              and derive_stages(c) != derive_stages(
                  dataclasses.replace(c, rounding='pycls'))]
    assert differ == ['regnet_x_400mf', 'regnet_y_800mf', 'regnet_y_8gf']


def test_custom_arch_dict_equals_named_row():
    row = REGNET_ARCHS['regnety_800mf']
    model = VBRegNet(arch=dataclasses.asdict(row))
    assert model.arch == row
    assert model.stage_channels == \
        VBRegNet(arch='regnety_800mf').stage_channels
    # A mmdet arch dict (no se_ratio) is valid as it is.
    mmdet_arch = dict(w0=88, wa=26.31, wm=2.25, group_w=48, depth=25,
                      bot_mul=1.0)
    assert VBRegNet(arch=mmdet_arch).arch == REGNET_ARCHS['regnetx_3.2gf']


def test_bottleneck_ratio_and_se_widths():
    model = VBRegNet(arch=dict(w0=8, wa=8.0, wm=1.5, group_w=4, depth=6,
                               bot_mul=0.5, se_ratio=0.25), stem_channels=8)
    assert model.stage_blocks == (1, 1, 2, 2)
    block = model.layer3[0]  # 16 -> 24 channels, bottleneck 12, 3 groups
    assert block.conv2.weight.shape == (12, 4, 3, 3)
    assert block.conv2.groups == 3
    # The SE width follows the block's input width: round(0.25 * 16).
    assert block.se.fc1.weight.shape == (4, 12, 1, 1)
    assert model.layer3[1].se.fc1.weight.shape == (6, 12, 1, 1)
    assert VBRegNet(arch='regnetx_200mf').layer1[0].se is None


# ---------------------------------------------------------------------------
# Parity with every source.
@pytest.mark.parametrize('arch', [
    'regnetx_400mf', 'regnetx_800mf',
    # mmdet requires bot_mul in a custom arch dict.
    dict(w0=8, wa=8.0, wm=1.5, group_w=8, depth=6, bot_mul=1.0),
])
def test_parity_with_mmdet_regnet(arch, save_state):
    from mmdet.models.backbones import RegNet as MMDetRegNet
    ref = randomize_bn(MMDetRegNet(arch=arch))
    ref.eval()  # mmdet's train() returns None: no chaining
    model = VBRegNet(arch=arch).eval()
    # The state dict of mmdet's RegNet loads unchanged...
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict(), strict=True)
    # ...and through the loader, as a detector checkpoint with a head.
    model2 = VBRegNet(arch=arch).eval()
    state = {f'backbone.{k}': v for k, v in ref.state_dict().items()}
    state['roi_head.fc.weight'] = torch.zeros(2)
    report = load_pretrained(model2, save_state({'state_dict': state}),
                             verbose=False)
    assert report.source == 'mmdet' and report.prefix == 'backbone.'
    assert list(report.dropped) == ["outside prefix 'backbone.'"]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outs_ref = ref(x)
        diff = max(max_abs_diff(model(x), outs_ref),
                   max_abs_diff(model2(x), outs_ref))
    print(f'mmdet {arch}: max abs diff {diff:.3g}')
    assert diff <= TOL


def timm_features(name, state):
    import timm
    feats = timm.create_model(name, features_only=True,
                              out_indices=(1, 2, 3, 4)).eval()
    feats.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith('head.')})
    return feats


@pytest.mark.parametrize('name', ['regnetx_200mf', 'regnety_200mf',
                                  'regnety_400mf'])
def test_parity_with_timm(name, save_state):
    import timm
    ref = randomize_bn(timm.create_model(timm_name(name))).eval()
    model = VBRegNet(arch=name).eval()
    report = load_pretrained(model, save_state(ref.state_dict()),
                             verbose=False)
    assert report.source == 'timm'
    assert report.dropped == {'classifier head': ['head.fc.weight',
                                                  'head.fc.bias']}
    feats = timm_features(timm_name(name), ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        diff = max_abs_diff(model(x), tuple(feats(x)))
    print(f'timm {name}: max abs diff {diff:.3g}')
    assert diff <= TOL


# pycls anynet.py names, written from timm's (timm renamed pycls's weights).
TIMM_TO_PYCLS = (
    (r'^head\.fc\.', 'head.fc.'),
    (r'\.conv1\.conv\.', '.f.a.'), (r'\.conv1\.bn\.', '.f.a_bn.'),
    (r'\.conv2\.conv\.', '.f.b.'), (r'\.conv2\.bn\.', '.f.b_bn.'),
    (r'\.conv3\.conv\.', '.f.c.'), (r'\.conv3\.bn\.', '.f.c_bn.'),
    (r'\.se\.fc1\.', '.f.se.f_ex.0.'), (r'\.se\.fc2\.', '.f.se.f_ex.2.'),
    (r'\.downsample\.conv\.', '.proj.'), (r'\.downsample\.bn\.', '.bn.'),
)


def to_pycls(state):
    out = {}
    for key, value in state.items():
        for pattern, repl in TIMM_TO_PYCLS:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


@pytest.mark.parametrize('name', ['regnetx_200mf', 'regnety_200mf'])
def test_parity_with_pycls_layout(name, save_state):
    import timm
    ref = randomize_bn(timm.create_model(timm_name(name))).eval()
    pycls_state = to_pycls(ref.state_dict())
    assert 's1.b1.f.a.weight' in pycls_state and 's1.b1.proj.weight' in \
        pycls_state and 'stem.conv.weight' in pycls_state
    model = VBRegNet(arch=name).eval()
    report = load_pretrained(model, save_state(pycls_state), verbose=False)
    assert report.source == 'pycls'
    assert report.dropped == {'classifier head': ['head.fc.weight',
                                                  'head.fc.bias']}
    feats = timm_features(timm_name(name), ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        diff = max_abs_diff(model(x), tuple(feats(x)))
    print(f'pycls {name}: max abs diff {diff:.3g}')
    assert diff <= TOL


def torchvision_features(model, x):
    x = model.stem(x)
    outs = []
    for stage in model.trunk_output:
        x = stage(x)
        outs.append(x)
    return tuple(outs)


@pytest.mark.parametrize('name', ['regnet_x_400mf', 'regnet_y_400mf'])
def test_parity_with_torchvision(name, save_state):
    import torchvision
    ref = randomize_bn(getattr(torchvision.models, name)()).eval()
    model = VBRegNet(arch=name).eval()
    report = load_pretrained(model, save_state(ref.state_dict()),
                             verbose=False)
    assert report.source == 'torchvision'
    assert report.dropped == {'classifier head': ['fc.weight', 'fc.bias']}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        diff = max_abs_diff(model(x), torchvision_features(ref, x))
    print(f'torchvision {name}: max abs diff {diff:.3g}')
    assert diff <= TOL


def test_torchvision_400mf_needs_its_own_rounding(save_state):
    import torchvision
    path = save_state(torchvision.models.regnet_x_400mf().state_dict())
    with pytest.raises(CheckpointError, match=r'wrong shape: .*layer4\.0\.'
                       r'conv1\.weight: checkpoint \(400, 160, 1, 1\) vs '
                       r'model \(384, 160, 1, 1\)'):
        load_pretrained(VBRegNet(arch='regnetx_400mf'), path, verbose=False)


@pytest.mark.parametrize('name', ['regnetx_200mf', 'regnety_200mf'])
def test_parity_with_transformers(name, save_state, tmp_path):
    transformers = pytest.importorskip(
        'transformers', reason='transformers is a test-only parity oracle')
    model = VBRegNet(arch=name).eval()
    config = transformers.RegNetConfig(
        embedding_size=model.stem_channels,
        hidden_sizes=list(model.stage_channels),
        depths=list(model.stage_blocks),
        groups_width=model.arch.group_w,
        layer_type=name[6])
    ref = randomize_bn(transformers.RegNetModel(config)).eval()
    report = load_pretrained(model, save_state(ref.state_dict()),
                             verbose=False)
    assert report.source == 'hf' and report.dropped == {}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref_outs = tuple(ref(x, output_hidden_states=True).hidden_states[1:])
        diff = max_abs_diff(model(x), ref_outs)
    print(f'hf {name}: max abs diff {diff:.3g}')
    assert diff <= TOL

    # The classification model, saved as safetensors by save_pretrained:
    # 'regnet.' prefix and a classifier head.
    clf = transformers.RegNetForImageClassification(config).eval()
    clf.regnet.load_state_dict(ref.state_dict())
    clf.save_pretrained(tmp_path / 'hf')
    model = VBRegNet(arch=name).eval()
    report = load_pretrained(model, tmp_path / 'hf' / 'model.safetensors',
                             verbose=False)
    assert report.source == 'hf'
    assert sorted(report.dropped['classifier head']) == [
        'classifier.1.bias', 'classifier.1.weight'
    ] and len(report.dropped) == 1
    with torch.no_grad():
        assert max_abs_diff(model(x), ref_outs) <= TOL


def test_timm_checkpoint_of_another_arch_fails_strictly(save_state):
    import timm
    path = save_state(timm.create_model('regnety_002').state_dict())
    with pytest.raises(CheckpointError, match=r'unexpected \(not in the '
                       r'model\): \d+ \[layer1\.0\.se\.fc1\.weight'):
        load_pretrained(VBRegNet(arch='regnetx_200mf'), path, verbose=False)


def test_source_name_narrows_detection(save_state):
    import timm
    path = save_state(timm.create_model('regnetx_002').state_dict())
    with pytest.raises(CheckpointError, match=r"checkpoint layout not "
                       r"recognised \(source='pycls'\)"):
        load_pretrained(VBRegNet(arch='regnetx_200mf'), path, source='pycls',
                        verbose=False)
    with pytest.raises(CheckpointError, match=r"source='tf' is not known for "
                       r"this backbone; valid values are 'auto' or one of "
                       r"\['hf', 'huggingface', 'mmdet', 'native', 'pycls', "
                       r"'timm', 'torchvision', 'transformers'\]"):
        load_pretrained(VBRegNet(arch='regnetx_200mf'), path, source='tf',
                        verbose=False)
    report = load_pretrained(VBRegNet(arch='regnetx_200mf'), path,
                             source='timm', verbose=False)
    assert report.source == 'timm'


# ---------------------------------------------------------------------------
# Options.
@pytest.mark.parametrize('arch,error,message', [
    ('regnetx_3.2GF', ValueError, r"arch='regnetx_3.2GF' is not a known "
     r"RegNet; valid names are \['regnetx_200mf', "),
    (dict(w0=8, wa=8.0, wm=1.5, group_w=8, depth=6, groups=2), TypeError,
     r"arch has unknown keys \['groups'\]; allowed keys are \['w0', 'wa', "
     r"'wm', 'group_w', 'depth', 'bot_mul', 'se_ratio', 'rounding'\]"),
    (dict(w0=8, wa=8.0, wm=1.5), ValueError, r"arch=.* lacks \['group_w', "
     r"'depth'\]; required keys are \['w0', 'wa', 'wm', 'group_w', "
     r"'depth'\]"),
    (dict(w0=12, wa=8.0, wm=1.5, group_w=8, depth=6), ValueError,
     r'arch w0=12 is not valid; it must be a positive multiple of 8'),
    (dict(w0=8, wa=8.0, wm=1.0, group_w=8, depth=6), ValueError,
     r'arch wm=1.0 is not valid; it must be > 1'),
    (dict(w0=8, wa=8.0, wm=1.5, group_w=8, depth=6, se_ratio=1.5),
     ValueError, r'arch se_ratio=1.5 is not valid; it must be in \[0, 1\)'),
    (dict(w0=8, wa=8.0, wm=1.5, group_w=8, depth=6, rounding='tf'),
     ValueError, r"arch rounding='tf' is not valid; it must be one of "
     r"\('pycls', 'torchvision'\)"),
    (dict(w0=8, wa=8.0, wm=1.5, group_w=8, depth=6.0), TypeError,
     r'arch depth must be an int, got 6.0 \(float\)'),
    (dict(w0=8, wa='8', wm=1.5, group_w=8, depth=6), TypeError,
     r"arch wa must be a number, got '8' \(str\)"),
    (dict(w0=8, wa=8.0, wm=1.2, group_w=8, depth=12), ValueError,
     r'arch=RegNetCfg\(.*\) generates 10 stages \(widths \[8, 16, 24, 32, '
     r'40, 48, 56, 72, 88, 104\]\); a RegNet backbone has 1 to 4 stages '
     r'\(strides 4 to 32\)'),
    (3.2, TypeError, r'arch must be a name \(str\), a dict of generating '
     r'parameters or a RegNetCfg, got 3.2 \(float\)'),
])
def test_arch_errors(arch, error, message):
    with pytest.raises(error, match=message):
        VBRegNet(arch=arch)


def test_other_option_errors():
    with pytest.raises(ValueError, match=r'stem_channels=0 is not valid; it '
                       r'must be a positive int'):
        VBRegNet(arch='regnetx_200mf', stem_channels=0)
    with pytest.raises(TypeError, match=r"in_channels must be a positive "
                       r"int, got '3' \(str\)"):
        VBRegNet(arch='regnetx_200mf', in_channels='3')
    with pytest.raises(TypeError, match=r'unexpected keyword argument '
                       r"'deep_stem'"):
        VBRegNet(arch='regnetx_200mf', deep_stem=True)


def test_regnet_cfg_row_is_frozen_and_validated():
    row = REGNET_ARCHS['regnetx_200mf']
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.depth = 3
    with pytest.raises(ValueError, match=r'arch depth=0 is not valid'):
        dataclasses.replace(row, depth=0)
    assert isinstance(dataclasses.replace(row, se_ratio=0.25), RegNetCfg)


def test_zero_init_residual():
    model = VBRegNet(arch='regnety_200mf')
    model.init_weights()
    blocks = [m for m in model.modules() if hasattr(m, 'norm3')]
    assert len(blocks) == sum(model.stage_blocks)
    assert all(torch.all(b.norm3.weight == 0) for b in blocks)
    model = VBRegNet(arch='regnety_200mf', zero_init_residual=False)
    model.init_weights()
    assert torch.all(model.layer1[0].bn3.weight == 1)


# ---------------------------------------------------------------------------
# mmdet's RegNet detector with VBRegNet.
def test_mask_rcnn_config():
    cfg = Config.fromfile(MASK_RCNN)
    assert cfg.custom_imports == dict(imports=['vb_plugin'],
                                      allow_failed_imports=False)
    backbone = cfg.model.backbone
    assert backbone.type == 'VBRegNet' and backbone.arch == 'regnetx_3.2gf'
    assert 'style' not in backbone  # _delete_ took effect
    # pycls's BGR statistics from mmdet's RegNet config are kept.
    assert cfg.model.data_preprocessor.bgr_to_rgb is False


def test_mask_rcnn_regnetx_trains_one_step_and_predicts():
    cfg = load_config(str(MASK_RCNN))
    model = build_detector(cfg, pretrained=False)
    backbone = model.backbone
    assert type(backbone).__name__ == 'VBRegNet'
    assert list(backbone.out_channels) == cfg.model.neck.in_channels
    assert backbone.out_strides == (4, 8, 16, 32)
    batch = synthetic_detection_batch(num_images=1, size=(128, 160))
    losses, preds, _ = checked_train_step(
        model, batch, frozen_prefixes=('conv1.', 'bn1.', 'layer1.'))
    # norm_eval: BN statistics did not move during the training step.
    assert backbone.layer2[0].bn1.num_batches_tracked.item() == 0
    assert preds[0].pred_instances.masks.shape[1:] == (128, 160)


def test_norm1_is_the_stem_norm_as_in_mmdet():
    from mmdet.models.backbones import RegNet as MMDetRegNet
    ref = MMDetRegNet(arch='regnetx_400mf')
    model = VBRegNet(arch='regnetx_400mf')
    model.load_state_dict(ref.state_dict())
    assert ref.norm1_name == 'bn1' and model.norm1 is model.bn1
    assert type(model.norm1) is type(ref.norm1)
    assert torch.equal(model.norm1.weight, ref.norm1.weight)


def test_torchvision_weights_into_the_pycls_arch_name_the_twin(save_state):
    """torchvision's regnet_x_400mf rounds widths its own way: loading it
    into arch='regnetx_400mf' fails on shapes, and the error says which arch
    fits."""
    import torchvision
    ref = torchvision.models.regnet_x_400mf()
    path = save_state(ref.state_dict())
    model = VBRegNet(arch='regnetx_400mf')
    with pytest.raises(CheckpointError) as info:
        load_pretrained(model, path, verbose=False)
    message = str(info.value)
    assert re.search(r'  wrong shape: \d+ ', message), message
    assert message.endswith(
        "  hint: torchvision rounds RegNet widths its own way, so its "
        "checkpoints fit torchvision's archs only: arch='regnet_x_400mf' is "
        "torchvision's form of this arch"), message
    # The twin loads it.
    report = load_pretrained(VBRegNet(arch='regnet_x_400mf'), path,
                             verbose=False)
    assert report.source == 'torchvision'
