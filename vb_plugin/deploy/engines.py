"""Inference engines (ONNX Runtime, OpenVINO) behind an ``nn.Module``.

:func:`engine_model` exports a backbone (or backbone + neck) with
:func:`~vb_plugin.deploy.export_onnx`, optionally quantizes it to int8
(:func:`quantize_int8`: ONNX Runtime's static quantization, QDQ format,
which both engines run as int8), compiles it for the engine and returns an
:class:`EngineModel`: an ``nn.Module`` with the backbone's contract
(``out_channels``, ``out_strides``, ``out_indices``, outputs as torch
tensors) that a detector can hold in place of its backbone
(:func:`deploy_detector`).

Every engine model is compared with the fp32 eager model at construction,
within :func:`engine_tolerance`.
"""
import dataclasses
import functools
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import torch
from torch import nn

from ..inference import _max_abs, max_abs_difference, tolerance_for
from .onnx_export import OnnxExport, _as_list, export_onnx, ort_session

BACKENDS = ('onnxruntime', 'openvino')
#: What of a detector goes on the engine (or into the ONNX file).
PARTS = ('backbone', 'backbone+neck')
#: dtypes each backend runs (ONNX Runtime's CPU provider has no bf16
#: kernels for convolutions).
BACKEND_DTYPES = {'onnxruntime': ('fp32', 'int8'),
                  'openvino': ('fp32', 'bf16', 'int8')}
#: int8 forms: max abs difference relative to the largest |output| of the
#: fp32 eager model. Per-tensor uint8 activations keep 256 levels over the
#: calibrated range, so each layer's rounding is ~0.4% of its range and the
#: errors add up over the network; measured on the tested models: see
#: docs/deploy.md. Detection accuracy is the real check (AP before/after).
INT8_RELATIVE_TOLERANCE = 0.25


def engine_tolerance(dtype: str, reference) -> float:
    """Max abs difference to the fp32 eager ``reference`` allowed for an
    engine form in ``dtype``: as :func:`~vb_plugin.inference.tolerance_for`
    for fp32 and bf16, :data:`INT8_RELATIVE_TOLERANCE` times the largest
    |output| (at least 1) for int8.

    Example:
        >>> engine_tolerance('fp32', torch.ones(1))
        0.0001
        >>> engine_tolerance('int8', torch.full((1, ), 4.))
        1.0
    """
    if dtype == 'int8':
        return INT8_RELATIVE_TOLERANCE * max(_max_abs(reference), 1.)
    return tolerance_for(
        torch.float32 if dtype == 'fp32' else torch.bfloat16, reference)


def check_part(part: str) -> None:
    """Raise ``ValueError`` unless ``part`` is one of :data:`PARTS`.

    Example:
        >>> check_part('backbone+neck')
    """
    if part not in PARTS:
        raise ValueError(f"part={part!r} is not valid; use 'backbone' or "
                         "'backbone+neck'")


