"""What a benchmark run is made of: its modes and dtypes, the rows to time
(:class:`Row`), their measurements (:class:`Result`) and the run's
:class:`Settings`.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..outputs import DTYPES as _DTYPES


@dataclass(frozen=True)
class Mode:
    """What a ``--mode`` times.

    Attributes:
        name (str): The ``--mode`` value.
        train (bool): A forward and a backward (else inference).
        detector (bool): A whole detector built from ``Settings.config``
            (else a backbone).
        neck (bool): The backbone followed by an FPN neck.
    """
    name: str
    train: bool = False
    detector: bool = False
    neck: bool = False


#: Every mode, by name.
MODE_SPECS = {m.name: m for m in (
    Mode('backbone'),
    Mode('neck', neck=True),
    Mode('train', train=True),
    Mode('detector', detector=True),
    Mode('detector-train', train=True, detector=True),
)}
MODES = tuple(MODE_SPECS)
#: Modes that time a forward and a backward.
TRAIN_MODES = tuple(n for n, m in MODE_SPECS.items() if m.train)
#: Modes that time a whole detector built from ``Settings.config``.
DETECTOR_MODES = tuple(n for n, m in MODE_SPECS.items() if m.detector)
#: The --dtype names: the short names of the inference path's table.
DTYPES = {name: _DTYPES[name] for name in ('fp32', 'bf16')}
#: The --amp names: autocast dtypes of the training modes (fp16 with a
#: loss scaler, as mmengine's AmpOptimWrapper).
AMP_DTYPES = {name: _DTYPES[name] for name in ('fp16', 'bf16')}
#: CSV columns, in order (the JSON rows have the same keys).
COLUMNS = ('arch', 'name', 'kind', 'mode', 'median_ms', 'p10_ms', 'p90_ms',
           'images_per_s', 'ratio_to_first', 'params_m', 'gmacs',
           'gflops_per_s', 'pct_of_peak', 'peak_mem_mb', 'max_abs_diff',
           'dtype', 'amp', 'memory_format', 'threads', 'batch', 'height',
           'width', 'iters', 'load_before', 'load_after', 'frozen', 'note')


@dataclass
class Row:
    """One model to time.

    Attributes:
        arch: Architecture group; ratios are to the first row of a group.
        name: Label of the row.
        kind: 'vb', 'peer' or an optimised form ('optimized', 'compiled',
            'bf16', ...).
        build: Builds the eager fp32 module (outputs a tuple of maps).
        form: ``optimize_for_inference`` keywords for an optimised row.
        ref: Name of the row whose eager module is the reference (and the
            source) of an optimised row.
    """
    arch: str
    name: str
    kind: str
    build: Callable[..., nn.Module]
    form: Optional[dict] = None
    ref: Optional[str] = None


@dataclass
class Result:
    """The measurements of one row; keys are :data:`COLUMNS`."""
    arch: str
    name: str
    kind: str
    mode: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    images_per_s: float
    ratio_to_first: float = 1.
    params_m: float = math.nan
    gmacs: float = math.nan
    gflops_per_s: float = math.nan
    pct_of_peak: float = math.nan
    peak_mem_mb: float = math.nan
    max_abs_diff: float = math.nan
    dtype: str = 'fp32'
    amp: str = ''
    memory_format: str = 'contiguous'
    threads: int = 0
    batch: int = 1
    height: int = 0
    width: int = 0
    iters: int = 0
    load_before: float = math.nan
    load_after: float = math.nan
    frozen: str = ''
    note: str = ''


@dataclass
class Settings:
    """How a run measures (``amp``: the autocast dtype of the training
    modes, or None)."""
    mode: str = 'backbone'
    batch: int = 1
    height: int = 640
    width: int = 640
    warmup: int = 5
    iters: int = 20
    threads: int = 2
    dtype: str = 'fp32'
    channels_last: bool = False
    device: str = 'cpu'
    config: Optional[str] = None
    seed: int = 0
    complexity: bool = True
    amp: Optional[str] = None

    @property
    def spec(self) -> Mode:
        """The :class:`Mode` named by ``mode``."""
        return MODE_SPECS[self.mode]

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f'mode={self.mode!r} is not valid; choose from '
                             f'{MODES}')
        if self.spec.detector and not self.config:
            raise ValueError(f'mode={self.mode!r} needs config (an mmdet '
                             'config file), got None')
        if self.dtype not in DTYPES:
            raise ValueError(f'dtype={self.dtype!r} is not valid; choose '
                             f'from {list(DTYPES)}')
        if self.amp is not None:
            if self.amp not in AMP_DTYPES:
                raise ValueError(f'amp={self.amp!r} is not valid; choose '
                                 f'from {list(AMP_DTYPES)} or None')
            if not self.spec.train:
                raise ValueError(
                    f'amp={self.amp!r} is for the training modes '
                    f'{list(TRAIN_MODES)}; mode={self.mode!r} times '
                    'inference (use the fp16/bf16 forms or dtype)')
            if self.dtype != 'fp32':
                raise ValueError(f'amp={self.amp!r} autocasts fp32 weights; '
                                 f'it does not go with dtype={self.dtype!r}')
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device={self.device!r} is not valid; use "
                             "'cpu' or 'cuda[:N]'") from err
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise ValueError(f'device={self.device!r} is not available: '
                             'torch.cuda.is_available() is False')
        if device.type == 'cuda' and device.index is not None and \
                device.index >= torch.cuda.device_count():
            raise ValueError(f'device={self.device!r} is not available: '
                             f'{torch.cuda.device_count()} CUDA device(s)')
        for key in ('batch', 'height', 'width', 'iters', 'threads'):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f'{key}={value!r} is not valid; it must be '
                                 'a positive int')
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f'warmup={self.warmup!r} is not valid; it must '
                             'be an int >= 0')
