"""Deployment: ONNX export of every backbone case, the ONNX Runtime and
OpenVINO backends of optimize_for_inference, a detector with its backbone +
neck on an engine, int8 calibrated on toy images, tools/export.py.

The engines are real (onnxruntime, openvino from requirements/deploy.txt);
every comparison is against the eager torch model.
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from mmengine.config import Config

from backbone_cases import build, case_id, iter_cases
from vb_plugin import VBConvNeXt, VBResNet, VBTimmBackbone, export_onnx, \
    optimize_for_inference
from vb_plugin.models.convnext import ConvNeXtBlock
from vb_plugin.deploy import (BackboneWithNeck, EngineModel, ExportError,
                              calibration_inputs, deploy_detector,
                              engine_model, output_names)
from vb_plugin.outputs import max_abs_difference, tolerance_for

ROOT = Path(__file__).resolve().parents[1]
CASES = list(iter_cases())
TOY = ROOT / 'configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py'


def third_input(model, batch=1):
    """A size neither export check used: odd, wide, rounded up to the
    model's size divisor."""
    div = getattr(model, 'size_divisor', 1)
    h, w = (-(-n // div) * div for n in (75, 203))
    return torch.rand(batch, 3, h, w)


@pytest.mark.parametrize('name,case', CASES,
                         ids=[f'{n}-{case_id(c)}' for n, c in CASES])
def test_every_case_exports_with_dynamic_batch_height_and_width(
        name, case, tmp_path):
    model = build(name, case).eval()
    path = tmp_path / 'model.onnx'
    exp = export_onnx(model, path)
    assert path.read_bytes() == exp.model
    assert exp.output_names == output_names(model.out_strides)
    assert [shape for shape, _, _ in exp.checks] == [
        (1, 3, *[-(-n // model.size_divisor) * model.size_divisor
                 for n in (129, 161)]),
        (2, 3, *[-(-n // model.size_divisor) * model.size_divisor
                 for n in (96, 224)])]
    # The file, run here by onnxruntime at a third size and batch 3,
    # against the original eager model.
    session = ort.InferenceSession(str(path),
                                   providers=['CPUExecutionProvider'])
    assert [i.shape for i in session.get_inputs()] == [
        ['batch', 3, 'height', 'width']]
    assert [o.name for o in session.get_outputs()] == exp.output_names
    x = third_input(model, batch=3)
    outs = session.run(None, {'input': x.numpy()})
    with torch.no_grad():
        ref = model(x)
    assert max_abs_difference(ref, [torch.from_numpy(o) for o in outs]) \
        <= tolerance_for(torch.float32, ref)


def test_export_leaves_the_model_as_it_was():
    model = VBResNet(depth=18, base_channels=8, with_cp=True).train()
    before = copy.deepcopy(model.state_dict())
    exp = export_onnx(model, check=False)
    assert exp.folded == 20 and exp.checks == []
    assert model.training and model.with_cp
    assert type(model.bn1).__name__ == 'BatchNorm2d'
    assert all(torch.equal(v, before[k])
               for k, v in model.state_dict().items())


def test_convnext_exports_its_mlp_as_convs_and_keeps_the_model():
    """VBConvNeXt's block MLPs go to ONNX as 1x1 Convs (faster on ONNX
    Runtime than MatMuls between transposes); the model passed keeps its
    Linear form, and the file still matches it."""
    model = VBConvNeXt(arch=dict(depths=[1, 1, 2, 1],
                                 channels=[8, 16, 32, 64])).eval()
    exp = export_onnx(model)
    ops = [n.op_type for n in onnx.load_from_string(exp.model).graph.node]
    assert 'MatMul' not in ops and 'Gemm' not in ops
    # stem, 3 downsamples, 5 depthwise and 2 x 5 MLP convs
    assert ops.count('Conv') == 1 + 3 + 5 + 2 * 5
    assert not any(b.conv_mlp for b in model.modules()
                   if isinstance(b, ConvNeXtBlock))
    x = torch.rand(1, 3, 97, 131)
    outs = ort.InferenceSession(exp.model).run(None, {'input': x.numpy()})
    with torch.no_grad():
        ref = model(x)
    assert max_abs_difference(ref, [torch.from_numpy(o) for o in outs]) \
        <= tolerance_for(torch.float32, ref)


def test_export_without_dynamic_axes_has_a_fixed_input():
    model = VBResNet(depth=18, base_channels=8).eval()
    exp = export_onnx(model, example_input=torch.rand(1, 3, 64, 96),
                      dynamic=False)
    dims = onnx.load_from_string(exp.model).graph.input[0].type.tensor_type
    assert [d.dim_value for d in dims.shape.dim] == [1, 3, 64, 96]
    assert [shape for shape, _, _ in exp.checks] == [(1, 3, 64, 96)]


def test_dcn_is_refused_with_the_module_named():
    model = VBResNet(depth=50, base_channels=8,
                     dcn=dict(type='DCN', deform_groups=1),
                     stage_with_dcn=(False, False, True, True))
    with pytest.raises(ExportError) as err:
        export_onnx(model)
    assert str(err.value) == (
        "VBResNet cannot be exported to ONNX: module 'layer3.0.conv2' is "
        "mmcv's DeformConv2dPack (deformable convolution), an mmcv custom "
        'op that onnxruntime and OpenVINO cannot run; build the backbone '
        'without dcn (dcn=None, stage_with_dcn all False) to export it')
    assert isinstance(err.value, ValueError)


def test_export_of_a_non_module_is_a_type_error():
    with pytest.raises(TypeError, match='model must be an nn.Module, got '
                       'dict'):
        export_onnx({})


# ----------------------------------------------------------------------
# Engine backends
ENGINE_CASES = [
    ('VBResNet', dict(depth=18, base_channels=8)),
    ('VBConvNeXt', dict(arch=dict(depths=[1, 1, 2, 1],
                                  channels=[8, 16, 32, 64]))),
    ('VBRegNet', dict(arch='regnetx_200mf')),
    ('VBTimmBackbone', dict(model_name='swin_tiny_patch4_window7_224',
                            drop_path_rate=0.0,
                            model_kwargs=dict(depths=(1, 1, 1, 1),
                                              embed_dim=16,
                                              num_heads=(1, 1, 2, 2)))),
]
FORMS = [('onnxruntime', 'fp32'), ('openvino', 'fp32'),
         ('openvino', 'bf16'), ('onnxruntime', 'int8'),
         ('openvino', 'int8')]


@pytest.mark.parametrize('backend,dtype', FORMS,
                         ids=[f'{b}-{d}' for b, d in FORMS])
@pytest.mark.parametrize('name,case', ENGINE_CASES,
                         ids=[n for n, _ in ENGINE_CASES])
def test_engine_forms_keep_the_contract(name, case, backend, dtype):
    model = build(name, case).eval()
    calibration = [torch.randn(1, 3, 96, 128) for _ in range(4)]
    fast = optimize_for_inference(
        model, backend=backend, dtype=dtype,
        calibration=calibration if dtype == 'int8' else None)
    assert isinstance(fast, EngineModel) and not fast.training
    assert (fast.backend, fast.dtype) == (backend, dtype)
    assert fast.out_channels == model.out_channels
    assert fast.out_strides == model.out_strides
    assert fast.out_indices == model.out_indices
    assert list(fast.parameters()) == []
    fast.train()
    assert not fast.training
    x = calibration[0] if dtype == 'int8' else third_input(model)
    outs = fast(x)
    assert isinstance(outs, tuple)
    with torch.no_grad():
        ref = model(x)
    assert [o.shape for o in outs] == [r.shape for r in ref]
    assert all(o.dtype == torch.float32 for o in outs)
    assert max_abs_difference(ref, outs) <= tolerance_for(dtype, ref)
    assert fast.max_abs_diff <= tolerance_for(dtype, ref)


def test_engine_outputs_come_back_in_the_input_dtype():
    model = VBResNet(depth=18, base_channels=8).eval()
    fast = engine_model(model, 'onnxruntime')
    outs = fast(torch.rand(1, 3, 64, 64, dtype=torch.float64))
    assert {o.dtype for o in outs} == {torch.float64}


def test_openvino_refuses_bicubic_resampling_of_position_embeddings():
    vit = VBTimmBackbone('vit_tiny_patch16_224',
                         model_kwargs=dict(depth=4, embed_dim=32,
                                           num_heads=2)).eval()
    with pytest.raises(ValueError) as err:
        engine_model(vit, 'openvino')
    assert str(err.value) == (
        "backend='openvino' cannot run VBTimmBackbone: its ONNX graph has 1 "
        "bicubic Resize node(s) (/body/Resize, e.g. timm's "
        'position-embedding resampling at any input size), which OpenVINO '
        "does not compute as torch does; use backend='onnxruntime'")
    # onnxruntime runs it, at another size than the export's.
    fast = engine_model(vit, 'onnxruntime')
    x = torch.rand(1, 3, 75, 203)
    with torch.no_grad():
        ref = vit(x)
    assert max_abs_difference(ref, fast(x)) <= tolerance_for(
        torch.float32, ref)


@pytest.mark.parametrize('kwargs,message', [
    (dict(backend='tensorrt'),
     "backend='tensorrt' is not valid; use 'torch', 'auto' or one of "
     "['onnxruntime', 'openvino']"),
    (dict(backend='onnxruntime', dtype='bf16'),
     "dtype='bf16' is not valid for backend='onnxruntime'; use one of "
     "['fp32', 'int8']"),
    (dict(backend='openvino', dtype='fp16'),
     "dtype='fp16' is not valid for backend='openvino'; use one of "
     "['fp32', 'bf16', 'int8']"),
    (dict(backend='onnxruntime', dtype='int8'),
     "dtype='int8' needs calibration: an iterable of input batches (NCHW "
     'tensors), e.g. vb_plugin.deploy.calibration_inputs(cfg)'),
    (dict(calibration=[torch.rand(1, 3, 32, 32)]),
     "calibration is for int8 on an engine backend (backend='onnxruntime' "
     "or 'openvino'); backend='torch' does not quantize"),
])
def test_bad_engine_options_are_value_errors(kwargs, message):
    model = VBResNet(depth=18, base_channels=8).eval()
    with pytest.raises(ValueError) as err:
        optimize_for_inference(model, **kwargs)
    assert str(err.value) == message


def test_calibration_must_be_nchw_tensors():
    model = VBResNet(depth=18, base_channels=8).eval()
    with pytest.raises(TypeError, match=r'calibration must yield NCHW '
                       r'tensors, got torch.Size\(\[3, 32, 32\]\)'):
        engine_model(model, 'onnxruntime', 'int8',
                     calibration=[torch.rand(3, 32, 32)])


# ----------------------------------------------------------------------
# In a detector
@pytest.fixture(scope='module')
def toy_root(tmp_path_factory):
    from vb_plugin.datasets import make_toy_coco
    root = tmp_path_factory.mktemp('deploy')
    make_toy_coco(root / 'data' / 'toy_coco', {'train': 2, 'val': 6})
    return root


def toy_detector():
    from mmdet.apis import init_detector
    model = init_detector(str(TOY), device='cpu')
    model.test_cfg.rcnn.score_thr = 0.0  # an untrained model: keep boxes
    return model


def assert_same_detections(out, ref):
    """fp32 forms in a detector: the eager detector's labels, boxes and
    scores within 1e-3, masks of the same shape."""
    assert len(ref.bboxes) > 0
    assert torch.equal(out.labels, ref.labels)
    assert (out.bboxes - ref.bboxes).abs().max() <= 1e-3
    assert (out.scores - ref.scores).abs().max() <= 1e-3
    assert out.masks.shape == ref.masks.shape


@pytest.mark.parametrize('part', ['backbone', 'backbone+neck'])
@pytest.mark.parametrize('backend', ['onnxruntime', 'openvino'])
def test_inference_detector_with_the_backbone_on_an_engine(
        backend, part, toy_root):
    from mmdet.apis import inference_detector
    image = str(sorted((toy_root / 'data/toy_coco/val').iterdir())[0])
    model = toy_detector()
    ref = inference_detector(model, image).pred_instances
    deployed = deploy_detector(copy.deepcopy(model), part=part,
                               backend=backend)
    assert isinstance(deployed.backbone, EngineModel)
    assert (deployed.neck is None) == (part == 'backbone+neck')
    if part == 'backbone+neck':
        assert deployed.backbone.export.output_names == [
            'stride4', 'stride8', 'stride16', 'stride32', 'stride64']
    out = inference_detector(deployed, image).pred_instances
    assert_same_detections(out, ref)


def test_inference_detector_with_the_torch_fast_path(toy_root):
    """The documented ``detector.backbone =
    optimize_for_inference(detector.backbone)``: the same detections as the
    eager detector (its channels_last outputs once gave mmcv's RoIAlign
    features it read as NCHW, and other boxes and scores)."""
    from mmdet.apis import inference_detector
    image = str(sorted((toy_root / 'data/toy_coco/val').iterdir())[0])
    model = toy_detector()
    ref = inference_detector(model, image).pred_instances
    fast = copy.deepcopy(model)
    fast.backbone = optimize_for_inference(fast.backbone)
    out = inference_detector(fast, image).pred_instances
    assert_same_detections(out, ref)


def test_int8_calibrated_on_toy_images_in_a_detector(toy_root,
                                                     monkeypatch):
    """Calibration inputs come from the config's own val set through the
    detector's data preprocessor; the int8 backbone + neck passes its
    construction check (tolerance_for) on one of them and predicts."""
    from mmdet.apis import inference_detector
    monkeypatch.chdir(toy_root)
    cfg = Config.fromfile(TOY)
    model = toy_detector()
    batches = list(calibration_inputs(cfg, num_images=4,
                                      data_preprocessor=model.
                                      data_preprocessor))
    assert len(batches) == 4
    assert all(b.dim() == 4 and b.shape[:2] == (1, 3) for b in batches)
    assert all(b.shape[-1] % 32 == 0 and b.shape[-2] % 32 == 0
               for b in batches)
    deployed = deploy_detector(copy.deepcopy(model), backend='onnxruntime',
                               dtype='int8', calibration=batches)
    assert deployed.backbone.dtype == 'int8'
    graph = onnx.load_from_string(deployed.backbone.export.model).graph
    assert any(n.op_type == 'QuantizeLinear' for n in graph.node)
    image = str(sorted((toy_root / 'data/toy_coco/val').iterdir())[0])
    pred = inference_detector(deployed, image).pred_instances
    assert len(pred.bboxes) > 0


def test_backbone_with_neck_exports_the_neck_strides():
    from mmdet.models.necks import FPN
    bb = VBResNet(depth=18, base_channels=8).eval()
    both = BackboneWithNeck(bb, FPN(list(bb.out_channels), 16, 5)).eval()
    exp = export_onnx(both)
    assert exp.output_names == ['stride4', 'stride8', 'stride16',
                                'stride32', 'stride64']


def test_tools_export_writes_a_checked_file(toy_root, tmp_path):
    out = tmp_path / 'det.onnx'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tools/export.py'), str(TOY), '--out',
         str(out), '--part', 'backbone+neck'], cwd=toy_root, env=env,
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f'wrote {out} (opset 18, 20 BN folded)' in proc.stdout
    assert 'outputs: stride4, stride8, stride16, stride32, stride64' in \
        proc.stdout
    assert proc.stdout.count('onnxruntime check at') == 2
    session = ort.InferenceSession(str(out),
                                   providers=['CPUExecutionProvider'])
    assert len(session.get_outputs()) == 5


def test_tools_deploy_eval_compares_forms_on_the_test_set(
        toy_root, tmp_path, monkeypatch, capsys):
    """mmengine's Runner evaluates the config's test set with the torch
    model and each form; fp32 on the engine gives the torch metrics."""
    import importlib.util
    monkeypatch.chdir(toy_root)
    model = toy_detector()
    ckpt = tmp_path / 'model.pth'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    spec = importlib.util.spec_from_file_location(
        'deploy_eval', ROOT / 'tools/deploy_eval.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    results = tool.main([str(TOY), str(ckpt), '--forms', 'onnxruntime',
                         'openvino-int8', 'auto', '--calibration-images',
                         '2', '--work-dir', str(tmp_path / 'work'),
                         '--cfg-options', 'model.test_cfg.rcnn.score_thr=0.0'])
    assert list(results) == ['torch', 'onnxruntime', 'openvino-int8', 'auto']
    for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
        for form in ('onnxruntime', 'auto'):  # fp32, whichever backend
            assert results[form][key] == pytest.approx(
                results['torch'][key], abs=1e-3)
        assert 0 <= results['openvino-int8'][key] <= 1
    printed = capsys.readouterr().out
    assert '| form | coco/bbox_mAP | coco/bbox_mAP_50 |' in printed
    assert '| openvino-int8 |' in printed


def test_evaluate_forms_refuses_unknown_forms():
    from vb_plugin.benchmark.evaluate import evaluate_forms
    with pytest.raises(ValueError, match=r"^form='tensorrt' is not valid; "
                       r"choose from \['optimized'"):
        evaluate_forms(Config.fromfile(TOY), forms=['tensorrt'])


@pytest.mark.parametrize('training', [False, True])
def test_backbone_with_neck_keeps_the_mode_of_its_parts(training):
    from mmdet.models.necks import FPN
    backbone = VBResNet(depth=18, base_channels=8).train(training)
    neck = FPN(list(backbone.out_channels), 16, 5).train(training)
    pair = BackboneWithNeck(backbone, neck)
    assert pair.training is training
    if not training:
        engine_model(pair, backend='onnxruntime')
        # The check ran the pair in eval mode and left every part as it was.
        assert not any(m.training for m in pair.modules())


# ----------------------------------------------------------------------
# backend='auto'
@pytest.mark.parametrize('dtype,backends', [
    ('fp32', ['onnxruntime', 'openvino', 'torch']),
    ('bf16', ['openvino', 'torch']),
    ('int8', ['onnxruntime', 'openvino']),
])
def test_auto_backend_returns_the_fastest_form_and_says_which(dtype,
                                                              backends):
    model = VBResNet(depth=18, base_channels=8).eval()
    x = torch.rand(1, 3, 96, 128)
    extra = dict(calibration=[torch.rand(1, 3, 96, 128) for _ in range(4)]
                 ) if dtype == 'int8' else {}
    fast = optimize_for_inference(model, backend='auto', dtype=dtype,
                                  example_input=x, **extra)
    choice = fast.auto_choice
    medians = choice['median_ms']
    assert sorted(medians) == backends and choice['skipped'] == {}
    assert all(ms > 0 for ms in medians.values())
    assert choice['backend'] == min(medians, key=medians.get)
    assert (choice['dtype'], choice['input_shape']) == (dtype, (1, 3, 96,
                                                                128))
    # The module returned is the chosen backend's form, with the contract.
    assert getattr(fast, 'backend', 'torch') == choice['backend']
    assert fast.out_strides == model.out_strides
    assert not fast.training
    with torch.no_grad():
        ref = model(x)
    tol = tolerance_for(dtype, ref) if hasattr(fast, 'backend') else \
        tolerance_for(torch.bfloat16 if dtype == 'bf16' else torch.float32,
                      ref)
    assert max_abs_difference(ref, fast(x)) <= tol


def test_auto_backend_leaves_out_a_backend_that_refuses_the_model():
    vit = VBTimmBackbone('vit_tiny_patch16_224',
                         model_kwargs=dict(depth=4, embed_dim=32,
                                           num_heads=2)).eval()
    fast = optimize_for_inference(vit, backend='auto')
    choice = fast.auto_choice
    assert sorted(choice['median_ms']) == ['onnxruntime', 'torch']
    assert list(choice['skipped']) == ['openvino']
    assert choice['skipped']['openvino'].startswith(
        "ValueError: backend='openvino' cannot run VBTimmBackbone: its ONNX "
        'graph has 1 bicubic Resize node(s)')


@pytest.mark.parametrize('kwargs,message', [
    (dict(dtype='fp16'),
     "dtype='fp16' is not valid for backend='auto'; use one of ['fp32', "
     "'bf16', 'int8']"),
    (dict(dtype='int8'),
     "backend='auto' found no backend for dtype='int8': onnxruntime: "
     "ValueError: dtype='int8' needs calibration"),
])
def test_auto_backend_errors(kwargs, message):
    model = VBResNet(depth=18, base_channels=8).eval()
    with pytest.raises(ValueError) as err:
        optimize_for_inference(model, backend='auto', **kwargs)
    assert str(err.value).startswith(message)


def test_deploy_detector_refuses_backbone_and_neck_without_a_neck():
    detector = toy_detector()
    detector.neck = None
    backbone = detector.backbone
    with pytest.raises(ValueError) as err:
        deploy_detector(detector, part='backbone+neck', backend='onnxruntime')
    assert str(err.value) == ("part='backbone+neck' but the MaskRCNN has no "
                              "neck; use part='backbone'")
    assert detector.backbone is backbone  # nothing changed


def _activation_scales(onnx_model: bytes):
    """The scales of the per-tensor QuantizeLinear nodes (activations)."""
    graph = onnx.load_from_string(onnx_model).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    return [float(inits[n.input[1]]) for n in graph.node
            if n.op_type == 'QuantizeLinear' and n.input[1] in inits
            and inits[n.input[1]].ndim == 0]


def test_int8_calibration_method_per_engine():
    """Each engine's int8 model is calibrated with its INT8_CALIBRATION
    method (Percentile for ONNX Runtime, MinMax for OpenVINO: see
    docs/deploy.md for the AP each gives)."""
    from vb_plugin.deploy import INT8_CALIBRATION, quantize_int8
    model = VBResNet(depth=18, base_channels=8).eval()
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randn(1, 3, 64, 96, generator=gen) for _ in range(4)]
    fp32 = export_onnx(model, example_input=calibration[0]).model
    expected = {m: _activation_scales(quantize_int8(fp32, calibration,
                                                    method=m))
                for m in ('MinMax', 'Percentile')}
    assert len(expected['MinMax']) > 10
    assert expected['MinMax'] != expected['Percentile']
    assert INT8_CALIBRATION == {'onnxruntime': 'Percentile',
                                'openvino': 'MinMax'}
    for backend, method in INT8_CALIBRATION.items():
        fast = engine_model(model, backend, 'int8', calibration=calibration,
                            example_input=calibration[0])
        assert _activation_scales(fast.export.model) == pytest.approx(
            expected[method]), backend
    with pytest.raises(ValueError) as err:
        quantize_int8(fp32, calibration, method='minmax')
    assert str(err.value) == ("method='minmax' is not valid; use one of "
                              "['MinMax', 'Entropy', 'Percentile', "
                              "'Distribution']")


@pytest.mark.parametrize('method', ['MinMax', 'Percentile'])
def test_int8_calibration_takes_one_batch_at_a_time(method, monkeypatch):
    """ONNX Runtime's calibrator gets one batch per collect_data call, so it
    holds the intermediate tensors of one batch at a time (given all at once
    it kept all of them: ResNet-50 + FPN at 800x1216 ran out of 23 GB with
    8 batches)."""
    from onnxruntime.quantization import calibrate
    from vb_plugin.deploy import quantize_int8
    cls = {'MinMax': calibrate.MinMaxCalibrater,
           'Percentile': calibrate.HistogramCalibrater}[method]
    real = cls.collect_data
    per_call = []

    def collect_data(self, reader):
        given = []
        get_next = reader.get_next

        def counted():
            batch = get_next()
            if batch:
                given.append(batch)
            return batch

        reader.get_next = counted
        try:
            return real(self, reader)
        finally:
            per_call.append(len(given))

    monkeypatch.setattr(cls, 'collect_data', collect_data)
    model = VBResNet(depth=18, base_channels=8).eval()
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randn(1, 3, 64, 96, generator=gen) for _ in range(3)]
    fp32 = export_onnx(model, example_input=calibration[0]).model
    int8 = quantize_int8(fp32, calibration, method=method)
    assert per_call == [1, 1, 1]
    assert len(_activation_scales(int8)) > 10


