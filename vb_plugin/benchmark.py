"""Backbone benchmark that runs on CPU (and CUDA): VB backbones next to the
models users would otherwise use, on the same inputs, in one run.

The library side of ``tools/benchmark.py``. For each architecture it builds
rows: the VB backbone (eager), its peers (mmdet, timm ``features_only``, HF
transformers, mmpretrain when importable), and the forms of
:func:`vb_plugin.optimize_for_inference`. Each row is timed the same way:
all rows of an architecture are built and warmed up, then timed together,
interleaved round by round (:func:`time_interleaved`), under
``torch.inference_mode`` (for ``mode='train'`` a forward + backward with
``frozen_stages=1`` and ``norm_eval``), with the thread count set and the
load average recorded.

Results are :class:`Result` rows, written as a text table, CSV, JSON and a
PNG bar chart (:func:`write_outputs`).
"""
import copy
import csv
import dataclasses
import json
import math
import os
import platform
import statistics
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .deploy.engines import engine_tolerance
# NOTE: FORMS (the --forms names) is the inference path's table.
from .inference import (_DTYPES, FORMS, check_forms, max_abs_difference,
                        optimize_for_inference, tolerance_for)

MODES = ('backbone', 'neck', 'train', 'detector')
#: The --dtype names: the short names of the inference path's table.
DTYPES = {name: _DTYPES[name] for name in ('fp32', 'bf16')}
#: CSV columns, in order (the JSON rows have the same keys).
COLUMNS = ('arch', 'name', 'kind', 'mode', 'median_ms', 'p10_ms', 'p90_ms',
           'images_per_s', 'ratio_to_first', 'params_m', 'gmacs',
           'gflops_per_s', 'pct_of_peak', 'peak_mem_mb', 'max_abs_diff',
           'dtype', 'memory_format', 'threads', 'batch', 'height', 'width',
           'iters', 'load_before', 'load_after', 'note')


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
    memory_format: str = 'contiguous'
    threads: int = 0
    batch: int = 1
    height: int = 0
    width: int = 0
    iters: int = 0
    load_before: float = math.nan
    load_after: float = math.nan
    note: str = ''


