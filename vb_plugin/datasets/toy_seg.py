"""A small semantic-segmentation dataset in mmseg's folder format, generated
on the fly.

Deterministic (a seed), no download. Each image shows one to four
non-overlapping shapes (square, disc, triangle) in random sizes and colours on
a textured background (noise and stripes), drawn by the same generator as the
detection toy set (:func:`vb_plugin.datasets.make_image`). The label map gives
every pixel its class: 0 background, 1 square, 2 disc, 3 triangle. Layout::

    root/img_dir/{train,val}/NNNNN.png   BGR images
    root/ann_dir/{train,val}/NNNNN.png   uint8 label maps

which mmseg's ``BaseSegDataset`` reads with ``img_suffix='.png'``,
``seg_map_suffix='.png'`` and ``reduce_zero_label=False``
(``configs/seg/_base_/toy_seg.py``).
"""
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np

from .toy_coco import TOY_CLASSES, make_image

#: Class names of the label maps, index = pixel value.
TOY_SEG_CLASSES = ('background', ) + TOY_CLASSES


def make_seg_image(rng: np.random.Generator,
                   size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """One image (HxWx3 uint8, BGR) and its label map (HxW uint8).

    Example:
        >>> img, label = make_seg_image(np.random.default_rng(0), (32, 48))
        >>> img.shape, label.shape, label.dtype, int(label.max()) <= 3
        ((32, 48, 3), (32, 48), dtype('uint8'), True)
    """
    import cv2
    img, objects = make_image(rng, size)
    label = np.zeros(size, dtype=np.uint8)
    for obj in objects:
        # NOTE: the same polygon rasterisation as the image's shape fill, so
        # labels and pixels agree exactly.
        cv2.fillPoly(label, [np.round(obj['polygon']).astype(np.int32)],
                     obj['label'] + 1)
    return img, label


def make_toy_seg(root: str,
                 splits: Dict[str, int] = None,
                 size: Sequence[int] = (128, 128),
                 seed: int = 0) -> Dict[str, Path]:
    """Write the toy segmentation dataset under ``root`` (mmseg layout).

    Existing files are overwritten; the same arguments always give the same
    bytes.

    Args:
        root, splits, size, seed: As for
            :func:`~vb_plugin.datasets.make_toy_coco`, with the defaults
            ``{'train': 200, 'val': 40}`` and (128, 128); ``size`` must be
            at least 16 on both sides.

    Returns:
        dict: Split name to its label-map folder.

    Example:
        >>> import tempfile
        >>> out = make_toy_seg(tempfile.mkdtemp(), splits={'val': 2},
        ...                    size=(32, 32))
        >>> sorted(p.name for p in out['val'].iterdir())
        ['00000.png', '00001.png']
    """
    import cv2
    splits = splits or {'train': 200, 'val': 40}
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f'size must be (height, width), both >= 16, got '
                         f'{tuple(size)!r}')
    root = Path(root)
    out = {}
    for split_idx, (split, count) in enumerate(sorted(splits.items())):
        rng = np.random.default_rng([seed, split_idx])
        img_dir = root / 'img_dir' / split
        ann_dir = root / 'ann_dir' / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, label = make_seg_image(rng, tuple(int(s) for s in size))
            cv2.imwrite(str(img_dir / f'{i:05d}.png'), img)
            cv2.imwrite(str(ann_dir / f'{i:05d}.png'), label)
        out[split] = ann_dir
    return out
