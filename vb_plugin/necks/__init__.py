"""Necks that vb_plugin registers in mmengine's root ``MODELS``."""
from .simple_pyramid import VBSimpleFeaturePyramid

#: Every neck, for the reference docs.
NECKS = (VBSimpleFeaturePyramid, )

__all__ = ['NECKS', 'VBSimpleFeaturePyramid']
