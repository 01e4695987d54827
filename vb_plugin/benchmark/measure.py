"""How a row is measured: load average, peak memory,
percentiles, the machine's peak GFLOP/s per dtype, a model's complexity and
what a training row freezes.
"""
import ctypes
import gc
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..outputs import DTYPES, dtype_name, tf32_flags
from ..timing import sync

# NOTE: FORMS (the --forms names) is the inference path's table.


# ----------------------------------------------------------------------
# Measurement.
def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover
        return math.nan


def busy_warning(load: float, threads: int,
                 includes_own: bool = False) -> Optional[str]:
    """A warning text when other work competes for the cores.

    Busy means that other processes keep more than one core busy beyond
    the cores our threads leave free: ``load - own > cores - threads + 1``,
    where ``own`` is ``threads`` for a load average read while (or just
    after) the benchmark ran (``includes_own``), else 0. A 1-minute load
    average still decaying from an earlier command (e.g. 0.6 on an idle
    2-core machine) is not busy.

    Example:
        >>> import os
        >>> cores = os.cpu_count()
        >>> busy_warning(0.1, 2) is None
        True
        >>> busy_warning(cores + 2.0, 2) is None
        False
        >>> busy_warning(cores, cores, includes_own=True) is None
        True
    """
    cores = os.cpu_count() or 1
    others = load - (threads if includes_own else 0)
    if others > max(cores - threads, 0) + 1:
        return (f'the machine is busy: load average {load:.2f} on {cores} '
                f'cores with {threads} benchmark threads'
                f'{" (ours included)" if includes_own else ""}; timings '
                'are noisy')
    return None


