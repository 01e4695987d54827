"""Configs, tools, the toy dataset, resume and multi-process training.

Everything here runs the real thing: mmengine's Runner through
``tools/train.py`` and ``tools/test.py`` in subprocesses, mmdet's CocoMetric,
and torchrun for the multi-process run.
"""
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from conftest import train_step_and_predict
from vb_plugin.apis import (build_detector, load_config,
                            synthetic_detection_batch, wire_neck_channels)
from vb_plugin.datasets import TOY_CLASSES, make_toy_coco

ROOT = Path(__file__).resolve().parents[1]
TOY_CONFIG = ROOT / 'configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py'
# Detection configs; configs/seg/ has its own test (tests/test_segmentation.py).
CONFIGS = sorted(p for p in (ROOT / 'configs').rglob('*.py')
                 if '_base_' not in p.parts and 'seg' not in p.parts)


def test_toy_dataset_is_deterministic_and_valid(tmp_path):
    a = make_toy_coco(tmp_path / 'a', {'train': 6, 'val': 3}, seed=1)
    b = make_toy_coco(tmp_path / 'b', {'train': 6, 'val': 3}, seed=1)
    for split in ('train', 'val'):
        assert a[split].read_bytes() == b[split].read_bytes()
        for img in sorted((tmp_path / 'a' / split).iterdir()):
            assert img.read_bytes() == (tmp_path / 'b' / split /
                                        img.name).read_bytes()
    other = make_toy_coco(tmp_path / 'c', {'train': 6}, seed=2)
    assert other['train'].read_bytes() != a['train'].read_bytes()

    ann = json.loads(a['train'].read_text())
    assert [c['name'] for c in ann['categories']] == list(TOY_CLASSES)
    assert len(ann['images']) == 6 and ann['annotations']
    for obj in ann['annotations']:
        x, y, w, h = obj['bbox']
        assert 0 <= x and 0 <= y and x + w <= 160 and y + h <= 160
        assert w > 4 and h > 4 and 0 < obj['area'] <= w * h
        poly = obj['segmentation'][0]
        assert len(poly) >= 6 and len(poly) % 2 == 0
        xs, ys = poly[0::2], poly[1::2]
        assert min(xs) >= x - 1 and max(xs) <= x + w + 1
        assert min(ys) >= y - 1 and max(ys) <= y + h + 1


def test_neck_in_channels_auto_and_mismatch():
    cfg = load_config(str(TOY_CONFIG))
    assert cfg.model.neck.in_channels == 'auto'
    assert wire_neck_channels(cfg) == (32, 64, 128, 256)
    assert cfg.model.neck.in_channels == [32, 64, 128, 256]

    cfg = load_config(str(TOY_CONFIG))
    cfg.model.neck.in_channels = [256, 512, 1024, 2048]
    with pytest.raises(ValueError, match=(
            r'model\.neck\.in_channels=\[256, 512, 1024, 2048\] does not '
            r'match the backbone: VBResNet with out_indices=\(0, 1, 2, 3\) '
            r'gives out_channels \[32, 64, 128, 256\]\. Set '
            r"neck\.in_channels=\[32, 64, 128, 256\] or 'auto'\.")):
        wire_neck_channels(cfg)


def neck_cfg(neck, **backbone):
    return Config(dict(model=dict(
        backbone=dict(type='VBResNet', depth=18, base_channels=8,
                      **backbone),
        neck=neck)))


