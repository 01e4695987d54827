"""ONNX export of a backbone (or backbone + neck), checked with onnxruntime.

One function, :func:`export_onnx`, and the pieces it is made of:

* :func:`prepare_for_export`: a deep copy in eval mode with activation
  checkpointing switched off and eval-mode BN folded into the convs that
  feed it (:func:`~vb_plugin.folding.fold_batch_norms`); modules that no
  ONNX engine can run (mmcv's deformable convs) are refused with their name;
* :func:`output_names`: outputs named by stride (``stride4`` ...);
* torch's TorchScript exporter (``dynamo=False``) with dynamic batch,
  height and width. The dynamo exporter of torch 2.13 is not used: it needs
  ``onnxscript`` and fails on timm's and mmcv's modules in ways the
  TorchScript exporter does not.

The file is then run by onnxruntime at two input sizes (the example's and
another with a different batch, height and width) and compared with the
eager model within :func:`~vb_plugin.outputs.tolerance_for`.
"""
import copy
import dataclasses
import io
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checks import round_up_to
from ..folding import fold_batch_norms
from ..models.base import VBBackbone
from ..outputs import (default_example, max_abs_difference, size_divisor,
                       tolerance_for)
from .parts import BackboneWithNeck, check_part

#: The ONNX opset used when none is given: the newest one torch 2.13's
#: TorchScript exporter writes and onnxruntime 1.20+/OpenVINO 2025+ read.
DEFAULT_OPSET = 18

INPUT_NAME = 'input'


class ExportError(ValueError):
    """A model that cannot be exported to ONNX (or whose export does not
    reproduce it), with the module and the reason."""


@dataclasses.dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote and how it was checked.

    Attributes:
        path (str): The ONNX file (empty when written to memory only).
        model (bytes): The serialised ONNX model.
        input_name (str): The input's name.
        output_names (list[str]): Output names, by stride, in output order.
        opset (int): The ONNX opset.
        checks (list[tuple]): ``(input shape, max abs diff, tolerance)`` of
            each onnxruntime check.
        folded (int): BN layers folded into convs before export.
        session: The onnxruntime session of the checks (None without
            them), for a caller that runs the model on onnxruntime next.
    """
    path: str
    model: bytes
    input_name: str
    output_names: List[str]
    opset: int
    checks: List[Tuple[Tuple[int, ...], float, float]]
    folded: int
    session: Optional[object] = dataclasses.field(default=None, repr=False,
                                                  compare=False)


def check_exportable(model: nn.Module) -> None:
    """Raise :class:`ExportError` for modules no ONNX engine can run.

    mmcv's deformable convolutions (DCN v1/v2) are custom ops: their ONNX
    form is mmcv's own domain, which onnxruntime and OpenVINO do not have.

    Example:
        >>> check_exportable(nn.Conv2d(3, 4, 3))
    """
    from mmcv.ops import DeformConv2d, ModulatedDeformConv2d
    for name, module in model.named_modules():
        if isinstance(module, (DeformConv2d, ModulatedDeformConv2d)):
            raise ExportError(
                f'{type(model).__name__} cannot be exported to ONNX: module '
                f'{name!r} is mmcv\'s {type(module).__name__} (deformable '
                'convolution), an mmcv custom op that onnxruntime and '
                'OpenVINO cannot run; build the backbone without dcn '
                '(dcn=None, stage_with_dcn all False) to export it')


def prepare_for_export(model: nn.Module,
                       example_input: torch.Tensor) -> Tuple[nn.Module, int]:
    """An eval-mode deep copy ready for export, and the number of BN folded.

    Activation checkpointing (``with_cp``, on the model and on any block
    that has the flag) is switched off, every VB backbone in it runs its
    :meth:`~vb_plugin.VBBackbone.prepare_export` hook and eval-mode BN is
    folded.

    Example:
        >>> from vb_plugin import VBResNet
        >>> m = VBResNet(depth=18, base_channels=8, with_cp=True)
        >>> ready, folded = prepare_for_export(m, torch.rand(1, 3, 64, 64))
        >>> ready.training, ready.with_cp, folded, m.with_cp
        (False, False, 20, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'model must be an nn.Module, got '
                        f'{type(model).__name__}')
    ready = copy.deepcopy(model).eval()
    check_exportable(ready)
    for module in ready.modules():
        if getattr(module, 'with_cp', False) is True:
            module.with_cp = False
        if isinstance(module, VBBackbone):
            module.prepare_export()
    folded = fold_batch_norms(ready, example_input)
    return ready, len(folded)


