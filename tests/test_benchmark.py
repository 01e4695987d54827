"""The benchmark library and tools/benchmark.py: rows, output schema, CLI.

No timing assertions: only structure, schema and correctness.
"""
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vb_plugin import benchmark as bm

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(height=32, width=32, warmup=0, iters=2, threads=1)
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _load_tool():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'benchmark_tool', ROOT / 'tools' / 'benchmark.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_rows_puts_vb_first_then_importable_peers_then_forms():
    rows = bm.make_rows(['resnet18'], forms=('optimized', 'bf16'))
    assert [r.kind for r in rows] == ['vb', 'peer', 'peer', 'peer',
                                      'optimized', 'bf16']
    assert rows[0].name == 'VBResNet'
    assert {r.name for r in rows if r.kind == 'peer'} == {
        'mmdet ResNet', 'timm resnet18', 'HF ResNetBackbone'}
    # mmpretrain is not installed here: its row is left out, not an error.
    names = [r.name for r in bm.make_rows(['convnext_atto'])]
    assert ('mmpretrain ConvNeXt' in names) == bm._importable('mmpretrain')


@pytest.mark.parametrize('kwargs,match', [
    (dict(archs=['resnet51']), "arch='resnet51'"),
    (dict(archs=['resnet18'], forms=['fast']), "form='fast'"),
])
def test_make_rows_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bm.make_rows(**kwargs)


@pytest.mark.parametrize('field,value,match', [
    ('mode', 'speed', "mode='speed'"),
    ('dtype', 'fp16', "dtype='fp16'"),
    ('iters', 0, 'iters=0'),
    ('warmup', -1, 'warmup=-1'),
])
def test_settings_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        bm.Settings(**{field: value}).check()
    with pytest.raises(ValueError, match='config'):
        bm.Settings(mode='detector').check()


@pytest.mark.parametrize('arch', ['resnet18', 'convnext_atto',
                                  'regnetx_400mf'])
def test_every_peer_gives_the_vb_shapes(arch):
    x = torch.rand(1, 3, 64, 64)
    shapes = {}
    for row in bm.make_rows([arch], forms=()):
        model = row.build()
        model.eval()  # NOTE: mmdet's ResNet.train() returns None
        with torch.inference_mode():
            outs = model(x)
        shapes[row.name] = [tuple(o.shape) for o in outs]
    first = next(iter(shapes.values()))
    assert all(s == first for s in shapes.values()), shapes


def test_percentile_and_busy_warning():
    assert bm.percentile([5.], 90) == 5.
    assert bm.percentile([1, 2, 3, 4, 5], 90) == pytest.approx(4.6)
    assert bm.busy_warning(100., 2) is not None


@pytest.mark.parametrize('load, threads, own, busy', [
    (0.6, 2, False, False),   # an idle 2-core machine after a command
    (1.0, 2, False, False),
    (1.2, 2, False, True),    # another process on more than a core
    (2.0, 2, True, False),    # our own two threads at the end of a run
    (3.2, 2, True, True),
    (1.8, 1, False, False),   # one thread leaves a core free
    (2.5, 1, False, True),
])
def test_busy_warning_on_two_cores(monkeypatch, load, threads, own, busy):
    monkeypatch.setattr(bm.measure.os, 'cpu_count', lambda: 2)
    warning = bm.busy_warning(load, threads, includes_own=own)
    assert (warning is not None) == busy
    if busy:
        assert warning.startswith(f'the machine is busy: load average '
                                  f'{load:.2f} on 2 cores')


def _run(tmp_path, rows, **settings):
    out = bm.run_benchmark(rows, bm.Settings(**{**TINY, **settings}),
                           progress=False, log=lambda s: None)
    return out, bm.write_outputs(out, tmp_path)


