"""The GPU path on a CUDA device: the fast-path forms against eager (TF32
as torch sets it, and off), CUDA graphs per input shape, backend='auto',
compiled forms, AMP training steps and the benchmark's CUDA rows, on tiny
models. Speed is never asserted.

Every test here is marked ``cuda``: skipped, with the reason, where
``torch.cuda.is_available()`` is False (tests/conftest.py);
``tools/gpu_check.sh`` runs them on a GPU. The detector tests need mmcv's
CUDA ops (or, on the lent GPU machine, ``../shared/gpu/mmcv_cuda_shim.py``,
which gpu_check.sh installs).
"""
import copy
import warnings
from pathlib import Path

import pytest
import torch
from backbone_cases import build, case_id, iter_cases
from conftest import randomize_bn, tf32_settings

import vb_plugin
from vb_plugin import benchmark as bm
from vb_plugin.inference import FORMS, optimize_for_inference
from vb_plugin.outputs import (FP32_TOLERANCE, max_abs, max_abs_difference,
                               reference_format, tf32_flags, tolerance_for)

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / 'configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py'
DETR_TOY = ROOT / 'configs/detr/detr_vb-r18_toy.py'
CUDA = torch.device('cuda')
CASES = [pytest.param(name, case, id=f'{name}[{case_id(case)}]')
         for name, case in iter_cases()]
#: The torch forms that run on CUDA without compiling.
EAGER_FORMS = ['optimized', 'bf16', 'fp16', 'cuda-graph', 'cuda-graph-bf16',
               'cuda-graph-fp16']


def _tiny_resnet():
    return randomize_bn(vb_plugin.VBResNet(depth=18, base_channels=8)).eval()


def _assert_like_eager(ref, out, dtype):
    assert all(o.device.type == 'cuda' and o.dtype == torch.float32
               and o.is_contiguous() for o in out)
    assert max_abs_difference(ref, out) <= tolerance_for(dtype, ref)


@pytest.mark.parametrize('form', EAGER_FORMS)
@pytest.mark.parametrize('name,case', CASES)
def test_forms_on_cuda_equal_eager(name, case, form):
    model = randomize_bn(build(name, case)).eval().to(CUDA)
    # NOTE: the construction check runs on CUDA too (default example).
    fast = optimize_for_inference(model, **FORMS[form])
    x = torch.rand(2, 3, 64, 64, device=CUDA)
    with torch.inference_mode():
        ref = model(x)
        out = fast(x)
        again = fast(x)
    _assert_like_eager(ref, out, fast.dtype)
    # A graph's replay writes into its static outputs: every call hands out
    # its own tensors.
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(out, again))
    assert max_abs_difference(out, again) <= tolerance_for(fast.dtype, ref)


@pytest.mark.parametrize('arch', ['resnet50', 'convnext_tiny',
                                  'regnetx_3.2gf'])
def test_full_size_fp32_form_with_and_without_tf32(arch):
    # On an H200 the check refused these ('differs from the fp32 eager
    # model by 0.000341 (> 0.0001)'): TF32 eager was held to fp32.
    vb_build, _ = bm.architecture(arch)
    model = vb_build().eval().to(CUDA)
    x = torch.rand(2, 3, 224, 320, device=CUDA)
    for tf32 in (True, False):
        with tf32_settings(conv=tf32, matmul=tf32):
            assert reference_format(CUDA) == ('tf32' if tf32 else 'fp32')
            fast = optimize_for_inference(model)
            with torch.inference_mode():
                ref = model(x)
                diff = max_abs_difference(ref, fast(x))
        if tf32:
            assert diff <= tolerance_for('fp32', ref, CUDA, tf32_flags())
        else:  # TF32 off: as exact as on the CPU
            assert diff <= FP32_TOLERANCE * max(max_abs(ref), 1.)


