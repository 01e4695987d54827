"""A run: prepare every row of an architecture, time them interleaved, and
fill in ratios, GFLOP/s and % of peak.
"""
import copy
import dataclasses
import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..inference import optimize_for_inference
from ..outputs import (DTYPES as _ALL_DTYPES, dtype_name, max_abs_difference,
                       tf32_flags, tolerance_for)
from ..timing import time_interleaved
from .detector import _Detector
from .measure import (busy_warning, count_complexity, frozen_summary,
                      load_average, measure_peak, peak_memory, percentile,
                      probe_dtypes, warm_up)
from .schema import AMP_DTYPES, DTYPES, MODE_SPECS, Result, Row, Settings


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

    def form_target(self) -> nn.Module:
        """The module a form replaces: the backbone."""
        return self.backbone

    def with_form(self, fast: nn.Module) -> '_WithNeck':
        """The same neck after ``fast``."""
        return _WithNeck(fast, (), neck=self.neck)


def _out_channels(model: nn.Module, in_channels: int = 3) -> List[int]:
    with torch.inference_mode():
        outs = model(torch.rand(1, in_channels, 64, 64))
    return [o.shape[1] for o in outs]


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
    train = settings.spec.train
    note = ''
    frozen = ''
    diff = math.nan
    mem_format = 'channels_last' if settings.channels_last else 'contiguous'
    row_dtype = settings.dtype
    if row.form is None:
        model = row.build(train=train)
        if settings.spec.neck:
            model = _WithNeck(model, _out_channels(model))
        if not train:
            model.eval()
        else:
            model.train()
            frozen = getattr(model, 'frozen_stages', None)
            if not settings.spec.detector and row.kind == 'peer' and \
                    not isinstance(frozen, int):
                note = 'no frozen_stages option: BN in eval only'
                from ..layers import is_batch_norm
                for m in model.modules():
                    if is_batch_norm(m):
                        m.eval()
        model = _prepare(model, settings, device, dtype)
        if train:
            frozen = frozen_summary(model)
        eager_cache[row.name] = model
        run_x = x.contiguous(memory_format=torch.channels_last) \
            if settings.channels_last else x
    else:
        if train:
            raise ValueError('optimised forms are for inference; mode=train '
                             'takes no forms')
        ref = eager_cache[row.ref]
        # NOTE: a wrapper (backbone + neck, a detector) says which module a
        # form replaces and how; a bare backbone is replaced whole.
        target = ref.form_target() if hasattr(ref, 'form_target') else ref
        # NOTE: every form is made from, and checked against, the fp32
        # eager backbone (a copy: the cached row keeps its dtype).
        target = copy.deepcopy(target).float().eval()
        example = x[:1].float()
        form = dict(row.form)
        # NOTE: int8 rows are calibrated on random inputs: a speed figure,
        # not an accuracy one (tools/deploy_eval.py measures accuracy).
        if form.get('dtype') == 'int8':
            gen = torch.Generator().manual_seed(0)
            form['calibration'] = [torch.randn(example.shape, generator=gen)
                                   for _ in range(8)]
        fast = optimize_for_inference(target, example_input=example, **form)
        # NOTE: an engine form (also what backend='auto' may pick).
        engine = hasattr(fast, 'backend')
        model = ref.with_form(fast) if hasattr(ref, 'with_form') else fast
        with torch.inference_mode():
            expected = target(example)
            diff = max_abs_difference(expected, fast(example))
            tol = tolerance_for(fast.dtype, expected)
        if not diff <= tol:
            note = f'max_abs_diff above tolerance {tol:.3g}'
        if engine:
            mem_format = fast.backend
            row_dtype = fast.dtype
        else:
            mem_format = 'channels_last' if fast.channels_last else \
                'contiguous'
            row_dtype = dtype_name(fast.dtype)
        run_x = x

    if train:
        step = _train_step(model, run_x, device, settings.amp)
    else:
        def step():
            return model(run_x)

    warm_up(step, settings.warmup, device=device, grad=train)
    result = Result(
        arch=row.arch, name=row.name, kind=row.kind, mode=settings.mode,
        median_ms=math.nan, p10_ms=math.nan, p90_ms=math.nan,
        images_per_s=math.nan,
        max_abs_diff=diff, dtype=row_dtype, amp=settings.amp or '',
        memory_format=mem_format,
        threads=torch.get_num_threads(), batch=settings.batch,
        height=settings.height, width=settings.width,
        iters=settings.iters, frozen=frozen, note=note)
    # NOTE: no GMACs for a whole detector: its count depends on the
    # detections, and the tracer cannot follow mmdet's inference call.
    if settings.complexity and isinstance(model, _Detector) and \
            row.form is None:
        result.params_m = sum(p.numel() for p in model.parameters()) / 1e6
    elif settings.complexity and row.form is None:
        params, macs = count_complexity(model.float(), x[:1].float())
        model.to(dtype)
        result.params_m = params
        result.gmacs = macs * settings.batch
    return step, result


