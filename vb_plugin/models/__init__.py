"""Backbone families. Importing this registers them in mmengine's MODELS."""
from .base import VBBackbone, check_frozen_stages, resolve_out_indices
from .convnext import CONVNEXT_ARCHS, VBConvNeXt
from .regnet import REGNET_ARCHS, VBRegNet
from .resnet import RESNET_ARCHS, DCNInputSizeError, VBResNet
from .timm import VBTimmBackbone

__all__ = [
    'VBBackbone', 'VBConvNeXt', 'CONVNEXT_ARCHS', 'VBResNet', 'RESNET_ARCHS',
    'DCNInputSizeError',
    'VBRegNet', 'REGNET_ARCHS',
    'VBTimmBackbone', 'check_frozen_stages', 'resolve_out_indices'
]