def test_outputs_schema(tmp_path):
    rows = bm.make_rows(['resnet18'], forms=('optimized', ))
    out, paths = _run(tmp_path, rows)
    with open(paths['csv']) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bm.COLUMNS
        records = list(reader)
    assert [r['name'] for r in records] == [r.name for r in rows]
    data = json.loads(paths['json'].read_text())
    assert set(data) == {'meta', 'rows'}
    for key in ('settings', 'torch', 'threads', 'peak', 'cpu_count',
                'load_average_start', 'load_average_end', 'busy_warning'):
        assert key in data['meta']
    assert data['meta']['threads'] == 1
    assert {'matmul_gflops', 'conv_gflops', 'peak_gflops'} <= set(
        data['meta']['peak'])
    for row in data['rows']:
        assert set(row) == set(bm.COLUMNS)
        assert row['median_ms'] > 0 and row['p10_ms'] <= row['p90_ms']
        assert row['params_m'] > 0 and row['gmacs'] > 0
        assert row['pct_of_peak'] > 0
    vb, opt = data['rows'][0], data['rows'][-1]
    assert vb['ratio_to_first'] == 1 and vb['max_abs_diff'] is None
    assert opt['memory_format'] == 'channels_last'
    assert opt['max_abs_diff'] <= 1e-4
    assert opt['gmacs'] == vb['gmacs']
    png = paths['png'].read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 1000
    assert paths['md'].read_text().startswith('| arch')


@pytest.mark.parametrize('mode', ['neck', 'train'])
def test_neck_and_train_modes(tmp_path, mode):
    rows = bm.make_rows(['regnetx_400mf'],
                        forms=() if mode == 'train' else ('optimized', ))
    out, _ = _run(tmp_path, rows, mode=mode, complexity=False)
    assert all(r.mode == mode and r.median_ms > 0 for r in out['rows'])
    assert all(not r.note.startswith('failed') for r in out['rows'])
    if mode == 'neck':
        assert out['rows'][-1].max_abs_diff <= 1e-4


def test_vitdet_rows_are_the_windowed_and_the_global_vit_b():
    """vitdet_b16: ViTDet-B's backbone (window 14, global blocks 2, 5, 8,
    11) next to the same backbone with every block global, same tables."""
    assert 'vitdet_b16' in bm.ARCHITECTURES
    rows = bm.make_rows(['vitdet_b16'], forms=())
    assert [(r.name, r.kind) for r in rows] == [
        ('VB ViT-B/16 windowed (ViTDet)', 'vb'),
        ('VB ViT-B/16 global attention', 'peer')]
    windowed, global_ = (row.build() for row in rows)
    assert [b.attn.window_size for b in windowed.body.model.blocks] == \
        [14, 14, 0] * 4
    assert [b.attn.window_size for b in global_.body.model.blocks] == [0] * 12
    for model in (windowed, global_):
        assert model.out_indices == (3, ) and tuple(model.out_channels) == (768, )
        # NOTE: ViTDet-B's tables: 127 rows in global blocks (1024 / 16).
        assert tuple(model.body.model.blocks[2].attn.rel_pos_h.shape) == (
            127, 64)


@pytest.mark.parametrize('mode', ['backbone', 'train'])
def test_cli_vitdet_rows_at_a_small_size(tmp_path, capsys, mode):
    tool = _load_tool()
    out = tool.main(['--arch', 'vitdet_b16', '--mode', mode, '--size', '64',
                     '96', '--warmup', '0', '--iters', '1', '--threads', '1',
                     '--forms', '--no-progress', '--out-dir', str(tmp_path)])
    printed = capsys.readouterr().out
    assert 'vitdet_b16: fastest peer VB ViT-B/16 global attention' in printed
    rows = out['rows']
    assert [r.kind for r in rows] == ['vb', 'peer']
    for r in rows:
        assert r.note == '' and math.isfinite(r.median_ms), r
        assert r.gmacs > 0 and r.peak_mem_mb >= 0
    if mode == 'train':
        # NOTE: both freeze the stem and blocks 0-2 (frozen_stages=1), as
        # every other architecture's training rows (the global form's
        # tables are larger: 127 rows in every block).
        for r, frozen in zip(rows, ('22,028,672', '22,054,272')):
            assert r.frozen.startswith(f'frozen_stages=1: {frozen} of '), r


def test_attention_macs_are_counted():
    """Fused attention (timm's ViTs, the windowed form) is counted: q @ k^T
    and attn @ v, next to the linear layers."""
    from timm.layers.attention import Attention
    attn = Attention(32, num_heads=2).eval()
    tokens, dim = 50, 32
    linear = tokens * dim * 3 * dim + tokens * dim * dim
    _, gmacs = bm.count_complexity(attn, torch.rand(1, tokens, dim))
    assert gmacs * 1e9 == linear + 2 * tokens * tokens * dim


