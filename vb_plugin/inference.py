"""The fast inference path: :func:`optimize_for_inference`.

It returns an equivalent inference module for a backbone (or any conv net):

* every batch norm whose input is a convolution's output is folded into the
  convolution (``torch.nn.utils.fusion.fuse_conv_bn_weights``). Which conv
  feeds which norm is read from one traced forward pass (forward hooks), not
  from module names, so mmdet's ``BasicBlock``/``Bottleneck`` (``conv1`` /
  ``bn1`` pairs, ``downsample`` Sequentials), mmcv's ``ConvModule``, the
  VB families, timm's ``ConvNormAct``/``BatchNormAct2d`` and
  :class:`~vb_plugin.layers.FrozenBatchNorm2d` all fold the same way;
* the weights and the input go to ``channels_last`` memory;
* :class:`~vb_plugin.VBConvNeXt` computes its block MLP as 1x1 convolutions
  (:meth:`~vb_plugin.VBConvNeXt.to_fast_inference`);
* optionally ``torch.compile`` (inductor with ``freezing``) and bfloat16.

The result is checked against the fp32 eager module on an example input
before it is returned (see ``check``).
"""
import copy
import statistics
import warnings
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d
from timm.layers import BatchNormAct2d, Conv2dSame
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .layers import FrozenBatchNorm2d, FrozenBatchNormAct2d

#: Max abs difference to the fp32 eager outputs accepted for fp32 forms, for
#: outputs of magnitude <= 1; larger outputs scale it by their largest |value|
#: (fp32 rounding is relative: folding reorders the arithmetic).
FP32_TOLERANCE = 1e-4
#: bf16 forms: max abs difference relative to the largest |output| of the
#: fp32 eager module. bf16 keeps 8 significand bits (a relative rounding of
#: 2**-9 ~ 0.2% per op); over tens of layers the errors add up to ~1-3% of
#: the output scale on the tested models, so 5% is the documented bound.
BF16_RELATIVE_TOLERANCE = 5e-2

