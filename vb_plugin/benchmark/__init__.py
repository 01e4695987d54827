"""Backbone benchmark that runs on CPU (and CUDA): VB backbones next to the
models users would otherwise use, on the same inputs, in one run.

The library side of ``tools/benchmark.py``. For each architecture it builds
rows: the VB backbone (eager), its peers (mmdet, timm ``features_only``, HF
transformers, mmpretrain when importable), and the forms of
:func:`vb_plugin.optimize_for_inference`. Each row is timed the same way:
all rows of an architecture are built and warmed up, then timed together,
interleaved round by round (:func:`time_interleaved`), under
``torch.inference_mode`` (for ``mode='train'`` a forward + backward with
``frozen_stages=1`` and ``norm_eval``, optionally under AMP: ``amp``), with
the thread count set and the load average recorded; on CUDA synchronised,
with the peak memory of each row from ``torch.cuda.max_memory_allocated``
and the peak GFLOP/s of each dtype from a probe sized for the GPU.

Results are :class:`Result` rows, written as a text table, CSV, JSON and a
PNG bar chart (:func:`write_outputs`).

One job per module: :mod:`.schema` (rows, results, settings),
:mod:`.catalogue` (which models to time), :mod:`.measure` (memory, peak,
complexity), :mod:`.run` (a run), :mod:`.output` (files), :mod:`.detector`
(whole detectors) and :mod:`.evaluate` (a detector's test metrics with each
inference form); interleaved timing is :mod:`vb_plugin.timing`'s.
"""

from ..inference import FORMS, check_forms
from ..timing import time_interleaved
from .catalogue import (ARCHITECTURES, _importable, architecture,
                        backbone_cfg, make_rows)
from .detector import NATIVE_TWINS, detector_rows, twin_config
from .measure import (PEAK_PROBES, PeakProbe, busy_warning, count_complexity,
                      frozen_summary, load_average, measure_peak, peak_memory,
                      percentile, probe_dtypes, warm_up)
from .output import (TABLE_COLUMNS, format_table, plot_results, speedups,
                     summarize, table_columns,
                     write_outputs)
from .run import run_benchmark
from .schema import (AMP_DTYPES, COLUMNS, DETECTOR_MODES, DTYPES, MODE_SPECS,
                     MODES, TRAIN_MODES, Mode, Result, Row, Settings)

__all__ = [
    'AMP_DTYPES', 'ARCHITECTURES', 'COLUMNS', 'DETECTOR_MODES', 'DTYPES',
    'FORMS', 'MODE_SPECS', 'MODES', 'Mode', 'NATIVE_TWINS', 'PEAK_PROBES',
    'PeakProbe', 'TABLE_COLUMNS', 'TRAIN_MODES',
    'architecture', 'backbone_cfg', 'busy_warning', 'check_forms',
    'count_complexity', 'detector_rows', 'format_table', 'frozen_summary',
    'load_average', 'make_rows', 'measure_peak', 'peak_memory', 'percentile',
    'plot_results', 'probe_dtypes', 'Result', 'Row', 'run_benchmark',
    'Settings', 'speedups', 'summarize', 'table_columns', 'time_interleaved',
    'twin_config', 'warm_up', 'write_outputs', '_importable'
]