@pytest.mark.parametrize('backend', ['onnxruntime', 'openvino'])
def test_inference_model_of_a_segmentor_with_the_backbone_on_an_engine(
        backend):
    """mmseg's own init_model + inference_model with an UperNet's backbone
    on an engine (it has no neck: 'backbone+neck' is refused): the same
    logits within 1e-3 and the same labels as the torch model, on an odd,
    non-square image."""
    import numpy as np
    from mmseg.apis import inference_model, init_model
    config = ROOT / 'configs/seg/upernet_vb-convnext-atto_toy.py'
    model = init_model(str(config), device='cpu')
    image = np.random.default_rng(0).integers(0, 255, (97, 131, 3),
                                              dtype=np.uint8)
    ref = inference_model(model, image)
    with pytest.raises(ValueError, match="has no neck; use part='backbone'"):
        deploy_detector(copy.deepcopy(model), part='backbone+neck',
                        backend=backend)
    deployed = deploy_detector(copy.deepcopy(model), part='backbone',
                               backend=backend)
    assert isinstance(deployed.backbone, EngineModel)
    out = inference_model(deployed, image)
    assert out.seg_logits.data.shape == ref.seg_logits.data.shape
    assert (out.seg_logits.data - ref.seg_logits.data).abs().max() <= 1e-3
    same = (out.pred_sem_seg.data == ref.pred_sem_seg.data).float().mean()
    assert same >= 0.999


@pytest.mark.parametrize('threads,sessions', [(None, 1), (3, 2)])
def test_onnxruntime_engine_reuses_the_sessions_of_the_export_check(
        threads, sessions, monkeypatch):
    """The export's onnxruntime check session is the fp32 engine (one
    session, not two) unless the engine asks for other threads."""
    made = []

    class Counted(ort.InferenceSession):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ort, 'InferenceSession', Counted)
    model = VBResNet(depth=18, base_channels=8).eval()
    fast = engine_model(model, backend='onnxruntime', threads=threads)
    assert len(made) == sessions
    assert fast.export.session is None
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert max_abs_difference(model(x), fast(x)) <= 1e-4
    copy.deepcopy(fast)