# ----------------------------------------------------------------------
# Peers.
class _HFBackbone(nn.Module):
    """A transformers ``*Backbone`` returning a tuple of feature maps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(self.model(pixel_values=x).feature_maps)


class _TimmFeatures(nn.Module):
    """timm ``features_only`` returning a tuple (it returns a list)."""

    def __init__(self, name: str,
                 out_indices: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        import timm
        kwargs = {} if out_indices is None else dict(
            out_indices=tuple(out_indices))
        self.body = timm.create_model(name, pretrained=False,
                                      features_only=True, **kwargs)

    def forward(self, x):
        return tuple(self.body(x))


def _mmdet(type_name: str, **kwargs) -> Callable[..., nn.Module]:
    def build(train: bool = False) -> nn.Module:
        from mmdet.models import backbones
        extra = dict(frozen_stages=1, norm_eval=True) if train else {}
        return getattr(backbones, type_name)(**kwargs, **extra)
    return build


def _vb(type_name: str, **kwargs) -> Callable[..., nn.Module]:
    def build(train: bool = False) -> nn.Module:
        import vb_plugin
        extra = dict(frozen_stages=1, norm_eval=True) if train else {}
        return getattr(vb_plugin, type_name)(**kwargs, **extra)
    build.row_name = type_name
    return build


def _timm(name: str, out_indices=(1, 2, 3, 4)) -> Callable[..., nn.Module]:
    def build(train: bool = False) -> nn.Module:
        return _TimmFeatures(name, out_indices)
    return build


def _hf(kind: str, **config) -> Callable[..., nn.Module]:
    def build(train: bool = False) -> nn.Module:
        import transformers
        cfg_cls = getattr(transformers, f'{kind}Config')
        model_cls = getattr(transformers, f'{kind}Backbone')
        cfg = cfg_cls(out_features=['stage1', 'stage2', 'stage3', 'stage4'],
                      **config)
        return _HFBackbone(model_cls(cfg))
    return build


def _mmpretrain_convnext(arch: str) -> Callable[..., nn.Module]:
    def build(train: bool = False) -> nn.Module:
        from mmpretrain.models import ConvNeXt
        extra = dict(frozen_stages=1) if train else {}
        return ConvNeXt(arch=arch, out_indices=(0, 1, 2, 3),
                        gap_before_final_norm=False, **extra)
    return build


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


#: Architectures: (VB builder, [(peer name, builder, module needed)]).
#: The VB row is named after the builder's class name.
ARCHITECTURES: Dict[str, Tuple[Callable, List[Tuple[str, Callable, str]]]]
ARCHITECTURES = {
    'resnet18': (_vb('VBResNet', depth=18), [
        ('mmdet ResNet', _mmdet('ResNet', depth=18), 'mmdet'),
        ('timm resnet18', _timm('resnet18'), 'timm'),
        ('HF ResNetBackbone', _hf('ResNet', depths=[2, 2, 2, 2],
                                  layer_type='basic',
                                  hidden_sizes=[64, 128, 256, 512]),
         'transformers'),
    ]),
    'resnet50': (_vb('VBResNet', depth=50), [
        ('mmdet ResNet', _mmdet('ResNet', depth=50), 'mmdet'),
        ('timm resnet50', _timm('resnet50'), 'timm'),
        ('HF ResNetBackbone', _hf('ResNet', depths=[3, 4, 6, 3],
                                  layer_type='bottleneck',
                                  hidden_sizes=[256, 512, 1024, 2048]),
         'transformers'),
    ]),
    'convnext_atto': (_vb('VBConvNeXt', arch='atto'), [
        ('timm convnext_atto', _timm('convnext_atto', (0, 1, 2, 3)),
         'timm'),
        ('HF ConvNextBackbone', _hf('ConvNext', depths=[2, 2, 6, 2],
                                    hidden_sizes=[40, 80, 160, 320]),
         'transformers'),
        ('mmpretrain ConvNeXt', _mmpretrain_convnext('atto'), 'mmpretrain'),
    ]),
    'convnext_tiny': (_vb('VBConvNeXt', arch='tiny'), [
        ('timm convnext_tiny', _timm('convnext_tiny', (0, 1, 2, 3)),
         'timm'),
        ('HF ConvNextBackbone', _hf('ConvNext', depths=[3, 3, 9, 3],
                                    hidden_sizes=[96, 192, 384, 768]),
         'transformers'),
        ('mmpretrain ConvNeXt', _mmpretrain_convnext('tiny'), 'mmpretrain'),
    ]),
    'regnetx_400mf': (_vb('VBRegNet', arch='regnetx_400mf'), [
        ('mmdet RegNet', _mmdet('RegNet', arch='regnetx_400mf'), 'mmdet'),
        ('timm regnetx_004', _timm('regnetx_004'), 'timm'),
    ]),
    'regnetx_3.2gf': (_vb('VBRegNet', arch='regnetx_3.2gf'), [
        ('mmdet RegNet', _mmdet('RegNet', arch='regnetx_3.2gf'), 'mmdet'),
        ('timm regnetx_032', _timm('regnetx_032'), 'timm'),
    ]),
}


def _from_cfg(cfg: dict, row_name: str) -> Callable[..., nn.Module]:
    def build(train: bool = False) -> nn.Module:
        from mmengine.registry import MODELS
        import vb_plugin  # noqa: F401 (registers the VB backbones)
        extra = dict(frozen_stages=1, norm_eval=True) if train else {}
        return MODELS.build({**cfg, **extra})
    build.row_name = row_name
    return build


def backbone_cfg(text: str) -> dict:
    """A backbone config from ``--backbone-cfg``: a ``dict(...)`` expression
    or a config file whose ``model.backbone`` is used.

    Example:
        >>> backbone_cfg("dict(type='VBConvNeXt', arch='atto')")
        {'type': 'VBConvNeXt', 'arch': 'atto'}
    """
    from mmengine.config import Config
    if text.endswith('.py'):
        cfg = Config.fromfile(text)
        if 'model' not in cfg or 'backbone' not in cfg.model:
            raise ValueError(f'--backbone-cfg {text!r}: the config has no '
                             'model.backbone')
        return cfg.model.backbone.to_dict()
    try:
        cfg = Config.fromstring(f'backbone = {text}', '.py').backbone
    except Exception as err:  # noqa: BLE001 (any syntax error)
        raise ValueError(f"--backbone-cfg {text!r} is not valid: give a "
                         "dict(type=..., ...) expression or a config file "
                         f"(.py) with model.backbone ({err})") from err
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise ValueError(f'--backbone-cfg {text!r} is not valid: it must be '
                         "a dict with a 'type'")
    return cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)


def architecture(arch) -> Tuple[Callable, List[Tuple[str, Callable, str]]]:
    """The (VB builder, peers) of an ``--arch`` value: a name of
    :data:`ARCHITECTURES`, ``'timm:<model name>'`` (``VBTimmBackbone`` with
    timm's own ``features_only`` model as the peer) or a backbone config
    dict (no peers).

    Example:
        >>> build, peers = architecture('timm:resnet10t')
        >>> build.row_name, [p[0] for p in peers]
        ('VBTimmBackbone resnet10t', ['timm resnet10t'])
    """
    if isinstance(arch, dict):
        return _from_cfg(arch, str(arch.get('type'))), []
    if isinstance(arch, str) and arch.startswith('timm:'):
        import timm
        name = arch[len('timm:'):]
        if not timm.is_model(name):
            raise ValueError(f'arch={arch!r} is not valid: timm has no '
                             f'model {name!r}')
        return (_from_cfg(dict(type='VBTimmBackbone', model_name=name),
                          f'VBTimmBackbone {name}'),
                [(f'timm {name}', _timm(name, None), 'timm')])
    if arch not in ARCHITECTURES:
        raise ValueError(f'arch={arch!r} is not valid; choose from '
                         f"{sorted(ARCHITECTURES)} or 'timm:<model name>'")
    return ARCHITECTURES[arch]


def make_rows(archs: Sequence[str],
              peers: bool = True,
              forms: Sequence[str] = ('optimized', )) -> List[Row]:
    """The rows of a run: per architecture, the VB backbone, its peers that
    are importable, then the optimised forms of the VB backbone.

    Args:
        archs (Sequence[str | dict]): Names of :data:`ARCHITECTURES`,
            ``'timm:<model name>'`` or backbone config dicts (see
            :func:`architecture`).
        peers (bool): Add the peer rows. Defaults to True.
        forms (Sequence[str]): Names of :data:`FORMS`. Defaults to
            ('optimized', ).

    Example:
        >>> [(r.name, r.kind) for r in make_rows(['regnetx_400mf'])]
        ... # doctest: +NORMALIZE_WHITESPACE
        [('VBRegNet', 'vb'), ('mmdet RegNet', 'peer'),
         ('timm regnetx_004', 'peer'), ('VBRegNet optimized', 'optimized')]
    """
    entries = [architecture(arch) for arch in archs]
    check_forms(forms)
    rows = []
    for arch, (vb_build, peer_list) in zip(archs, entries):
        vb_name = vb_build.row_name
        if isinstance(arch, dict):
            arch = vb_name
        rows.append(Row(arch, vb_name, 'vb', vb_build))
        if peers:
            for name, build, module in peer_list:
                if _importable(module):
                    rows.append(Row(arch, name, 'peer', build))
        for form in forms:
            rows.append(Row(arch, f'{vb_name} {form}', form, vb_build,
                            form=FORMS[form], ref=vb_name))
    return rows


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


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


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
            grad: bool = False) -> float:
    """Run ``fn`` ``warmup`` times (at least once) and return the peak
    memory in MB those runs took: CUDA: max allocated; CPU: the sampled peak
    resident set size above the start.

    The first runs are where the allocator (and ``torch.compile``) takes its
    memory, so they are where it can be seen.

    Example:
        >>> warm_up(lambda: torch.ones(8).sum(), 1) >= 0
        True
    """
    ctx = torch.enable_grad if grad else torch.inference_mode
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    with ctx(), _RSSPeak() as rss:
        for _ in range(max(warmup, 1)):
            fn()
        _sync(device)
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return max(rss.peak - rss.base, 0) / 2**20


def time_interleaved(fns: Sequence[Callable[[], object]],
                     iters: int,
                     device: torch.device = torch.device('cpu'),
                     grad: bool = False) -> List[List[float]]:
    """Time ``iters`` runs of every callable, interleaved.

    Round ``i`` runs each callable once, starting with callable ``i mod n``,
    so a change in the machine's load during the run (a shared machine)
    hits every row alike instead of whichever row ran at that moment, and
    no row always runs right after the same other one. Runs under
    ``torch.inference_mode`` unless ``grad``; CUDA work is synchronised
    before each clock read.

    Returns:
        list: One list of ``iters`` times in ms per callable.

    Example:
        >>> times = time_interleaved([lambda: torch.ones(8).sum()] * 2, 3)
        >>> [len(t) for t in times]
        [3, 3]
    """
    ctx = torch.enable_grad if grad else torch.inference_mode
    n = len(fns)
    times: List[List[float]] = [[] for _ in range(n)]
    with ctx():
        _sync(device)
        for i in range(iters):
            for k in range(n):
                j = (i + k) % n
                start = time.perf_counter()
                fns[j]()
                _sync(device)
                times[j].append((time.perf_counter() - start) * 1e3)
    return times


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100].

    Example:
        >>> percentile([1, 2, 3, 4, 5], 10)
        1.4
    """
    v = sorted(values)
    if len(v) == 1:
        return float(v[0])
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def measure_peak(device: torch.device = torch.device('cpu'),
                 dtype: torch.dtype = torch.float32,
                 seconds: float = 1.0) -> Dict[str, float]:
    """A short probe of the achievable GFLOP/s: a square matmul and a
    3x3 conv (channels_last), best of repeated runs.

    Returns:
        dict: ``matmul_gflops``, ``conv_gflops`` and ``peak_gflops`` (the
        larger).

    Example:
        >>> peak = measure_peak(seconds=0.05)
        >>> peak['peak_gflops'] > 0
        True
    """
    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    conv = nn.Conv2d(256, 256, 3, padding=1, bias=False).to(
        device=device, dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(1, 256, 56, 56, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    probes = {
        'matmul_gflops': (lambda: a @ b, 2 * n**3),
        'conv_gflops': (lambda: conv(x), 2 * 256 * 256 * 9 * 56 * 56),
    }
    out = {}
    with torch.inference_mode():
        for key, (fn, flops) in probes.items():
            fn()
            best, end = math.inf, time.perf_counter() + seconds / 2
            while True:
                start = time.perf_counter()
                fn()
                _sync(device)
                best = min(best, time.perf_counter() - start)
                if time.perf_counter() > end:
                    break
            out[key] = flops / best / 1e9
    out['peak_gflops'] = max(out.values())
    return out


def count_complexity(model: nn.Module,
                     x: torch.Tensor) -> Tuple[float, float]:
    """Parameters (millions) and GMACs of one forward of ``x``, from
    ``mmengine.analysis.get_model_complexity_info`` (its "flops" count one
    multiply-add as one). NaN GMACs when the model cannot be traced.

    Example:
        >>> count_complexity(nn.Conv2d(3, 8, 1, bias=False),
        ...                  torch.rand(1, 3, 10, 10))
        (2.4e-05, 2.4e-06)
    """
    params = sum(p.numel() for p in model.parameters()) / 1e6
    try:
        import logging

        from mmengine.analysis import get_model_complexity_info
        from mmengine.logging import MMLogger
        logger = MMLogger.get_current_instance()
        level = logger.level
        # NOTE: the analyzer warns about every op it cannot count (e.g.
        # layer_norm, a negligible share of the MACs); keep the table clean.
        logger.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                info = get_model_complexity_info(model, inputs=(x, ),
                                                 show_table=False,
                                                 show_arch=False)
        finally:
            logger.setLevel(level)
        macs = info['flops'] / 1e9
    except Exception:  # noqa: BLE001 - any tracer failure: no count
        macs = math.nan
    return params, macs


class _WithNeck(nn.Module):
    """Backbone + mmdet FPN (256 channels, 5 outputs)."""

    def __init__(self, backbone: nn.Module, in_channels: Sequence[int],
                 neck: Optional[nn.Module] = None):
        super().__init__()
        from mmdet.models.necks import FPN
        self.backbone = backbone
        self.neck = neck if neck is not None else FPN(
            in_channels=list(in_channels), out_channels=256, num_outs=5)

    def forward(self, x):
        return tuple(self.neck(self.backbone(x)))


def _out_channels(model: nn.Module, in_channels: int = 3) -> List[int]:
    with torch.inference_mode():
        outs = model(torch.rand(1, in_channels, 64, 64))
    return [o.shape[1] for o in outs]


@dataclass
class Settings:
    """How a run measures."""
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

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f'mode={self.mode!r} is not valid; choose from '
                             f'{MODES}')
        if self.mode == 'detector' and not self.config:
            raise ValueError("mode='detector' needs config (an mmdet "
                             'config file), got None')
        if self.dtype not in DTYPES:
            raise ValueError(f'dtype={self.dtype!r} is not valid; choose '
                             f'from {list(DTYPES)}')
        for key in ('batch', 'height', 'width', 'iters', 'threads'):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f'{key}={value!r} is not valid; it must be '
                                 'a positive int')
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f'warmup={self.warmup!r} is not valid; it must '
                             'be an int >= 0')