def _train_step(model: nn.Module, x: torch.Tensor, device: torch.device,
                amp: Optional[str] = None) -> Callable[[], None]:
    """A training row's step: forward and backward of the sum of the output
    means (a detector's: of its losses), gradients dropped after.

    With ``amp`` as mmengine's ``AmpOptimWrapper``: the forward and the loss
    under ``torch.autocast`` in that dtype over the fp32 weights, and for
    fp16 a ``GradScaler``: the loss scaled for the backward, the gradients
    unscaled and checked for inf/NaN, the scale updated (the optimizer step
    itself is not timed, with or without AMP).
    """
    amp_dtype = AMP_DTYPES[amp] if amp else None
    scaler = torch.amp.GradScaler(device.type) if amp == 'fp16' else None
    # NOTE: the scaler unscales the gradients of an optimizer's groups; this
    # one is never stepped.
    groups = torch.optim.SGD([p for p in model.parameters()
                              if p.requires_grad], lr=0.) if scaler else None

    def step():
        with torch.autocast(device.type, dtype=amp_dtype,
                            enabled=amp_dtype is not None):
            outs = model(x)
            loss = sum(o.float().mean() for o in outs)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(groups)
            scaler.update()
        for p in model.parameters():
            p.grad = None
    step.scaler = scaler
    return step


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
        if MODE_SPECS[r.mode].train:
            # NOTE: a backward costs about twice the forward.
            flops = 3 * 2 * r.gmacs
        else:
            flops = 2 * r.gmacs
        r.gflops_per_s = flops / (r.median_ms / 1e3)
        # NOTE: an AMP row computes its convs and matmuls in the amp dtype.
        peak = peaks.get(r.amp or r.dtype, math.nan)
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
        >>> from vb_plugin.benchmark import make_rows
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
    # a multiple of the fp32 rate where the CPU has bf16 instructions, and
    # a GPU's fp16/bf16 tensor cores at a multiple of its (TF32) fp32 rate.
    probes = {name: measure_peak(device, _ALL_DTYPES[name])
              for name in probe_dtypes(settings, rows)}
    peaks = {name: probe['peak_gflops'] for name, probe in probes.items()}
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
                    form_dtype = (row.form or {}).get('dtype')
                    prepared.append((None, Result(
                        arch=row.arch, name=row.name, kind=row.kind,
                        dtype=dtype_name(form_dtype or settings.dtype),
                        amp=settings.amp or '', mode=settings.mode,
                        median_ms=math.nan,
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
                                         grad=settings.spec.train)
            load_after = load_average()
            for (step, res), times in zip(timed, all_times):
                _set_times(res, times)
                res.load_before, res.load_after = load_before, load_after
                # NOTE: after every row of the group ran: no row pays for
                # the process's growth (see peak_memory).
                res.peak_mem_mb = peak_memory(
                    step, device=device, grad=settings.spec.train)
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
        peak=probes['fp32'], peak_bf16=probes.get('bf16'), peaks=probes,
        load_average_start=load_start,
        load_average_end=load_end, busy_warning=warning or end_warning,
        time=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
    if device.type == 'cuda':
        meta.update(device_name=torch.cuda.get_device_name(device),
                    tf32=tf32_flags()._asdict())
    return dict(meta=meta, rows=results)
