"""A small COCO-format instance-segmentation dataset, generated on the fly.

Deterministic (a seed), no download. Each image shows one to four
non-overlapping shapes (square, disc, triangle) in random sizes and colours
on a textured background (noise and stripes), with polygon masks and boxes.
It is meant to be learned in minutes on a CPU, so that a short schedule can
show that a detector really trains and evaluates.
"""
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

TOY_CLASSES = ('square', 'disc', 'triangle')


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.integers(20, 140, size=3)
    yy, xx = np.mgrid[0:h, 0:w]
    angle = rng.uniform(0, math.pi)
    freq = rng.uniform(0.05, 0.3)
    stripes = np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)))
    img = base[None, None, :] + 25 * stripes[..., None] \
        + rng.normal(0, 12, size=(h, w, 3))
    return img


def _polygon(kind: str, cx: float, cy: float, r: float,
             rng: np.random.Generator) -> np.ndarray:
    if kind == 'square':
        angles = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
    elif kind == 'disc':
        angles = np.linspace(0, 2 * math.pi, 24, endpoint=False)
    else:
        angles = np.array([0.5, 0.5 + 2 / 3, 0.5 + 4 / 3]) * math.pi \
            + rng.uniform(-0.3, 0.3)
    return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1)


def _fill(img: np.ndarray, poly: np.ndarray, color: np.ndarray,
          rng: np.random.Generator) -> np.ndarray:
    import cv2
    mask = np.zeros(img.shape[:2], dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
    noise = rng.normal(0, 8, size=img.shape)
    img[mask > 0] = (color[None, :] + noise[mask > 0])
    return mask


def make_image(rng: np.random.Generator, size: Tuple[int, int],
               max_objects: int = 4) -> Tuple[np.ndarray, List[dict]]:
    """One image (HxWx3 uint8, BGR) and its objects (polygon, box, label)."""
    h, w = size
    img = _background(rng, h, w)
    objects, placed = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            r = rng.uniform(0.08, 0.22) * min(h, w)
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            if all(math.hypot(cx - x, cy - y) > r + q + 2
                   for x, y, q in placed):
                break
        else:
            continue
        label = int(rng.integers(len(TOY_CLASSES)))
        poly = _polygon(TOY_CLASSES[label], cx, cy, r, rng)
        poly[:, 0] = poly[:, 0].clip(0, w - 1)
        poly[:, 1] = poly[:, 1].clip(0, h - 1)
        color = rng.integers(150, 256, size=3) if rng.random() < 0.5 else \
            rng.integers(0, 60, size=3)
        mask = _fill(img, poly, color.astype(np.float64), rng)
        ys, xs = np.nonzero(mask)
        box = [float(xs.min()), float(ys.min()),
               float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        objects.append(dict(polygon=poly, bbox=box, label=label,
                            area=float(mask.sum())))
        placed.append((cx, cy, r))
    return np.clip(img, 0, 255).astype(np.uint8), objects


def make_toy_coco(root: str,
                  splits: Dict[str, int] = None,
                  size: Sequence[int] = (160, 160),
                  seed: int = 0) -> Dict[str, Path]:
    """Write the toy dataset under ``root`` in COCO layout.

    ``root/{split}/NNNNN.png`` and ``root/annotations/{split}.json`` for
    each split. Existing files are overwritten; the same arguments always
    give the same bytes.

    Args:
        root (str): Output folder.
        splits (dict): Split name to number of images. Defaults to
            ``{'train': 300, 'val': 60}``.
        size (Sequence[int]): Image (height, width). Defaults to (160, 160).
        seed (int): Random seed. Defaults to 0.

    Returns:
        dict: Split name to its annotation file.

    Example:
        >>> import tempfile, json
        >>> out = make_toy_coco(tempfile.mkdtemp(), splits={'val': 2})
        >>> ann = json.load(open(out['val']))
        >>> len(ann['images']), [c['name'] for c in ann['categories']]
        (2, ['square', 'disc', 'triangle'])
    """
    import cv2
    splits = splits or {'train': 300, 'val': 60}
    root = Path(root)
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    out = {}
    for split_idx, (split, count) in enumerate(sorted(splits.items())):
        rng = np.random.default_rng([seed, split_idx])
        (root / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            img, objects = make_image(rng, tuple(size))
            name = f'{i:05d}.png'
            cv2.imwrite(str(root / split / name), img)
            images.append(dict(id=i, file_name=name, height=int(size[0]),
                               width=int(size[1])))
            for obj in objects:
                annotations.append(
                    dict(id=len(annotations) + 1, image_id=i,
                         category_id=obj['label'] + 1, bbox=obj['bbox'],
                         area=obj['area'], iscrowd=0,
                         segmentation=[obj['polygon'].round(2).ravel()
                                       .tolist()]))
        categories = [dict(id=k + 1, name=n) for k, n in enumerate(TOY_CLASSES)]
        ann_file = root / 'annotations' / f'{split}.json'
        ann_file.write_text(json.dumps(dict(images=images,
                                            annotations=annotations,
                                            categories=categories)))
        out[split] = ann_file
    return out
