"""vb_plugin: backbones for MMDetection 3.x with one contract across families.

``import vb_plugin`` (or ``custom_imports=dict(imports=['vb_plugin'])`` in a
config) registers the backbones in mmengine's root ``MODELS`` registry, so
``backbone=dict(type='VBResNet', ...)`` builds under mmdet's default scope.
"""
from .models import VBBackbone, VBResNet
from .version import __version__
from .weights import CheckpointError, LoadReport, load_pretrained

__all__ = [
    'VBBackbone', 'VBResNet', 'CheckpointError', 'LoadReport',
    'load_pretrained', '__version__'
]
