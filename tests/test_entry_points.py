"""Every shipped config in the ecosystem's own entry points.

Nothing here goes through vb_plugin's tools: mmdet's and mmseg's packaged
``tools/train.py`` and ``tools/test.py`` (installed with the packages, under
``.mim/tools/``), ``mmdet.apis.init_detector`` + ``inference_detector``,
``DetInferencer``, ``mmengine.runner.Runner.from_cfg`` and
``mmseg.apis.init_model`` + ``inference_model``. The configs only say
``custom_imports=dict(imports=['vb_plugin'])``; ``neck.in_channels='auto'``
and the wiring checks come from the build hook of :mod:`vb_plugin.wiring`.

Toy configs run a real training iteration or a prediction on the toy data;
COCO/ADE20K configs (no dataset here) are built for real and predict on a
small image.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import mmdet
import mmseg
import numpy as np
import pytest
import torch
from mmengine.config import Config

from vb_plugin.datasets import make_toy_coco, make_toy_seg

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / 'configs').rglob('*.py')
                 if '_base_' not in p.parts)
DET_CONFIGS = [p for p in CONFIGS if 'seg' not in p.parts]
SEG_CONFIGS = [p for p in CONFIGS if 'seg' in p.parts]
DET_TOY = [p for p in DET_CONFIGS if p.stem.endswith('_toy')]
SEG_TOY = [p for p in SEG_CONFIGS if p.stem.endswith('_toy')]
MMDET_TOOLS = Path(mmdet.__file__).parent / '.mim' / 'tools'
MMSEG_TOOLS = Path(mmseg.__file__).parent / '.mim' / 'tools'


def ids(paths):
    return [p.stem for p in paths]


def test_configs_are_found_and_split():
    assert len(DET_CONFIGS) >= 10 and len(SEG_CONFIGS) >= 6
    assert len(DET_TOY) >= 5 and len(SEG_TOY) >= 3
    assert (MMDET_TOOLS / 'train.py').is_file()
    assert (MMSEG_TOOLS / 'test.py').is_file()


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """A working directory with data/toy_coco and data/toy_seg, where the
    configs' relative data roots point."""
    root = tmp_path_factory.mktemp('entry')
    make_toy_coco(root / 'data' / 'toy_coco', {'train': 4, 'val': 2})
    make_toy_seg(root / 'data' / 'toy_seg', {'train': 4, 'val': 2})
    return root


def toy_image(data_root) -> str:
    return str(sorted((data_root / 'data' / 'toy_coco' / 'val').iterdir())[0])


def neck_in_channels(neck):
    """Input channels of the built neck's per-level convs (FPN's lateral
    convs, ChannelMapper's convs; VBSimpleFeaturePyramid's one map, read
    from the first conv of each of its levels)."""
    from vb_plugin import VBSimpleFeaturePyramid
    if isinstance(neck, VBSimpleFeaturePyramid):
        widths = {next(m.in_channels for m in level
                       if hasattr(m, 'in_channels'))
                  for level in neck.levels.values()}
        assert widths == {neck.in_channels}, widths
        return [neck.in_channels]
    convs = getattr(neck, 'lateral_convs', None) or neck.convs
    return [c.conv.in_channels for c in convs]


