"""Comparing a model's outputs: dtypes, differences, tolerances and the
one default example input.

Every inference form (:func:`vb_plugin.optimize_for_inference`), ONNX
export (:func:`vb_plugin.export_onnx`) and engine
(:func:`vb_plugin.deploy.engine_model`) is checked against the fp32 eager
model with :func:`max_abs_difference` within :func:`tolerance_for` its
dtype, on :func:`default_example` unless the caller gives an input.

Like is compared with like: on a CUDA device where torch lets fp32
convolutions or matmuls run in TF32 (:func:`tf32_flags`), the fp32 eager
reference is itself only TF32-accurate, and the tolerance is the TF32 one
(:func:`reference_format`).
"""
from typing import Dict, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from .checks import round_up_to

#: The dtypes of the inference forms, by name (fp16: CUDA only; int8:
#: engines only, no torch dtype).
DTYPES: Dict[str, Optional[torch.dtype]] = {
    'fp32': torch.float32,
    'bf16': torch.bfloat16,
    'fp16': torch.float16,
    'int8': None,
}
#: Other names accepted for the same dtypes.
DTYPE_ALIASES = {'float32': 'fp32', 'bfloat16': 'bf16', 'float16': 'fp16',
                 'half': 'fp16'}

#: Max abs difference to the fp32 eager outputs accepted for fp32 forms, for
#: outputs of magnitude <= 1; larger outputs scale it by their largest |value|
#: (fp32 rounding is relative: folding reorders the arithmetic).
FP32_TOLERANCE = 1e-4
#: bf16 forms: max abs difference relative to the largest |output| of the
#: fp32 eager module. bf16 keeps 8 significand bits (a relative rounding of
#: 2**-9 ~ 0.2% per op); over tens of layers the errors add up to ~1-3% of
#: the output scale on the tested models, so 5% is the documented bound.
BF16_RELATIVE_TOLERANCE = 5e-2
#: Unit roundoff (2**-significand bits) of the reduced-precision formats.
UNIT_ROUNDOFF = {'bf16': 2.**-9, 'fp16': 2.**-11, 'tf32': 2.**-11}
#: fp16 forms and TF32 references: fp16 and TF32 keep 11 significand bits,
#: a rounding 4x finer than bf16's, so bf16's bound scaled by the ratio of
#: the unit roundoffs: 5% / 4 = 1.25% of the output scale. (TF32 on an H200:
#: the fp32 'optimized' forms of ResNet-50, ConvNeXt-T and RegNetX-3.2GF
#: differed from TF32 eager by 3.4e-4, 2.7e-3 on outputs up to 4.7, i.e.
#: 5.7e-4 of the scale, and 2.3e-4.)
FP16_RELATIVE_TOLERANCE = TF32_RELATIVE_TOLERANCE = (
    BF16_RELATIVE_TOLERANCE * UNIT_ROUNDOFF['fp16'] / UNIT_ROUNDOFF['bf16'])
#: int8 forms: max abs difference relative to the largest |output| of the
#: fp32 eager model. Per-tensor uint8 activations keep 256 levels over the
#: calibrated range, so each layer's rounding is ~0.4% of its range and the
#: errors add up over the network; measured on the tested models: see
#: docs/deploy.md. Detection accuracy is the real check (AP before/after).
INT8_RELATIVE_TOLERANCE = 0.25

#: Tolerance of each format relative to the output scale (at least 1):
#: the dtypes of :data:`DTYPES`, and 'tf32', the format of fp32 eager
#: references on a CUDA device that allows TF32 (:func:`reference_format`).
RELATIVE_TOLERANCES = {'fp32': FP32_TOLERANCE,
                       'tf32': TF32_RELATIVE_TOLERANCE,
                       'fp16': FP16_RELATIVE_TOLERANCE,
                       'bf16': BF16_RELATIVE_TOLERANCE,
                       'int8': INT8_RELATIVE_TOLERANCE}

