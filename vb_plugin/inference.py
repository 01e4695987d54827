"""The fast inference path: :func:`optimize_for_inference`.

It returns an equivalent inference module for a backbone (or any conv net):

* every batch norm whose input is a convolution's output is folded into the
  convolution (:func:`vb_plugin.folding.fold_batch_norms`);
* every VB backbone in it switches to its fast layers
  (:meth:`~vb_plugin.models.VBBackbone.set_fast_layers`: VBConvNeXt's block
  MLP as 1x1 convolutions);
* the weights and the input go to ``channels_last`` memory;
* optionally bfloat16 or (CUDA) float16, ``torch.compile`` (inductor with
  ``freezing``, in a mode of :data:`COMPILE_MODES`) and (CUDA) CUDA graphs
  (:mod:`vb_plugin.graphs`).

The forms have names (:data:`FORMS`), used by ``tools/benchmark.py`` and
``tools/deploy_eval.py``; ``backend`` sends the backbone to an inference
engine instead (:mod:`vb_plugin.deploy`), and ``backend='auto'`` times the
candidates on the model's device and keeps the fastest.

The result is checked against the fp32 eager module on an example input
before it is returned (see ``check``), on the model's device and within
:func:`~vb_plugin.outputs.tolerance_for` (TF32-aware on CUDA).
"""
import copy
import itertools
import statistics
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .deploy import BACKENDS, engine_model
from .folding import fold_batch_norms
from .graphs import CUDAGraphCache
from .models.base import VBBackbone
from .outputs import (DTYPES, default_example, device_of, dtype_name,
                      max_abs_difference, reference_format, tolerance_for)
from .timing import time_interleaved

#: Named forms of :func:`optimize_for_inference`: name -> its keyword
#: arguments (used by tools/benchmark.py --forms and tools/deploy_eval.py).
#: Engine forms need the `deploy` extra; int8 ones need ``calibration``;
#: fp16 and CUDA-graph forms need a CUDA device (:func:`needs_cuda`).
FORMS = {
    'optimized': dict(),
    'bf16': dict(dtype='bf16'),
    'fp16': dict(dtype='fp16'),
    'compiled': dict(compile=True),
    'compiled-bf16': dict(compile=True, dtype='bf16'),
    'compiled-fp16': dict(compile=True, dtype='fp16'),
    'cuda-graph': dict(cuda_graph=True),
    'cuda-graph-bf16': dict(cuda_graph=True, dtype='bf16'),
    'cuda-graph-fp16': dict(cuda_graph=True, dtype='fp16'),
    'compiled-cuda-graph': dict(compile='reduce-overhead'),
    'compiled-cuda-graph-bf16': dict(compile='reduce-overhead', dtype='bf16'),
    'compiled-cuda-graph-fp16': dict(compile='reduce-overhead', dtype='fp16'),
    'auto': dict(backend='auto'),
    'auto-bf16': dict(backend='auto', dtype='bf16'),
    'auto-fp16': dict(backend='auto', dtype='fp16'),
    'auto-int8': dict(backend='auto', dtype='int8'),
    'onnxruntime': dict(backend='onnxruntime'),
    'onnxruntime-int8': dict(backend='onnxruntime', dtype='int8'),
    'openvino': dict(backend='openvino'),
    'openvino-bf16': dict(backend='openvino', dtype='bf16'),
    'openvino-int8': dict(backend='openvino', dtype='int8'),
}

#: ``compile`` modes: torch.compile's, each with inductor's ``freezing``
#: (the weights become constants of the compiled graph). True is 'default'.
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune',
                 'max-autotune-no-cudagraphs')


def compile_mode(compile: Union[bool, str, None]) -> Optional[str]:
    """The mode of :data:`COMPILE_MODES` that ``compile`` asks for (None:
    no compilation).

    Example:
        >>> [compile_mode(c) for c in (True, False, 'max-autotune')]
        ['default', None, 'max-autotune']
    """
    if compile is None or compile is False:
        return None
    if compile is True:
        return 'default'
    if isinstance(compile, str) and compile in COMPILE_MODES:
        return compile
    raise ValueError(f'compile={compile!r} is not valid; use True, False or '
                     f'one of {list(COMPILE_MODES)}')


