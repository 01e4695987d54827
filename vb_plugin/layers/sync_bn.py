"""SyncBN conversion that keeps timm's norm-act layers whole.

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
:func:`vb_plugin.apis.setup_runner_config` (``tools/train.py``) routes
``sync_bn`` through it when the backbone has such layers.
"""
from typing import List

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
    if implementation not in SYNC_BN_IMPLEMENTATIONS:
        raise ValueError(f'sync_bn={implementation!r} is not valid; use one '
                         f'of {SYNC_BN_IMPLEMENTATIONS}')
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