def _bicubic_aa_symbolic(g, input, output_size, align_corners, scale_factors):
    """ONNX form of ``aten::_upsample_bicubic2d_aa`` (antialiased bicubic,
    which timm uses to resample position embeddings to the input's grid and
    torch's exporter does not write): opset 18's ``Resize`` with
    ``antialias=1``. PyTorch's antialiased kernel is PIL's (a = -0.5, no
    taps outside the image), hence ``cubic_coeff_a=-0.5`` and
    ``exclude_outside=1``; measured against torch: <= 1.5e-6.
    """
    from torch.onnx import symbolic_helper
    align = symbolic_helper._maybe_get_const(align_corners, 'b')
    shape = g.op('Shape', input)
    batch_channels = g.op('Slice', shape,
                          g.op('Constant', value_t=torch.tensor([0])),
                          g.op('Constant', value_t=torch.tensor([2])))
    size = g.op('Cast', output_size, to_i=7)  # NOTE: 7 is ONNX's INT64
    sizes = g.op('Concat', batch_channels, size, axis_i=0)
    empty = g.op('Constant', value_t=torch.tensor([], dtype=torch.float32))
    return g.op('Resize', input, empty, empty, sizes, antialias_i=1,
                coordinate_transformation_mode_s=(
                    'align_corners' if align is True else 'half_pixel'),
                cubic_coeff_a_f=-0.5, exclude_outside_i=1, mode_s='cubic')


def _register_symbolics(opset: int) -> None:
    if opset >= 18:  # NOTE: Resize's antialias attribute is opset 18
        torch.onnx.register_custom_op_symbolic(
            'aten::_upsample_bicubic2d_aa', _bicubic_aa_symbolic, opset)


def output_strides(model: nn.Module, in_channels: int = 3,
                   probe: int = 512) -> List[int]:
    """The stride of each output: the model's ``out_strides`` when it has
    them, else measured on a ``probe`` x ``probe`` input.

    Example:
        >>> from vb_plugin import VBResNet
        >>> output_strides(VBResNet(depth=18, base_channels=8))
        [4, 8, 16, 32]
    """
    strides = getattr(model, 'out_strides', None)
    if strides is not None:
        return [int(s) if float(s).is_integer() else s for s in strides]
    param = next(model.parameters(), None)
    device = param.device if param is not None else 'cpu'
    with torch.no_grad():
        outs = model(torch.zeros(1, in_channels, probe, probe, device=device))
    return [probe // o.shape[-2] for o in _as_list(outs)]


def output_names(strides: Sequence) -> List[str]:
    """Names by stride; a stride that repeats gets its output index too.

    Example:
        >>> output_names([4, 8, 16, 32])
        ['stride4', 'stride8', 'stride16', 'stride32']
        >>> output_names([16, 16])
        ['stride16_0', 'stride16_1']
    """
    text = [f'stride{s}'.replace('.', 'p') for s in strides]
    return [t if text.count(t) == 1 else f'{t}_{i}'
            for i, t in enumerate(text)]


def _as_list(outs) -> List[torch.Tensor]:
    if isinstance(outs, torch.Tensor):
        return [outs]
    if isinstance(outs, dict):
        return list(outs.values())
    return list(outs)


def second_input(example: torch.Tensor, div: int = 1) -> torch.Tensor:
    """Another input for the check: batch + 1, height and width changed.

    Example:
        >>> tuple(second_input(torch.rand(1, 3, 129, 161)).shape)
        (2, 3, 96, 224)
    """
    b, c, h, w = example.shape
    h2, w2 = round_up_to((max(h - 33, 32), w + 63), div)
    return torch.rand(b + 1, c, h2, w2, device=example.device)


def ort_session(model: Union[str, bytes], threads: Optional[int] = None):
    """An onnxruntime CPU session that does not spin idle threads (so it
    does not slow torch down in the same process).

    Args:
        model (str | bytes): An ONNX file or its bytes.
        threads (int, optional): Intra-op threads. Defaults to
            ``torch.get_num_threads()``.
    """
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts,
                                providers=['CPUExecutionProvider'])