def test_failed_row_is_recorded_not_fatal(tmp_path):
    def broken(train=False):
        raise RuntimeError('boom')

    rows = [bm.Row('x', 'broken', 'peer', broken)]
    out, paths = _run(tmp_path, rows, complexity=False)
    assert out['rows'][0].note.startswith('failed: RuntimeError: boom')
    assert math.isnan(out['rows'][0].median_ms)
    assert paths['png'].exists()


def test_cli_main_end_to_end(tmp_path, capsys):
    tool = _load_tool()
    out = tool.main(['--arch', 'resnet18', '--no-peers', '--size', '32', '32',
                     '--warmup', '0', '--iters', '2', '--threads', '1',
                     '--forms', 'optimized', 'bf16', '--no-progress',
                     '--out-dir', str(tmp_path)])
    printed = capsys.readouterr().out
    assert '| VBResNet optimized' in printed and 'load average' in printed
    assert [r.kind for r in out['rows']] == ['vb', 'optimized', 'bf16']
    bf16 = out['rows'][-1]
    assert bf16.dtype == 'bf16' and bf16.note == ''
    for ext in ('csv', 'json', 'png', 'md'):
        assert (tmp_path / f'benchmark.{ext}').is_file()


def test_cli_detector_mode(tmp_path):
    tool = _load_tool()
    config = ROOT / 'configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py'
    out = tool.main(['--mode', 'detector', '--config', str(config),
                     '--size', '64', '64', '--warmup', '0', '--iters', '1',
                     '--threads', '1', '--no-complexity', '--no-progress',
                     '--out-dir', str(tmp_path)])
    names = [r.name for r in out['rows']]
    assert names == [config.stem, f'{config.stem} optimized']
    assert all(not r.note for r in out['rows']), out['rows']
    assert out['rows'][-1].max_abs_diff <= 1e-4


@pytest.mark.slow
def test_cli_subprocess(tmp_path):
    cmd = [sys.executable, str(ROOT / 'tools' / 'benchmark.py'), '--arch',
           'convnext_atto', '--size', '32', '32', '--warmup', '0', '--iters',
           '1', '--threads', '1', '--out-dir', str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / 'benchmark.json').read_text())['rows']


def test_rows_are_timed_interleaved_in_rotating_order():
    calls = []
    fns = [lambda k=k: calls.append(k) for k in range(3)]
    times = bm.time_interleaved(fns, iters=4)
    assert [len(t) for t in times] == [4, 4, 4]
    # Round i runs every row once, starting with row i mod 3.
    assert calls == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]


def test_all_rows_of_an_architecture_are_prepared_before_timing(monkeypatch):
    events = []
    real_prepare, real_time = bm.run._prepare_row, bm.time_interleaved

    def prepare(row, *args):
        events.append(('prepare', row.arch, row.name))
        return real_prepare(row, *args)

    def timed(fns, *args, **kwargs):
        events.append(('time', len(fns)))
        return real_time(fns, *args, **kwargs)

    monkeypatch.setattr(bm.run, '_prepare_row', prepare)
    monkeypatch.setattr(bm.run, 'time_interleaved', timed)
    rows = bm.make_rows(['resnet18', 'regnetx_400mf'], peers=False)
    out = bm.run_benchmark(rows, bm.Settings(**TINY, complexity=False),
                           progress=False, log=lambda s: None)
    assert events == [
        ('prepare', 'resnet18', 'VBResNet'),
        ('prepare', 'resnet18', 'VBResNet optimized'), ('time', 2),
        ('prepare', 'regnetx_400mf', 'VBRegNet'),
        ('prepare', 'regnetx_400mf', 'VBRegNet optimized'), ('time', 2)]
    assert all(r.iters == 2 and r.median_ms > 0 for r in out['rows'])


def test_percent_of_peak_is_of_the_rows_own_dtype():
    rows = bm.make_rows(['resnet18'], peers=False, forms=('bf16', ))
    out = bm.run_benchmark(rows, bm.Settings(**TINY), progress=False,
                           log=lambda s: None)
    meta = out['meta']
    fp32, bf16 = out['rows']
    assert (fp32.dtype, bf16.dtype) == ('fp32', 'bf16')
    assert fp32.pct_of_peak == pytest.approx(
        100 * fp32.gflops_per_s / meta['peak']['peak_gflops'])
    assert bf16.pct_of_peak == pytest.approx(
        100 * bf16.gflops_per_s / meta['peak_bf16']['peak_gflops'])
    # Without bf16 rows there is no bf16 probe.
    out = bm.run_benchmark(bm.make_rows(['resnet18'], peers=False),
                           bm.Settings(**TINY, complexity=False),
                           progress=False, log=lambda s: None)
    assert out['meta']['peak_bf16'] is None