class _RSSPeak:
    """Samples the resident set size in a thread (CPU peak memory)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        try:
            with open('/proc/self/statm') as f:
                return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
        except (OSError, ValueError, AttributeError):
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def warm_up(fn: Callable[[], object],
            warmup: int,
            device: torch.device = torch.device('cpu'),
            grad: bool = False) -> None:
    """Run ``fn`` ``warmup`` times (at least once): the first runs are where
    the allocator (and ``torch.compile``) takes its memory and time.

    Example:
        >>> warm_up(lambda: torch.ones(8).sum(), 1)
    """
    ctx = torch.enable_grad if grad else torch.inference_mode
    with ctx():
        for _ in range(max(warmup, 1)):
            fn()
        sync(device)


def _release_free_memory() -> None:
    """Collect garbage and return the C heap's free pages to the system
    (glibc's ``malloc_trim``; nothing elsewhere), so the resident set size
    drops to what is in use."""
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object],
                device: torch.device = torch.device('cpu'),
                grad: bool = False) -> float:
    """The memory in MB one run of ``fn`` takes above what is in use before
    it: CUDA: max allocated above allocated; CPU: the sampled peak resident
    set size above the start, after the heap's free pages were returned.

    Each row is measured this way after every row was warmed up, so a row
    does not pay for the growth of the process (the allocator keeps freed
    memory, so without the trim the first row measured absorbs it and equal
    code gives unequal figures). Memory an engine keeps between runs (its
    arena) is in use before the run and not counted.

    Example:
        >>> peak_memory(lambda: torch.ones(2**22).sum()) >= 0
        True
    """
    ctx = torch.enable_grad if grad else torch.inference_mode
    if device.type == 'cuda':
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with ctx():
            fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _release_free_memory()
    with ctx(), _RSSPeak() as rss:
        fn()
    return max(rss.peak - rss.base, 0) / 2**20


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100].

    Example:
        >>> percentile([1, 2, 3, 4, 5], 10)
        1.4
    """
    return float(np.percentile(values, q))


@dataclass(frozen=True)
class PeakProbe:
    """The sizes of the peak probe on one kind of device.

    Attributes:
        matmul (int): ``n`` of the n x n by n x n matmul.
        conv (tuple): (batch, channels, height, width) of the input of a
            channels -> channels 3x3 conv (padding 1, ``channels_last``).
        repeat (int): Runs between two clock reads (one synchronisation).
    """
    matmul: int
    conv: Tuple[int, int, int, int]
    repeat: int = 1

    def flops(self) -> Dict[str, int]:
        """Floating-point operations of one run of each probe.

        Example:
            >>> PeakProbe(2, (1, 1, 1, 1)).flops()
            {'matmul_gflops': 16, 'conv_gflops': 18}
        """
        n, c, h, w = self.conv
        return {'matmul_gflops': 2 * self.matmul**3,
                'conv_gflops': 2 * n * c * c * 9 * h * w}


#: The peak probe's sizes by device type. A CPU core pair is busy with a
#: 1024^2 matmul; a GPU needs ~1 TFLOP per run to reach its peak (H200:
#: ~790 TFLOP/s in bf16), and 10 runs per clock read to hide the launch and
#: synchronisation.
PEAK_PROBES = {
    'cpu': PeakProbe(matmul=1024, conv=(1, 256, 56, 56)),
    'cuda': PeakProbe(matmul=8192, conv=(256, 256, 56, 56), repeat=10),
}


def probe_dtypes(settings, rows: Sequence = ()) -> List[str]:
    """The dtypes a run needs the peak of: fp32 (always), the eager rows'
    ``dtype``, the training rows' ``amp`` and the forms' dtypes (int8 has
    no torch probe; fp16 forms only on CUDA, the only device they run on).

    Example:
        >>> from vb_plugin.benchmark import Row, Settings
        >>> probe_dtypes(Settings(mode='train', amp='fp16'))
        ['fp32', 'fp16']
        >>> rows = [Row('a', 'x', 'bf16', None, form=dict(dtype='bf16')),
        ...         Row('a', 'y', 'fp16', None, form=dict(dtype='fp16')),
        ...         Row('a', 'z', 'auto-int8', None,
        ...             form=dict(backend='auto', dtype='int8'))]
        >>> probe_dtypes(Settings(), rows)
        ['fp32', 'bf16']
    """
    cuda = torch.device(settings.device).type == 'cuda'
    forms = [(row.form or {}).get('dtype') for row in rows]
    names = ['fp32', settings.dtype, settings.amp]
    names += [f for f in forms if cuda or f is None or dtype_name(f) != 'fp16']
    out: List[str] = []
    for name in names:
        if name is None:
            continue
        name = dtype_name(name)
        if DTYPES[name] is not None and name not in out:
            out.append(name)
    return out


def measure_peak(device: torch.device = torch.device('cpu'),
                 dtype: torch.dtype = torch.float32,
                 seconds: float = 1.0,
                 probe: Optional[PeakProbe] = None) -> Dict[str, object]:
    """A short probe of the achievable GFLOP/s: a square matmul and a
    3x3 conv (channels_last), best of repeated runs, with the sizes of
    :data:`PEAK_PROBES` for the device's type.

    On CUDA, fp32 convolutions and matmuls run in TF32 where torch's flags
    allow it (:func:`~vb_plugin.outputs.tf32_flags`): the result says so.

    Returns:
        dict: ``matmul_gflops``, ``conv_gflops`` and ``peak_gflops`` (the
        larger), the ``dtype``, ``device`` and sizes, and on CUDA
        ``tf32_conv``/``tf32_matmul``.

    Example:
        >>> peak = measure_peak(seconds=0.05)
        >>> peak['peak_gflops'] > 0, peak['dtype'], peak['matmul_n']
        (True, 'fp32', 1024)
    """
    device = torch.device(device)
    if probe is None:
        probe = PEAK_PROBES.get(device.type, PEAK_PROBES['cpu'])
    n = probe.matmul
    batch, channels, height, width = probe.conv
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(
        device=device, dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(*probe.conv, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    flops = probe.flops()
    probes = {'matmul_gflops': lambda: a @ b, 'conv_gflops': lambda: conv(x)}
    out: Dict[str, object] = {}
    with torch.inference_mode():
        for key, fn in probes.items():
            fn()
            sync(device)
            best, end = math.inf, time.perf_counter() + seconds / 2
            while True:
                start = time.perf_counter()
                for _ in range(probe.repeat):
                    fn()
                sync(device)
                best = min(best, (time.perf_counter() - start) / probe.repeat)
                if time.perf_counter() > end:
                    break
            out[key] = flops[key] / best / 1e9
    out['peak_gflops'] = max(out['matmul_gflops'], out['conv_gflops'])
    out.update(dtype=dtype_name(dtype), device=str(device), matmul_n=n,
               conv_input=list(probe.conv))
    if device.type == 'cuda':
        flags = tf32_flags()
        out.update(tf32_conv=flags.conv, tf32_matmul=flags.matmul)
    return out


def frozen_summary(model: nn.Module) -> str:
    """What a training row freezes: the ``frozen_stages`` of the first
    module that has one (the backbone), the parameters without gradients
    and the batch norms in eval mode.

    Example:
        >>> from vb_plugin import VBResNet
        >>> model = VBResNet(depth=18, base_channels=8, frozen_stages=1,
        ...                  norm_eval=True).train()
        >>> print(frozen_summary(model))
        frozen_stages=1: 3,560 of 176,712 parameters frozen;
        20 of 20 BN in eval
        >>> print(frozen_summary(nn.Sequential(nn.Conv2d(3, 8, 3)).train()))
        no frozen_stages: 0 of 224 parameters frozen; 0 of 0 BN in eval
    """
    from ..layers import is_batch_norm
    stages = next((m.frozen_stages for m in model.modules()
                   if isinstance(getattr(m, 'frozen_stages', None), int)),
                  None)
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters()
                 if not p.requires_grad)
    norms = [m for m in model.modules() if is_batch_norm(m)]
    head = 'no frozen_stages' if stages is None else \
        f'frozen_stages={stages}'
    return (f'{head}: {frozen:,} of {total:,} parameters frozen; '
            f'{sum(not m.training for m in norms)} of {len(norms)} BN in '
            'eval')


def sdpa_macs(inputs: List[Any], outputs: List[Any]) -> int:
    """Multiply-adds of ``aten::scaled_dot_product_attention`` (a handle of
    mmengine's ``FlopAnalyzer``, which has none): ``q @ k^T`` and
    ``attn @ v``, ``L * S * (E + Ev)`` per batch and head.

    Example:
        >>> from mmengine.analysis import FlopAnalyzer
        >>> class Attend(nn.Module):
        ...     def forward(self, q):
        ...         return nn.functional.scaled_dot_product_attention(q, q, q)
        >>> FlopAnalyzer(Attend(), (torch.rand(2, 3, 10, 8), )).set_op_handle(
        ...     'aten::scaled_dot_product_attention', sdpa_macs).total()
        9600
    """
    from mmengine.analysis.jit_handles import get_shape
    q, k, v = (get_shape(val) for val in inputs[:3])
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def count_complexity(model: nn.Module,
                     x: torch.Tensor) -> Tuple[float, float]:
    """Parameters (millions) and GMACs of one forward of ``x``, from
    mmengine's ``FlopAnalyzer`` (its "flops" count one multiply-add as one)
    with :func:`sdpa_macs` for fused attention. NaN GMACs when the model
    cannot be traced.

    Example:
        >>> count_complexity(nn.Conv2d(3, 8, 1, bias=False),
        ...                  torch.rand(1, 3, 10, 10))
        (2.4e-05, 2.4e-06)
    """
    params = sum(p.numel() for p in model.parameters()) / 1e6
    try:
        import logging

        from mmengine.analysis import FlopAnalyzer
        from mmengine.logging import MMLogger
        logger = MMLogger.get_current_instance()
        level = logger.level
        # NOTE: the analyzer warns about every op it cannot count (e.g.
        # layer_norm, a negligible share of the MACs); keep the table clean.
        logger.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                # NOTE: the analyzer has no handle for fused attention
                # (timm's ViTs, the windowed form): without one a global
                # ViT-B at 1024x1024 would lose 46% of its MACs.
                flops = FlopAnalyzer(model, (x, )).set_op_handle(
                    'aten::scaled_dot_product_attention',
                    sdpa_macs).total()
        finally:
            logger.setLevel(level)
        macs = flops / 1e9
    except Exception:  # noqa: BLE001 - any tracer failure: no count
        macs = math.nan
    return params, macs
