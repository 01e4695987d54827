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
within :func:`~vb_plugin.outputs.tolerance_for`.
"""
import dataclasses
from typing import Iterable, Optional

import torch
from torch import nn

from ..outputs import max_abs_difference, tolerance_for
from .onnx_export import OnnxExport, _as_list, export_onnx, ort_session
from .openvino import OpenVINORun, check_openvino_ops
from .parts import BackboneWithNeck, check_part
from .quantize import INT8_CALIBRATION, calibration_batches, quantize_int8

BACKENDS = ('onnxruntime', 'openvino')
#: dtypes each backend runs (ONNX Runtime's CPU provider has no bf16
#: kernels for convolutions).
BACKEND_DTYPES = {'onnxruntime': ('fp32', 'int8'),
                  'openvino': ('fp32', 'bf16', 'int8')}


@dataclasses.dataclass
class _Compiled:
    backend: str
    run: object  # callable: np.ndarray -> list of np.ndarray


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
            ``example_input`` within
            :func:`~vb_plugin.outputs.tolerance_for`. Defaults to True.
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
        batches = calibration_batches(calibration, calibration_limit)
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
        compiled = _Compiled('openvino',
                             OpenVINORun(onnx_model, dtype, threads))
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
        tol = tolerance_for(dtype, ref)
        result.max_abs_diff = diff
        if not diff <= tol:
            raise ValueError(
                f'the {backend} {dtype} form of {type(model).__name__} '
                f'differs from the fp32 eager model by {diff:.3g} (> '
                f'{tol:.3g}, see tolerance_for) at input '
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
