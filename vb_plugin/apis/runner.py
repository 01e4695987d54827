"""The Runner set-up of ``tools/train.py`` and ``tools/test.py``: mmdet's
tool flags, exact resume, sync BN with timm layers, CPU multi-process.
"""
import os
from pathlib import Path
from typing import Optional

import torch
from mmengine.config import Config

from .config import _meta_backbone, wire_neck_channels


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
    from ..layers import norm_act_layers
    from ..layers.sync_bn import SYNC_BN_IMPLEMENTATIONS
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