_DTYPES = {'fp32': torch.float32, 'float32': torch.float32,
           'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16}


#: Named forms of :func:`optimize_for_inference`: name -> its keyword
#: arguments (used by tools/benchmark.py --forms and tools/deploy_eval.py).
#: Engine forms need the `deploy` extra; int8 ones need ``calibration``.
FORMS = {
    'optimized': dict(),
    'compiled': dict(compile=True),
    'bf16': dict(dtype='bf16'),
    'compiled-bf16': dict(compile=True, dtype='bf16'),
    'onnxruntime': dict(backend='onnxruntime'),
    'onnxruntime-int8': dict(backend='onnxruntime', dtype='int8'),
    'openvino': dict(backend='openvino'),
    'openvino-bf16': dict(backend='openvino', dtype='bf16'),
    'openvino-int8': dict(backend='openvino', dtype='int8'),
}


def check_forms(forms) -> None:
    """Raise ``ValueError`` for a name that is not in :data:`FORMS`.

    Example:
        >>> check_forms(['optimized', 'openvino-int8'])
    """
    for form in forms:
        if form not in FORMS:
            raise ValueError(f'form={form!r} is not valid; choose from '
                             f'{list(FORMS)}')


#: ``backend='auto'``: the backends tried for each dtype, in this order.
AUTO_BACKENDS = {'fp32': ('torch', 'onnxruntime', 'openvino'),
                 'bf16': ('torch', 'openvino'),
                 'int8': ('onnxruntime', 'openvino')}


def _dtype_name(dtype) -> str:
    for name, value in _DTYPES.items():
        if dtype is value:
            return 'bf16' if value is torch.bfloat16 else 'fp32'
    return dtype


def _fastest_form(backbone: nn.Module, dtype, example_input, calibration,
                  rounds: int = 5, **torch_options) -> nn.Module:
    """``optimize_for_inference(backend='auto')``: build every backend of
    :data:`AUTO_BACKENDS` for ``dtype``, time them interleaved on
    ``example_input`` and return the fastest, with its choice recorded in
    ``auto_choice`` and logged."""
    from mmengine.logging import print_log

    from .benchmark.measure import time_interleaved
    name = _dtype_name(dtype)
    if name not in AUTO_BACKENDS:
        raise ValueError(f"dtype={dtype!r} is not valid for backend='auto'; "
                         f'use one of {list(AUTO_BACKENDS)}')
    if example_input is None:
        example_input = _default_example(backbone, (129, 161))
    forms: Dict[str, nn.Module] = {}
    skipped: Dict[str, str] = {}
    for backend in AUTO_BACKENDS[name]:
        try:
            if backend == 'torch':
                forms[backend] = optimize_for_inference(
                    backbone, dtype=name, example_input=example_input,
                    **torch_options)
            else:
                forms[backend] = optimize_for_inference(
                    backbone, backend=backend, dtype=name,
                    example_input=example_input, calibration=calibration,
                    check=torch_options.get('check', True))
        except (ImportError, ValueError) as err:
            # NOTE: a backend that is not installed or refuses the model
            # (an export it cannot take, OpenVINO's cubic Resize) is left
            # out, and the reason is reported.
            skipped[backend] = f'{type(err).__name__}: {err}'
    if not forms:
        raise ValueError(f"backend='auto' found no backend for dtype="
                         f'{name!r}: ' + '; '.join(
                             f'{b}: {why}' for b, why in skipped.items()))
    names = list(forms)
    fns = [lambda m=forms[b]: m(example_input) for b in names]
    time_interleaved(fns, 1)  # warm-up
    medians = {b: statistics.median(t) for b, t in
               zip(names, time_interleaved(fns, rounds))}
    best = min(medians, key=medians.get)
    chosen = forms.pop(best)
    del forms
    chosen.auto_choice = dict(backend=best, dtype=name,
                              input_shape=tuple(example_input.shape),
                              median_ms=medians, skipped=skipped)
    print_log(f"optimize_for_inference(backend='auto'): {best} {name} is "
              f'the fastest at input {tuple(example_input.shape)} ('
              + ', '.join(f'{b} {ms:.1f} ms' for b, ms in
                          sorted(medians.items(), key=lambda kv: kv[1]))
              + ')' + ''.join(f'; {b} skipped ({why.splitlines()[0]})'
                              for b, why in skipped.items()),
              logger='current')
    return chosen


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


def max_abs_difference(a, b) -> float:
    """Largest absolute difference between two outputs (tensors, or
    tuples/lists/dicts of them), computed in fp32.

    Example:
        >>> max_abs_difference((torch.ones(2), torch.zeros(1)),
        ...                    (torch.ones(2), torch.full((1, ), .5)))
        0.5
    """
    if isinstance(a, dict):
        a, b = list(a.values()), list(b.values())
    if isinstance(a, (tuple, list)):
        if len(a) != len(b):
            raise ValueError(f'outputs differ in length: {len(a)} and '
                             f'{len(b)}')
        return max((max_abs_difference(x, y) for x, y in zip(a, b)),
                   default=0.)
    if a.shape != b.shape:
        raise ValueError(f'outputs differ in shape: {tuple(a.shape)} and '
                         f'{tuple(b.shape)}')
    return (a.float() - b.float()).abs().max().item()


def _max_abs(out) -> float:
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return max((_max_abs(o) for o in out), default=0.)
    return out.float().abs().max().item()


def tolerance_for(dtype: torch.dtype, reference) -> float:
    """The max abs difference to the fp32 eager ``reference`` outputs that
    an optimised form in ``dtype`` may have: :data:`FP32_TOLERANCE` (fp32)
    or :data:`BF16_RELATIVE_TOLERANCE` (bf16) times the largest |output|
    (at least 1).

    Example:
        >>> tolerance_for(torch.float32, torch.ones(1))
        0.0001
        >>> tolerance_for(torch.bfloat16, torch.full((1, ), 2.))
        0.1
    """
    scale = max(_max_abs(reference), 1.)
    if dtype == torch.float32:
        return FP32_TOLERANCE * scale
    return BF16_RELATIVE_TOLERANCE * scale


def _as_eager_outputs(out, dtype: Optional[torch.dtype]):
    """Outputs as the eager model gives them: floating tensors in ``dtype``
    (None: unchanged), every tensor in the default memory format.

    ``channels_last`` outputs are not a drop-in: mmcv's CPU RoIAlign reads
    its features as NCHW-contiguous memory, and a Mask R-CNN fed
    ``channels_last`` FPN maps gave other boxes and scores.
    """
    if isinstance(out, torch.Tensor):
        if out.is_floating_point() and dtype is not None:
            return out.to(dtype=dtype, memory_format=torch.contiguous_format)
        return out.contiguous()
    if isinstance(out, (tuple, list)):
        return type(out)(_as_eager_outputs(o, dtype) for o in out)
    if isinstance(out, dict):
        return {k: _as_eager_outputs(v, dtype) for k, v in out.items()}
    return out


class InferenceModel(nn.Module):
    """An inference form of a model: it converts its input to the model's
    memory format and dtype, and its outputs back to the input's dtype and
    the default (NCHW-contiguous) memory format, as the eager model gives
    them.

    Metadata of the wrapped backbone (``out_channels``, ``out_strides``,
    ``out_indices``) is available on the wrapper, so necks can read it.

    Args:
        module (nn.Module): The (folded, converted) eager module.
        channels_last (bool): Give the module ``channels_last`` inputs.
        dtype (torch.dtype): The module's compute dtype.
        compiled (callable, optional): ``torch.compile(module)``; run instead
            of ``module``. Defaults to None.
        folded (list, optional): The folded (conv, bn) pairs, for the record.
    """

    def __init__(self,
                 module: nn.Module,
                 channels_last: bool = True,
                 dtype: torch.dtype = torch.float32,
                 compiled=None,
                 folded: Optional[Sequence[Tuple[str, str]]] = None) -> None:
        super().__init__()
        self.module = module
        self.channels_last = channels_last
        self.dtype = dtype
        self.folded = list(folded or [])
        # NOTE: not a submodule: the compiled wrapper shares the module's
        # parameters and would duplicate them in the state dict.
        self.__dict__['compiled'] = compiled
        for name in ('out_channels', 'out_strides', 'out_indices'):
            if hasattr(module, name):
                self.__dict__[name] = getattr(module, name)

    def train(self, mode: bool = True) -> 'InferenceModel':
        """Stays in eval mode: BN is folded, so the model cannot train."""
        if mode:
            warnings.warn('InferenceModel.train(True) is ignored: it is an '
                          'inference form (BN folded); train the original '
                          'model and optimise a copy afterwards')
        return super().train(False)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        in_dtype = x.dtype
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if x.is_floating_point() and x.dtype != self.dtype:
            x = x.to(self.dtype)
        run = self.compiled if self.compiled is not None else self.module
        out = run(x, *args, **kwargs)
        return _as_eager_outputs(
            out, in_dtype if in_dtype.is_floating_point else None)


def _default_example(model: nn.Module,
                     size: Tuple[int, int] = (64, 64)) -> torch.Tensor:
    """A 1 x in_channels x H x W random input on the model's device."""
    in_channels = getattr(model, 'in_channels', 3)
    param = next(model.parameters(), None)
    device = param.device if param is not None else 'cpu'
    return torch.rand(1, int(in_channels), *size, device=device)


def optimize_for_inference(backbone: nn.Module,
                           fold_bn: bool = True,
                           channels_last: bool = True,
                           conv_mlp: bool = True,
                           compile: bool = False,
                           dtype: Union[str, torch.dtype] = torch.float32,
                           example_input: Optional[torch.Tensor] = None,
                           check: bool = True,
                           backend: str = 'torch',
                           calibration=None) -> nn.Module:
    """An equivalent, faster module for inference with ``backbone``.

    ``backbone`` itself is not changed: a deep copy is put in eval mode,
    then (each step optional) its eval-mode batch norms are folded into the
    convolutions that feed them, a :class:`~vb_plugin.VBConvNeXt` computes
    its block MLP as 1x1 convs, weights go to ``channels_last`` and
    ``dtype``, and the result is compiled with inductor (``freezing=True``,
    which needs inference under ``torch.no_grad``/``inference_mode``).

    With ``check`` the optimised eager form is compared with the fp32 eager
    copy on ``example_input`` and a ``RuntimeError`` is raised beyond
    :func:`tolerance_for` (the compiled form is checked by the benchmark and
    the tests, since compiling here would cost a compilation per call).

    Args:
        backbone (nn.Module): A VB backbone or any conv net.
        fold_bn (bool): Fold eval-mode BN into convs. Defaults to True.
        channels_last (bool): Use ``channels_last`` memory. Defaults to True.
        conv_mlp (bool): ConvNeXt MLP as 1x1 convs (VBConvNeXt only).
            Defaults to True.
        compile (bool): ``torch.compile`` with inductor freezing. Defaults to
            False.
        dtype (str | torch.dtype): 'fp32'/torch.float32 or
            'bf16'/torch.bfloat16. Outputs come back in the input's dtype.
            Defaults to torch.float32.
        example_input (torch.Tensor, optional): Input used to trace which
            conv feeds which norm and for the check. Defaults to a
            1 x in_channels x 64 x 64 random tensor.
        check (bool): Compare with the fp32 eager model. Defaults to True.
        backend (str): 'torch' (the steps above), or an inference engine:
            'onnxruntime' or 'openvino' (see
            :func:`vb_plugin.deploy.engine_model`; ``dtype`` then also takes
            'int8', which needs ``calibration``; ``fold_bn``,
            ``channels_last``, ``conv_mlp`` and ``compile`` do not apply:
            the export folds BN and the engine picks its layouts), or
            'auto': it builds every backend that can run ``dtype``
            (:data:`AUTO_BACKENDS`; int8 needs ``calibration``), times them
            interleaved on ``example_input`` (pass one at your deployment
            size; default 1 x C x 129 x 161), returns the fastest and says
            which: it is logged, and kept in the result's ``auto_choice``
            (backend, medians in ms, backends skipped and why).
            Defaults to 'torch'.
        calibration (Iterable[torch.Tensor], optional): Input batches for
            int8 (engines only). Defaults to None.

    Returns:
        nn.Module: The optimised module in eval mode: an
        :class:`InferenceModel` for 'torch', a
        :class:`vb_plugin.deploy.EngineModel` for an engine.

    Raises:
        TypeError: If ``backbone`` is not an ``nn.Module``.
        ValueError: If ``dtype`` is not fp32 or bf16.
        RuntimeError: If ``check`` finds a difference beyond the tolerance.

    Example:
        >>> from vb_plugin import VBResNet
        >>> model = VBResNet(depth=18, base_channels=8).eval()
        >>> fast = optimize_for_inference(model)
        >>> x = torch.rand(1, 3, 64, 64)
        >>> [tuple(o.shape) for o in fast(x)]
        [(1, 8, 16, 16), (1, 16, 8, 8), (1, 32, 4, 4), (1, 64, 2, 2)]
        >>> len(fast.folded), max_abs_difference(model(x), fast(x)) < 1e-4
        (20, True)
    """
    if not isinstance(backbone, nn.Module):
        raise TypeError(f'backbone must be an nn.Module, got '
                        f'{type(backbone).__name__}')
    if backend == 'auto':
        return _fastest_form(backbone, dtype, example_input, calibration,
                             fold_bn=fold_bn, channels_last=channels_last,
                             conv_mlp=conv_mlp, compile=compile,
                             check=check)
    if backend != 'torch':
        from .deploy import BACKENDS, engine_model
        if backend not in BACKENDS:
            raise ValueError(f'backend={backend!r} is not valid; use '
                             f"'torch', 'auto' or one of {list(BACKENDS)}")
        names = {torch.float32: 'fp32', torch.bfloat16: 'bf16'}
        return engine_model(backbone, backend=backend,
                            dtype=names.get(dtype, dtype),
                            example_input=example_input,
                            calibration=calibration, check=check)
    if calibration is not None:
        raise ValueError("calibration is for int8 on an engine backend "
                         "(backend='onnxruntime' or 'openvino'); "
                         "backend='torch' does not quantize")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not valid; use 'fp32' or "
                             "'bf16' (or torch.float32 / torch.bfloat16)")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f'dtype={dtype!r} is not valid; use torch.float32 '
                         "or torch.bfloat16 ('fp32' / 'bf16')")
    reference = copy.deepcopy(backbone).eval()
    model = copy.deepcopy(backbone).eval()
    if example_input is None:
        example_input = _default_example(model)
    folded: List[Tuple[str, str]] = []
    if fold_bn:
        folded = fold_batch_norms(model, example_input)
    if conv_mlp and hasattr(model, 'to_fast_inference'):
        model.to_fast_inference()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dtype != torch.float32:
        model = model.to(dtype)
    result = InferenceModel(model, channels_last=channels_last, dtype=dtype,
                            folded=folded).eval()
    if check:
        with torch.inference_mode():
            ref = reference(example_input)
            out = result(example_input)
        diff = max_abs_difference(ref, out)
        tol = tolerance_for(dtype, ref)
        if not diff <= tol:
            raise RuntimeError(
                f'optimize_for_inference: the optimised '
                f'{type(backbone).__name__} differs from the fp32 eager '
                f'model by {diff:.3g} (> {tol:.3g}); pass fold_bn=False or '
                'report the model')
    del reference
    if compile:
        result.__dict__['compiled'] = torch.compile(
            model, options={'freezing': True})
    return result
