"""Semantic segmentation with MMSegmentation: configs, dilated ResNet parity
with mmseg's ResNetV1c, layer-wise decay, the toy dataset, and (slow) a toy
training run through ``tools/train.py`` and ``tools/test.py``.

Everything here uses the real things: mmseg models built from the configs in
``configs/seg/``, mmseg's optimizer constructor, its dataset class and its
IoUMetric, and mmengine's Runner.
"""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import max_abs_diff, randomize_bn
from mmengine.config import Config, ConfigDict
from mmengine.registry import init_default_scope

import vb_plugin
from vb_plugin import VBResNet, load_pretrained
from vb_plugin.apis import load_config, setup_runner_config
from vb_plugin.datasets import TOY_SEG_CLASSES, make_toy_seg

pytest.importorskip('mmseg')

ROOT = Path(__file__).resolve().parents[1]
SEG_CONFIGS = sorted(p for p in (ROOT / 'configs' / 'seg').rglob('*.py')
                     if '_base_' not in p.parts)
TOY_SEG_CONFIG = ROOT / 'configs/seg/deeplabv3plus_vb-r18-d8_toy.py'
TOL = 1e-5


# ---------------------------------------------------------------------------
# Registration.
@pytest.mark.parametrize('cfg', [
    dict(type='VBConvNeXt', arch='atto'),
    dict(type='VBResNet', depth=18),
    dict(type='VBRegNet', arch='regnetx_200mf'),
    dict(type='VBTimmBackbone', model_name='resnet18'),
], ids=lambda c: c['type'])
def test_types_resolve_under_mmseg_scope(cfg):
    """The root-registry registration makes the types visible from mmseg's
    MODELS (a child registry), under mmseg's default scope."""
    from mmseg.registry import MODELS as MMSEG_MODELS
    init_default_scope('mmseg')
    cls = getattr(vb_plugin, cfg['type'])
    assert MMSEG_MODELS.get(cfg['type']) is cls
    with torch.device('meta'):
        assert type(MMSEG_MODELS.build(cfg)) is cls


# ---------------------------------------------------------------------------
# Dilated ResNet = mmseg's ResNetV1c.
V1C_VARIANTS = [
    # DeepLabV3+/PSPNet R-50-D8 (every mmseg ResNetV1c config).
    dict(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
         contract_dilation=True),
    # R-18-D8 and output stride 16 (as mmseg's R-101-D16 configs).
    dict(depth=18, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
         contract_dilation=True),
    dict(depth=50, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2),
         contract_dilation=True),
    # mmseg's own default: no contraction.
    dict(depth=18, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)),
]


@pytest.mark.parametrize('cfg', V1C_VARIANTS,
                         ids=lambda c: ','.join(f'{k}={v}' for k, v in
                                                c.items()))