def test_neck_in_channels_int():
    """An int is a neck that takes one map (YOLOF's DilatedEncoder): checked
    against a one-output backbone, refused with a clear TypeError for a
    multi-output one (it used to be "'int' object is not iterable")."""
    cfg = neck_cfg(dict(type='FPN', in_channels=64))
    with pytest.raises(TypeError, match='^' + re.escape(
            'model.neck.in_channels=64 is an int, but VBResNet with '
            'out_indices=(0, 1, 2, 3) gives out_channels [8, 16, 32, 64], one '
            "map per output: set neck.in_channels=[8, 16, 32, 64] or 'auto' "
            '(an int is for a neck that takes a single map, behind a '
            'backbone with one output)') + '$'):
        wire_neck_channels(cfg)
    cfg = neck_cfg(dict(type='DilatedEncoder', in_channels=64),
                   out_indices=(3, ))
    assert wire_neck_channels(cfg) == (64, )
    assert cfg.model.neck.in_channels == 64
    cfg.model.neck.in_channels = 2048
    with pytest.raises(ValueError, match='^' + re.escape(
            'model.neck.in_channels=2048 does not match the backbone: '
            'VBResNet with out_indices=(3,) gives out_channels [64]. Set '
            'neck.in_channels=64.') + '$'):
        wire_neck_channels(cfg)
    for bad, shown in (('all', "'all' (str)"), ([8, '16'], "[8, '16'] (list)"),
                       (8.0, '8.0 (float)')):
        with pytest.raises(TypeError, match='^' + re.escape(
                "model.neck.in_channels must be 'auto' or a list of ints "
                f'(one per backbone output), got {shown}; VBResNet with '
                'out_indices=(0, 1, 2, 3) gives out_channels [8, 16, 32, 64]'
        ) + '$'):
            wire_neck_channels(neck_cfg(dict(type='FPN', in_channels=bad)))


def test_list_of_necks_wires_the_first():
    """mmdet's neck=[FPN, DyHead] (ATSS-DyHead): the first neck takes the
    backbone's outputs; it used to be skipped, so 'auto' reached FPN."""
    from mmengine.registry import MODELS
    necks = [dict(type='FPN', in_channels='auto', out_channels=16,
                  num_outs=5),
             dict(type='DyHead', in_channels=16, out_channels=16,
                  num_blocks=1)]
    cfg = neck_cfg(necks)
    assert wire_neck_channels(cfg) == (8, 16, 32, 64)
    assert cfg.model.neck[0].in_channels == [8, 16, 32, 64]
    assert cfg.model.neck[1].in_channels == 16
    backbone = MODELS.build(cfg.model.backbone).eval()
    neck = MODELS.build(cfg.model.neck).eval()   # an nn.Sequential
    with torch.no_grad():
        outs = neck(backbone(torch.rand(1, 3, 128, 128)))
    assert [o.shape[1] for o in outs] == [16] * 5

    cfg = neck_cfg(copy.deepcopy(necks))
    cfg.model.neck[0].in_channels = [64, 128, 256, 512]
    with pytest.raises(ValueError, match='^' + re.escape(
            'model.neck[0].in_channels=[64, 128, 256, 512] does not match '
            'the backbone: VBResNet with out_indices=(0, 1, 2, 3) gives '
            'out_channels [8, 16, 32, 64]. Set neck[0].in_channels=[8, 16, '
            "32, 64] or 'auto'.") + '$'):
        wire_neck_channels(cfg)
    cfg = neck_cfg(copy.deepcopy(necks))
    cfg.model.neck[1].in_channels = 'auto'
    with pytest.raises(ValueError, match='^' + re.escape(
            "model.neck[1].in_channels='auto': only the first neck of a list "
            "takes the backbone's outputs and can be 'auto'; model.neck[1] "
            '(DyHead) takes the outputs of model.neck[0]: write its '
            'in_channels') + '$'):
        wire_neck_channels(cfg)


