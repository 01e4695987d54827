"""Library side of ``tools/``: configs, neck wiring, runners, smoke runs.

The scripts in ``tools/`` only parse arguments and call these functions.
"""
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.registry import MODELS, init_default_scope
from torch import nn

from .wiring import wire_model


def load_config(config: str, cfg_options: Optional[dict] = None) -> Config:
    """Read an mmdet config, importing its ``custom_imports`` (vb_plugin).

    ``config`` is a file, or a config shipped in an installed package:
    ``mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py`` (mmengine's
    ``get_config``; nothing is downloaded).
    """
    if '::' in config:
        from mmengine.hub import get_config
        cfg = get_config(config)
    else:
        cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def _meta_backbone(cfg: Config) -> Tuple[dict, nn.Module]:
    """The config's backbone, built on the ``meta`` device (no memory, no
    initialisation), with its config (``init_cfg`` dropped)."""
    backbone_cfg = cfg.model.backbone.copy()
    backbone_cfg.pop('init_cfg', None)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    with torch.device('meta'):
        return backbone_cfg, MODELS.build(backbone_cfg)


def wire_neck_channels(cfg: Config) -> Optional[Tuple[int, ...]]:
    """Fill or check ``cfg.model.neck.in_channels`` from the backbone, and
    check the heads' strides and the input padding against it.

    The same check runs in every entry point that builds the model (see
    :mod:`vb_plugin.wiring`); calling it on the config first also puts the
    filled-in list into the config that a tool saves. With
    ``in_channels='auto'`` (or missing) the neck gets the backbone's
    ``out_channels``. A list that disagrees raises a ``ValueError`` that gives
    the right list, before any weights exist, instead of a conv shape error
    deep inside the neck. The backbone is built on the ``meta`` device, so
    this costs no memory and no initialisation.

    A list of necks (``neck=[dict(...), dict(...)]``, built by mmengine as a
    sequence) is wired through its first neck, the one that takes the
    backbone's outputs; the later ones take the previous neck's and need
    their ``in_channels`` written. An int ``in_channels`` is a neck that
    takes one map (mmdet's ``DilatedEncoder`` of YOLOF, ``CTResNetNeck``):
    it is checked against a backbone with one output.

    Returns:
        tuple | None: The backbone's out_channels, or None when the model has
        no neck or its backbone has no ``out_channels``.

    Raises:
        ValueError: If ``in_channels`` disagrees with the backbone, or a
            later neck of a list says ``'auto'``.
        TypeError: If ``in_channels`` is neither ``'auto'``, a list of ints
            nor, for a backbone with one output, an int.

    Example:
        >>> cfg = Config(dict(model=dict(
        ...     backbone=dict(type='VBResNet', depth=18, out_indices=(1, 2, 3)),
        ...     neck=dict(type='FPN', in_channels='auto', out_channels=8))))
        >>> wire_neck_channels(cfg), cfg.model.neck.in_channels
        ((128, 256, 512), [128, 256, 512])
    """
    model = cfg.get('model', {})
    if not isinstance(model, dict) or 'backbone' not in model:
        return None
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    return wire_model(model)


def build_detector(cfg: Config, pretrained: bool = True) -> nn.Module:
    """Build ``cfg.model`` under the config's default scope (mmdet).

    Args:
        cfg (Config): The config.
        pretrained (bool): Keep the backbone's pretrained ``init_cfg``. With
            False it is dropped, for machines without the weights.
    """
    wire_neck_channels(cfg)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model_cfg = cfg.model.copy()
    if not pretrained:
        model_cfg.backbone.pop('init_cfg', None)
    model = MODELS.build(model_cfg)
    model.init_weights()
    return model


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