def _prepare(module: nn.Module, settings: Settings, device, dtype):
    module = module.to(device=device, dtype=dtype)
    if settings.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def _prepare_row(row: Row, settings: Settings, x: torch.Tensor,
                 eager_cache: Dict[str, nn.Module]
                 ) -> Tuple[Callable[[], object], Result]:
    """Build (or optimise) the row's model, check an optimised form against
    fp32 eager, warm it up; return its step and a :class:`Result` without
    times."""
    device = torch.device(settings.device)
    dtype = DTYPES[settings.dtype]
    train = settings.mode == 'train'
    note = ''
    diff = math.nan
    mem_format = 'channels_last' if settings.channels_last else 'contiguous'
    row_dtype = settings.dtype
    if row.form is None:
        model = row.build(train=train)
        if settings.mode == 'neck':
            model = _WithNeck(model, _out_channels(model))
        if not train:
            model.eval()
        else:
            model.train()
            if row.kind == 'peer' and not isinstance(
                    getattr(model, 'frozen_stages', None), int):
                note = 'no frozen_stages option: BN in eval only'
                from .layers import is_batch_norm
                for m in model.modules():
                    if is_batch_norm(m):
                        m.eval()
        model = _prepare(model, settings, device, dtype)
        eager_cache[row.name] = model
        run_x = x.contiguous(memory_format=torch.channels_last) \
            if settings.channels_last else x
    else:
        if train:
            raise ValueError('optimised forms are for inference; mode=train '
                             'takes no forms')
        ref = eager_cache[row.ref]
        if settings.mode == 'neck':
            target = ref.backbone
        elif settings.mode == 'detector':
            target = ref.detector.backbone
        else:
            target = ref
        # NOTE: every form is made from, and checked against, the fp32
        # eager backbone (a copy: the cached row keeps its dtype).
        target = copy.deepcopy(target).float()
        example = x[:1].float()
        form = dict(row.form)
        # NOTE: int8 rows are calibrated on random inputs: a speed figure,
        # not an accuracy one (tools/deploy_eval.py measures accuracy).
        if form.get('dtype') == 'int8':
            gen = torch.Generator().manual_seed(0)
            form['calibration'] = [torch.randn(example.shape, generator=gen)
                                   for _ in range(8)]
        fast = optimize_for_inference(target, example_input=example, **form)
        engine = 'backend' in form
        if settings.mode == 'neck':
            model = _WithNeck(fast, (), neck=ref.neck)
        elif settings.mode == 'detector':
            detector = copy.deepcopy(ref.detector)
            detector.backbone = fast
            model = _Detector(detector)
        else:
            model = fast
        with torch.inference_mode():
            expected = target(example)
            diff = max_abs_difference(expected, fast(example))
            tol = engine_tolerance(fast.dtype, expected) if engine else \
                tolerance_for(fast.dtype, expected)
        if not diff <= tol:
            note = f'max_abs_diff above tolerance {tol:.3g}'
        if engine:
            mem_format = fast.backend
            row_dtype = fast.dtype
        else:
            mem_format = 'channels_last' if fast.channels_last else \
                'contiguous'
            row_dtype = 'bf16' if fast.dtype == torch.bfloat16 else 'fp32'
        run_x = x

    if train:
        def step():
            outs = model(run_x)
            loss = sum(o.float().mean() for o in outs)
            loss.backward()
            for p in model.parameters():
                p.grad = None
    else:
        def step():
            return model(run_x)

    mem = warm_up(step, settings.warmup, device=device, grad=train)
    result = Result(
        arch=row.arch, name=row.name, kind=row.kind, mode=settings.mode,
        median_ms=math.nan, p10_ms=math.nan, p90_ms=math.nan,
        images_per_s=math.nan, peak_mem_mb=mem,
        max_abs_diff=diff, dtype=row_dtype, memory_format=mem_format,
        threads=torch.get_num_threads(), batch=settings.batch,
        height=settings.height, width=settings.width,
        iters=settings.iters, note=note)
    if settings.complexity and row.form is None:
        params, macs = count_complexity(model.float(), x[:1].float())
        model.to(dtype)
        result.params_m = params
        result.gmacs = macs * settings.batch
    return step, result


