"""vb_plugin: backbones for MMDetection 3.x with one contract across families.

``import vb_plugin`` (or ``custom_imports=dict(imports=['vb_plugin'])`` in a
config) registers the backbones and the neck (``VBSimpleFeaturePyramid``) in
mmengine's root ``MODELS`` registry, so ``backbone=dict(type='VBResNet',
...)`` builds under mmdet's default scope.
"""
from . import engine  # noqa: F401  (registers RNGStateHook)
from .models import FAMILIES, VBBackbone
from .necks import VBSimpleFeaturePyramid
from .deploy import export_onnx
from .inference import optimize_for_inference
from .version import __version__
from .wiring import install_build_hook, wire_model
from .weights import (CheckpointError, LoadReport,
                      install_safe_mmengine_loader, load_pretrained)

install_safe_mmengine_loader()
install_build_hook()

# NOTE: every family (VBResNet, VBRegNet, VBConvNeXt, VBTimmBackbone, ...)
# by its class name, as vb_plugin.models finds them.
globals().update(FAMILIES)

__all__ = [
    'VBBackbone', *FAMILIES, 'VBSimpleFeaturePyramid', 'CheckpointError', 'LoadReport', 'export_onnx',
    'optimize_for_inference', 'load_pretrained', 'wire_model', '__version__'
]