def test_cuda_graphs_record_one_graph_per_shape_then_run_eager():
    model = _tiny_resnet().to(CUDA)
    fast = optimize_for_inference(model, cuda_graph=True)
    assert fast.graphs.signatures == []  # the check's graph was dropped
    fast.graphs.max_graphs = 2
    shapes = [(1, 3, 64, 64), (2, 3, 64, 96), (1, 3, 64, 64),
              (1, 3, 96, 64)]
    with torch.inference_mode():
        for i, shape in enumerate(shapes):
            x = torch.rand(shape, device=CUDA)
            if i < 3:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter('always')
                    out = fast(x)
                assert not [w for w in caught
                            if 'CUDA graphs' in str(w.message)]
            else:
                with pytest.warns(UserWarning, match=r'CUDA graphs: input '
                                  r'\(1, 3, 96, 64\) torch.float32 is a new '
                                  r'signature beyond the 2 recorded'):
                    out = fast(x)
            _assert_like_eager(model(x), out, torch.float32)
    assert [s[0] for s in fast.graphs.signatures] == [(1, 3, 64, 64),
                                                      (2, 3, 64, 96)]
    # The outputs of one call survive the next replay of the same graph.
    x1, x2 = (torch.rand(1, 3, 64, 64, device=CUDA) for _ in range(2))
    with torch.inference_mode():
        first = fast(x1)
        fast(x2)
        _assert_like_eager(model(x1), first, torch.float32)
    # Outside inference mode too (the static tensors are normal tensors).
    with torch.no_grad():
        _assert_like_eager(model(x2), fast(x2), torch.float32)
    # A copy records its own graphs; moving the model drops them.
    twin = copy.deepcopy(fast)
    assert twin.graphs.signatures == [] and twin.graphs.fn is twin.module
    fast.to(CUDA)
    assert fast.graphs.signatures == []


def test_auto_on_cuda_times_the_eager_and_graph_forms():
    model = _tiny_resnet().to(CUDA)
    x = torch.rand(2, 3, 96, 128, device=CUDA)
    fast = optimize_for_inference(model, backend='auto', dtype='fp16',
                                  example_input=x)
    choice = fast.auto_choice
    assert sorted(choice['median_ms']) == ['cuda-graph', 'torch']
    assert choice['skipped'] == {} and choice['device'].startswith('cuda')
    assert choice['backend'] == min(choice['median_ms'],
                                    key=choice['median_ms'].get)
    assert (fast.graphs is not None) == (choice['backend'] == 'cuda-graph')
    with torch.inference_mode():
        _assert_like_eager(model(x), fast(x), torch.float16)
    with pytest.raises(ValueError) as err:
        optimize_for_inference(model, backend='auto', dtype='int8')
    assert str(err.value) == (
        "dtype='int8' is not valid for backend='auto'; use one of ['fp32', "
        "'bf16', 'fp16'] on cuda (int8 is for the CPU)")


@pytest.mark.slow
@pytest.mark.parametrize('form', ['compiled-fp16',
                                  'compiled-cuda-graph-fp16'])
def test_compiled_forms_on_cuda(form):
    model = _tiny_resnet().to(CUDA)
    fast = optimize_for_inference(model, **FORMS[form])
    x1, x2 = (torch.rand(2, 3, 64, 64, device=CUDA) for _ in range(2))
    with torch.inference_mode():
        first = fast(x1)
        second = fast(x2)
        _assert_like_eager(model(x1), first, torch.float16)
        _assert_like_eager(model(x2), second, torch.float16)
    assert fast.compile_mode == ('reduce-overhead' if 'graph' in form
                                 else 'default')


