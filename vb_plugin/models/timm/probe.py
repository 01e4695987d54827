"""Which input sizes a timm model takes, learned before any forward.

Detection inputs vary in size; many timm models were written for one. The
probe runs the extractor on the meta device (no memory, no compute) at a few
sizes and classifies what fails (:func:`probe_input_sizes`): a divisor the
input needs, a patch size to pad to, position state to make per input
(:mod:`.positions`), SAME padding for convolutions that do not pad, or a
build error naming the one size the model takes. Everything here is a
function of a model factory (``create(**kwargs)`` builds the timm model) or
of a model built on meta, so it is tested without a backbone.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from timm.layers import to_2tuple
from torch import nn

from ...checks import round_up_to
from .levels import feature_list
from .positions import (PositionGrid, position_grids, relax_patch_embeds,
                        replaced, resampled_positions)

#: What the input's height and width must be multiples of, by timm model
#: module, where it is not 1 (measured: these fail with a bare RuntimeError
#: at 225x301 or 272x336 and run at multiples of the divisor). HRNet's and
#: DLA's branches are fused by adding maps whose sizes must agree.
SIZE_DIVISORS = {
    'hrnet': 32,
    'dla': 32,
    'hieradet_sam2': 32,
    'csatv2': 16,
    'naflexvit': 16,
    'vision_transformer_hybrid': 16,
    'vitamin': 16,
}

#: timm's own options for inputs of any size, tried in this order; the
#: first set the model accepts is used (a model refuses unknown keywords).
#: ViT, DeiT, BEiT, EVA: the position embedding is resampled at forward
#: time, and the input padded to the patch size; Swin: windows are padded.
ANY_SIZE_OPTIONS = (
    dict(dynamic_img_size=True, dynamic_img_pad=True),
    dict(dynamic_img_size=True),
    dict(strict_img_size=False),
)


@dataclass(frozen=True)
class SizeProbe:
    """What the meta-device probe of a timm model found about input sizes:
    the build error (or ''), the divisor its input needs, the patch size
    to pad its input to, the position embeddings to resample per input."""
    message: str = ''
    divisor: int = 1
    pad: int = 1
    positions: Tuple[PositionGrid, ...] = ()
    same_padding: bool = False


@dataclass(frozen=True)
class ProbeTarget:
    """What the probe needs to know of a backbone's extractor.

    Attributes:
        model_name: The timm model name (for messages).
        in_channels: Input channels.
        native: The pretraining input size (H, W).
        divisor: What the input must be a multiple of, known before
            probing (:data:`SIZE_DIVISORS`).
        pad: The patch size the input is padded to, known before probing.
        reductions: The stride of every timm level.
        outputs: For each stage of the backbone, the position of its map
            among the extractor's outputs (None: not extracted) and its
            stride.
        nhwc: Whether the extractor gives NHWC maps.
    """
    model_name: str
    in_channels: int
    native: Tuple[int, int]
    divisor: int
    pad: int
    reductions: Tuple[int, ...]
    outputs: Tuple[Tuple[Optional[int], int], ...]
    nhwc: bool = False


#: (model name, create keywords, in_channels) -> what the probe found; the
#: meta-device probe runs once per process.
_SIZE_PROBES: Dict[tuple, SizeProbe] = {}

_SIZE_ERROR_HINTS = ('match', 'shape', 'size', 'Input height',
                     'Input image', 'divisible', 'invalid for input')


def is_size_error(err: Exception) -> bool:
    """Whether timm's error is about the input's spatial size."""
    text = str(err)
    return isinstance(err, AssertionError) or any(h in text
                                                  for h in _SIZE_ERROR_HINTS)


def create_on_meta(create: Callable[..., nn.Module], **kwargs) -> nn.Module:
    """``create(**kwargs)`` on the meta device (no memory, no
    initialisation), or for real when the model cannot be built there."""
    try:
        with torch.device('meta'):
            return create(**kwargs)
    except (NotImplementedError, RuntimeError):
        # NOTE: a model whose __init__ computes with tensor values
        # cannot be built on the meta device; build it for real.
        return create(**kwargs)


def any_size_options(create: Callable[..., nn.Module],
                     model_kwargs: dict) -> dict:
    """The first set of :data:`ANY_SIZE_OPTIONS` that ``create`` takes,
    none of whose keywords the user gave in ``model_kwargs``."""
    for options in ANY_SIZE_OPTIONS:
        if set(options) & set(model_kwargs):
            continue
        try:
            with torch.device('meta'):
                create(**options)
        except TypeError:
            continue
        except (NotImplementedError, RuntimeError):
            pass   # it took the keywords; meta just cannot build it
        return dict(options)
    return {}


def pad_same(model: nn.Module) -> Tuple[str, ...]:
    """Give the convolutions and pools that do not pad (VALID) SAME
    padding, ``(k - 1) * dilation / 2`` (odd kernels; pools do not count
    the padding), so that a level at stride s is ``ceil(H / s)`` and its
    cells line up with the image's grid, as TF's object detection API does
    with ``align_feature_maps=True`` for its Inception backbones. Weights
    are unchanged. Returns the names of the modules changed.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.Conv2d(8, 8, 1),
        ...                   nn.MaxPool2d(3, 2, padding=1))
        >>> pad_same(m), m[0].padding
        (('0',), (1, 1))
    """
    changed = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            continue
        kernel = to_2tuple(module.kernel_size)
        dilation = to_2tuple(getattr(module, 'dilation', 1))
        if (to_2tuple(module.padding) != (0, 0) or max(kernel) == 1
                or not all(k % 2 for k in kernel)):
            continue
        module.padding = tuple((k - 1) * d // 2
                               for k, d in zip(kernel, dilation))
        if isinstance(module, nn.AvgPool2d):
            module.count_include_pad = False
        changed.append(name)
    return tuple(changed)


def probe_input_sizes(full: nn.Module, target: ProbeTarget,
                      key: tuple) -> SizeProbe:
    """Learn which input sizes the model takes, before any forward.

    The extractor runs on the meta device (no memory, no compute): at
    its pretraining size; at a larger, non-square one that is a
    multiple of every divisor it states (``probe``); and at an odd one.

    * A size error at the odd size only: the smallest patch size
      (2..28) whose multiples run becomes ``pad`` (the input
      is padded to it and outputs cropped, as for Swin); if none does,
      ``divisor`` becomes ``probe``'s step.
    * A size error at ``probe``: multiples of ``32 * k`` (k = 2..16)
      are tried at two non-square sizes each, and the smallest that
      runs becomes ``divisor`` (HaloNet's blocks: 256); if
      none does, position state made for the pretraining token grid
      (:func:`~.positions.position_grids`: CaiT's, VOLO's, Visformer's
      embeddings, BEiT's tables, ...) is made for each input's grid
      instead (``positions``, with the input padded to their
      largest stride); if that does not run either, the model takes
      one size only (token-mixing layers, block grids, and no timm
      option for others): ``ValueError`` naming it, instead of timm's
      error at the first forward.
    * Maps smaller than ``size / stride`` at ``probe`` (convolutions
      that do not pad, Inception): SAME padding
      (``same_padding``, :func:`pad_same`) if it gives such maps
      at ``probe`` and at an odd size; otherwise ``ValueError``.

    Models that meta cannot run (or that were built for real) are left
    to the forward's check. A user who passes
    ``model_kwargs=dict(img_size=...)`` has chosen the one size and is
    not probed. Results are cached per process under ``key``.
    """
    if key not in _SIZE_PROBES:
        _SIZE_PROBES[key] = _probe(full, target)
    return _SIZE_PROBES[key]


def _probe(full: nn.Module, target: ProbeTarget) -> SizeProbe:
    param = next(full.parameters(), None)
    if param is None or not param.is_meta:
        return SizeProbe()
    native = tuple(target.native)
    step = max(32, target.divisor, target.pad)

    # NOTE: run_at reads positions when it runs: empty until the
    # model's position state is found (below).
    positions: Tuple[PositionGrid, ...] = ()

    def run_at(size) -> Tuple[Optional[list], Optional[Exception]]:
        x = torch.empty(1, target.in_channels, *size, device='meta')
        try:
            with torch.no_grad(), replaced(
                    full, resampled_positions(full, positions, size)):
                return feature_list(full.eval()(x)), None
        except Exception as err:  # noqa: BLE001 - classified below
            return None, err

    # NOTE: some models cannot finish on meta (Gemma4's ViT calls
    # .item()); past their size checks, they stop with the same error
    # at every size: that error counts as running.
    _, at_native = run_at(native)
    if at_native is not None and is_size_error(at_native):
        return SizeProbe()

    def ran(err: Optional[Exception]) -> bool:
        return err is None or (at_native is not None
                               and str(err) == str(at_native))

    def runs(div: int) -> bool:
        # NOTE: two non-square multiples of div, larger than the native
        # size (so a one-size model cannot pass by chance), one side an
        # odd multiple.
        a = -(-max(native) // div) + 1
        return all(ran(run_at(size)[1])
                   for size in ((a * div, (a + 1) * div),
                                ((a + 1) * div, a * div)))

    probe = round_up_to(tuple(n + extra
                              for n, extra in zip(native, (64, 128))), step)
    outs, err = run_at(probe)
    if ran(err):
        message = map_size_message(target, probe, outs) if outs else ''
        if message and pad_same(full):
            # NOTE: convolutions that do not pad (Xception, Inception
            # v4): SAME padding, as TF's detection API does for them.
            odd = (probe[0] - 31, probe[1] - 29)
            checked = [(size, run_at(size)) for size in (probe, odd)]
            if all(o is not None and not map_size_message(target, size, o)
                   for size, (o, _) in checked):
                return SizeProbe(same_padding=True)
            message = message.replace(
                '(its convolutions do not pad)',
                '(its convolutions do not pad, and SAME padding on its '
                'convolution and pool modules does not line its maps up '
                'either)')
        if message or target.pad > 1:
            return SizeProbe(message)
        _, err = run_at((probe[0] - 31, probe[1] - 29))
        if ran(err) or not is_size_error(err):
            return SizeProbe()
        pad = next((d for d in (2, 4, 7, 8, 14, 16, 28) if runs(d)), 1)
        return SizeProbe(pad=pad, divisor=1 if pad > 1 else step)
    if not is_size_error(err):
        return SizeProbe()
    tried = [32 * k for k in range(2, 17)
             if 32 * k > step and 32 * k % step == 0]
    for div in tried:
        if runs(div):
            return SizeProbe(divisor=div)
    # NOTE: fixed learned position embeddings (CaiT, VOLO, Visformer)
    # are resampled per input from the pretraining grid, as timm does
    # for ViT; the input is padded to their largest stride.
    positions = position_grids(
        full, native, target.reductions)
    if positions:
        relax_patch_embeds(full)
        pad = max(g.stride for g in positions)
        if runs(pad):
            return SizeProbe(pad=pad, positions=positions)
    reason = (str(err).splitlines() or [''])[0][:160]
    return SizeProbe(
        f'model_name={target.model_name!r} takes only {native[0]}x'
        f'{native[1]} inputs: at {probe[0]}x{probe[1]} timm fails '
        f'({type(err).__name__}: {reason}), and at multiples of '
        f'{tried[0] if tried else step} to {tried[-1] if tried else step}'
        ' too; timm offers it no option for other sizes. Detection '
        'inputs vary in size: choose another model, or pass '
        'model_kwargs=dict(img_size=...) to build it for the one size '
        'you will feed (other sizes then raise at forward)')


def map_size_message(target: ProbeTarget, size: Tuple[int, int],
                     outs: list) -> str:
    """The build error for maps that are not ``size / stride`` (floor
    or ceil) at the levels the backbone outputs, or ''."""
    for at, stride in target.outputs:
        out = outs[at] if at is not None and at < len(outs) else None
        if out is None:
            continue
        got = tuple(out.shape[1:3] if target.nhwc else out.shape[2:4])
        want = tuple(-(-n // stride) for n in size)
        if all(g in (n // stride, w) for g, n, w in zip(got, size, want)):
            continue
        return (
            f'model_name={target.model_name!r} gives maps smaller than its '
            f'strides say: at {size[0]}x{size[1]} its stride-'
            f'{stride} level is {got[0]}x{got[1]}, not '
            f'{want[0]}x{want[1]} (its convolutions do not pad). '
            'Anchors and RoI pooling placed at that stride would cover '
            'only part of the image: choose another model')
    return ''