def test_runner_config_flags(tmp_path):
    from vb_plugin.apis import setup_runner_config
    cfg = setup_runner_config(load_config(str(TOY_CONFIG)), str(TOY_CONFIG))
    assert cfg.work_dir == 'work_dirs/mask-rcnn_vb-r18_fpn_toy'
    assert cfg.launcher == 'none' and not cfg.get('resume', False)
    assert cfg.model.neck.in_channels == [32, 64, 128, 256]
    assert dict(type='RNGStateHook') in cfg.custom_hooks
    cfg = setup_runner_config(load_config(str(TOY_CONFIG)), str(TOY_CONFIG),
                              work_dir=str(tmp_path), resume='auto')
    assert (cfg.work_dir, cfg.resume, cfg.load_from) == (str(tmp_path), True,
                                                         None)
    cfg = setup_runner_config(load_config(str(TOY_CONFIG)), str(TOY_CONFIG),
                              resume='x/iter_2.pth')
    assert (cfg.resume, cfg.load_from) == (True, 'x/iter_2.pth')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r'amp=True \(--amp\) needs a '
                           r'GPU'):
            setup_runner_config(load_config(str(TOY_CONFIG)),
                                str(TOY_CONFIG), amp=True)


TIMM_TOY = ROOT / 'configs/mask_rcnn/mask-rcnn_vb-timm-resnet18d_fpn_toy.py'
#: regnetx_002 builds its BNs as timm's BatchNormAct2d (norm + act).
NORM_ACT_OPTIONS = {'model.backbone.model_name': 'regnetx_002'}


def test_sync_bn_keeps_timm_norm_act_layers():
    """With sync_bn, mmengine's Runner converts the model with
    mmengine.model.convert_sync_batchnorm, which turns timm's BatchNormAct2d
    into a plain SyncBatchNorm that drops the activation. setup_runner_config
    hands sync_bn to VBDistributedDataParallel instead, whose conversion
    keeps it: the same eval outputs, layer for layer."""
    from conftest import max_abs_diff, randomize_bn
    from mmengine.model import MMDistributedDataParallel
    from mmengine.model import convert_sync_batchnorm as mmengine_convert
    from mmengine.registry import MODEL_WRAPPERS
    from timm.layers import BatchNormAct2d
    from timm.layers.norm_act import SyncBatchNormAct

    from vb_plugin.apis import setup_runner_config
    from vb_plugin.layers import (VBDistributedDataParallel,
                                  convert_sync_batchnorm)
    cfg = load_config(str(TIMM_TOY), dict(NORM_ACT_OPTIONS, sync_bn='torch'))
    setup_runner_config(cfg, str(TIMM_TOY))
    assert 'sync_bn' not in cfg   # so the Runner does not convert
    assert cfg.model_wrapper_cfg == dict(
        type='VBDistributedDataParallel', broadcast_buffers=False,
        find_unused_parameters=False, sync_bn='torch')
    wrapper = MODEL_WRAPPERS.get(cfg.model_wrapper_cfg.type)
    assert wrapper is VBDistributedDataParallel
    assert issubclass(wrapper, MMDistributedDataParallel)

    # What the wrapper does to the model before DDP (DDP itself refuses
    # SyncBatchNorm on CPU), against what the Runner would have done.
    model = randomize_bn(build_detector(cfg, pretrained=False)).eval()
    num_norm_act = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    assert num_norm_act == 44
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.extract_feat(x)
        synced = convert_sync_batchnorm(copy.deepcopy(model),
                                        cfg.model_wrapper_cfg.sync_bn).eval()
        assert sum(type(m) is SyncBatchNormAct
                   for m in synced.modules()) == num_norm_act
        assert not any(type(m) is torch.nn.BatchNorm2d
                       for m in synced.modules())
        assert max_abs_diff(synced.extract_feat(x), ref) <= 1e-5
        mangled = mmengine_convert(copy.deepcopy(model), 'torch').eval()
        assert max_abs_diff(mangled.extract_feat(x), ref) > 0.1


