"""Deployment: ONNX export and the ONNX Runtime / OpenVINO engines.

Needs the ``deploy`` extra (``pip install vb_plugin[deploy]``: onnx,
onnxruntime, openvino); importing this package does not import them.
See docs/deploy.md.
"""
from .calibration import calibration_inputs
from .engines import (BACKEND_DTYPES, BACKENDS, EngineModel,
                      deploy_detector, engine_model)
from .onnx_export import (DEFAULT_OPSET, ExportError, OnnxExport,
                          export_config, export_onnx, output_names,
                          prepare_for_export)
from .parts import PARTS, BackboneWithNeck, check_part
from .quantize import INT8_CALIBRATION, quantize_int8

__all__ = [
    'BACKENDS', 'BACKEND_DTYPES', 'DEFAULT_OPSET', 'INT8_CALIBRATION',
    'PARTS', 'BackboneWithNeck', 'EngineModel', 'ExportError', 'OnnxExport',
    'calibration_inputs', 'check_part', 'deploy_detector', 'engine_model',
    'export_config', 'export_onnx', 'output_names', 'prepare_for_export',
    'quantize_int8'
]
