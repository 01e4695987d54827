"""SyncBN with timm's norm-act layers kept whole: the conversion, the DDP
wrapper that applies it, and the config policy that routes ``sync_bn`` there.

mmengine's Runner converts a model for ``sync_bn`` with
:func:`mmengine.model.convert_sync_batchnorm`, which knows only torch's
``_BatchNorm``: timm's ``BatchNormAct2d`` (a ``_BatchNorm`` with its
activation inside) becomes a plain ``SyncBatchNorm`` that keeps the ``act``
child but never calls it. Nothing fails; the activations are gone. timm's own
converter (:func:`timm.layers.convert_sync_batchnorm`) makes them
``SyncBatchNormAct`` instead, which does call them.

:func:`convert_sync_batchnorm` is mmengine's conversion with timm's for those
layers, and :class:`VBDistributedDataParallel` applies it where the Runner
applies mmengine's (after building the model, before wrapping it in DDP).
:func:`route_sync_bn` (called by :func:`vb_plugin.apis.setup_runner_config`,
``tools/train.py``) routes ``sync_bn`` through it when the backbone has such
layers.
"""
from typing import List

from mmengine.config import Config

from mmengine.model import MMDistributedDataParallel
from mmengine.model import convert_sync_batchnorm as mmengine_convert
from mmengine.registry import MODEL_WRAPPERS
from timm.layers import BatchNormAct2d
from timm.layers import convert_sync_batchnorm as timm_convert
from timm.layers.norm_act import SyncBatchNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

SYNC_BN_IMPLEMENTATIONS = ('torch', 'mmcv')


def norm_act_layers(module: nn.Module) -> List[str]:
    """Names of the timm norm-act batch norms in ``module`` that mmengine's
    ``convert_sync_batchnorm`` would strip of their activation.

    Example:
        >>> norm_act_layers(nn.Sequential(nn.Conv2d(3, 4, 1),
        ...                               BatchNormAct2d(4), nn.BatchNorm2d(4)))
        ['1']
    """
    return [name for name, m in module.named_modules()
            if isinstance(m, BatchNormAct2d)
            and not isinstance(m, SyncBatchNormAct)]


def check_sync_bn(implementation: str) -> None:
    """Raise ``ValueError`` unless ``implementation`` is a ``sync_bn`` value
    mmengine knows ('torch' or 'mmcv').

    Example:
        >>> check_sync_bn('torch')
    """
    if implementation not in SYNC_BN_IMPLEMENTATIONS:
        raise ValueError(f'sync_bn={implementation!r} is not valid; use one '
                         f'of {SYNC_BN_IMPLEMENTATIONS}')


def convert_sync_batchnorm(module: nn.Module,
                           implementation: str = 'torch') -> nn.Module:
    """Convert every batch norm to SyncBN, as mmengine's
    ``convert_sync_batchnorm`` does, but timm's ``BatchNormAct2d`` to timm's
    ``SyncBatchNormAct``, which keeps its activation.

    Parameters and buffers are shared with the original layers, so outputs
    in eval mode are unchanged. Children are replaced in place; the root is
    returned (a new object if the root itself is a batch norm).

    Args:
        module (nn.Module): The model.
        implementation (str): 'torch' (``torch.nn.SyncBatchNorm``) or
            'mmcv' (``mmcv.ops.SyncBatchNorm``), as mmengine's ``sync_bn``.

    Returns:
        nn.Module: The converted model.

    Raises:
        ValueError: On another implementation, or on 'mmcv' when the model
            has a timm norm-act layer (mmcv's SyncBN has no form with an
            activation).

    Example:
        >>> import torch
        >>> bn = BatchNormAct2d(4, act_layer=nn.ReLU).eval()
        >>> synced = convert_sync_batchnorm(nn.Sequential(bn))[0]
        >>> x = torch.randn(2, 4, 3, 3)
        >>> type(synced).__name__, torch.equal(synced(x), bn(x))
        ('SyncBatchNormAct', True)
    """
    check_sync_bn(implementation)
    if isinstance(module, SyncBatchNormAct):
        return module
    if isinstance(module, BatchNormAct2d):
        if implementation != 'torch':
            raise ValueError(
                f"sync_bn={implementation!r} cannot keep the activation of "
                f"timm's {type(module).__name__} (mmcv's SyncBatchNorm has "
                "no form with one, and would drop it); use sync_bn='torch', "
                "which converts it to timm's SyncBatchNormAct")
        return timm_convert(module)
    if isinstance(module, _BatchNorm):
        return mmengine_convert(module, implementation)
    for name, child in list(module.named_children()):
        new = convert_sync_batchnorm(child, implementation)
        if new is not child:
            module.add_module(name, new)
    return module


@MODEL_WRAPPERS.register_module()
class VBDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's ``MMDistributedDataParallel`` that converts the model for
    ``sync_bn`` itself, with :func:`convert_sync_batchnorm`.

    :func:`vb_plugin.apis.setup_runner_config` moves a config's ``sync_bn``
    here (``model_wrapper_cfg=dict(type='VBDistributedDataParallel',
    sync_bn=...)``) when the backbone has timm norm-act layers, so that
    mmengine's Runner, which would convert with its own function, does not.

    Args:
        module (nn.Module): The model, built and on its device.
        sync_bn (str, optional): 'torch' or 'mmcv', as the config's
            ``sync_bn``. None converts nothing. Defaults to None.
        **kwargs: ``MMDistributedDataParallel``'s and DDP's arguments.
    """

    def __init__(self, module: nn.Module, sync_bn=None, **kwargs) -> None:
        if sync_bn is not None:
            module = convert_sync_batchnorm(module, sync_bn)
        super().__init__(module=module, **kwargs)


def route_sync_bn(cfg: Config, backbone_type: str,
                  backbone: nn.Module) -> None:
    """Keep timm's norm-act layers whole under the config's ``sync_bn``.

    mmengine's Runner converts a distributed model for ``sync_bn`` with
    ``mmengine.model.convert_sync_batchnorm``, which turns timm's
    ``BatchNormAct2d`` into a plain ``SyncBatchNorm`` that never calls the
    activation. When ``backbone`` (built on the ``meta`` device) has such
    layers, ``sync_bn`` moves into ``model_wrapper_cfg``: the Runner then
    builds :class:`VBDistributedDataParallel`, which converts with
    :func:`convert_sync_batchnorm` and is otherwise mmengine's default
    wrapper. Other models are left to mmengine.

    Args:
        cfg (Config): The config; changed in place.
        backbone_type (str): The backbone's ``type``, for messages.
        backbone (nn.Module): The backbone, e.g. on the meta device.

    Raises:
        ValueError: On sync_bn='mmcv' with norm-act layers (it would drop
            their activations), or another wrapper type than mmengine's
            default or ours.

    Example:
        >>> from mmengine.config import Config
        >>> cfg = Config(dict(sync_bn='torch'))
        >>> route_sync_bn(cfg, 'X', nn.Sequential(BatchNormAct2d(4)))
        >>> 'sync_bn' in cfg, cfg.model_wrapper_cfg['type']
        (False, 'VBDistributedDataParallel')
    """
    sync_bn = cfg.sync_bn
    check_sync_bn(sync_bn)
    layers = norm_act_layers(backbone)
    if not layers:
        return
    found = (f'{backbone_type} has {len(layers)} timm norm-act layers '
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
