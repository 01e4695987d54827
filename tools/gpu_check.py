"""The GPU check of issue 28 in one call: the cuda-marked tests and the
``tools/benchmark.py --device cuda`` rows, results written under ``$OUT``.

Run on a machine with a GPU, from the project root. On the lent GPU
machine (no mm* packages there) ``tools/gpu_check.sh`` sets the stack up
first and runs this through mmcv_cuda_shim (see docs/performance.md):

    python tools/gpu_check.py                  # tests, bench, detector
    python tools/gpu_check.py compiled train   # the other stages
    python tools/gpu_check.py --dry-run        # print the commands only

Stages (:data:`STAGES`), each with a time cap, cut short at the overall
``--seconds`` (a stage that does not fit is skipped and said so):

* ``tests``: ``pytest -m "cuda and not slow"`` (tests/test_cuda.py and the
  AMP config's test);
* ``bench``: ResNet-50, ConvNeXt-T and RegNetX-3.2GF, batch 16, 640x640,
  the VB eager row, its peers and the eager, fp16/bf16 and CUDA-graph
  forms, interleaved;
* ``detector``: mmdet's Mask R-CNN R-50 (VBResNet, and mmdet's ResNet with
  the same weights) through ``inference_detector`` at 800x1216, with
  backbone + neck replaced by each form;
* ``compiled`` (not in the default: inductor compiles take minutes): the
  compiled forms (default mode, and reduce-overhead's CUDA graphs) of the
  same backbones, and the slow cuda tests;
* ``train`` (not in the default): training steps with fp16 AMP (backbones
  at batch 8, Mask R-CNN at 2 x 800x1216, native twin first).

Writes ``gpu_check.json`` (per stage and run: command, exit status,
seconds, pytest's last line, and for benchmark runs the speed-ups of
:func:`vb_plugin.benchmark.speedups` against the targets), ``pytest.txt``
and ``<stage>.json`` (the benchmark's JSON; ``train1.json`` for the
second run of ``train``): at most 8 files with ``run.log``.
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHS = ['resnet50', 'convnext_tiny', 'regnetx_3.2gf']
#: Targets of issue 28 on the GPU: the fastest form of any precision
#: against the fastest peer's eager time (backbones), and the detector
#: with its fastest backbone+neck form against the eager detector.
TARGETS = {'bench': ('vs_peer', 3.0), 'compiled': ('vs_peer', 3.0),
           'detector': ('vs_vb', 1.5)}
DETECTOR = 'configs/mask_rcnn/mask-rcnn_vb-r50_fpn_1x_coco.py'
R50_MASK_RCNN = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
BENCH = ['--device', 'cuda', '--threads', '16', '--no-progress']


@dataclass(frozen=True)
class Stage:
    """One step of the check: its runs, each ('pytest' or 'benchmark', the
    arguments), within ``cap_s`` seconds together."""
    runs: Sequence[Tuple[str, Sequence[str]]]
    cap_s: int


STAGES: Dict[str, Stage] = {
    'tests': Stage([('pytest', [
        '-m', 'cuda and not slow', '-q', '-rfEs', 'tests/test_cuda.py',
        'tests/test_workflows.py::test_amp_config_is_the_r50_config_with_'
        'fp16_amp'])], 180),
    'bench': Stage([('benchmark', [
        '--arch', *ARCHS, '--batch', '16', '--size', '640', '640',
        '--forms', 'optimized', 'bf16', 'fp16', 'cuda-graph',
        'cuda-graph-bf16', 'cuda-graph-fp16', '--warmup', '10', '--iters',
        '30', *BENCH])], 180),
    'detector': Stage([('benchmark', [
        '--mode', 'detector', '--native', '--part', 'backbone+neck',
        '--config', DETECTOR, '--size', '800', '1216', '--forms',
        'optimized', 'bf16', 'fp16', 'cuda-graph-bf16', 'cuda-graph-fp16',
        '--warmup', '5', '--iters', '20', '--no-complexity', *BENCH])], 120),
    'compiled': Stage([
        ('benchmark', [
            '--arch', *ARCHS, '--batch', '16', '--size', '640', '640',
            '--forms', 'fp16', 'compiled', 'compiled-fp16',
            'compiled-cuda-graph-fp16', '--warmup', '5', '--iters', '30',
            *BENCH]),
        ('pytest', ['-m', 'cuda and slow', '-q', '-rfEs',
                    'tests/test_cuda.py'])], 480),
    'train': Stage([
        ('benchmark', [
            '--mode', 'train', '--amp', 'fp16', '--arch', 'resnet50',
            'convnext_tiny', '--batch', '8', '--size', '640', '640',
            '--warmup', '5', '--iters', '20', *BENCH]),
        ('benchmark', [
            '--mode', 'detector-train', '--amp', 'fp16', '--native',
            '--config', R50_MASK_RCNN, '--batch', '2', '--size', '800',
            '1216', '--warmup', '3', '--iters', '10', '--no-complexity',
            *BENCH])], 240),
}
DEFAULT_STAGES = ('tests', 'bench', 'detector')


def launcher() -> List[str]:
    """How to start Python: ``$SHIM`` (``python3 .gpu/mmcv_cuda_shim.py``
    on the lent GPU machine) or this interpreter."""
    shim = os.environ.get('SHIM')
    return shlex.split(shim) if shim else [sys.executable]


def commands(name: str, work: Path) -> List[Tuple[str, List[str]]]:
    """The (kind, command line) of each run of a stage; a benchmark writes
    into ``work``."""
    out = []
    for i, (kind, argv) in enumerate(STAGES[name].runs):
        if kind == 'pytest':
            import pytest
            main = str(Path(pytest.__file__).with_name('__main__.py'))
            out.append((kind, launcher() + [main, *argv]))
        else:
            out.append((kind, launcher() + [
                'tools/benchmark.py', *argv, '--out-dir',
                str(work / f'{name}{i}')]))
    return out


def _rows(path: Path):
    from vb_plugin.benchmark import Result
    data = json.loads(path.read_text())
    return [Result(**{k: math.nan if v is None else v for k, v in r.items()})
            for r in data['rows']], data['meta']


def _text(output) -> str:
    if isinstance(output, bytes):
        return output.decode(errors='replace')
    return output or ''


def run_stage(name: str, out: Path, work: Path, seconds: float) -> dict:
    """Run one stage within ``seconds``; its record for gpu_check.json."""
    from vb_plugin.benchmark import speedups
    record: dict = dict(stage=name, runs=[])
    stage_start = time.time()
    for i, (kind, cmd) in enumerate(commands(name, work)):
        left = seconds - (time.time() - stage_start)
        if left < 20:
            record['runs'].append(dict(command=shlex.join(cmd), rc=None,
                                       skipped='no time left'))
            continue
        start = time.time()
        print(f'== {name}: {shlex.join(cmd)}', flush=True)
        # NOTE: the checkout is tested, whatever else is installed.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), os.environ.get('PYTHONPATH')) if p))
        try:
            res = subprocess.run(cmd, cwd=ROOT, timeout=left, env=env,
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
            rc, text = res.returncode, _text(res.stdout)
        except subprocess.TimeoutExpired as err:
            rc, text = f'timeout after {left:.0f} s', _text(err.stdout)
        print(text[-6000:], flush=True)
        run = dict(command=shlex.join(cmd), rc=rc,
                   seconds=round(time.time() - start, 1))
        if kind == 'pytest':
            with open(out / 'pytest.txt', 'a') as f:
                f.write(f'== {name}: {shlex.join(cmd)}\n{text}\n')
            run['summary'] = (text.strip().splitlines() or [''])[-1]
        json_path = work / f'{name}{i}' / 'benchmark.json'
        if json_path.is_file():
            (out / f'{name}{i or ""}.json').write_text(json_path.read_text())
            rows, meta = _rows(json_path)
            run['speedups'] = speedups(rows)
            run['busy_warning'] = meta.get('busy_warning')
            if name in TARGETS:
                key, target = TARGETS[name]
                run['target'] = {arch: dict(
                    figure=key, value=entry.get(key), target=target,
                    met=(entry.get(key) or 0) >= target)
                    for arch, entry in run['speedups'].items()}
        record['runs'].append(run)
    return record


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('stages', nargs='*', metavar='STAGE',
                   help=f'stages to run, in order: {list(STAGES)} (default: '
                   f'{list(DEFAULT_STAGES)})')
    p.add_argument('--out', default=os.environ.get('OUT', 'work_dirs/gpu'),
                   help='where results go (default: $OUT, else '
                   'work_dirs/gpu)')
    p.add_argument('--seconds', type=float, default=450,
                   help='time for all stages together (default: 450; the '
                   "device tool's call limit is 600 s, and the stack set-up "
                   'takes ~120 s of it)')
    p.add_argument('--dry-run', action='store_true',
                   help='print the commands, run nothing')
    args = p.parse_args(argv)
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        p.error(f'stage {unknown[0]!r} is not valid; choose from '
                f'{list(STAGES)}')
    args.stages = args.stages or list(DEFAULT_STAGES)
    return args


def main(argv=None) -> Optional[dict]:
    args = parse_args(argv)
    out = Path(args.out)
    if args.dry_run:
        for name in args.stages:
            for _, cmd in commands(name, Path('WORK')):
                print(shlex.join(cmd))
        return None
    work = Path(tempfile.mkdtemp(prefix='gpu_check_'))
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.seconds
    summary = dict(stages=[], started=time.strftime('%Y-%m-%dT%H:%M:%SZ',
                                                    time.gmtime()))
    for name in args.stages:
        left = deadline - time.time()
        if left < 30:
            summary['stages'].append(dict(stage=name, skipped=(
                f'{left:.0f} s left of --seconds {args.seconds:.0f}')))
            continue
        summary['stages'].append(
            run_stage(name, out, work, min(STAGES[name].cap_s, left)))
        (out / 'gpu_check.json').write_text(json.dumps(summary, indent=1))
    (out / 'gpu_check.json').write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == '__main__':
    main()