ENGINE_FORMS = ['onnxruntime', 'onnxruntime-int8', 'openvino',
                'openvino-bf16', 'openvino-int8']


def test_cli_engine_forms(tmp_path, capsys):
    """The engine forms parse and run on a tiny model; each row is checked
    against fp32 eager within its engine tolerance (no note)."""
    tool = _load_tool()
    out = tool.main(['--arch', 'resnet18', '--no-peers', '--size', '64', '64',
                     '--warmup', '0', '--iters', '2', '--threads', '1',
                     '--forms', *ENGINE_FORMS, '--no-progress',
                     '--out-dir', str(tmp_path)])
    rows = out['rows']
    assert [r.kind for r in rows] == ['vb', *ENGINE_FORMS]
    assert [(r.memory_format, r.dtype) for r in rows[1:]] == [
        ('onnxruntime', 'fp32'), ('onnxruntime', 'int8'),
        ('openvino', 'fp32'), ('openvino', 'bf16'), ('openvino', 'int8')]
    assert all(r.note == '' for r in rows), [r.note for r in rows]
    assert all(r.median_ms > 0 for r in rows)
    assert rows[1].max_abs_diff <= 1e-4 and rows[3].max_abs_diff <= 1e-4
    assert '| VBResNet openvino-int8' in capsys.readouterr().out


def test_any_timm_model_and_any_backbone_config(tmp_path):
    """--arch timm:NAME times VBTimmBackbone next to timm's own
    features_only model; --backbone-cfg takes a dict expression or a config
    file's model.backbone."""
    tool = _load_tool()
    config = ROOT / 'configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py'
    out = tool.main(['--arch', 'timm:resnet10t', '--backbone-cfg',
                     "dict(type='VBConvNeXt', arch='atto')", '--backbone-cfg',
                     str(config), '--size', '64', '64', '--warmup', '0',
                     '--iters', '1', '--threads', '1', '--forms',
                     'optimized', '--no-complexity', '--no-progress',
                     '--out-dir', str(tmp_path)])
    assert [(r.arch, r.name, r.kind) for r in out['rows']] == [
        ('timm:resnet10t', 'VBTimmBackbone resnet10t', 'vb'),
        ('timm:resnet10t', 'timm resnet10t', 'peer'),
        ('timm:resnet10t', 'VBTimmBackbone resnet10t optimized',
         'optimized'),
        ('VBConvNeXt', 'VBConvNeXt', 'vb'),
        ('VBConvNeXt', 'VBConvNeXt optimized', 'optimized'),
        ('VBResNet', 'VBResNet', 'vb'),
        ('VBResNet', 'VBResNet optimized', 'optimized')]
    assert all(r.note == '' for r in out['rows']), out['rows']
    assert all(r.median_ms > 0 for r in out['rows'])


@pytest.mark.parametrize('text,message', [
    ('dict(arch=1)', "--backbone-cfg 'dict(arch=1)' is not valid: it must "
     "be a dict with a 'type'"),
    ('dict(type=', "--backbone-cfg 'dict(type=' is not valid: give a "
     'dict(type=..., ...) expression or a config file (.py) with '
     'model.backbone'),
])
def test_bad_backbone_cfg_is_a_value_error(text, message):
    with pytest.raises(ValueError) as err:
        bm.backbone_cfg(text)
    assert str(err.value).startswith(message)


def test_unknown_timm_model_is_a_value_error():
    with pytest.raises(ValueError) as err:
        bm.make_rows(['timm:resnet_nope'])
    assert str(err.value) == ("arch='timm:resnet_nope' is not valid: timm "
                              "has no model 'resnet_nope'")


TOY = ROOT / 'configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py'