class BackboneWithNeck(nn.Module):
    """A backbone and its neck as one module (to export or deploy both).

    Example:
        >>> from mmdet.models.necks import FPN
        >>> from vb_plugin import VBResNet
        >>> bb = VBResNet(depth=18, base_channels=8)
        >>> m = BackboneWithNeck(bb, FPN(list(bb.out_channels), 16, 5))
        >>> [o.shape[-1] for o in m(torch.rand(1, 3, 64, 64))]
        [16, 8, 4, 2, 1]
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.in_channels = getattr(backbone, 'in_channels', 3)
        self.size_divisor = getattr(backbone, 'size_divisor', 1)
        # NOTE: the pair is in the backbone's mode (a new module is in
        # training mode, and train()/eval() on it reach both parts).
        self.train(backbone.training)

    def forward(self, x: torch.Tensor):
        return tuple(self.neck(self.backbone(x)))


@dataclasses.dataclass
class _Compiled:
    backend: str
    run: object  # callable: np.ndarray -> list of np.ndarray


def _cubic_resizes(onnx_model: bytes) -> List[str]:
    import onnx
    graph = onnx.load_from_string(onnx_model).graph
    return [n.name for n in graph.node if n.op_type == 'Resize' and any(
        a.name == 'mode' and a.s == b'cubic' for a in n.attribute)]


def check_openvino_ops(onnx_model: bytes, name: str = 'the model') -> None:
    """Raise ``ValueError`` for ONNX ops that OpenVINO runs differently.

    OpenVINO 2026.4's ``Resize`` in cubic mode does not reproduce torch's
    bicubic interpolation (measured: max abs diff 2e-3 at the identity size
    and 0.03-0.07 at upsampling, where onnxruntime gives <= 2e-6). timm's
    ViT, DeiT, DINOv2 and EVA at any input size resample their position
    embedding with it.
    """
    cubic = _cubic_resizes(onnx_model)
    if cubic:
        raise ValueError(
            f"backend='openvino' cannot run {name}: its ONNX graph has "
            f'{len(cubic)} bicubic Resize node(s) ({cubic[0]}, e.g. timm\'s '
            'position-embedding resampling at any input size), which '
            "OpenVINO does not compute as torch does; use "
            "backend='onnxruntime'")


@functools.lru_cache(maxsize=None)
def openvino_core():
    """The process's one OpenVINO ``Core``.

    One Core for every engine model: creating Cores over and over in one
    process (one per compiled model) ends in a segmentation fault (seen
    here in the test suite, and reported by other OpenVINO users), and a
    compiled model must not outlive the Core whose plugin made it.
    """
    import openvino as ov
    return ov.Core()


class _OpenVINORun:
    """An OpenVINO compiled model and its infer request."""

    def __init__(self, onnx_model: bytes, dtype: str, threads: int) -> None:
        core = openvino_core()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / 'model.onnx'
            path.write_bytes(onnx_model)
            model = core.read_model(str(path))
        config = {
            'INFERENCE_PRECISION_HINT': 'bf16' if dtype == 'bf16' else 'f32',
            'INFERENCE_NUM_THREADS': int(threads),
            'PERFORMANCE_HINT': 'LATENCY',
            'NUM_STREAMS': 1,
        }
        self.compiled = core.compile_model(model, 'CPU', config)
        del model
        self.request = self.compiled.create_infer_request()
        self.num_outputs = len(self.compiled.outputs)

    def __call__(self, array):
        self.request.infer({0: array})
        return [self.request.get_output_tensor(i).data.copy()
                for i in range(self.num_outputs)]

    def __del__(self):
        # NOTE: the request before the model it was made from.
        for name in ('request', 'compiled'):
            self.__dict__.pop(name, None)


def _ov_compile(onnx_model: bytes, dtype: str, threads: int) -> _Compiled:
    return _Compiled('openvino', _OpenVINORun(onnx_model, dtype, threads))


def _ort_compile(onnx_model: bytes, threads: int,
                 session=None) -> _Compiled:
    session = session or ort_session(onnx_model, threads)
    name = session.get_inputs()[0].name
    return _Compiled('onnxruntime',
                     lambda array: session.run(None, {name: array}))


class EngineModel(nn.Module):
    """A model compiled for an inference engine, used like the backbone.

    It holds no parameters; the input goes to the engine as fp32 numpy and
    the outputs come back as torch tensors on the input's device and dtype.

    Attributes:
        backend (str): 'onnxruntime' or 'openvino'.
        dtype (str): 'fp32', 'bf16' or 'int8'.
        export (OnnxExport): The ONNX model the engine runs (int8: the
            quantized one).
        max_abs_diff (float): The construction check's difference to the
            fp32 eager model (NaN without a check).
    """

    def __init__(self, compiled: _Compiled, dtype: str, export: OnnxExport,
                 source: nn.Module) -> None:
        super().__init__()
        self.__dict__['_compiled'] = compiled
        self.backend = compiled.backend
        self.dtype = dtype
        self.export = export
        self.max_abs_diff = float('nan')
        self.in_channels = int(getattr(source, 'in_channels', 3))
        for name in ('out_channels', 'out_strides', 'out_indices',
                     'size_divisor'):
            if hasattr(source, name):
                self.__dict__[name] = getattr(source, name)

    def train(self, mode: bool = True) -> 'EngineModel':
        """Stays in eval mode: an engine model cannot train."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> tuple:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(
                f'{self.backend} model expects an N x {self.in_channels} x H '
                f'x W tensor, got {getattr(x, "shape", type(x).__name__)}')
        outs = self._compiled.run(x.detach().float().cpu().contiguous()
                                  .numpy())
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return tuple(torch.from_numpy(o).to(x.device, dtype) for o in outs)

    def extra_repr(self) -> str:
        return f'backend={self.backend!r}, dtype={self.dtype!r}'


def _calibration_batches(calibration, limit: int) -> List[torch.Tensor]:
    if calibration is None:
        raise ValueError("dtype='int8' needs calibration: an iterable of "
                         'input batches (NCHW tensors), e.g. '
                         'vb_plugin.deploy.calibration_inputs(cfg)')
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    batches = []
    for x in calibration:
        if not (isinstance(x, torch.Tensor) and x.dim() == 4):
            raise TypeError(f'calibration must yield NCHW tensors, got '
                            f'{getattr(x, "shape", type(x).__name__)}')
        batches.append(x.detach().float().cpu())
        if len(batches) >= limit:
            break
    if not batches:
        raise ValueError('calibration gave no batches')
    return batches