def test_sync_bn_config_checks():
    from vb_plugin.apis import setup_runner_config

    # Without timm norm-act layers, mmengine's conversion is right: as is.
    cfg = load_config(str(TOY_CONFIG), {'sync_bn': 'torch'})
    setup_runner_config(cfg, str(TOY_CONFIG))
    assert cfg.sync_bn == 'torch' and 'model_wrapper_cfg' not in cfg
    # A wrapper of the config keeps its arguments.
    cfg = load_config(str(TIMM_TOY), dict(
        NORM_ACT_OPTIONS, sync_bn='torch',
        model_wrapper_cfg=dict(type='MMDistributedDataParallel',
                               find_unused_parameters=True)))
    setup_runner_config(cfg, str(TIMM_TOY))
    assert cfg.model_wrapper_cfg == dict(type='VBDistributedDataParallel',
                                         find_unused_parameters=True,
                                         sync_bn='torch')
    errors = [
        ({'sync_bn': 'nccl'}, "sync_bn='nccl' is not valid; use one of "
         "('torch', 'mmcv')"),
        ({'sync_bn': 'mmcv'}, "sync_bn='mmcv': VBTimmBackbone has 44 timm "
         'norm-act layers (BatchNormAct2d, e.g. body.stem.bn), and mmcv\'s '
         'SyncBatchNorm has no form with an activation (it would drop '
         "theirs); use sync_bn='torch', which converts them to timm's "
         'SyncBatchNormAct'),
        ({'sync_bn': 'torch', 'model_wrapper_cfg': dict(
            type='MMFullyShardedDataParallel')},
         "sync_bn='torch' with model_wrapper_cfg type "
         "'MMFullyShardedDataParallel': VBTimmBackbone has 44 timm norm-act "
         'layers (BatchNormAct2d, e.g. body.stem.bn), whose activation '
         "mmengine's conversion would drop. vb_plugin converts them in its "
         'VBDistributedDataParallel (an MMDistributedDataParallel); use that '
         'wrapper, or convert the model with '
         'vb_plugin.layers.convert_sync_batchnorm in yours'),
    ]
    for options, message in errors:
        cfg = load_config(str(TIMM_TOY), dict(NORM_ACT_OPTIONS, **options))
        with pytest.raises(ValueError, match='^' + re.escape(message) + '$'):
            setup_runner_config(cfg, str(TIMM_TOY))
    if not torch.cuda.is_available():
        for config, options in ((TOY_CONFIG, {}), (TIMM_TOY, NORM_ACT_OPTIONS)):
            cfg = load_config(str(config), dict(options, sync_bn='torch'))
            with pytest.raises(ValueError, match='^' + re.escape(
                    "sync_bn='torch' needs GPUs: torch's "
                    'DistributedDataParallel refuses SyncBatchNorm layers in '
                    'CPU modules; drop sync_bn for multi-process training on '
                    'CPU') + '$'):
                setup_runner_config(cfg, str(config), launcher='pytorch')


# NOTE: the ViTDet-B COCO configs train a full ViT-B at 1024x1024 LSJ: about
# 3 min per step on 2 CPU cores, so they run with the slow tests (their
# build and inference stay in tests/test_entry_points.py's fast ones).
STEP_CONFIGS = [pytest.param(p, marks=pytest.mark.slow)
                if 'vitdet' in p.stem and 'lsj' in p.stem else p
                for p in CONFIGS]


@pytest.mark.parametrize('config', STEP_CONFIGS,
                         ids=[p.stem for p in CONFIGS])
def test_every_config_builds_and_trains_one_step(config):
    cfg = load_config(str(config))
    model = build_detector(cfg, pretrained=False)
    assert list(model.backbone.out_channels) == cfg.model.neck.in_channels
    num_classes = cfg.model.roi_head.bbox_head.num_classes \
        if 'roi_head' in cfg.model else cfg.model.bbox_head.num_classes
    batch = synthetic_detection_batch(num_images=2, size=(128, 160),
                                      num_classes=num_classes)
    losses, preds = train_step_and_predict(model, batch)
    assert torch.isfinite(losses['loss'])
    assert len(preds) == 2


AMP_CONFIG = ROOT / 'configs/mask_rcnn/mask-rcnn_vb-r50_fpn_amp-1x_coco.py'