def _set_times(result: Result, times: Sequence[float]) -> None:
    median = statistics.median(times)
    result.median_ms = median
    result.p10_ms = percentile(times, 10)
    result.p90_ms = percentile(times, 90)
    result.images_per_s = result.batch * 1e3 / median


def _finish(results: List[Result], peaks: Dict[str, float]) -> None:
    """Ratios, complexity of optimised rows, achieved GFLOP/s, % of the
    peak of the row's dtype (``peaks``: dtype name -> GFLOP/s)."""
    first: Dict[str, Result] = {}
    by_name = {(r.arch, r.name): r for r in results}
    for r in results:
        first.setdefault(r.arch, r)
        r.ratio_to_first = first[r.arch].median_ms / r.median_ms
        if math.isnan(r.gmacs) and r.kind not in ('vb', 'peer'):
            src = by_name.get((r.arch, r.name.rsplit(' ', 1)[0]))
            if src is not None:
                r.params_m, r.gmacs = src.params_m, src.gmacs
        if r.mode == 'train':
            # NOTE: a backward costs about twice the forward.
            flops = 3 * 2 * r.gmacs
        else:
            flops = 2 * r.gmacs
        r.gflops_per_s = flops / (r.median_ms / 1e3)
        peak = peaks.get(r.dtype, math.nan)
        r.pct_of_peak = 100 * r.gflops_per_s / peak if peak > 0 else math.nan