#: The size of :func:`default_example`: odd, so that padding branches are
#: traced and checked too.
DEFAULT_EXAMPLE_SIZE = (129, 161)


def dtype_name(dtype: Union[str, torch.dtype, None]) -> str:
    """The name in :data:`DTYPES` of ``dtype`` (a name, an alias or a torch
    dtype).

    Raises:
        ValueError: For any other value.

    Example:
        >>> [dtype_name(d) for d in (torch.bfloat16, 'float32', 'int8')]
        ['bf16', 'fp32', 'int8']
    """
    if isinstance(dtype, str):
        name = DTYPE_ALIASES.get(dtype, dtype)
        if name in DTYPES:
            return name
    else:
        for name, value in DTYPES.items():
            if value is not None and dtype == value:
                return name
    raise ValueError(f'dtype={dtype!r} is not valid; use one of '
                     f'{list(DTYPES)} (or torch.float32 / torch.bfloat16 / '
                     'torch.float16)')


def max_abs(out) -> float:
    """Largest |value| of an output (a tensor, or tuples/lists/dicts of
    them), in fp32.

    Example:
        >>> max_abs((torch.ones(2), {'a': torch.full((1, ), -3.)}))
        3.0
    """
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return max((max_abs(o) for o in out), default=0.)
    return out.float().abs().max().item()


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


class TF32(NamedTuple):
    """Whether fp32 convolutions (cuDNN) and matmuls (cuBLAS) may run in
    TF32 on a CUDA device."""
    conv: bool = False
    matmul: bool = False


def _allows_tf32(value: str) -> Optional[bool]:
    return {'tf32': True, 'ieee': False}.get(value)


def tf32_flags() -> TF32:
    """torch's current TF32 settings for CUDA convolutions and matmuls.

    Read through the ``fp32_precision`` settings where torch has them
    (``torch.backends.cudnn.conv.fp32_precision``,
    ``torch.backends.cuda.matmul.fp32_precision``; 'none' inherits from
    ``torch.backends.cudnn.fp32_precision``, then
    ``torch.backends.fp32_precision``), else the older ``allow_tf32`` flags.
    torch's defaults: TF32 convolutions, IEEE fp32 matmuls.

    Example:
        >>> flags = tf32_flags()
        >>> isinstance(flags.conv, bool) and isinstance(flags.matmul, bool)
        True
    """
    backends = torch.backends
    conv = getattr(getattr(backends.cudnn, 'conv', None), 'fp32_precision',
                   None)
    if conv is None:  # torch without the fp32_precision settings
        return TF32(conv=bool(backends.cudnn.allow_tf32),
                    matmul=bool(backends.cuda.matmul.allow_tf32))
    # NOTE: the allow_tf32 getters raise once both kinds of setting were
    # used; the fp32_precision ones reflect both (set_float32_matmul_
    # precision and matmul.allow_tf32 set matmul.fp32_precision too).
    generic = _allows_tf32(getattr(backends, 'fp32_precision', 'none'))
    cudnn = _allows_tf32(getattr(backends.cudnn, 'fp32_precision', 'none'))
    matmul = backends.cuda.matmul.fp32_precision

    def first(*values) -> bool:
        return next((v for v in values if v is not None), False)

    return TF32(conv=first(_allows_tf32(conv), cudnn, generic),
                matmul=first(_allows_tf32(matmul), generic))