def run_ort(session, x: torch.Tensor) -> List[torch.Tensor]:
    """Run an onnxruntime session on a torch tensor; torch outputs."""
    name = session.get_inputs()[0].name
    outs = session.run(None, {name: x.detach().float().cpu().numpy()})
    return [torch.from_numpy(o) for o in outs]


def export_onnx(model: nn.Module,
                path: Optional[Union[str, Path]] = None,
                example_input: Optional[torch.Tensor] = None,
                dynamic: bool = True,
                opset: Optional[int] = None,
                check: bool = True) -> OnnxExport:
    """Export a backbone (or any module returning a tuple of feature maps)
    to ONNX and check the file with onnxruntime.

    The model is not changed: a copy is prepared by
    :func:`prepare_for_export` (eval mode, ``with_cp`` off, BN folded).
    Outputs keep the model's order (``out_indices`` order for a backbone)
    and are named by stride (:func:`output_names`). With ``dynamic`` the
    batch, height and width are dynamic axes.

    With ``check`` the file runs in onnxruntime at the example's size and
    at another batch, height and width (:func:`second_input`; only the
    example's size when ``dynamic`` is False), and each output must match
    the eager model within :func:`~vb_plugin.outputs.tolerance_for`
    (1e-4 times the largest |output|, at least 1e-4).

    Args:
        model (nn.Module): A VB backbone, a backbone + neck, or any module
            whose forward takes one NCHW tensor and returns tensors.
        path (str | Path, optional): Where to write the file; None keeps it
            in memory (``OnnxExport.model``). Defaults to None.
        example_input (torch.Tensor, optional): The input traced. Defaults
            to :func:`~vb_plugin.outputs.default_example` (1 x C x 129 x
            161, odd on purpose:
            input padding is traced as the shape-dependent op it is).
        dynamic (bool): Dynamic batch, height and width. Defaults to True.
        opset (int, optional): ONNX opset. Defaults to
            :data:`DEFAULT_OPSET` (18).
        check (bool): Check with onnxruntime. Defaults to True.

    Returns:
        OnnxExport: The file, names, opset and the checks' figures.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ExportError: (a ``ValueError``) If a module cannot be exported
            (mmcv's DCN, an op torch cannot write to ONNX), or if the file
            does not reproduce the model.

    Example:
        >>> from vb_plugin import VBResNet
        >>> exp = export_onnx(VBResNet(depth=18, base_channels=8))
        >>> exp.output_names
        ['stride4', 'stride8', 'stride16', 'stride32']
        >>> [(shape, diff < tol) for shape, diff, tol in exp.checks]
        [((1, 3, 129, 161), True), ((2, 3, 96, 224), True)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'model must be an nn.Module, got '
                        f'{type(model).__name__}')
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if example_input is None:
        example_input = default_example(model)
    if not (isinstance(example_input, torch.Tensor)
            and example_input.dim() == 4):
        raise ValueError(f'example_input must be an NCHW tensor, got '
                         f'{getattr(example_input, "shape", example_input)}')
    ready, folded = prepare_for_export(model, example_input)
    with torch.no_grad():
        ref_outs = _as_list(ready(example_input))
    names = output_names(output_strides(ready, example_input.shape[1]))
    if len(names) != len(ref_outs):
        names = [f'output{i}' for i in range(len(ref_outs))]
    axes = None
    if dynamic:
        axes = {INPUT_NAME: {0: 'batch', 2: 'height', 3: 'width'}}
        axes.update({n: {0: 'batch', 2: f'{n}_h', 3: f'{n}_w'}
                     for n in names})
    buffer = io.BytesIO()
    _register_symbolics(opset)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter('ignore')  # tracer warnings, see the check
            torch.onnx.export(ready, (example_input, ), buffer,
                              input_names=[INPUT_NAME], output_names=names,
                              dynamic_axes=axes, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
    except Exception as err:  # noqa: BLE001 (torch raises many kinds)
        raise ExportError(
            f'{type(model).__name__} cannot be exported to ONNX (opset '
            f'{opset}): {type(err).__name__}: {str(err)[:500]}') from err
    data = buffer.getvalue()
    checks, session = [], None
    if check:
        session = ort_session(data)
        cases = [(example_input, ref_outs)]
        if dynamic:
            x = second_input(example_input, size_divisor(model))
            with torch.no_grad():
                cases.append((x, _as_list(ready(x))))
        for x, ref in cases:
            try:
                out = run_ort(session, x)
                diff = max_abs_difference(ref, out)
            except Exception as err:  # noqa: BLE001 (onnxruntime's errors)
                raise ExportError(
                    f'the ONNX export of {type(model).__name__} does not run '
                    f'in onnxruntime at input {tuple(x.shape)}: '
                    f'{type(err).__name__}: {str(err)[:500]}') from err
            tol = tolerance_for(torch.float32, ref)
            if not diff <= tol:
                raise ExportError(
                    f'the ONNX export of {type(model).__name__} differs from '
                    f'the eager model by {diff:.3g} (> {tol:.3g}) at input '
                    f'{tuple(x.shape)}: a shape-dependent branch was traced '
                    'for the example size only; export with '
                    'dynamic=False at the size you deploy')
            checks.append((tuple(x.shape), diff, tol))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return OnnxExport(path=str(path or ''), model=data,
                      input_name=INPUT_NAME, output_names=names, opset=opset,
                      checks=checks, folded=folded, session=session)


def export_config(cfg,
                  path: Union[str, Path],
                  checkpoint: Optional[str] = None,
                  part: str = 'backbone',
                  example_input: Optional[torch.Tensor] = None,
                  opset: Optional[int] = None) -> OnnxExport:
    """Export the backbone (or backbone + neck) of the model a config
    builds, with a trained checkpoint's weights, to ONNX.

    The model is built as mmdet/mmseg build it (the config's default scope;
    the backbone's pretrained ``init_cfg`` is not loaded: the checkpoint,
    when given, is loaded strictly into the whole model through mmengine's
    ``load_checkpoint``, read by vb_plugin's safe reader).

    Args:
        cfg (Config): A detection or segmentation config.
        path (str | Path): The ONNX file to write.
        checkpoint (str, optional): A checkpoint of the whole model (e.g.
            what mmdet's tools/train.py saved). Defaults to None (initial
            weights).
        part (str): 'backbone' or 'backbone+neck'. Defaults to 'backbone'.
        example_input (torch.Tensor, optional): See :func:`export_onnx`.
        opset (int, optional): See :func:`export_onnx`.

    Returns:
        OnnxExport: See :func:`export_onnx`.
    """
    from mmengine.runner import load_checkpoint
    from ..apis import build_detector
    check_part(part)
    model = build_detector(cfg, pretrained=False)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True,
                        logger='silent')
    module = model.backbone
    if part == 'backbone+neck':
        if getattr(model, 'neck', None) is None:
            raise ValueError("part='backbone+neck' but the config's model "
                             'has no neck')
        module = BackboneWithNeck(model.backbone, model.neck)
    return export_onnx(module, path, example_input=example_input,
                       opset=opset)
