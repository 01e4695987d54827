"""Calibration inputs for int8: images of a dataset the config names, as
the detector's data preprocessor gives them to the backbone."""
import contextlib
import io
from typing import Iterator, Optional

import torch
from mmengine.config import Config
from mmengine.registry import MODELS
from mmengine.runner import Runner


def calibration_inputs(cfg: Config,
                       num_images: int = 300,
                       split: str = 'val',
                       data_preprocessor: Optional[torch.nn.Module] = None
                       ) -> Iterator[torch.Tensor]:
    """Yield backbone inputs (normalised, padded NCHW batches of one image)
    from the config's ``{split}_dataloader``, through its model's
    ``data_preprocessor``, for int8 calibration.

    Args:
        cfg (Config): A detection or segmentation config (its dataset, test
            pipeline and data preprocessor are used).
        num_images (int): How many images. Defaults to 300.
        split (str): 'train', 'val' or 'test'. Defaults to 'val'.
        data_preprocessor (nn.Module, optional): Defaults to one built from
            ``cfg.model.data_preprocessor``.

    Example (run in docs/deploy.md, which writes the toy set first):
        >>> cfg = Config.fromfile('configs/mask_rcnn/'
        ...                       'mask-rcnn_vb-r18_fpn_toy.py')
        >>> batches = list(calibration_inputs(cfg, 8))  # doctest: +SKIP
    """
    if split not in ('train', 'val', 'test'):
        raise ValueError(f"split={split!r} is not valid; use 'train', "
                         "'val' or 'test'")
    key = f'{split}_dataloader'
    if cfg.get(key) is None:
        raise ValueError(f'the config has no {key} to calibrate with')
    loader_cfg = cfg[key].copy()
    loader_cfg['batch_size'] = 1
    loader_cfg['num_workers'] = 0
    loader_cfg['persistent_workers'] = False
    loader_cfg['sampler'] = dict(type='DefaultSampler', shuffle=False)
    # NOTE: pycocotools prints while it indexes the annotations.
    with contextlib.redirect_stdout(io.StringIO()):
        loader = Runner.build_dataloader(loader_cfg)
    if data_preprocessor is None:
        data_preprocessor = MODELS.build(cfg.model.data_preprocessor)
    seen = 0
    for data in loader:
        if seen >= num_images:
            break
        with torch.no_grad():
            yield data_preprocessor(data, False)['inputs']
        seen += 1