def run(script, *args, cwd, timeout=900):
    """Run one of the packages' own tools, as a user would: a fresh Python,
    the config's custom_imports importing vb_plugin."""
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join(
                   filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
    proc = subprocess.run([sys.executable, str(script), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


#: A one-iteration run without validation, for every toy config.
SHORT = {'train_cfg.max_iters': 1, 'train_cfg.val_interval': 1000,
         'default_hooks.checkpoint.interval': 1,
         'train_dataloader.batch_size': 2,
         'train_dataloader.num_workers': 0,
         'train_dataloader.persistent_workers': False,
         'default_hooks.logger.interval': 1}


def cfg_options(options=SHORT):
    """``--cfg-options`` arguments of the tools."""
    return ['--cfg-options', *(f'{k}={v}' for k, v in options.items())]


# ----------------------------------------------------------------------
# mmdet
@pytest.mark.parametrize('config', DET_TOY, ids=ids(DET_TOY))
def test_mmdet_packaged_train_and_test_tools(config, data_root):
    work = data_root / 'mmdet_tools' / config.stem
    out = run(MMDET_TOOLS / 'train.py', config, '--work-dir', work,
              *cfg_options(), cwd=data_root)
    assert re.search(r'Iter\(train\) \[1/1\].* loss: \d', out), out[-3000:]
    ckpt = work / 'iter_1.pth'
    assert ckpt.is_file()
    out = run(MMDET_TOOLS / 'test.py', config, ckpt, '--work-dir',
              work / 'test', cwd=data_root)
    assert re.search(r'coco/bbox_mAP: -?\d', out), out[-3000:]


@pytest.fixture(scope='module')
def toy_checkpoint(data_root):
    """Mask R-CNN trained for two iterations with the toy config through
    mmengine's Runner (what mmdet's tools/train.py does)."""
    from mmengine.runner import Runner
    cfg = Config.fromfile(ROOT / 'configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py')
    cfg.work_dir = str(data_root / 'toy_ckpt')
    cfg.merge_from_dict(dict(SHORT, **{'train_cfg.max_iters': 2}))
    cwd = os.getcwd()
    os.chdir(data_root)
    try:
        Runner.from_cfg(cfg).train()
    finally:
        os.chdir(cwd)
    path = data_root / 'toy_ckpt' / 'iter_2.pth'
    assert path.is_file()
    return path


@pytest.mark.parametrize('config', DET_TOY, ids=ids(DET_TOY))
def test_runner_from_cfg_trains(config, data_root, monkeypatch):
    from mmengine.runner import Runner
    monkeypatch.chdir(data_root)
    cfg = Config.fromfile(config)
    cfg.work_dir = str(data_root / 'runner' / config.stem)
    cfg.merge_from_dict(SHORT)
    runner = Runner.from_cfg(cfg)
    backbone = runner.model.backbone
    assert neck_in_channels(runner.model.neck) == list(backbone.out_channels)
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()
              if p.requires_grad}
    runner.train()
    after = dict(runner.model.backbone.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in before.items())


@pytest.mark.parametrize('config', DET_CONFIGS, ids=ids(DET_CONFIGS))
def test_init_detector_and_inference_detector(config, data_root):
    """Every detection config, COCO ones included (built for real, without
    their pretrained weights, as init_detector does without a checkpoint),
    predicts on a toy image."""
    from mmdet.apis import inference_detector, init_detector
    model = init_detector(str(config), device='cpu')
    assert neck_in_channels(model.neck) == list(model.backbone.out_channels)
    result = inference_detector(model, toy_image(data_root))
    pred = result.pred_instances
    assert pred.bboxes.shape[-1] == 4
    assert len(pred.scores) == len(pred.labels) == len(pred.bboxes)
    if 'mask' in Config.fromfile(config).model.get('roi_head', {}):
        assert 'masks' in pred


def test_trained_toy_checkpoint_in_init_detector(toy_checkpoint, data_root):
    """The getting-started recipe: a checkpoint trained with the toy config
    gives boxes and masks through mmdet's init_detector."""
    from mmdet.apis import inference_detector, init_detector
    config = ROOT / 'configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py'
    model = init_detector(str(config), str(toy_checkpoint), device='cpu')
    from vb_plugin.weights import read_checkpoint
    saved = read_checkpoint(toy_checkpoint)['state_dict']
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    model.test_cfg.rcnn.score_thr = 0.0   # an almost untrained model
    result = inference_detector(model, toy_image(data_root))
    pred = result.pred_instances
    assert len(pred.bboxes) > 0
    assert pred.masks.shape[0] == len(pred.bboxes)
    assert tuple(pred.masks.shape[1:]) == (160, 160)
    assert model.dataset_meta['classes'] == ('square', 'disc', 'triangle')


@pytest.mark.parametrize('config', DET_TOY, ids=ids(DET_TOY))
def test_det_inferencer_on_an_image_file(config, data_root, toy_checkpoint,
                                         tmp_path):
    from mmdet.apis import DetInferencer
    weights = (str(toy_checkpoint) if 'r18_fpn' in config.stem else None)
    inferencer = DetInferencer(model=str(config), weights=weights,
                               device='cpu', show_progress=False)
    out = inferencer(toy_image(data_root), out_dir=str(tmp_path),
                     no_save_pred=False, return_datasamples=False)
    pred = out['predictions'][0]
    assert set(pred) >= {'labels', 'scores', 'bboxes'}
    assert len(pred['labels']) == len(pred['scores']) == len(pred['bboxes'])
    assert list((tmp_path / 'preds').glob('*.json'))


# ----------------------------------------------------------------------
# mmseg
@pytest.mark.parametrize('config', SEG_TOY, ids=ids(SEG_TOY))
def test_mmseg_packaged_train_and_test_tools(config, data_root):
    work = data_root / 'mmseg_tools' / config.stem
    out = run(MMSEG_TOOLS / 'train.py', config, '--work-dir', work,
              *cfg_options(), cwd=data_root)
    ckpt = work / 'iter_1.pth'
    assert ckpt.is_file(), out[-3000:]
    out = run(MMSEG_TOOLS / 'test.py', config, ckpt, '--work-dir',
              work / 'test', cwd=data_root)
    assert re.search(r'mIoU: -?\d', out), out[-3000:]


@pytest.mark.parametrize('config', SEG_CONFIGS, ids=ids(SEG_CONFIGS))
def test_mmseg_init_model_and_inference_model(config, data_root):
    from mmseg.apis import inference_model, init_model
    model = init_model(str(config), device='cpu')
    image = np.random.default_rng(0).integers(0, 255, (96, 130, 3),
                                              dtype=np.uint8)
    result = inference_model(model, image)
    seg = result.pred_sem_seg.data
    assert tuple(seg.shape) == (1, 96, 130)
    assert int(seg.max()) < model.decode_head.num_classes


# ----------------------------------------------------------------------
# Wiring errors, in mmdet's own entry points.
def test_neck_mismatch_is_a_value_error_in_init_detector():
    from mmdet.apis import init_detector
    cfg = Config.fromfile(ROOT / 'configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py')
    cfg.model.neck.in_channels = [256, 512, 1024, 2048]
    with pytest.raises(ValueError, match='^' + re.escape(
            'model.neck.in_channels=[256, 512, 1024, 2048] does not match '
            'the backbone: VBResNet with out_indices=(0, 1, 2, 3) gives '
            'out_channels [32, 64, 128, 256]. Set neck.in_channels=[32, 64, '
            "128, 256] or 'auto'.") + '$'):
        init_detector(cfg, device='cpu')


def test_neck_mismatch_is_a_value_error_in_mmdet_train_tool(data_root):
    config = ROOT / 'configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py'
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(MMDET_TOOLS / 'train.py'), str(config),
         '--work-dir', str(data_root / 'bad'), '--cfg-options',
         'model.neck.in_channels=[8,16,32,64]'],
        cwd=data_root, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0
    assert ('ValueError: model.neck.in_channels=[8, 16, 32, 64] does not '
            'match the backbone: VBResNet') in proc.stderr, proc.stderr[-3000:]
