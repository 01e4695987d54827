"""Backbone families. Importing this registers them in mmengine's MODELS."""
from .base import VBBackbone, check_frozen_stages, resolve_out_indices
from .resnet import RESNET_ARCHS, VBResNet

__all__ = [
    'VBBackbone', 'VBResNet', 'RESNET_ARCHS', 'check_frozen_stages',
    'resolve_out_indices'
]