def compile_options(mode: str) -> Dict[str, object]:
    """Inductor's options for a ``torch.compile`` mode, with ``freezing``
    (``torch.compile`` takes a mode or options, not both).

    Example:
        >>> compile_options('reduce-overhead')
        {'triton.cudagraphs': True, 'freezing': True}
    """
    from torch._inductor import list_mode_options
    return {**list_mode_options(mode), 'freezing': True}


def needs_cuda(dtype: Union[str, torch.dtype] = 'fp32',
               compile: Union[bool, str, None] = False,
               cuda_graph: bool = False) -> List[str]:
    """The options of a torch form that need a CUDA device, as ``name=value``
    texts (empty: it runs anywhere): fp16 (the CPU has no fast fp16
    convolutions), CUDA graphs, and compile modes that record CUDA graphs.

    Example:
        >>> needs_cuda(**FORMS['compiled-cuda-graph-fp16'])
        ["dtype='fp16'", "compile='reduce-overhead'"]
        >>> needs_cuda(**FORMS['compiled-bf16'])
        []
    """
    reasons = []
    if dtype_name(dtype) == 'fp16':
        reasons.append("dtype='fp16'")
    mode = compile_mode(compile)
    if mode is not None and compile_options(mode).get('triton.cudagraphs'):
        reasons.append(f'compile={mode!r}')
    if cuda_graph:
        reasons.append('cuda_graph=True')
    return reasons


