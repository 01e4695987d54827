"""Bundled data: a toy COCO-format instance-segmentation set made on the fly."""
from .toy_coco import TOY_CLASSES, make_image, make_toy_coco

__all__ = ['TOY_CLASSES', 'make_image', 'make_toy_coco']
