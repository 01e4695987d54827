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
    through :class:`vb_plugin.engine.VBDistributedDataParallel` when the
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
    """:func:`vb_plugin.engine.route_sync_bn` with the config's backbone,
    built on the meta device (the value of ``sync_bn`` is checked first)."""
    from ..engine import check_sync_bn, route_sync_bn
    check_sync_bn(cfg.sync_bn)
    if 'backbone' not in cfg.get('model', {}):
        return
    backbone_cfg, backbone = _meta_backbone(cfg)
    route_sync_bn(cfg, backbone_cfg.type, backbone)


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
