"""A synthetic detection batch in mmdet's data format (tests, benchmark).
"""
from typing import Dict, Tuple

import numpy as np
import torch



def synthetic_detection_batch(num_images: int = 1,
                              size: Tuple[int, int] = (256, 320),
                              num_objects: int = 3,
                              num_classes: int = 80,
                              seed: int = 0) -> Dict[str, list]:
    """A batch in mmdet's data format: bright boxes on a noisy background,
    with their boxes, labels and masks.

    Example:
        >>> batch = synthetic_detection_batch(num_images=2, size=(64, 96))
        >>> batch['inputs'][0].shape, len(batch['data_samples'][1].gt_instances)
        (torch.Size([3, 64, 96]), 3)
    """
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    rng = np.random.default_rng(seed)
    h, w = size
    inputs, samples = [], []
    for i in range(num_images):
        img = rng.integers(0, 80, size=(3, h, w), dtype=np.uint8)
        masks = np.zeros((num_objects, h, w), dtype=np.uint8)
        boxes = []
        for k in range(num_objects):
            bh = int(rng.integers(h // 6, h // 2))
            bw = int(rng.integers(w // 6, w // 2))
            y0 = int(rng.integers(0, h - bh))
            x0 = int(rng.integers(0, w - bw))
            masks[k, y0:y0 + bh, x0:x0 + bw] = 1
            img[:, y0:y0 + bh, x0:x0 + bw] = rng.integers(120, 255, (3, 1, 1))
            boxes.append([x0, y0, x0 + bw, y0 + bh])
        sample = DetDataSample(
            metainfo=dict(img_id=i, img_shape=(h, w), ori_shape=(h, w),
                          scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor(boxes, dtype=torch.float32),
            labels=torch.from_numpy(
                rng.integers(0, num_classes, num_objects)).long(),
            masks=BitmapMasks(masks, h, w))
        inputs.append(torch.from_numpy(img))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)