def _device_of(module: nn.Module,
               example_input: Optional[torch.Tensor]) -> torch.device:
    """Where ``module`` runs: its first parameter's (or buffer's) device,
    else the example input's, else the CPU."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()),
                  example_input)
    return torch.device('cpu') if tensor is None else tensor.device


def check_forms(forms) -> None:
    """Raise ``ValueError`` for a name that is not in :data:`FORMS`.

    Example:
        >>> check_forms(['optimized', 'openvino-int8'])
    """
    for form in forms:
        if form not in FORMS:
            raise ValueError(f'form={form!r} is not valid; choose from '
                             f'{list(FORMS)}')


#: ``backend='auto'`` on the CPU: the backends tried for each dtype, in
#: this order.
AUTO_BACKENDS = {'fp32': ('torch', 'onnxruntime', 'openvino'),
                 'bf16': ('torch', 'openvino'),
                 'int8': ('onnxruntime', 'openvino')}
#: ``backend='auto'`` on a CUDA device: the torch forms tried for each dtype
#: (the engines run on the CPU): the eager form and its CUDA graphs.
AUTO_CUDA_FORMS = {'fp32': ('torch', 'cuda-graph'),
                   'bf16': ('torch', 'cuda-graph'),
                   'fp16': ('torch', 'cuda-graph')}


def _fastest_form(backbone: nn.Module, dtype, example_input, calibration,
                  rounds: int = 5, **torch_options) -> nn.Module:
    """``optimize_for_inference(backend='auto')``: build every candidate for
    ``dtype`` on the model's device (CPU: the backends of
    :data:`AUTO_BACKENDS`; CUDA: the forms of :data:`AUTO_CUDA_FORMS`), time
    them interleaved on ``example_input`` (synchronised on CUDA) and return
    the fastest, with its choice recorded in ``auto_choice`` and logged."""
    from mmengine.logging import print_log
    device = _device_of(backbone, example_input)
    candidates = AUTO_CUDA_FORMS if device.type == 'cuda' else AUTO_BACKENDS
    try:
        name = dtype_name(dtype)
    except ValueError:
        name = None
    if name not in candidates:
        other = AUTO_BACKENDS if device.type == 'cuda' else AUTO_CUDA_FORMS
        where = 'a CUDA device' if device.type != 'cuda' else 'the CPU'
        hint = f' ({name} is for {where})' if name in other else ''
        raise ValueError(f"dtype={dtype!r} is not valid for backend='auto'; "
                         f'use one of {list(candidates)} on {device.type}'
                         + hint)
    if example_input is None:
        example_input = default_example(backbone)
    forms: Dict[str, nn.Module] = {}
    skipped: Dict[str, str] = {}
    for backend in candidates[name]:
        try:
            if backend == 'cuda-graph':
                if compile_mode(torch_options.get('compile')) is not None:
                    raise ValueError(
                        'cuda_graph=True records the eager form; a compiled '
                        "form records CUDA graphs with compile="
                        "'reduce-overhead'")
                forms[backend] = optimize_for_inference(
                    backbone, dtype=name, example_input=example_input,
                    cuda_graph=True, **torch_options)
            elif backend == 'torch':
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
    time_interleaved(fns, 1, device=device)  # warm-up
    medians = {b: statistics.median(t) for b, t in
               zip(names, time_interleaved(fns, rounds, device=device))}
    best = min(medians, key=medians.get)
    chosen = forms.pop(best)
    del forms
    chosen.auto_choice = dict(backend=best, dtype=name,
                              device=str(device),
                              input_shape=tuple(example_input.shape),
                              median_ms=medians, skipped=skipped)
    print_log(f"optimize_for_inference(backend='auto'): {best} {name} is "
              f'the fastest on {device} at input '
              f'{tuple(example_input.shape)} ('
              + ', '.join(f'{b} {ms:.1f} ms' for b, ms in
                          sorted(medians.items(), key=lambda kv: kv[1]))
              + ')' + ''.join(f'; {b} skipped ({why.splitlines()[0]})'
                              for b, why in skipped.items()),
              logger='current')
    return chosen


def _as_eager_outputs(out, dtype: Optional[torch.dtype], copy: bool = False):
    """Outputs as the eager model gives them: floating tensors in ``dtype``
    (None: unchanged), every tensor in the default memory format; new
    tensors with ``copy`` (outputs of a CUDA graph, which its next replay
    overwrites).

    ``channels_last`` outputs are not a drop-in: mmcv's CPU RoIAlign reads
    its features as NCHW-contiguous memory, and a Mask R-CNN fed
    ``channels_last`` FPN maps gave other boxes and scores.
    """
    if isinstance(out, torch.Tensor):
        if out.is_floating_point() and dtype is not None:
            return out.to(dtype=dtype, memory_format=torch.contiguous_format,
                          copy=copy)
        if copy:
            return out.clone(memory_format=torch.contiguous_format)
        return out.contiguous()
    if isinstance(out, (tuple, list)):
        return type(out)(_as_eager_outputs(o, dtype, copy) for o in out)
    if isinstance(out, dict):
        return {k: _as_eager_outputs(v, dtype, copy) for k, v in out.items()}
    return out


class InferenceModel(nn.Module):
    """An inference form of a model: it converts its input to the model's
    memory format and dtype, and its outputs back to the input's dtype and
    the default (NCHW-contiguous) memory format, as the eager model gives
    them.

    Metadata of the wrapped backbone (``out_channels``, ``out_strides``,
    ``out_indices``) is available on the wrapper, so necks can read it.

    With CUDA graphs (``graphs``, a :class:`~vb_plugin.graphs.
    CUDAGraphCache` of the module) a CUDA input without extra arguments is
    replayed from the graph of its shape, and the outputs are copied out of
    the graph's memory; so are those of a compiled form whose mode records
    CUDA graphs. Moving or casting the model (``.to()``, ``.half()``) drops
    the recorded graphs.

    Args:
        module (nn.Module): The (folded, converted) eager module.
        channels_last (bool): Give the module ``channels_last`` inputs.
        dtype (torch.dtype): The module's compute dtype.
        compiled (callable, optional): ``torch.compile(module)``; run instead
            of ``module``. Defaults to None.
        folded (list, optional): The folded (conv, bn) pairs, for the record.
        graphs (CUDAGraphCache, optional): CUDA graphs of ``module``.
            Defaults to None.
        compile_mode (str, optional): The mode ``compiled`` was made with
            (:data:`COMPILE_MODES`). Defaults to None.
    """

    def __init__(self,
                 module: nn.Module,
                 channels_last: bool = True,
                 dtype: torch.dtype = torch.float32,
                 compiled=None,
                 folded: Optional[Sequence[Tuple[str, str]]] = None,
                 graphs: Optional[CUDAGraphCache] = None,
                 compile_mode: Optional[str] = None) -> None:
        super().__init__()
        self.module = module
        self.channels_last = channels_last
        self.dtype = dtype
        self.folded = list(folded or [])
        self.compile_mode = compile_mode
        # NOTE: not submodules: the compiled wrapper and the graphs share
        # the module's parameters and would duplicate them in the state
        # dict.
        self.__dict__['compiled'] = compiled
        self.__dict__['graphs'] = graphs
        for name in ('out_channels', 'out_strides', 'out_indices'):
            if hasattr(module, name):
                self.__dict__[name] = getattr(module, name)

    def _apply(self, fn, *args, **kwargs):
        # NOTE: a graph replays the kernels on the addresses it recorded;
        # after the weights move, it would read freed memory.
        if self.graphs is not None:
            self.graphs.clear()
        return super()._apply(fn, *args, **kwargs)

    @property
    def records_graphs(self) -> bool:
        """Whether calls replay CUDA graphs (ours or inductor's)."""
        return self.graphs is not None or bool(
            self.compile_mode and compile_options(self.compile_mode).get(
                'triton.cudagraphs'))

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
        if self.graphs is not None and x.is_cuda and not args and not kwargs:
            out = self.graphs(x)
        else:
            run = self.compiled if self.compiled is not None else self.module
            out = run(x, *args, **kwargs)
        return _as_eager_outputs(
            out, in_dtype if in_dtype.is_floating_point else None,
            copy=self.records_graphs)


def optimize_for_inference(backbone: nn.Module,
                           fold_bn: bool = True,
                           channels_last: bool = True,
                           conv_mlp: bool = True,
                           compile: Union[bool, str] = False,
                           dtype: Union[str, torch.dtype] = torch.float32,
                           example_input: Optional[torch.Tensor] = None,
                           check: bool = True,
                           backend: str = 'torch',
                           calibration=None,
                           cuda_graph: bool = False) -> nn.Module:
    """An equivalent, faster module for inference with ``backbone``.

    ``backbone`` itself is not changed: a deep copy is put in eval mode,
    then (each step optional) its eval-mode batch norms are folded into the
    convolutions that feed them, VB backbones switch to their fast layers
    (VBConvNeXt: the block MLP as 1x1 convs), weights go to
    ``channels_last`` and
    ``dtype``, and the result is compiled with inductor (``freezing=True``,
    which needs inference under ``torch.no_grad``/``inference_mode``) or,
    on CUDA, replayed from CUDA graphs. The form runs where ``backbone`` is
    (move it to the GPU first for a CUDA form).

    With ``check`` the optimised eager form (and its CUDA graph) is compared
    with the fp32 eager copy on ``example_input`` on the model's device, and
    a ``RuntimeError`` is raised beyond :func:`tolerance_for` (on CUDA the
    reference's own precision counts: with TF32 allowed, the TF32
    tolerance); the compiled form is checked by the benchmark and the
    tests, since compiling here would cost a compilation per call.

    Args:
        backbone (nn.Module): A VB backbone or any conv net.
        fold_bn (bool): Fold eval-mode BN into convs. Defaults to True.
        channels_last (bool): Use ``channels_last`` memory. Defaults to True.
        conv_mlp (bool): The fast layers of every VB backbone in the model
            (:meth:`~vb_plugin.models.VBBackbone.set_fast_layers`; VBConvNeXt:
            its MLP as 1x1 convs). Defaults to True.
        compile (bool | str): ``torch.compile`` with inductor freezing: True
            (torch.compile's 'default' mode) or a mode of
            :data:`COMPILE_MODES` ('reduce-overhead' and 'max-autotune'
            record CUDA graphs: CUDA only). Defaults to False.
        dtype (str | torch.dtype): 'fp32'/torch.float32, 'bf16'/
            torch.bfloat16 or (CUDA only) 'fp16'/torch.float16. Outputs come
            back in the input's dtype. Defaults to torch.float32.
        example_input (torch.Tensor, optional): Input used to trace which
            conv feeds which norm and for the check. Defaults to a
            1 x in_channels x 129 x 161 random tensor on the model's device.
        check (bool): Compare with the fp32 eager model. Defaults to True.
        backend (str): 'torch' (the steps above), or an inference engine:
            'onnxruntime' or 'openvino' (see
            :func:`vb_plugin.deploy.engine_model`; ``dtype`` then also takes
            'int8', which needs ``calibration``; ``fold_bn``,
            ``channels_last``, ``conv_mlp`` and ``compile`` do not apply:
            the export folds BN and the engine picks its layouts), or
            'auto': on the CPU it builds every backend that can run
            ``dtype`` (:data:`AUTO_BACKENDS`; int8 needs ``calibration``), on
            a CUDA device the eager and CUDA-graph torch forms
            (:data:`AUTO_CUDA_FORMS`), times them interleaved on
            ``example_input`` on that device (pass one at your deployment
            size; default 1 x C x 129 x 161), returns the fastest and says
            which: it is logged, and kept in the result's ``auto_choice``
            (backend, device, medians in ms, candidates skipped and why).
            Defaults to 'torch'.
        calibration (Iterable[torch.Tensor], optional): Input batches for
            int8 (engines only). Defaults to None.
        cuda_graph (bool): Replay the eager form from CUDA graphs, one per
            input shape, for up to :data:`vb_plugin.graphs.MAX_CUDA_GRAPHS`
            shapes; further new shapes run the eager form
            (:class:`~vb_plugin.graphs.CUDAGraphCache`). CUDA only; not with
            ``compile`` (use ``compile='reduce-overhead'``). Defaults to
            False.

    Returns:
        nn.Module: The optimised module in eval mode: an
        :class:`InferenceModel` for 'torch', a
        :class:`vb_plugin.deploy.EngineModel` for an engine.

    Raises:
        TypeError: If ``backbone`` is not an ``nn.Module``.
        ValueError: If ``dtype``, ``compile`` or ``backend`` is not valid,
            or a CUDA-only option is asked for on another device.
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
        if cuda_graph:
            raise ValueError("cuda_graph=True is not an option of backend="
                             "'auto': on a CUDA device it times the form "
                             'with and without CUDA graphs itself')
        return _fastest_form(backbone, dtype, example_input, calibration,
                             fold_bn=fold_bn, channels_last=channels_last,
                             conv_mlp=conv_mlp, compile=compile,
                             check=check)
    if backend != 'torch':
        if backend not in BACKENDS:
            raise ValueError(f'backend={backend!r} is not valid; use '
                             f"'torch', 'auto' or one of {list(BACKENDS)}")
        try:
            dtype = dtype_name(dtype)
        except ValueError:
            pass  # NOTE: engine_model names what its backend takes
        return engine_model(backbone, backend=backend, dtype=dtype,
                            example_input=example_input,
                            calibration=calibration, check=check)
    if calibration is not None:
        raise ValueError("calibration is for int8 on an engine backend "
                         "(backend='onnxruntime' or 'openvino'); "
                         "backend='torch' does not quantize")
    try:
        name = dtype_name(dtype)
    except ValueError:
        name = None
    if DTYPES.get(name) is None:
        raise ValueError(f"dtype={dtype!r} is not valid; use 'fp32', 'bf16' "
                         "or 'fp16' (or torch.float32 / torch.bfloat16 / "
                         'torch.float16)')
    dtype = DTYPES[name]
    mode = compile_mode(compile)
    if cuda_graph and mode is not None:
        raise ValueError(f'cuda_graph=True records the eager form; it does '
                         f'not go with compile={compile!r}: use compile='
                         "'reduce-overhead' (inductor's own CUDA graphs)")
    device = _device_of(backbone, example_input)
    cuda_only = needs_cuda(name, mode, cuda_graph)
    if cuda_only and device.type != 'cuda':
        raise ValueError(
            f'{" and ".join(cuda_only)} need{"s" * (len(cuda_only) == 1)} a '
            f'CUDA device, but the model is on {device}: move it to a GPU '
            "first (the CPU forms: dtype 'fp32' or 'bf16', compile=True or "
            "'max-autotune-no-cudagraphs', no CUDA graphs)")
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
        _check(backbone, 'optimised', ref, out, dtype)
    if cuda_graph:
        result.__dict__['graphs'] = CUDAGraphCache(model)
        if check:
            with torch.inference_mode():
                out = result(example_input)
            _check(backbone, 'CUDA graph of the optimised', ref, out, dtype)
            # NOTE: the example's graph checked the recording; the cache
            # starts empty, for the shapes the model will be called with.
            result.graphs.clear()
    del reference
    if mode is not None:
        result.compile_mode = mode
        result.__dict__['compiled'] = torch.compile(
            model, options=compile_options(mode))
    return result


def _check(backbone: nn.Module, what: str, ref, out, dtype) -> None:
    """Raise ``RuntimeError`` if ``out`` differs from the fp32 eager
    ``ref`` beyond :func:`tolerance_for` on ``ref``'s device."""
    diff = max_abs_difference(ref, out)
    tol = tolerance_for(dtype, ref)
    if not diff <= tol:
        device = device_of(ref)
        raise RuntimeError(
            f'optimize_for_inference: the {what} '
            f'{type(backbone).__name__} differs from the fp32 eager model '
            f'({reference_format(device)} on {device}) by {diff:.3g} (> '
            f'{tol:.3g}); pass fold_bn=False or report the model')
