"""int8 quantization of an ONNX model with ONNX Runtime's own tool, and
the calibration batches it takes."""
import tempfile
from pathlib import Path
from typing import List, Sequence

import torch


def calibration_batches(calibration, limit: int) -> List[torch.Tensor]:
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