def test_native_twin_detector_has_the_same_weights_and_losses():
    native_row, vb_row = bm.detector_rows(str(TOY), forms=(), native=True)
    assert (native_row.name, native_row.kind) == (
        f'{TOY.stem} ResNet', 'peer')
    native, vb = native_row.build(train=True), vb_row.build(train=True)
    assert type(native.detector.backbone).__name__ == 'ResNet'
    assert type(vb.detector.backbone).__name__ == 'VBResNet'
    a, b = native.detector.state_dict(), vb.detector.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, 3, 64, 96)
    losses = []
    for model in (native.train(), vb.train()):
        torch.manual_seed(0)  # the RPN and RoI samplers draw at random
        losses.append(torch.cat([t.reshape(-1) for t in model(x)]))
    assert len(losses[0]) >= 5
    assert (losses[0] - losses[1]).abs().max() <= 1e-5, losses


def test_native_twin_needs_a_backbone_with_a_twin():
    config = ROOT / 'configs/mask_rcnn/mask-rcnn_vb-convnext-atto_fpn_toy.py'
    with pytest.raises(ValueError, match=r"model.backbone.type='VBConvNeXt' "
                       r'has none \(twins: '):
        bm.detector_rows(str(config), native=True)


def test_detector_rows_refuse_an_unknown_part():
    with pytest.raises(ValueError, match="part='neck' is not valid"):
        bm.detector_rows(str(TOY), part='neck')


def test_mmdet_configs_load_by_package_name():
    from vb_plugin.apis import load_config
    cfg = load_config('mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py')
    assert cfg.model.backbone.type == 'ResNet'
    assert bm.twin_config(cfg).model.backbone.type == 'VBResNet'
    rows = bm.detector_rows('mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
                            forms=['optimized'], native=True)
    name = 'mask-rcnn_r50_fpn_1x_coco'
    assert [(r.name, r.kind, r.ref) for r in rows] == [
        (name, 'peer', None), (f'{name} VBResNet', 'vb', None),
        (f'{name} optimized', 'optimized', name)]


@pytest.mark.parametrize('argv,names', [
    (['--mode', 'detector-train', '--native', '--batch', '2'],
     [f'{TOY.stem} ResNet', TOY.stem]),
    (['--mode', 'detector', '--native', '--part', 'backbone+neck', '--forms',
      'optimized', 'openvino'],
     [f'{TOY.stem} ResNet', TOY.stem, f'{TOY.stem} optimized backbone+neck',
      f'{TOY.stem} openvino backbone+neck']),
])
def test_cli_detector_modes_with_the_native_twin(tmp_path, argv, names):
    out = _load_tool().main(argv + [
        '--config', str(TOY), '--size', '64', '96', '--warmup', '0',
        '--iters', '1', '--threads', '1', '--no-progress', '--out-dir',
        str(tmp_path)])
    rows = out['rows']
    assert [r.name for r in rows] == names
    assert all(not r.note and r.median_ms > 0 for r in rows), rows
    # Same weights in both: the parameter counts are equal.
    assert rows[0].params_m == rows[1].params_m > 0
    for r in rows[2:]:
        assert r.max_abs_diff <= 1e-4


@pytest.mark.parametrize('mode', ['backbone', 'train'])
def test_equal_code_gives_equal_peak_memory_whatever_its_place(mode):
    # mmdet's ResNet and VBResNet run the same blocks; the first row used
    # to absorb the process's growth (8x the others' figure).
    from vb_plugin.benchmark.catalogue import _mmdet, _vb
    rows = [bm.Row('r', 'VBResNet a', 'vb', _vb('VBResNet', depth=18)),
            bm.Row('r', 'mmdet ResNet', 'peer', _mmdet('ResNet', depth=18)),
            bm.Row('r', 'VBResNet b', 'vb', _vb('VBResNet', depth=18))]
    out = bm.run_benchmark(rows, bm.Settings(
        mode=mode, height=192, width=256, warmup=1, iters=1, threads=1,
        complexity=False), progress=False, log=lambda s: None)
    mems = [r.peak_mem_mb for r in out['rows']]
    assert min(mems) > 0, mems
    assert max(mems) <= 1.25 * min(mems), mems


# ----------------------------------------------------------------------
# The GPU path, what runs without a GPU: --amp, the peak probe's sizes,
# the CUDA forms' refusal on the CPU (tests/test_cuda.py runs them on CUDA).
def test_amp_option_parses():
    tool = _load_tool()
    assert tool.parse_args(['--mode', 'train', '--amp', 'fp16']).amp == \
        'fp16'
    assert tool.parse_args(['--mode', 'detector-train', '--amp',
                            'bf16']).amp == 'bf16'
    assert tool.parse_args([]).amp is None
    with pytest.raises(SystemExit):
        tool.parse_args(['--mode', 'train', '--amp', 'fp8'])


