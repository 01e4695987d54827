"""Comparing a model's outputs: dtypes, differences, tolerances and the
one default example input.

Every inference form (:func:`vb_plugin.optimize_for_inference`), ONNX
export (:func:`vb_plugin.export_onnx`) and engine
(:func:`vb_plugin.deploy.engine_model`) is checked against the fp32 eager
model with :func:`max_abs_difference` within :func:`tolerance_for` its
dtype, on :func:`default_example` unless the caller gives an input.
"""
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from .checks import round_up_to

#: The dtypes of the inference forms, by name (int8: engines only, no
#: torch dtype).
DTYPES: Dict[str, Optional[torch.dtype]] = {
    'fp32': torch.float32,
    'bf16': torch.bfloat16,
    'int8': None,
}
#: Other names accepted for the same dtypes.
DTYPE_ALIASES = {'float32': 'fp32', 'bfloat16': 'bf16'}

#: Max abs difference to the fp32 eager outputs accepted for fp32 forms, for
#: outputs of magnitude <= 1; larger outputs scale it by their largest |value|
#: (fp32 rounding is relative: folding reorders the arithmetic).
FP32_TOLERANCE = 1e-4
#: bf16 forms: max abs difference relative to the largest |output| of the
#: fp32 eager module. bf16 keeps 8 significand bits (a relative rounding of
#: 2**-9 ~ 0.2% per op); over tens of layers the errors add up to ~1-3% of
#: the output scale on the tested models, so 5% is the documented bound.
BF16_RELATIVE_TOLERANCE = 5e-2
#: int8 forms: max abs difference relative to the largest |output| of the
#: fp32 eager model. Per-tensor uint8 activations keep 256 levels over the
#: calibrated range, so each layer's rounding is ~0.4% of its range and the
#: errors add up over the network; measured on the tested models: see
#: docs/deploy.md. Detection accuracy is the real check (AP before/after).
INT8_RELATIVE_TOLERANCE = 0.25

#: Tolerance of each dtype relative to the output scale (at least 1).
RELATIVE_TOLERANCES = {'fp32': FP32_TOLERANCE,
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
                     f'{list(DTYPES)} (or torch.float32 / torch.bfloat16)')


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


def tolerance_for(dtype: Union[str, torch.dtype], reference) -> float:
    """The max abs difference to the fp32 eager ``reference`` outputs that
    a form in ``dtype`` may have: :data:`RELATIVE_TOLERANCES` of its
    name times the largest |output| (at least 1).

    Example:
        >>> tolerance_for(torch.float32, torch.ones(1))
        0.0001
        >>> tolerance_for(torch.bfloat16, torch.full((1, ), 2.))
        0.1
        >>> tolerance_for('int8', torch.full((1, ), 4.))
        1.0
    """
    return RELATIVE_TOLERANCES[dtype_name(dtype)] * max(max_abs(reference),
                                                        1.)


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