def test_amp_config_is_the_r50_config_with_fp16_amp():
    from mmengine.optim import build_optim_wrapper
    amp = load_config(str(AMP_CONFIG))
    plain = load_config(
        str(ROOT / 'configs/mask_rcnn/mask-rcnn_vb-r50_fpn_1x_coco.py'))
    assert amp.model == plain.model
    assert amp.optim_wrapper.optimizer == plain.optim_wrapper.optimizer
    assert (amp.optim_wrapper.type, amp.optim_wrapper.dtype,
            amp.optim_wrapper.loss_scale) == ('AmpOptimWrapper', 'float16',
                                              'dynamic')
    model = torch.nn.Conv2d(3, 4, 1)
    if torch.cuda.is_available():
        wrapper = build_optim_wrapper(model.cuda(), amp.optim_wrapper)
        assert wrapper.cast_dtype == torch.float16
    else:  # mmengine's AmpOptimWrapper refuses the CPU
        with pytest.raises(AssertionError, match='only available training '
                           'on gpu, npu, mlu or musa'):
            build_optim_wrapper(model, amp.optim_wrapper)


def test_demo_summary_reports_the_metrics_the_config_has():
    from vb_plugin.apis import metric_lines
    boxes = {'coco/bbox_mAP': 0.512, 'coco/bbox_mAP_50': 0.8,
             'coco/bbox_mAP_75': 0.5}
    assert metric_lines(boxes) == ['  bbox AP:    0.512 (AP50 0.800)']
    masks = dict(boxes, **{'coco/segm_mAP': 0.25, 'coco/segm_mAP_50': 0.6})
    assert metric_lines(masks) == ['  bbox AP:    0.512 (AP50 0.800)',
                                   '  segm AP:    0.250 (AP50 0.600)']
    assert metric_lines({'pascal_voc/mAP': 0.5}) == [
        "  metrics:    {'pascal_voc/mAP': 0.5}"]


def test_demo_runs_a_boxes_only_config(tmp_path, monkeypatch):
    """tools/demo.py's run_demo on the DETR toy config (bbox metric only):
    it used to stop with KeyError: 'coco/segm_mAP' (and, before that, on
    persistent_workers without workers in the val loader). It reads the
    dataset from data_root (there is no data/toy_coco in the working
    directory), not from the config's own data_root."""
    from vb_plugin.apis import run_demo
    monkeypatch.chdir(tmp_path)
    data = tmp_path / 'somewhere' / 'toy'
    make_toy_coco(data, {'train': 4, 'val': 2}, seed=0)
    summary = run_demo(str(ROOT / 'configs/detr/detr_vb-r18_toy.py'),
                       str(tmp_path / 'work'), data_root=str(data),
                       max_iters=1)
    assert re.search(r'^  bbox AP:    \d\.\d{3} \(AP50 \d\.\d{3}\)$', summary,
                     re.M), summary
    assert 'segm' not in summary
    assert (tmp_path / 'work' / 'iter_1.pth').is_file()