@pytest.mark.parametrize('settings,message', [
    (dict(mode='train', amp='fp8'),
     "amp='fp8' is not valid; choose from ['fp16', 'bf16'] or None"),
    (dict(amp='fp16'),
     "amp='fp16' is for the training modes ['train', 'detector-train']; "
     "mode='backbone' times inference (use the fp16/bf16 forms or dtype)"),
    (dict(mode='train', amp='bf16', dtype='bf16'),
     "amp='bf16' autocasts fp32 weights; it does not go with dtype='bf16'"),
    (dict(device='gpu'), "device='gpu' is not valid; use 'cpu' or "
     "'cuda[:N]'"),
])
def test_amp_and_device_settings_errors(settings, message):
    with pytest.raises(ValueError) as err:
        bm.Settings(**settings).check()
    assert str(err.value) == message


def test_an_unavailable_cuda_device_is_refused():
    with pytest.raises(ValueError) as err:
        bm.Settings(device='cuda:99').check()
    assert str(err.value).startswith("device='cuda:99' is not available")


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_amp_training_rows_on_the_cpu(amp):
    rows = [r for r in bm.make_rows(['resnet18'], forms=())
            if r.name in ('VBResNet', 'timm resnet18')]
    out = bm.run_benchmark(rows, bm.Settings(mode='train', amp=amp, **TINY),
                           progress=False, log=lambda s: None)
    vb, timm = out['rows']
    assert [(r.amp, r.dtype, r.note) for r in out['rows']] == [
        (amp, 'fp32', ''), (amp, 'fp32', 'no frozen_stages option: BN in '
                            'eval only')]
    assert all(r.median_ms > 0 for r in out['rows'])
    # What each row freezes: the VB row stage 1 (as mmdet's configs), the
    # timm row nothing.
    assert vb.frozen.startswith('frozen_stages=1: 157,504 of 11,176,512 '
                                'parameters frozen; 20 of 20 BN in eval')
    assert timm.frozen == ('no frozen_stages: 0 of 11,176,512 parameters '
                           'frozen; 20 of 20 BN in eval')
    # % of peak is of the autocast dtype's peak, probed for the run.
    peaks = out['meta']['peaks']
    assert list(peaks) == ['fp32', amp]
    assert vb.pct_of_peak == pytest.approx(
        100 * vb.gflops_per_s / peaks[amp]['peak_gflops'])


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_amp_step_autocasts_over_fp32_weights(amp):
    from vb_plugin import VBResNet
    model = VBResNet(depth=18, base_channels=8, frozen_stages=1,
                     norm_eval=True).train()
    seen = {}

    def record(key, tensor):
        seen.setdefault(key, tensor.dtype)  # NOTE: hooks must return None

    model.layer2[0].conv1.register_forward_hook(
        lambda m, i, o: record('activation', o))
    weight = model.layer2[0].conv1.weight
    weight.register_hook(lambda g: record('grad', g))
    step = bm.run._train_step(model, torch.rand(2, 3, 32, 32),
                              torch.device('cpu'), amp)
    step()
    assert seen == {'activation': bm.AMP_DTYPES[amp],
                    'grad': torch.float32}
    assert weight.dtype == torch.float32 and weight.grad is None
    if amp == 'fp16':  # the loss scaler of AmpOptimWrapper's default
        assert step.scaler.is_enabled()
        assert step.scaler.get_scale() == 2.**16  # finite gradients
    else:
        assert step.scaler is None


DETR_TOY = ROOT / 'configs/detr/detr_vb-r18_toy.py'


def test_detector_train_amp_bf16_on_the_cpu(tmp_path):
    # DETR trains under bf16 autocast; Mask R-CNN stops in mmcv 2.1.0's CPU
    # nms (float only; its RoIAlign has no bf16 kernel either): the error
    # docs/performance.md quotes.
    out = _load_tool().main([
        '--mode', 'detector-train', '--config', str(DETR_TOY), '--amp',
        'bf16', '--size', '64', '96', '--batch', '2', '--warmup', '0',
        '--iters', '1', '--threads', '1', '--no-complexity', '--no-progress',
        '--out-dir', str(tmp_path)])
    detr, = out['rows']
    assert detr.note == '' and detr.amp == 'bf16' and detr.median_ms > 0
    # the toy DETR config trains every stage
    assert detr.frozen == ('frozen_stages=-1: 0 of 3,541,416 parameters '
                           'frozen; 0 of 20 BN in eval')
    rows = bm.detector_rows(str(TOY), forms=())
    out = bm.run_benchmark(rows, bm.Settings(
        mode='detector-train', config=str(TOY), amp='bf16', batch=2,
        height=64, width=96, warmup=0, iters=1, threads=1,
        complexity=False), progress=False, log=lambda s: None)
    assert out['rows'][0].note == ('failed: RuntimeError: expected scalar '
                                   'type Float but found BFloat16')


