"""Writing a run: text table, summary lines, CSV, JSON, Markdown and a PNG.
"""
import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence


# NOTE: FORMS (the --forms names) is the inference path's table.
from .schema import COLUMNS, Result


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


def table_columns(results: Sequence[Result]) -> Sequence[str]:
    """:data:`TABLE_COLUMNS`, then ``amp`` and ``frozen`` where a row has
    them (training rows).

    Example:
        >>> r = Result('a', 'm', 'vb', 'train', 10., 9., 11., 100.,
        ...            amp='bf16')
        >>> table_columns([r])[-1]
        'amp'
    """
    extra = tuple(c for c in ('amp', 'frozen')
                  if any(getattr(r, c) for r in results))
    return tuple(TABLE_COLUMNS) + extra


def format_table(results: Sequence[Result],
                 columns: Optional[Sequence[str]] = None) -> str:
    """A plain-text (Markdown) table of the results (``columns``: default
    :func:`table_columns`).

    Example:
        >>> r = Result('a', 'm', 'vb', 'backbone', 10., 9., 11., 100.)
        >>> print(format_table([r], ('name', 'median_ms')))
        | name | median_ms |
        |------|-----------|
        | m    | 10.00     |
    """
    if columns is None:
        columns = table_columns(results)
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


def speedups(results: Sequence[Result]) -> Dict[str, Dict[str, object]]:
    """Per architecture, the figures the speed targets are stated in
    (docs/performance.md): the fastest row that is not a peer (the VB
    eager row or a form, any precision) against the fastest peer and
    against the VB eager row. Rows without a time are left out.

    Example:
        >>> rows = [Result('a', 'VB', 'vb', 'backbone', 9., 9., 9., 1.),
        ...         Result('a', 'P', 'peer', 'backbone', 10., 10., 10., 1.),
        ...         Result('a', 'VB fp16', 'fp16', 'backbone', 2.5, 2.5,
        ...                2.5, 1., dtype='fp16', max_abs_diff=0.01)]
        >>> speedups(rows)['a']
        ... # doctest: +NORMALIZE_WHITESPACE
        {'fastest': 'VB fp16', 'fastest_ms': 2.5, 'dtype': 'fp16',
         'max_abs_diff': 0.01, 'note': '', 'peer': 'P', 'peer_ms': 10.0,
         'vs_peer': 4.0, 'vb_ms': 9.0, 'vs_vb': 3.6}
    """
    out: Dict[str, Dict[str, object]] = {}
    for arch in dict.fromkeys(r.arch for r in results):
        group = [r for r in results
                 if r.arch == arch and not math.isnan(r.median_ms)]
        ours = [r for r in group if r.kind != 'peer']
        if not ours:
            continue
        best = min(ours, key=lambda r: r.median_ms)
        entry: Dict[str, object] = dict(
            fastest=best.name, fastest_ms=best.median_ms, dtype=best.dtype,
            max_abs_diff=best.max_abs_diff, note=best.note)
        peers = [r for r in group if r.kind == 'peer']
        if peers:
            peer = min(peers, key=lambda r: r.median_ms)
            entry.update(peer=peer.name, peer_ms=peer.median_ms,
                         vs_peer=peer.median_ms / best.median_ms)
        vb = next((r for r in group if r.kind == 'vb'), None)
        if vb is not None:
            entry.update(vb_ms=vb.median_ms,
                         vs_vb=vb.median_ms / best.median_ms)
        out[arch] = entry
    return out


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
    amp = f" amp {s['amp']}" if s.get('amp') else ''
    gpu = f" on {meta['device_name']}" if meta.get('device_name') else ''
    ax.set_title(
        f"{s.get('mode')} b{s.get('batch')} {s.get('height')}x"
        f"{s.get('width')} {s.get('dtype')}{amp}{gpu} {meta.get('threads')} "
        f"threads, load {meta.get('load_average_start', math.nan):.2f}",
        fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