def run_tool(tool, *args, cwd, timeout=900, env=None):
    cmd = [sys.executable, str(ROOT / 'tools' / tool), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def logged_losses(work_dir):
    rows = []
    for scalars in sorted(Path(work_dir).glob('*/vis_data/scalars.json')):
        for line in scalars.read_text().splitlines():
            row = json.loads(line)
            if 'loss' in row:
                rows.append({k: v for k, v in row.items()
                             if k.startswith('loss') or k == 'iter'})
    return rows


@pytest.fixture(scope='module')
def small_toy(tmp_path_factory):
    root = tmp_path_factory.mktemp('toy')
    make_toy_coco(root / 'data' / 'toy_coco', {'train': 16, 'val': 4})
    return root


SHORT_RUN = ['train_cfg.val_interval=1000', 'default_hooks.logger.interval=1',
             'default_hooks.checkpoint.interval=2',
             'train_dataloader.batch_size=2']


def test_resume_equals_uninterrupted_run(small_toy):
    full, split = small_toy / 'full', small_toy / 'split'
    run_tool('train.py', TOY_CONFIG, '--work-dir', full, '--cfg-options',
             'train_cfg.max_iters=4', *SHORT_RUN, cwd=small_toy)
    run_tool('train.py', TOY_CONFIG, '--work-dir', split, '--cfg-options',
             'train_cfg.max_iters=2', *SHORT_RUN, cwd=small_toy)
    proc = run_tool('train.py', TOY_CONFIG, '--work-dir', split, '--resume',
                    '--cfg-options', 'train_cfg.max_iters=4', *SHORT_RUN,
                    cwd=small_toy)
    assert 'Auto resumed from the latest checkpoint' in proc.stdout + \
        proc.stderr
    # Same losses at every iteration, before and after the interruption.
    full_log, split_log = logged_losses(full), logged_losses(split)
    assert [r['iter'] for r in full_log] == [1, 2, 3, 4]
    assert full_log == split_log
    # Same final weights, bit for bit.
    from vb_plugin.weights import read_checkpoint
    a = read_checkpoint(full / 'iter_4.pth')
    b = read_checkpoint(split / 'iter_4.pth')
    assert a['meta']['iter'] == b['meta']['iter'] == 4
    assert a['state_dict'].keys() == b['state_dict'].keys()
    for key, value in a['state_dict'].items():
        assert torch.equal(value, b['state_dict'][key]), key


def test_two_process_training_on_cpu(small_toy):
    work_dir = small_toy / 'dist'
    env = dict(os.environ, PYTHON=sys.executable, PORT='29517',
               OMP_NUM_THREADS='1')
    proc = subprocess.run(
        ['bash', str(ROOT / 'tools' / 'dist_train.sh'), str(TOY_CONFIG), '2',
         '--work-dir', str(work_dir), '--cfg-options',
         'train_cfg.max_iters=2', *SHORT_RUN],
        cwd=small_toy, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (proc.stdout + proc.stderr)
    assert 'Distributed launcher: pytorch' in log
    assert 'Distributed training: True' in log
    assert 'GPU number: 2' in log  # mmengine's name for the world size
    from vb_plugin.weights import read_checkpoint
    ckpt = read_checkpoint(work_dir / 'iter_2.pth')
    assert ckpt['meta']['iter'] == 2
    assert any(k.startswith('backbone.layer4') for k in ckpt['state_dict'])


def coco_metrics(output):
    import re
    found = dict(re.findall(r'(coco/\w+): (-?[\d.]+)', output))
    return {k: float(v) for k, v in found.items()}


@pytest.mark.slow
def test_demo_schedule_learns_and_survives_resume(tmp_path):
    """train (interrupted half-way) -> resume -> evaluate with tools/test.py,
    against the same evaluation of the untrained model."""
    make_toy_coco(tmp_path / 'data' / 'toy_coco')
    cfg = Config.fromfile(TOY_CONFIG)
    half = cfg.train_cfg.max_iters // 2
    work = tmp_path / 'work'
    no_val = ['train_cfg.val_begin=1000000']
    run_tool('train.py', TOY_CONFIG, '--work-dir', work, '--cfg-options',
             f'train_cfg.max_iters={half}', *no_val, cwd=tmp_path,
             timeout=3600)
    run_tool('train.py', TOY_CONFIG, '--work-dir', work, '--resume',
             '--cfg-options', *no_val, cwd=tmp_path, timeout=3600)
    final = work / f'iter_{cfg.train_cfg.max_iters}.pth'
    trained = coco_metrics(run_tool('test.py', TOY_CONFIG, final,
                                    '--work-dir', tmp_path / 'eval',
                                    cwd=tmp_path).stdout)

    torch.manual_seed(0)
    untrained_model = build_detector(load_config(str(TOY_CONFIG)),
                                     pretrained=False)
    untrained_ckpt = tmp_path / 'untrained.pth'
    torch.save({'state_dict': untrained_model.state_dict()}, untrained_ckpt)
    untrained = coco_metrics(run_tool('test.py', TOY_CONFIG, untrained_ckpt,
                                      '--work-dir', tmp_path / 'eval0',
                                      cwd=tmp_path).stdout)
    print(f'bbox mAP trained {trained["coco/bbox_mAP"]:.3f} vs untrained '
          f'{untrained["coco/bbox_mAP"]:.3f}; segm mAP trained '
          f'{trained["coco/segm_mAP"]:.3f} vs untrained '
          f'{untrained["coco/segm_mAP"]:.3f}')
    assert untrained['coco/bbox_mAP'] < 0.01
    assert untrained['coco/segm_mAP'] < 0.01
    assert trained['coco/bbox_mAP'] >= 0.5
    assert trained['coco/segm_mAP'] >= 0.5


DUMP_HOOK = '''
import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class DumpWeightsHook(Hook):
    """Every rank saves the parameters it ends training with (BN running
    statistics are per rank: mmengine's DDP does not broadcast buffers)."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def after_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) \\
            else runner.model
        torch.save(dict(model.named_parameters()),
                   f'{self.out_dir}/rank{dist.get_rank()}.pth')
'''


def test_two_nodes_of_one_process_train_the_same_weights(small_toy):
    """Two "nodes" on 127.0.0.1, as a cluster runs mmdet's dist_train.sh:
    two torchrun invocations with NNODES=2 and their own NODE_RANK. Each
    rank saves the parameters it ends with; after two iterations they are
    equal, and equal to the checkpoint rank 0 saved."""
    out = small_toy / 'nodes'
    out.mkdir()
    (out / 'dump_weights_hook.py').write_text(DUMP_HOOK)
    config = out / 'two_nodes.py'
    config.write_text(
        f"_base_ = '{TOY_CONFIG}'\n"
        "custom_imports = dict(imports=['vb_plugin', 'dump_weights_hook'],\n"
        "                      allow_failed_imports=False)\n"
        f"custom_hooks = [dict(type='DumpWeightsHook', out_dir='{out}')]\n")
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, PYTHON=sys.executable, PORT='29533',
                   NNODES='2', NODE_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                   OMP_NUM_THREADS='1',
                   PYTHONPATH=f"{out}{os.pathsep}"
                   f"{os.environ.get('PYTHONPATH', '')}")
        procs.append(subprocess.Popen(
            ['bash', str(ROOT / 'tools' / 'dist_train.sh'), str(config), '1',
             '--work-dir', str(out / 'work'), '--cfg-options',
             'train_cfg.max_iters=2', *SHORT_RUN],
            cwd=small_toy, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=env))
    try:
        logs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert 'Distributed training: True' in logs[0]
    assert 'GPU number: 2' in logs[0]   # mmengine's name for the world size
    a = torch.load(out / 'rank0.pth', weights_only=True)
    b = torch.load(out / 'rank1.pth', weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    from vb_plugin.weights import read_checkpoint
    saved = read_checkpoint(out / 'work' / 'iter_2.pth')['state_dict']
    assert all(torch.equal(saved[k], a[k]) for k in a)


def test_slurm_train_matches_mmdets():
    """tools/slurm_train.sh takes mmdet's arguments and variables and gives
    srun the same options (not run here: no Slurm)."""
    import mmdet
    ours = (ROOT / 'tools' / 'slurm_train.sh').read_text()
    theirs = (Path(mmdet.__file__).parent / '.mim' / 'tools' /
              'slurm_train.sh').read_text()
    pattern = re.compile(r'^\s*(--[\w-]+=\S+|\w+=\$\{[^}]+\}|\w+=\$\d)',
                         re.M)
    assert [o for o in pattern.findall(ours)
            if not o.startswith('PYTHON=')] == pattern.findall(theirs)
    assert '--launcher="slurm"' in ours
    proc = subprocess.run(['bash', '-n', str(ROOT / 'tools' /
                                             'slurm_train.sh')])
    assert proc.returncode == 0