def test_peak_probe_sizes_are_data():
    cpu, cuda = bm.PEAK_PROBES['cpu'], bm.PEAK_PROBES['cuda']
    assert (cpu.matmul, cpu.conv, cpu.repeat) == (1024, (1, 256, 56, 56), 1)
    # A GPU needs ~1 TFLOP per run (H200: ~790 TFLOP/s in bf16), and
    # several runs per clock read.
    flops = cuda.flops()
    assert flops['matmul_gflops'] >= 1e12 and flops['conv_gflops'] >= 9e11
    assert cuda.repeat == 10
    peak = bm.measure_peak(dtype=torch.bfloat16, seconds=0.01,
                           probe=bm.PeakProbe(64, (1, 8, 8, 8)))
    assert {k: peak[k] for k in ('dtype', 'device', 'matmul_n',
                                 'conv_input')} == dict(
        dtype='bf16', device='cpu', matmul_n=64, conv_input=[1, 8, 8, 8])
    assert 'tf32_conv' not in peak  # TF32 is stated on CUDA only
    assert peak['peak_gflops'] == max(peak['matmul_gflops'],
                                      peak['conv_gflops']) > 0


@pytest.mark.parametrize('settings,forms,dtypes', [
    (dict(), (), ['fp32']),
    (dict(dtype='bf16'), (), ['fp32', 'bf16']),
    (dict(mode='train', amp='fp16'), (), ['fp32', 'fp16']),
    (dict(), ('optimized', 'bf16', 'fp16', 'auto-int8'), ['fp32', 'bf16']),
    (dict(device='cuda'), ('cuda-graph-fp16', 'openvino-bf16'),
     ['fp32', 'fp16', 'bf16']),
])
def test_probe_dtypes_are_those_the_rows_use(settings, forms, dtypes):
    rows = bm.make_rows(['resnet18'], peers=False, forms=forms)
    assert bm.probe_dtypes(bm.Settings(**settings), rows) == dtypes


def test_cuda_forms_are_failed_rows_on_the_cpu(tmp_path):
    out = _load_tool().main([
        '--arch', 'resnet18', '--no-peers', '--size', '32', '32', '--warmup',
        '0', '--iters', '1', '--threads', '1', '--forms', 'optimized', 'fp16',
        'cuda-graph', 'auto-fp16', '--no-complexity', '--no-progress',
        '--out-dir', str(tmp_path)])
    rows = out['rows']
    assert [(r.kind, r.dtype) for r in rows] == [
        ('vb', 'fp32'), ('optimized', 'fp32'), ('fp16', 'fp16'),
        ('cuda-graph', 'fp32'), ('auto-fp16', 'fp16')]
    assert [r.note for r in rows[:2]] == ['', '']
    assert rows[2].note.startswith(
        "failed: ValueError: dtype='fp16' needs a CUDA device, but the model "
        'is on cpu: move it to a GPU first')
    assert rows[3].note.startswith(
        'failed: ValueError: cuda_graph=True needs a CUDA device, but the '
        'model is on cpu')
    assert rows[4].note == (
        "failed: ValueError: dtype='fp16' is not valid for backend='auto'; "
        "use one of ['fp32', 'bf16', 'int8'] on cpu (fp16 is for a CUDA "
        'device)')


def test_auto_form_row_names_the_backend_it_picked(tmp_path):
    out = _load_tool().main([
        '--arch', 'resnet18', '--no-peers', '--size', '64', '64', '--warmup',
        '0', '--iters', '1', '--threads', '1', '--forms', 'auto',
        '--no-complexity', '--no-progress', '--out-dir', str(tmp_path)])
    vb, auto = out['rows']
    assert auto.note == '' and auto.median_ms > 0
    assert auto.memory_format in ('channels_last', 'onnxruntime', 'openvino')
    assert auto.max_abs_diff <= 1e-4