def train_step_and_predict(model: nn.Module,
                           batch: Dict[str, list],
                           lr: float = 0.01) -> Tuple[Dict[str, torch.Tensor],
                                                      Sequence]:
    """One SGD training step with mmdet's losses, then one prediction.

    Returns:
        tuple: The logged losses of the step and the predicted data samples.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optim = OptimWrapper(torch.optim.SGD(params, lr=lr, momentum=0.9))
    model.train()
    losses = model.train_step(batch, optim)
    model.eval()
    with torch.no_grad():
        preds = model.test_step(batch)
    return losses, preds


def setup_runner_config(cfg: Config,
                        config_path: str,
                        work_dir: Optional[str] = None,
                        resume: Optional[str] = None,
                        amp: bool = False,
                        launcher: str = 'none') -> Config:
    """Apply the usual mmdet tool flags to ``cfg`` (as mmdet's
    ``tools/train.py`` does) and wire the neck.

    Args:
        cfg (Config): The loaded config (``--cfg-options`` already merged).
        config_path (str): Its file, for the default work dir.
        work_dir (str, optional): ``--work-dir``; else the config's, else
            ``work_dirs/<config name>``.
        resume (str, optional): ``--resume``: 'auto' for the latest
            checkpoint in the work dir, or a checkpoint path.
        amp (bool): ``--amp``: mixed precision with dynamic loss scaling.
        launcher (str): 'none' or 'pytorch' (torchrun), 'slurm', 'mpi'.

    It also adds :class:`vb_plugin.engine.RNGStateHook`, so that a resumed
    run continues exactly as an uninterrupted one, and routes ``sync_bn``
    through :class:`vb_plugin.layers.VBDistributedDataParallel` when the
    backbone has timm norm-act layers (mmengine's own conversion would drop
    their activations).
    """
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = os.path.join('work_dirs', Path(config_path).stem)
    if amp:
        if not torch.cuda.is_available():
            raise ValueError('amp=True (--amp) needs a GPU: mmengine\'s '
                             'AmpOptimWrapper supports no CPU training')
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif resume is not None:
        cfg.resume, cfg.load_from = True, resume
    wire_neck_channels(cfg)
    if cfg.get('sync_bn') is not None:
        _setup_sync_bn(cfg)
    hooks = cfg.get('custom_hooks') or []
    if not any(h.get('type') == 'RNGStateHook' for h in hooks):
        cfg.custom_hooks = [*hooks, dict(type='RNGStateHook')]
    if launcher != 'none' and not torch.cuda.is_available():
        _setup_cpu_distributed(cfg)
    return cfg


def _setup_sync_bn(cfg: Config) -> None:
    """Keep timm's norm-act layers whole under ``sync_bn``.

    mmengine's Runner converts a distributed model for ``sync_bn`` with
    ``mmengine.model.convert_sync_batchnorm``, which turns timm's
    ``BatchNormAct2d`` into a plain ``SyncBatchNorm`` that never calls the
    activation. When the backbone (built on the ``meta`` device) has such
    layers, ``sync_bn`` moves into ``model_wrapper_cfg``: the Runner then
    builds :class:`vb_plugin.layers.VBDistributedDataParallel`, which
    converts with :func:`vb_plugin.layers.convert_sync_batchnorm` (timm's
    ``SyncBatchNormAct`` for those layers, mmengine's conversion for the
    others) and is otherwise mmengine's default wrapper. Other models are
    left to mmengine.
    """
    from .layers import norm_act_layers
    from .layers.sync_bn import SYNC_BN_IMPLEMENTATIONS
    sync_bn = cfg.sync_bn
    if sync_bn not in SYNC_BN_IMPLEMENTATIONS:
        raise ValueError(f'sync_bn={sync_bn!r} is not valid; use one of '
                         f'{SYNC_BN_IMPLEMENTATIONS}')
    if 'backbone' not in cfg.get('model', {}):
        return
    backbone_cfg, backbone = _meta_backbone(cfg)
    layers = norm_act_layers(backbone)
    if not layers:
        return
    found = (f'{backbone_cfg.type} has {len(layers)} timm norm-act layers '
             f'(BatchNormAct2d, e.g. {layers[0]})')
    if sync_bn != 'torch':
        raise ValueError(
            f'sync_bn={sync_bn!r}: {found}, and mmcv\'s SyncBatchNorm has no '
            "form with an activation (it would drop theirs); use "
            "sync_bn='torch', which converts them to timm's "
            'SyncBatchNormAct')
    wrapper = cfg.get('model_wrapper_cfg')
    if wrapper is None:
        # The arguments mmengine's Runner gives its default wrapper.
        wrapper = dict(type='MMDistributedDataParallel',
                       broadcast_buffers=False,
                       find_unused_parameters=cfg.get(
                           'find_unused_parameters', False))
    wrapper_type = wrapper.get('type', 'MMDistributedDataParallel')
    if wrapper_type not in ('MMDistributedDataParallel',
                            'VBDistributedDataParallel'):
        raise ValueError(
            f'sync_bn={sync_bn!r} with model_wrapper_cfg type '
            f'{wrapper_type!r}: {found}, whose activation mmengine\'s '
            'conversion would drop. vb_plugin converts them in its '
            'VBDistributedDataParallel (an MMDistributedDataParallel); use '
            'that wrapper, or convert the model with '
            'vb_plugin.layers.convert_sync_batchnorm in yours')
    cfg.model_wrapper_cfg = dict(wrapper, type='VBDistributedDataParallel',
                                 sync_bn=sync_bn)
    cfg.pop('sync_bn')


def _setup_cpu_distributed(cfg: Config) -> None:
    """Multi-process training without GPUs.

    mmengine's pytorch launcher calls ``torch.cuda.set_device`` before it
    creates the process group, and wraps the model with
    ``device_ids=[LOCAL_RANK]``; both fail on CPU. The process group is made
    here with gloo (mmengine then skips its own), and DDP gets
    ``device_ids=None``, as CPU modules need.
    """
    import torch.distributed as dist
    backend = cfg.get('env_cfg', {}).get('dist_cfg', {}).get('backend')
    if backend not in (None, 'gloo'):
        raise ValueError(f'env_cfg.dist_cfg.backend={backend!r} needs GPUs; '
                         "use 'gloo' for multi-process training on CPU")
    sync_bn = cfg.get('sync_bn') or (cfg.get('model_wrapper_cfg')
                                     or {}).get('sync_bn')
    if sync_bn is not None:
        raise ValueError(
            f'sync_bn={sync_bn!r} needs GPUs: torch\'s DistributedDataParallel '
            'refuses SyncBatchNorm layers in CPU modules; drop sync_bn for '
            'multi-process training on CPU')
    if cfg.launcher == 'pytorch' and not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel', broadcast_buffers=False)
    wrapper.setdefault('device_ids', None)
    cfg.model_wrapper_cfg = wrapper


def build_runner(cfg: Config):
    """The Runner the config asks for (``runner_type``), as mmdet does."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def _move_data_root(cfg: Config, data_root: str) -> None:
    """Point the datasets and evaluators of a config written for its own
    ``data_root`` (the toy configs: ``'data/toy_coco/'``) at ``data_root``.
    """
    old = cfg.get('data_root')
    if not old:
        return
    new = data_root.rstrip('/') + '/'
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dataset = (cfg.get(loader) or {}).get('dataset')
        while dataset is not None:   # through dataset wrappers
            if dataset.get('data_root') == old:
                dataset.data_root = new
            dataset = dataset.get('dataset')
    for name in ('val_evaluator', 'test_evaluator'):
        evaluator = cfg.get(name)
        if isinstance(evaluator, dict) and str(evaluator.get(
                'ann_file', '')).startswith(old):
            evaluator.ann_file = new + evaluator.ann_file[len(old):]
    cfg.data_root = new