def test_dilated_resnet_matches_mmseg_resnetv1c(cfg, save_state):
    from mmseg.models.backbones import ResNetV1c
    ref = randomize_bn(ResNetV1c(**cfg))
    ref.eval()
    model = VBResNet(deep_stem=True, **cfg).eval()
    # mmseg's ResNetV1c state dict loads unchanged...
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict(), strict=True)
    # ...and through the loader, as an ImageNet V1c checkpoint (with its
    # classifier, which is dropped) would.
    model2 = VBResNet(deep_stem=True, **cfg).eval()
    ckpt = dict(ref.state_dict(), **{'fc.weight': torch.zeros(10, 4),
                                     'fc.bias': torch.zeros(10)})
    report = load_pretrained(model2, save_state({'state_dict': ckpt}),
                             verbose=False)
    assert report.source == 'mmdet'
    assert sorted(k for keys in report.dropped.values()
                  for k in keys) == ['fc.bias', 'fc.weight']
    x = torch.randn(1, 3, 67, 64)
    with torch.no_grad():
        outs_ref = ref(x)
        outs, outs2 = model(x), model2(x)
    diff = max(max_abs_diff(outs, outs_ref), max_abs_diff(outs2, outs_ref))
    print(f'max abs diff vs mmseg ResNetV1c: {diff:.3g}')
    assert diff <= TOL
    # out_strides are the true strides of the outputs.
    strides = {(1, 2, 1, 1): (4, 8, 8, 8), (1, 2, 2, 1): (4, 8, 16, 16)}
    assert model.out_strides == strides[cfg['strides']]
    for out, c, s in zip(outs, model.out_channels, model.out_strides):
        assert out.shape[1] == c and out.shape[3] == -(-64 // s)


def test_contract_dilation_dilates_first_blocks_by_half():
    model = VBResNet(depth=50, deep_stem=True, strides=(1, 2, 1, 1),
                     dilations=(1, 1, 2, 4), contract_dilation=True)
    first = [model.get_submodule(f'layer{i}')[0].conv2.dilation
             for i in (1, 2, 3, 4)]
    assert first == [(1, 1), (1, 1), (1, 1), (2, 2)]
    assert model.layer3[1].conv2.dilation == (2, 2)
    assert model.layer4[2].conv2.dilation == (4, 4)
    assert model.layer4[0].conv2.padding == (2, 2)
    plain = VBResNet(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
    assert plain.layer4[0].conv2.dilation == (4, 4)
    with pytest.raises(TypeError, match=r"contract_dilation must be True or "
                       r"False, got 'yes'"):
        VBResNet(depth=18, contract_dilation='yes')


# ---------------------------------------------------------------------------
# Configs.
def cpu_config(cfg: Config, size=(64, 64)) -> Config:
    """SyncBN -> BN (one CPU process) and a small input size."""

    def no_sync_bn(node):
        if isinstance(node, dict):
            if node.get('type') == 'SyncBN':
                node['type'] = 'BN'
            for value in node.values():
                no_sync_bn(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                no_sync_bn(value)

    no_sync_bn(cfg.model)
    cfg.model.data_preprocessor.size = size
    return cfg


def synthetic_seg_batch(num_images=2, size=(64, 64), num_classes=4, seed=0):
    """A batch in mmseg's data format: rectangles of random classes on noise.
    """
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    rng = np.random.default_rng(seed)
    h, w = size
    inputs, samples = [], []
    for _ in range(num_images):
        img = rng.integers(0, 80, size=(3, h, w), dtype=np.uint8)
        label = np.zeros((h, w), dtype=np.int64)
        for _k in range(3):
            y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
            cls = int(rng.integers(1, num_classes))
            label[y0:y0 + h // 3, x0:x0 + w // 3] = cls
            img[:, y0:y0 + h // 3, x0:x0 + w // 3] = (60 * cls) % 256
        sample = SegDataSample(metainfo=dict(img_shape=size, ori_shape=size,
                                             pad_shape=size))
        sample.gt_sem_seg = PixelData(data=torch.from_numpy(label)[None])
        inputs.append(torch.from_numpy(img))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def head_in_channels_match(cfg, channels):
    """The decode and auxiliary heads read the backbone's real channels."""
    for name in ('decode_head', 'auxiliary_head'):
        head = cfg.model.get(name)
        if head is None:
            continue
        index = head.get('in_index', -1)
        want = [channels[i] for i in index] if isinstance(
            index, (list, tuple)) else channels[index]
        assert head.in_channels == want, (name, head.in_channels, want)
        if 'c1_in_channels' in head:
            assert head.c1_in_channels == channels[0]


@pytest.mark.parametrize('config', SEG_CONFIGS,
                         ids=[p.stem for p in SEG_CONFIGS])
def test_every_seg_config_builds_and_trains_one_step(config):
    from mmengine.optim import build_optim_wrapper
    from mmseg.registry import MODELS as MMSEG_MODELS
    cfg = cpu_config(load_config(str(config)))
    assert cfg.default_scope == 'mmseg'
    assert cfg.custom_imports.imports == ['vb_plugin']
    init_default_scope(cfg.default_scope)
    model_cfg = cfg.model.copy()
    model_cfg.backbone.pop('init_cfg', None)  # no weights on this machine
    model = MMSEG_MODELS.build(model_cfg)
    model.init_weights()
    head_in_channels_match(cfg, model.backbone.out_channels)
    # The config's own optimizer (constructor, layer-wise decay), without
    # AMP, which needs a GPU.
    optim_cfg = ConfigDict(cfg.optim_wrapper.copy())
    if optim_cfg.get('type') == 'AmpOptimWrapper':
        optim_cfg.type = 'OptimWrapper'
        optim_cfg.pop('loss_scale', None)
    optim = build_optim_wrapper(model, optim_cfg)
    num_classes = cfg.model.decode_head.num_classes
    batch = synthetic_seg_batch(num_images=2, num_classes=num_classes)
    model.train()
    losses = model.train_step(batch, optim)
    assert torch.isfinite(losses['loss'])
    model.eval()
    with torch.no_grad():
        preds = model.test_step(batch)
    assert len(preds) == 2
    assert preds[0].pred_sem_seg.data.shape == (1, 64, 64)
    assert int(preds[0].pred_sem_seg.data.max()) < num_classes


def test_convnext_layer_decay_uses_mmseg_stage_ids():
    """mmseg's LearningRateDecayOptimizerConstructor (stage_wise) gives
    VBConvNeXt's parameters the groups it gives mmpretrain's ConvNeXt."""
    from mmengine.optim import build_optim_wrapper
    from mmseg.registry import MODELS as MMSEG_MODELS
    cfg = cpu_config(load_config(
        str(ROOT / 'configs/seg/upernet_vb-convnext-atto_toy.py')))
    init_default_scope('mmseg')
    model = MMSEG_MODELS.build(cfg.model)
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    scale_of = {}
    for group in optim.optimizer.param_groups:
        for p in group['params']:
            scale_of[id(p)] = group['lr_scale']
    rate, top = 0.9, 6 + 2  # num_layers + 2, as mmseg counts

    def expected(name):
        if name.startswith('backbone.downsample_layers.'):
            stage_id = 0
        elif name.startswith('backbone.stages.'):
            stage_id = int(name.split('.')[2]) + 1
        else:  # output norms and heads
            stage_id = top - 1
        return rate**(top - stage_id - 1)

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith('backbone.stages.3.') for n in names)
    for name, param in model.named_parameters():
        assert scale_of[id(param)] == pytest.approx(expected(name)), name
    assert scale_of[id(model.backbone.stages[0][0].gamma)] == \
        pytest.approx(0.9**6)


# ---------------------------------------------------------------------------
# The toy dataset.
def test_toy_seg_is_deterministic_and_valid(tmp_path):
    import cv2
    a = make_toy_seg(tmp_path / 'a', {'train': 5, 'val': 2}, seed=1)
    make_toy_seg(tmp_path / 'b', {'train': 5, 'val': 2}, seed=1)
    files = sorted(p.relative_to(tmp_path / 'a')
                   for p in (tmp_path / 'a').rglob('*.png'))
    assert len(files) == 2 * 7
    for rel in files:
        assert (tmp_path / 'a' / rel).read_bytes() == \
            (tmp_path / 'b' / rel).read_bytes()
    make_toy_seg(tmp_path / 'c', {'train': 5}, seed=2)
    name = 'ann_dir/train/00000.png'
    assert (tmp_path / 'c' / name).read_bytes() != \
        (tmp_path / 'a' / name).read_bytes()
    seen = set()
    for path in sorted(a['train'].iterdir()):
        label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        img = cv2.imread(str(tmp_path / 'a/img_dir/train' / path.name))
        assert label.shape == (128, 128) and label.dtype == np.uint8
        assert img.shape == (128, 128, 3)
        seen |= set(np.unique(label).tolist())
        # Shapes are flat-coloured (with mild noise) on a striped, noisy
        # background, so labelled pixels differ from the background.
        assert label.max() > 0 and (label == 0).mean() > 0.3
    assert seen <= set(range(len(TOY_SEG_CLASSES))) and len(seen) >= 3
    with pytest.raises(ValueError, match=r'size must be \(height, width\), '
                       r'both >= 16, got \(8, 8\)'):
        make_toy_seg(tmp_path / 'd', {'val': 1}, size=(8, 8))


def test_toy_seg_loads_with_mmseg_dataset(tmp_path):
    from mmseg.registry import DATASETS
    make_toy_seg(tmp_path / 'toy', {'train': 3, 'val': 2})
    cfg = load_config(str(TOY_SEG_CONFIG))
    init_default_scope('mmseg')
    dataset_cfg = cfg.val_dataloader.dataset.copy()
    dataset_cfg.data_root = str(tmp_path / 'toy')
    dataset = DATASETS.build(dataset_cfg)
    assert len(dataset) == 2
    assert dataset.metainfo['classes'] == TOY_SEG_CLASSES
    item = dataset[0]
    assert item['inputs'].shape == (3, 128, 128)
    seg = item['data_samples'].gt_sem_seg.data
    assert seg.shape == (1, 128, 128) and int(seg.max()) <= 3


def test_tools_keep_mmseg_scope():
    cfg = setup_runner_config(load_config(str(TOY_SEG_CONFIG)),
                              str(TOY_SEG_CONFIG))
    assert cfg.default_scope == 'mmseg'
    assert 'neck' not in cfg.model
    assert dict(type='RNGStateHook') in cfg.custom_hooks
    assert cfg.work_dir == 'work_dirs/deeplabv3plus_vb-r18-d8_toy'


# ---------------------------------------------------------------------------
# Slow: train on the toy set and evaluate, against the untrained model.
def run_tool(tool, *args, cwd, timeout=3600):
    cmd = [sys.executable, str(ROOT / 'tools' / tool), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def miou(output: str) -> float:
    found = re.findall(r'mIoU: (-?[\d.]+)', output)
    assert found, output[-3000:]
    return float(found[-1])


@pytest.mark.slow
def test_toy_schedule_learns_segmentation(tmp_path):
    make_toy_seg(tmp_path / 'data' / 'toy_seg')
    cfg = Config.fromfile(TOY_SEG_CONFIG)
    work = tmp_path / 'work'
    run_tool('train.py', TOY_SEG_CONFIG, '--work-dir', work,
             '--cfg-options', 'train_cfg.val_begin=1000000', cwd=tmp_path)
    final = work / f'iter_{cfg.train_cfg.max_iters}.pth'
    proc = run_tool('test.py', TOY_SEG_CONFIG, final, '--work-dir',
                    tmp_path / 'eval', cwd=tmp_path)
    trained = miou(proc.stdout + proc.stderr)

    torch.manual_seed(0)
    init_default_scope('mmseg')
    from mmseg.registry import MODELS as MMSEG_MODELS
    untrained_model = MMSEG_MODELS.build(load_config(str(TOY_SEG_CONFIG))
                                         .model)
    untrained_model.init_weights()
    untrained_ckpt = tmp_path / 'untrained.pth'
    torch.save({'state_dict': untrained_model.state_dict()}, untrained_ckpt)
    proc = run_tool('test.py', TOY_SEG_CONFIG, untrained_ckpt, '--work-dir',
                    tmp_path / 'eval0', cwd=tmp_path)
    untrained = miou(proc.stdout + proc.stderr)
    print(f'toy mIoU trained {trained:.2f} vs untrained {untrained:.2f}')
    # A constant prediction scores at most 25 (IoU 100 for one class of
    # four, 0 for the others); above that the model tells shapes apart.
    # Seen on a shared 2-core CPU: trained 32.55 (background 92.9, disc
    # 37.3, square and triangle 0), untrained 0.82.
    assert untrained < 25
    assert trained >= 28