@pytest.mark.parametrize('amp', ['fp16', 'bf16'])
def test_amp_step_on_cuda(amp):
    model = vb_plugin.VBResNet(depth=18, base_channels=8, frozen_stages=1,
                               norm_eval=True).train().to(CUDA)
    seen = {}

    def record(key, tensor):
        seen.setdefault(key, (tensor.dtype, bool(torch.isfinite(
            tensor).all())))

    model.layer2[0].conv1.register_forward_hook(
        lambda m, i, o: record('activation', o))
    model.layer2[0].conv1.weight.register_hook(lambda g: record('grad', g))
    step = bm.run._train_step(model, torch.rand(2, 3, 64, 64, device=CUDA),
                              CUDA, amp)
    step()
    assert seen == {'activation': (bm.AMP_DTYPES[amp], True),
                    'grad': (torch.float32, True)}
    if amp == 'fp16':
        assert step.scaler.is_enabled() and step.scaler.get_scale() > 0


def test_benchmark_cuda_backbone_rows():
    forms = ('optimized', 'bf16', 'fp16', 'cuda-graph-fp16', 'auto-fp16')
    rows = bm.make_rows(['resnet18'], forms=forms)
    out = bm.run_benchmark(rows, bm.Settings(
        device='cuda', batch=2, height=64, width=64, warmup=1, iters=3,
        threads=1), progress=False, log=lambda s: None)
    assert [r.kind for r in out['rows'] if r.kind != 'peer'] == [
        'vb', *forms]
    for r in out['rows']:
        assert r.note == '' and r.median_ms > 0 and r.peak_mem_mb >= 0, r
        assert r.pct_of_peak > 0, r
    assert [r.dtype for r in out['rows'][-5:]] == [
        'fp32', 'bf16', 'fp16', 'fp16', 'fp16']
    meta = out['meta']
    assert meta['device_name'] == torch.cuda.get_device_name(0)
    assert set(meta['tf32']) == {'conv', 'matmul'}
    assert list(meta['peaks']) == ['fp32', 'bf16', 'fp16']
    assert isinstance(meta['peaks']['fp32']['tf32_conv'], bool)
    assert meta['peaks']['fp32']['matmul_n'] == bm.PEAK_PROBES[
        'cuda'].matmul


@pytest.mark.parametrize('amp', ['fp16', 'bf16'])
def test_benchmark_cuda_training_rows_with_amp(amp):
    rows = [r for r in bm.make_rows(['resnet18'], forms=())
            if r.name in ('VBResNet', 'mmdet ResNet', 'timm resnet18')]
    out = bm.run_benchmark(rows, bm.Settings(
        mode='train', amp=amp, device='cuda', batch=2, height=64, width=64,
        warmup=1, iters=3, threads=1), progress=False, log=lambda s: None)
    for r in out['rows']:
        assert r.amp == amp and r.median_ms > 0 and r.peak_mem_mb > 0, r
    vb, mmdet, timm = out['rows']
    assert vb.frozen == mmdet.frozen and vb.frozen.startswith(
        'frozen_stages=1: ')
    assert timm.frozen.startswith('no frozen_stages: 0 of ')


def test_benchmark_cuda_detector_rows():
    # inference_detector with backbone + neck replaced by each form, and
    # the training step under fp16 AMP (mmdet's AmpOptimWrapper default).
    forms = ['optimized', 'fp16', 'cuda-graph-fp16']
    rows = bm.detector_rows(str(TOY), forms=forms, native=True,
                            part='backbone+neck')
    out = bm.run_benchmark(rows, bm.Settings(
        mode='detector', config=str(TOY), device='cuda', height=96,
        width=128, warmup=1, iters=2, threads=1, complexity=False),
        progress=False, log=lambda s: None)
    assert all(r.note == '' and r.median_ms > 0 for r in out['rows']), \
        out['rows']
    for amp, config in (('fp16', TOY), ('bf16', DETR_TOY)):
        rows = bm.detector_rows(str(config), forms=())
        out = bm.run_benchmark(rows, bm.Settings(
            mode='detector-train', config=str(config), amp=amp,
            device='cuda', batch=2, height=96, width=128, warmup=1, iters=2,
            threads=1, complexity=False), progress=False, log=lambda s: None)
        row, = out['rows']
        assert row.note == '' and row.amp == amp and row.peak_mem_mb > 0
