"""The fast inference path: :func:`optimize_for_inference`.

It returns an equivalent inference module for a backbone (or any conv net):

* every batch norm whose input is a convolution's output is folded into the
  convolution (:func:`vb_plugin.folding.fold_batch_norms`);
* every VB backbone in it switches to its fast layers
  (:meth:`~vb_plugin.models.VBBackbone.set_fast_layers`: VBConvNeXt's block
  MLP as 1x1 convolutions);
* the weights and the input go to ``channels_last`` memory;
* optionally ``torch.compile`` (inductor with ``freezing``) and bfloat16.

The forms have names (:data:`FORMS`), used by ``tools/benchmark.py`` and
``tools/deploy_eval.py``; ``backend`` sends the backbone to an inference
engine instead (:mod:`vb_plugin.deploy`).

The result is checked against the fp32 eager module on an example input
before it is returned (see ``check``).
"""
import copy
import statistics
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .deploy import BACKENDS, engine_model
from .folding import fold_batch_norms
from .models.base import VBBackbone
from .outputs import (DTYPE_ALIASES, DTYPES, default_example, dtype_name,
                      max_abs_difference,
                      tolerance_for)
from .timing import time_interleaved

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


def _fastest_form(backbone: nn.Module, dtype, example_input, calibration,
                  rounds: int = 5, **torch_options) -> nn.Module:
    """``optimize_for_inference(backend='auto')``: build every backend of
    :data:`AUTO_BACKENDS` for ``dtype``, time them interleaved on
    ``example_input`` and return the fastest, with its choice recorded in
    ``auto_choice`` and logged."""
    from mmengine.logging import print_log
    try:
        name = dtype_name(dtype)
    except ValueError:
        name = None
    if name not in AUTO_BACKENDS:
        raise ValueError(f"dtype={dtype!r} is not valid for backend='auto'; "
                         f'use one of {list(AUTO_BACKENDS)}')
    if example_input is None:
        example_input = default_example(backbone)
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
    convolutions that feed them, VB backbones switch to their fast layers
    (VBConvNeXt: the block MLP as 1x1 convs), weights go to
    ``channels_last`` and
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
        conv_mlp (bool): The fast layers of every VB backbone in the model
            (:meth:`~vb_plugin.models.VBBackbone.set_fast_layers`; VBConvNeXt:
            its MLP as 1x1 convs). Defaults to True.
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
        name = DTYPE_ALIASES.get(dtype, dtype)
        if DTYPES.get(name) is None:
            raise ValueError(f"dtype={dtype!r} is not valid; use 'fp32' or "
                             "'bf16' (or torch.float32 / torch.bfloat16)")
        dtype = DTYPES[name]
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f'dtype={dtype!r} is not valid; use torch.float32 '
                         "or torch.bfloat16 ('fp32' / 'bf16')")
    reference = copy.deepcopy(backbone).eval()
    model = copy.deepcopy(backbone).eval()
    if example_input is None:
        example_input = default_example(model)
    folded: List[Tuple[str, str]] = []
    if fold_bn:
        folded = fold_batch_norms(model, example_input)
    if conv_mlp:
        for module in model.modules():
            if isinstance(module, VBBackbone):
                module.set_fast_layers(True)
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