def _load_gpu_check():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'gpu_check_tool', ROOT / 'tools' / 'gpu_check.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_commands_are_valid_benchmark_runs():
    gpu_check, tool = _load_gpu_check(), _load_tool()
    runs = [(name, argv) for name, stage in gpu_check.STAGES.items()
            for kind, argv in stage.runs if kind == 'benchmark']
    assert [name for name, _ in runs] == [
        'bench', 'detector', 'compiled', 'train', 'train']
    for name, argv in runs:
        args = tool.parse_args(list(argv))
        assert args.device == 'cuda' and args.no_progress
        if args.mode in ('detector', 'detector-train'):
            assert (ROOT / args.config).is_file() or \
                args.config.startswith('mmdet::')
    # The rows: batch 16 at 640x640 for the three backbones, every
    # torch form that runs on CUDA between 'bench' and 'compiled', and the
    # Mask R-CNN at 800x1216 with backbone + neck replaced.
    bench = tool.parse_args(list(gpu_check.STAGES['bench'].runs[0][1]))
    compiled = tool.parse_args(
        list(gpu_check.STAGES['compiled'].runs[0][1]))
    assert bench.arch == compiled.arch == ['resnet50', 'convnext_tiny',
                                           'regnetx_3.2gf']
    assert bench.batch == 16 and bench.size == [640, 640]
    torch_forms = {name for name, form in bm.FORMS.items()
                   if form.get('backend') is None}
    assert set(bench.forms) | set(compiled.forms) == torch_forms - {
        'compiled-bf16', 'compiled-cuda-graph', 'compiled-cuda-graph-bf16'}
    detector = tool.parse_args(list(gpu_check.STAGES['detector'].runs[0][1]))
    assert (detector.mode, detector.part, detector.size, detector.native) \
        == ('detector', 'backbone+neck', [800, 1216], True)
    assert gpu_check.DEFAULT_STAGES == ('tests', 'bench', 'detector')


def test_gpu_check_runs_its_stages_and_writes_the_summary(tmp_path,
                                                          monkeypatch):
    # The runner, with a stage that runs here: a CPU benchmark and the cuda
    # tests (skipped without a GPU).
    gpu_check = _load_gpu_check()
    stage = gpu_check.Stage([
        ('benchmark', ['--arch', 'resnet18', '--no-peers', '--size', '32',
                       '32', '--warmup', '0', '--iters', '1', '--threads',
                       '1', '--forms', 'optimized', '--no-complexity',
                       '--no-progress']),
        ('pytest', ['-m', 'cuda', '-q', '-p', 'no:cacheprovider',
                    'tests/test_cuda.py', '-k', 'auto_on_cuda'])], 300)
    monkeypatch.setitem(gpu_check.STAGES, 'cpu', stage)
    monkeypatch.setitem(gpu_check.TARGETS, 'cpu', ('vs_vb', 1.0))
    monkeypatch.delenv('SHIM', raising=False)
    summary = gpu_check.main(['cpu', '--seconds', '200', '--out',
                              str(tmp_path)])
    assert json.loads((tmp_path / 'gpu_check.json').read_text()) == summary
    cpu, = summary['stages']
    bench, pytest_run = cpu['runs']
    assert bench['rc'] == 0 and pytest_run['rc'] == 0, summary
    speed = bench['speedups']['resnet18']
    assert speed['fastest'] in ('VBResNet', 'VBResNet optimized')
    assert bench['target']['resnet18'] == dict(
        figure='vs_vb', value=speed['vs_vb'], target=1.0,
        met=speed['vs_vb'] >= 1.0)
    assert json.loads((tmp_path / 'cpu.json').read_text())['rows']
    assert re.match(r'1 skipped\b', pytest_run['summary']), summary
    assert 'tests/test_cuda.py' in (tmp_path / 'pytest.txt').read_text()
    # A stage that does not fit in the time left is skipped, and said so.
    summary = gpu_check.main(['cpu', '--seconds', '10', '--out',
                              str(tmp_path / 'short')])
    skipped, = summary['stages']
    assert skipped['stage'] == 'cpu' and re.fullmatch(
        r'\d+ s left of --seconds 10', skipped['skipped']), skipped