def metric_lines(metrics: Dict[str, float]) -> List[str]:
    """The evaluation lines of the demo summary: COCO bbox and segm AP, each
    only when the evaluator computed it (a boxes-only config such as DETR's
    has no segm metric); any other metrics as they are.

    Example:
        >>> metric_lines({'coco/bbox_mAP': 0.61, 'coco/bbox_mAP_50': 0.9})
        ['  bbox AP:    0.610 (AP50 0.900)']
    """
    lines = []
    for kind in ('bbox', 'segm'):
        ap = metrics.get(f'coco/{kind}_mAP')
        if ap is not None:
            ap50 = metrics.get(f'coco/{kind}_mAP_50', float('nan'))
            lines.append(f'  {kind} AP:    {ap:.3f} (AP50 {ap50:.3f})')
    if not lines:
        lines.append(f'  metrics:    {dict(metrics)}')
    return lines


def run_demo(config: str,
             work_dir: str,
             data_root: str = 'data/toy_coco',
             max_iters: Optional[int] = None,
             log_level: str = 'WARNING') -> str:
    """Generate the toy data, train, evaluate; return a printable summary.

    Args:
        config (str): A toy-dataset config.
        work_dir (str): Where logs and checkpoints go.
        data_root (str): Where the toy dataset is written (if missing) and
            read from: it replaces the config's ``data_root``.
        max_iters (int, optional): Override the schedule's length.
        log_level (str): mmengine's console log level (the progress bar and
            the summary are printed regardless).
    """
    from .datasets import make_toy_coco
    root = Path(data_root)
    if not (root / 'annotations' / 'val.json').is_file():
        make_toy_coco(str(root))
    # Evaluate once, after training (not also inside the training loop).
    options = {'log_level': log_level, 'train_cfg.val_begin': 10**9}
    if max_iters is not None:
        options['train_cfg.max_iters'] = max_iters
    cfg = load_config(config, options)
    _move_data_root(cfg, str(root))
    setup_runner_config(cfg, config, work_dir=work_dir)
    cfg.custom_hooks = [*cfg.custom_hooks, dict(type='ProgressBarHook')]
    runner = build_runner(cfg)
    runner.train()
    metrics = runner.val_loop.run()
    backbone = runner.model.backbone
    bcfg = {k: v for k, v in cfg.model.backbone.items() if k != 'type'}
    ckpt = Path(cfg.work_dir) / f'iter_{runner.iter}.pth'
    lines = [
        'vb_plugin demo summary',
        f'  config:     {config}',
        f'  backbone:   {type(backbone).__name__}({bcfg})',
        f'              out_channels={backbone.out_channels}, '
        f'out_strides={backbone.out_strides}',
        f'  trained:    {runner.iter} iterations on {data_root}',
        *metric_lines(metrics),
        f'  logs:       {Path(cfg.work_dir) / runner.timestamp}',
        f'  checkpoint: {ckpt}',
    ]
    return '\n'.join(lines)