#: How each engine's int8 model is calibrated (ONNX Runtime's
#: ``CalibrationMethod``). Measured on the toy Mask R-CNN (docs/deploy.md):
#: bbox AP against fp32, ONNX Runtime -1.4 with MinMax and -0.4 with
#: Percentile; OpenVINO -0.2 with MinMax and -0.6 with Percentile. The
#: speed is the same (only the scales differ).
INT8_CALIBRATION = {'onnxruntime': 'Percentile', 'openvino': 'MinMax'}


def quantize_int8(onnx_model: bytes, calibration: Sequence[torch.Tensor],
                  input_name: str = 'input', method: str = 'MinMax') -> bytes:
    """Static int8 quantization with ONNX Runtime's own tool (QDQ format,
    int8 per-channel weights, uint8 activations).

    Both engines run the result as int8 (OpenVINO reads QDQ models as its
    own quantized form). int8 activations (ONNX Runtime's S8S8) were
    measured 3.5x slower on ONNX Runtime here, so activations are uint8.

    Args:
        onnx_model (bytes): The fp32 ONNX model.
        calibration (Sequence[torch.Tensor]): Input batches, as the model
            gets them at inference (normalised images).
        input_name (str): The model's input name. Defaults to 'input'.
        method (str): ONNX Runtime's calibration method for the
            activation ranges: 'MinMax', 'Percentile' (99.999th percentile
            of the absolute values), 'Entropy' or 'Distribution'. Defaults
            to 'MinMax'; :func:`engine_model` uses
            :data:`INT8_CALIBRATION`.

    Returns:
        bytes: The quantized ONNX model.

    Raises:
        ValueError: On another ``method``.
    """
    from onnxruntime.quantization import (CalibrationDataReader,
                                          CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    methods = [m.name for m in CalibrationMethod]
    if method not in methods:
        raise ValueError(f'method={method!r} is not valid; use one of '
                         f'{methods}')

    class Reader(CalibrationDataReader):
        """The batches, one per ``collect_data`` call of the calibrator
        (ONNX Runtime's strided calibration, ``CalibStridedMinMax=1``, which
        applies to every method). Given all batches in one call, the
        calibrator keeps every intermediate tensor of all of them before it
        reduces them (histograms for 'Percentile'): ResNet-50 + FPN at
        800x1216 ran out of 23 GB with 8 batches."""

        def __init__(self):
            self.batches = list(calibration)
            self.set_range(0, len(self.batches))

        def __len__(self):
            return len(self.batches)

        def set_range(self, start_index, end_index):
            self.queue = iter(self.batches[start_index:end_index])

        def get_next(self):
            x = next(self.queue, None)
            return None if x is None else {input_name: x.numpy()}

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (Path(tmp) / n for n in ('fp32.onnx', 'pre.onnx',
                                                  'int8.onnx'))
        src.write_bytes(onnx_model)
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 (pre-processing is optional)
            pre = src
        quantize_static(str(pre), str(dst), Reader(),
                        quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod[method],
                        extra_options={'CalibStridedMinMax': 1})
        return dst.read_bytes()


def engine_model(model: nn.Module,
                 backend: str = 'onnxruntime',
                 dtype: str = 'fp32',
                 example_input: Optional[torch.Tensor] = None,
                 calibration: Optional[Iterable[torch.Tensor]] = None,
                 calibration_limit: int = 300,
                 check: bool = True,
                 threads: Optional[int] = None) -> EngineModel:
    """``model`` compiled for an inference engine, as an ``nn.Module``.

    Also reached as ``optimize_for_inference(model, backend=...)``.

    Args:
        model (nn.Module): A backbone, :class:`BackboneWithNeck`, or any
            module mapping an NCHW tensor to tensors.
        backend (str): 'onnxruntime' or 'openvino'. Defaults to
            'onnxruntime'.
        dtype (str): 'fp32', 'bf16' (OpenVINO only) or 'int8' (needs
            ``calibration``). Defaults to 'fp32'.
        example_input (torch.Tensor, optional): Export example and check
            input. Defaults to the export's default for the export and a
            1 x C x 96 x 128 random input for the check (int8: the first
            calibration batch, since quantization ranges fit the data).
        calibration (Iterable[torch.Tensor], optional): Input batches for
            int8 calibration (see :func:`calibration_inputs`).
        calibration_limit (int): At most this many batches are used.
            Defaults to 300.
        check (bool): Compare with the fp32 eager model on
            ``example_input`` within :func:`engine_tolerance`. Defaults to
            True.
        threads (int, optional): Engine threads. Defaults to
            ``torch.get_num_threads()``.

    Returns:
        EngineModel: In eval mode.

    Raises:
        ValueError: For an unknown backend or dtype, bf16 on onnxruntime,
            int8 without calibration, a model that cannot be exported, or
            a check beyond the tolerance.

    Example:
        >>> from vb_plugin import VBResNet
        >>> bb = VBResNet(depth=18, base_channels=8).eval()
        >>> fast = engine_model(bb, backend='onnxruntime')
        >>> x = torch.rand(1, 3, 96, 128)
        >>> fast.out_strides, max_abs_difference(bb(x), fast(x)) < 1e-4
        ((4, 8, 16, 32), True)
    """
    if backend not in BACKENDS:
        raise ValueError(f'backend={backend!r} is not valid; use one of '
                         f"{list(BACKENDS)} (or 'torch' in "
                         'optimize_for_inference)')
    if dtype not in BACKEND_DTYPES[backend]:
        raise ValueError(f'dtype={dtype!r} is not valid for backend='
                         f'{backend!r}; use one of '
                         f'{list(BACKEND_DTYPES[backend])}')
    threads = int(threads or torch.get_num_threads())
    batches = None
    if dtype == 'int8':
        batches = _calibration_batches(calibration, calibration_limit)
    exported = export_onnx(model, example_input=example_input, check=check)
    # NOTE: the export's check session is the fp32 onnxruntime engine when
    # its threads are the engine's (made once, not twice); the record
    # kept on the module does not hold it (sessions cannot be copied).
    checked = (exported.session if dtype == 'fp32'
               and threads == torch.get_num_threads() else None)
    exported = dataclasses.replace(exported, session=None)
    if example_input is None and batches:
        example_input = batches[0]
    onnx_model = exported.model
    if dtype == 'int8':
        onnx_model = quantize_int8(onnx_model, batches, exported.input_name,
                                   method=INT8_CALIBRATION[backend])
        exported = dataclasses.replace(exported, model=onnx_model, path='')
    if backend == 'openvino':
        check_openvino_ops(onnx_model, type(model).__name__)
        compiled = _ov_compile(onnx_model, dtype, threads)
    else:
        compiled = _ort_compile(onnx_model, threads, checked)
    result = EngineModel(compiled, dtype, exported, model).eval()
    if check:
        x = example_input if example_input is not None else (
            torch.rand(1, result.in_channels, 96, 128))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                ref = _as_list(model(x))
        finally:
            model.train(was_training)
        out = list(result(x))
        diff = max_abs_difference(ref, out)
        tol = engine_tolerance(dtype, ref)
        result.max_abs_diff = diff
        if not diff <= tol:
            raise ValueError(
                f'the {backend} {dtype} form of {type(model).__name__} '
                f'differs from the fp32 eager model by {diff:.3g} (> '
                f'{tol:.3g}, see engine_tolerance) at input '
                f'{tuple(x.shape)}')
    return result


def deploy_detector(detector: nn.Module,
                    part: str = 'backbone+neck',
                    **kwargs) -> nn.Module:
    """Put a detector's backbone (and neck) on an engine, in place.

    With ``part='backbone+neck'`` the engine runs both and the detector's
    ``neck`` becomes None (mmdet's ``extract_feat`` then skips it); heads
    stay in torch. ``kwargs`` go to :func:`engine_model`.

    Args:
        detector (nn.Module): An mmdet detector (or mmseg segmentor) with
            ``backbone`` and optionally ``neck``.
        part (str): 'backbone' or 'backbone+neck'. Defaults to
            'backbone+neck'.

    Returns:
        nn.Module: ``detector``, changed in place and in eval mode.

    Raises:
        ValueError: For an unknown ``part``, or 'backbone+neck' on a model
            without a neck (nothing is changed then).
    """
    check_part(part)
    neck = getattr(detector, 'neck', None)
    if part == 'backbone+neck' and neck is None:
        raise ValueError(f"part='backbone+neck' but the "
                         f'{type(detector).__name__} has no neck; use '
                         "part='backbone'")
    detector.eval()
    if part == 'backbone+neck':
        detector.backbone = engine_model(
            BackboneWithNeck(detector.backbone, neck), **kwargs)
        detector.neck = None
    else:
        detector.backbone = engine_model(detector.backbone, **kwargs)
    return detector