def reference_format(device: Union[str, torch.device] = 'cpu',
                     tf32: Optional[TF32] = None) -> str:
    """The format an fp32 eager model computes in on ``device``: 'tf32' on
    a CUDA device where fp32 convolutions or matmuls may run in TF32, else
    'fp32'.

    Args:
        device (str | torch.device): Where the model runs. Defaults to 'cpu'.
        tf32 (TF32, optional): The TF32 settings; default: torch's current
            ones (:func:`tf32_flags`) on a device that has TF32 (compute
            capability 8.0 or newer). Defaults to None.

    Example:
        >>> reference_format('cpu', TF32(conv=True, matmul=True))
        'fp32'
        >>> reference_format('cuda', TF32(conv=True, matmul=False))
        'tf32'
        >>> reference_format('cuda:1', TF32(conv=False, matmul=False))
        'fp32'
    """
    device = torch.device(device)
    if device.type != 'cuda':
        return 'fp32'
    if tf32 is None:
        # NOTE: GPUs before Ampere have no TF32; the flags do nothing there.
        if torch.cuda.get_device_capability(device) < (8, 0):
            return 'fp32'
        tf32 = tf32_flags()
    return 'tf32' if (tf32.conv or tf32.matmul) else 'fp32'


def device_of(out) -> torch.device:
    """The device of an output's first tensor (CPU when it has none).

    Example:
        >>> device_of((torch.ones(1), {'a': torch.zeros(2)}))
        device(type='cpu')
    """
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, (torch.Tensor, tuple, list, dict)):
                return device_of(o)
        return torch.device('cpu')
    return out.device


def tolerance_for(dtype: Union[str, torch.dtype], reference,
                  device: Union[str, torch.device, None] = None,
                  tf32: Optional[TF32] = None) -> float:
    """The max abs difference to the fp32 eager ``reference`` outputs that
    a form in ``dtype`` may have.

    Like is compared with like: the tolerance is that of the coarser of two
    formats, the form's (``dtype``) and the reference's own on ``device``
    (:func:`reference_format`: 'tf32' on a CUDA device that lets fp32
    convolutions or matmuls run in TF32); :data:`RELATIVE_TOLERANCES` of it
    times the largest |output| (at least 1).

    Args:
        dtype (str | torch.dtype): The form's dtype.
        reference: The fp32 eager outputs (a tensor, or tuples/lists/dicts).
        device (str | torch.device, optional): Where both ran; default: the
            reference's device.
        tf32 (TF32, optional): The TF32 settings they ran with; default:
            torch's current ones. Defaults to None.

    Example:
        >>> tolerance_for(torch.float32, torch.ones(1))
        0.0001
        >>> tolerance_for(torch.bfloat16, torch.full((1, ), 2.))
        0.1
        >>> tolerance_for('int8', torch.full((1, ), 4.))
        1.0
        >>> tolerance_for('fp32', torch.ones(1), 'cuda', TF32(conv=True))
        0.0125
        >>> tolerance_for('bf16', torch.ones(1), 'cuda', TF32(conv=True))
        0.05
    """
    name = dtype_name(dtype)
    ref = reference_format(device_of(reference) if device is None else device,
                           tf32)
    tol = max(RELATIVE_TOLERANCES[name], RELATIVE_TOLERANCES[ref])
    return tol * max(max_abs(reference), 1.)


def size_divisor(model: nn.Module) -> int:
    """What the model's input sizes must be multiples of (1: any).

    Example:
        >>> size_divisor(nn.Conv2d(3, 4, 3))
        1
    """
    return max(int(getattr(model, 'size_divisor', 1) or 1), 1)


def default_example(model: nn.Module,
                    size: Sequence[int] = DEFAULT_EXAMPLE_SIZE
                    ) -> torch.Tensor:
    """A 1 x in_channels x H x W random input on the model's device, ``size``
    rounded up to the model's ``size_divisor``.

    Example:
        >>> from vb_plugin import VBResNet
        >>> tuple(default_example(VBResNet(depth=18)).shape)
        (1, 3, 129, 161)
    """
    div = size_divisor(model)
    in_channels = getattr(model, 'in_channels', 3)
    param = next(model.parameters(), None)
    device = param.device if param is not None else 'cpu'
    return torch.rand(1, int(in_channels), *round_up_to(size, div),
                      device=device)
