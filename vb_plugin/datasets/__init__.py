"""Bundled data: a toy COCO-format instance-segmentation set made on the fly."""
from .toy_coco import TOY_CLASSES, make_image, make_toy_coco
from .toy_seg import TOY_SEG_CLASSES, make_seg_image, make_toy_seg

__all__ = ['TOY_CLASSES', 'make_image', 'make_toy_coco', 'TOY_SEG_CLASSES',
           'make_seg_image', 'make_toy_seg']
