"""Batch-norm folding: every eval-mode batch norm whose input is a
convolution's output is folded into the convolution
(``torch.nn.utils.fusion.fuse_conv_bn_weights``).

Which conv feeds which norm is read from one traced forward pass (forward
hooks), not from module names, so mmdet's ``BasicBlock``/``Bottleneck``
(``conv1`` / ``bn1`` pairs, ``downsample`` Sequentials), mmcv's
``ConvModule``, the VB families, timm's ``ConvNormAct``/``BatchNormAct2d``
and :class:`~vb_plugin.layers.FrozenBatchNorm2d` all fold the same way.
Used by the fast path (:func:`vb_plugin.optimize_for_inference`) and the
ONNX export.
"""
from collections import Counter
from typing import Dict, List, Tuple

import torch
from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d
from timm.layers import BatchNormAct2d, Conv2dSame
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .layers import FrozenBatchNorm2d, FrozenBatchNormAct2d


def _foldable_conv_types() -> Tuple[type, ...]:
    """Conv classes whose forward is a plain conv of ``weight``/``bias``.

    NOTE: a subclass such as timm's ``StdConv2d`` standardises its weight
    inside ``forward``; folding a BN into that weight would be wrong, so only
    classes known to use the weight as it is qualify.
    """
    return (nn.Conv2d, MMCVConv2d, Conv2dSame)


def _is_foldable_conv(module: nn.Module) -> bool:
    return type(module) in _foldable_conv_types()


def _is_foldable_bn(module: nn.Module) -> bool:
    """An eval-mode BN that normalises with its running statistics."""
    if isinstance(module, FrozenBatchNorm2d):
        return True
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (not module.training and module.track_running_stats
                and module.running_mean is not None
                and module.running_var is not None)
    return False


def _bn_remainder(bn: nn.Module) -> nn.Module:
    """What stays of a norm after folding: timm's ``BatchNormAct2d`` and
    :class:`FrozenBatchNormAct2d` keep their drop and act."""
    if isinstance(bn, (BatchNormAct2d, FrozenBatchNormAct2d)):
        return nn.Sequential(getattr(bn, 'drop', nn.Identity()),
                             getattr(bn, 'act', nn.Identity()))
    return nn.Identity()


class _OtherUses(TorchFunctionMode):
    """Collects in ``read`` the names (``watched``: tensor id -> name) of
    the tensors that a torch call outside every batch norm's forward takes
    as an input and that gives a tensor (shape reads do not count): a conv
    output that a shortcut or an in-place activation also reads cannot
    take the norm's folding."""

    def __init__(self, watched: Dict[int, str]) -> None:
        super().__init__()
        self.watched = watched
        self.read: set = set()  # names of the watched tensors' producers
        self.in_norm = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.in_norm and isinstance(out, torch.Tensor):
            self.read.update(self.watched[id(leaf)]
                             for leaf in tree_leaves((args, kwargs))
                             if isinstance(leaf, torch.Tensor)
                             and id(leaf) in self.watched)
        return out


def find_conv_bn_pairs(model: nn.Module,
                       example_input: torch.Tensor) -> List[Tuple[str, str]]:
    """Names of (conv, batch norm) pairs where the norm's input is exactly
    the conv's output, read from one forward pass of ``example_input``.

    A conv or norm that runs more than once in the pass (a shared module),
    and a conv whose output anything else reads too (a pre-norm block's
    shortcut, an in-place activation), are left out. Only eval-mode BN with
    running statistics and plain convs qualify.

    Args:
        model (nn.Module): The model, in eval mode.
        example_input (torch.Tensor): An input of the model.

    Returns:
        list[tuple[str, str]]: ``(conv_name, bn_name)`` in forward order.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
        ...                   nn.ReLU()).eval()
        >>> find_conv_bn_pairs(m, torch.rand(1, 3, 8, 8))
        [('0', '1')]
        >>> class PreNorm(nn.Module):  # the conv's output is also the shortcut
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        ...     def forward(self, x):
        ...         x = self.conv(x)
        ...         return x + self.bn(x)
        >>> find_conv_bn_pairs(PreNorm().eval(), torch.rand(1, 3, 8, 8))
        []
    """
    convs = {n: m for n, m in model.named_modules() if _is_foldable_conv(m)}
    bns = {n: m for n, m in model.named_modules() if _is_foldable_bn(m)}
    outputs: Dict[int, str] = {}
    keep: List[torch.Tensor] = []  # NOTE: keeps ids unique during the pass
    calls: Dict[str, int] = {}
    pairs: List[Tuple[str, str]] = []
    handles = []

    def conv_hook(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            keep.append(output)
            outputs[id(output)] = name
        return hook

    other = _OtherUses(outputs)

    def bn_hook(name):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            other.in_norm += 1
            if args and isinstance(args[0], torch.Tensor) and id(
                    args[0]) in outputs:
                pairs.append((outputs[id(args[0])], name))
        return hook

    def bn_exit(module, args, output):
        other.in_norm -= 1

    try:
        for name, m in convs.items():
            handles.append(m.register_forward_hook(conv_hook(name)))
        for name, m in bns.items():
            handles.append(m.register_forward_pre_hook(bn_hook(name)))
            handles.append(m.register_forward_hook(bn_exit))
        with torch.no_grad(), other:
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    # NOTE: a conv output that two norms read is folded into neither.
    readers = Counter(c for c, _ in pairs)
    return [(c, b) for c, b in pairs
            if calls[c] == 1 and calls[b] == 1 and readers[c] == 1
            and c not in other.read]


def fold_batch_norms(model: nn.Module,
                     example_input: torch.Tensor) -> List[Tuple[str, str]]:
    """Fold every eval-mode BN that follows a conv into the conv, in place.

    The conv gets the folded weight and a bias; the norm becomes
    ``nn.Identity`` (or its drop + act for timm's norm-act layers). Module
    names of the convs are kept.

    Args:
        model (nn.Module): The model, in eval mode.
        example_input (torch.Tensor): An input to trace the data flow with.

    Returns:
        list[tuple[str, str]]: The folded ``(conv_name, bn_name)`` pairs.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> x = torch.rand(1, 3, 8, 8)
        >>> ref = m(x)
        >>> fold_batch_norms(m, x), type(m[1]).__name__
        ([('0', '1')], 'Identity')
        >>> bool((m(x) - ref).abs().max() < 1e-5)
        True
    """
    pairs = find_conv_bn_pairs(model, example_input)
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        with torch.no_grad():
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var,
                bn.eps, bn.weight, bn.bias)
        conv.weight = weight
        conv.bias = bias
        model.set_submodule(bn_name, _bn_remainder(bn))
    return pairs