def run_benchmark(rows: Sequence[Row],
                  settings: Settings,
                  progress: bool = True,
                  log: Callable[[str], None] = print) -> Dict[str, object]:
    """Time every row on the same input; return ``meta`` and ``rows``.

    Args:
        rows (Sequence[Row]): From :func:`make_rows` (or
            :func:`detector_rows`).
        settings (Settings): Input size, iterations, threads, dtype, mode.
        progress (bool): Show a tqdm progress bar. Defaults to True.
        log (callable): Where warnings go. Defaults to ``print``.

    Returns:
        dict: ``{'meta': {...}, 'rows': [Result, ...]}``.

    Example:
        >>> out = run_benchmark(make_rows(['resnet18'], peers=False),
        ...                     Settings(height=32, width=32, warmup=0,
        ...                              iters=1, complexity=False),
        ...                     progress=False, log=lambda s: None)
        >>> [r.name for r in out['rows']]
        ['VBResNet', 'VBResNet optimized']
    """
    settings.check()
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    dtype = DTYPES[settings.dtype]
    load_start = load_average()
    warning = busy_warning(load_start, settings.threads)
    if warning:
        log(f'WARNING: {warning}')
    # NOTE: each row's % of peak is of its own dtype's peak: bf16 runs at
    # a multiple of the fp32 rate where the CPU has bf16 instructions.
    peak = measure_peak(device, torch.float32)
    peaks = {'fp32': peak['peak_gflops']}
    if settings.dtype == 'bf16' or any(
            (row.form or {}).get('dtype') == 'bf16' for row in rows):
        peak_bf16 = measure_peak(device, torch.bfloat16)
        peaks['bf16'] = peak_bf16['peak_gflops']
    else:
        peak_bf16 = None
    x = torch.rand(settings.batch, 3, settings.height, settings.width,
                   device=device, dtype=dtype)
    results = []
    groups: Dict[str, List[Row]] = {}
    for row in rows:
        groups.setdefault(row.arch, []).append(row)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(rows) + len(groups), desc='benchmark',
                   unit='step')
    try:
        for arch, group in groups.items():
            # NOTE: all rows of an architecture are built and warmed up
            # first, then timed together, interleaved (time_interleaved).
            cache: Dict[str, nn.Module] = {}
            prepared = []
            for row in group:
                if bar is not None:
                    bar.set_postfix_str(f'{arch}: prepare {row.name}')
                try:
                    prepared.append(_prepare_row(row, settings, x, cache))
                except Exception as err:  # noqa: BLE001 - keep the others
                    log(f'WARNING: {row.arch}: {row.name} failed: '
                        f'{type(err).__name__}: {err}')
                    prepared.append((None, Result(
                        arch=row.arch, name=row.name, kind=row.kind,
                        mode=settings.mode, median_ms=math.nan,
                        p10_ms=math.nan, p90_ms=math.nan,
                        images_per_s=math.nan, threads=settings.threads,
                        batch=settings.batch, height=settings.height,
                        width=settings.width,
                        note=f'failed: {type(err).__name__}: {err}'[:200])))
                if bar is not None:
                    bar.update(1)
            timed = [(step, res) for step, res in prepared if step is not None]
            if bar is not None:
                bar.set_postfix_str(f'{arch}: timing {len(timed)} rows '
                                    'interleaved')
            load_before = load_average()
            all_times = time_interleaved([step for step, _ in timed],
                                         settings.iters, device=device,
                                         grad=settings.mode == 'train')
            load_after = load_average()
            for (_, res), times in zip(timed, all_times):
                _set_times(res, times)
                res.load_before, res.load_after = load_before, load_after
            results.extend(res for _, res in prepared)
            del cache, prepared, timed
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    _finish(results, peaks)
    load_end = load_average()
    end_warning = busy_warning(load_end, settings.threads,
                               includes_own=True)
    if end_warning and not warning:
        log(f'WARNING: {end_warning}')
    meta = dict(
        settings=dataclasses.asdict(settings),
        torch=torch.__version__, python=platform.python_version(),
        machine=platform.machine(), processor=platform.processor(),
        cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
        peak=peak, peak_bf16=peak_bf16, load_average_start=load_start,
        load_average_end=load_end, busy_warning=warning or end_warning,
        time=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
    return dict(meta=meta, rows=results)


# ----------------------------------------------------------------------
# Output.
def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return '-'
        if abs(value) >= 100:
            return f'{value:.0f}'
        if value != 0 and abs(value) < 0.01:
            return f'{value:.1e}'
        return f'{value:.2f}'
    return str(value)


TABLE_COLUMNS = ('arch', 'name', 'median_ms', 'p10_ms', 'p90_ms',
                 'images_per_s', 'ratio_to_first', 'params_m', 'gmacs',
                 'gflops_per_s', 'pct_of_peak', 'peak_mem_mb',
                 'max_abs_diff', 'dtype', 'memory_format', 'threads')


def format_table(results: Sequence[Result],
                 columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """A plain-text (Markdown) table of the results.

    Example:
        >>> r = Result('a', 'm', 'vb', 'backbone', 10., 9., 11., 100.)
        >>> print(format_table([r], ('name', 'median_ms')))
        | name | median_ms |
        |------|-----------|
        | m    | 10.00     |
    """
    cells = [[_fmt(getattr(r, c)) for c in columns] for r in results]
    widths = [max([len(c)] + [len(row[i]) for row in cells])
              for i, c in enumerate(columns)]
    lines = ['| ' + ' | '.join(c.ljust(w) for c, w in zip(columns, widths))
             + ' |',
             '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
    for row in cells:
        lines.append('| ' + ' | '.join(v.ljust(w)
                                       for v, w in zip(row, widths)) + ' |')
    return '\n'.join(lines)


def summarize(results: Sequence[Result]) -> List[str]:
    """Per architecture: each VB row's speed-up over the fastest peer
    (peer median / VB median; > 1 means VB is faster).

    Example:
        >>> rows = [Result('a', 'VB', 'vb', 'backbone', 8., 8., 8., 1.),
        ...         Result('a', 'P', 'peer', 'backbone', 10., 10., 10., 1.)]
        >>> summarize(rows)
        ['a: fastest peer P 10.0 ms; VB 8.0 ms = 1.25x']
    """
    lines = []
    archs = list(dict.fromkeys(r.arch for r in results))
    for arch in archs:
        group = [r for r in results
                 if r.arch == arch and not math.isnan(r.median_ms)]
        peers = [r for r in group if r.kind == 'peer']
        if not peers:
            continue
        best = min(peers, key=lambda r: r.median_ms)
        parts = [f'{r.name} {r.median_ms:.1f} ms = '
                 f'{best.median_ms / r.median_ms:.2f}x'
                 for r in group if r.kind != 'peer']
        lines.append(f'{arch}: fastest peer {best.name} '
                     f'{best.median_ms:.1f} ms; ' + '; '.join(parts))
    return lines


def write_outputs(out: Dict[str, object], out_dir: str,
                  stem: str = 'benchmark') -> Dict[str, Path]:
    """Write ``{stem}.csv``, ``{stem}.json``, ``{stem}.png`` and
    ``{stem}.md`` (the table) into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: List[Result] = out['rows']
    paths = {k: out_dir / f'{stem}.{k}' for k in ('csv', 'json', 'png', 'md')}
    with open(paths['csv'], 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow(dataclasses.asdict(r))

    def clean(v):
        return None if isinstance(v, float) and math.isnan(v) else v

    with open(paths['json'], 'w') as f:
        json.dump(dict(meta=out['meta'],
                       rows=[{k: clean(v) for k, v in
                              dataclasses.asdict(r).items()} for r in rows]),
                  f, indent=2, default=str)
    paths['md'].write_text(format_table(rows) + '\n')
    plot_results(rows, paths['png'], out['meta'])
    return paths


def plot_results(rows: Sequence[Result], path, meta: dict) -> None:
    """A horizontal bar chart of the median ms (p10..p90 whiskers),
    grouped by architecture."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    colors = {'vb': 'tab:blue', 'peer': 'tab:gray'}
    labels = [f'{r.arch}: {r.name}' for r in rows]
    medians = [r.median_ms for r in rows]
    err = [[r.median_ms - r.p10_ms for r in rows],
           [r.p90_ms - r.median_ms for r in rows]]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    ax.barh(range(len(rows)), medians, xerr=err, capsize=2,
            color=[colors.get(r.kind, 'tab:green') for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel('median ms per batch (p10..p90); lower is faster')
    s = meta.get('settings', {})
    ax.set_title(
        f"{s.get('mode')} b{s.get('batch')} {s.get('height')}x"
        f"{s.get('width')} {s.get('dtype')} {meta.get('threads')} threads, "
        f"load {meta.get('load_average_start', math.nan):.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------
# Whole detector.
def detector_rows(config: str,
                  forms: Sequence[str] = ('optimized', )) -> List[Row]:
    """Rows timing a whole mmdet detector (``test_step`` on a synthetic
    batch, data preprocessing included) built from ``config`` without
    pretrained weights, and the same detector with its backbone optimised.
    """
    from .apis import build_detector, load_config

    def build(train: bool = False) -> nn.Module:
        return _Detector(build_detector(load_config(config),
                                        pretrained=False))

    name = Path(config).stem
    rows = [Row('detector', name, 'vb', build)]
    check_forms(forms)
    for form in forms:
        rows.append(Row('detector', f'{name} {form}', form, build,
                        form=FORMS[form], ref=name))
    return rows


class _Detector(nn.Module):
    """A detector called with an image tensor: ``test_step`` on it."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x):
        from mmdet.structures import DetDataSample
        h, w = x.shape[-2:]
        samples = [DetDataSample(metainfo=dict(
            img_shape=(h, w), ori_shape=(h, w), scale_factor=(1., 1.),
            batch_input_shape=(h, w), pad_shape=(h, w)))
            for _ in range(x.shape[0])]
        inputs = [(img * 255).to(torch.uint8) for img in x.float()]
        preds = self.detector.test_step(dict(inputs=inputs,
                                             data_samples=samples))
        return tuple(p.pred_instances.bboxes for p in preds)
