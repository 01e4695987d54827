"""Time VB backbones next to their peers on this machine (CPU or CUDA).

Writes a table (stdout and ``benchmark.md``), ``benchmark.csv``,
``benchmark.json`` and ``benchmark.png`` into ``--out-dir``. See
docs/performance.md.

Examples:
    python tools/benchmark.py --arch resnet50 convnext_tiny regnetx_3.2gf \\
        --forms optimized compiled
    python tools/benchmark.py --arch resnet50 --mode train
    python tools/benchmark.py --arch resnet50 --mode train --amp fp16 \
        --device cuda
    python tools/benchmark.py --arch resnet50 convnext_tiny --device cuda \
        --batch 16 --forms optimized fp16 cuda-graph-fp16 compiled-fp16
    python tools/benchmark.py --arch vitdet_b16 --size 1024 1024 --forms
    python tools/benchmark.py --arch timm:convnext_small \
        --forms optimized onnxruntime openvino openvino-bf16 openvino-int8
    python tools/benchmark.py \
        --backbone-cfg "dict(type='VBConvNeXt', arch='small')"
    python tools/benchmark.py --mode detector \\
        --config configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py
    python tools/benchmark.py --mode detector-train --native --batch 2 \\
        --size 512 640 --config mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py
    python tools/benchmark.py --mode detector --size 800 1216 --part \\
        backbone+neck --forms optimized openvino onnxruntime-int8 \\
        --config mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vb_plugin.benchmark import (AMP_DTYPES, ARCHITECTURES,  # noqa
                                 DETECTOR_MODES, DTYPES, FORMS, MODES,
                                 TRAIN_MODES,
                                 Settings, backbone_cfg,
                                 detector_rows,
                                 format_table, make_rows, run_benchmark,
                                 summarize, write_outputs)
from vb_plugin.deploy import PARTS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--arch', nargs='+', default=None,
                   help='architectures to time: ' + ', '.join(
                       sorted(ARCHITECTURES)) + ", or 'timm:<model name>' "
                   '(default: resnet50, unless --backbone-cfg is given)')
    p.add_argument('--backbone-cfg', action='append', default=[],
                   metavar='CFG',
                   help="a backbone to time: \"dict(type='VBConvNeXt', "
                   "arch='small')\" or a config file (its model.backbone); "
                   'may repeat')
    p.add_argument('--mode', default='backbone', choices=MODES,
                   help='backbone alone, backbone + FPN, a training step '
                   '(forward + backward, frozen_stages=1, norm_eval), a '
                   "whole detector's inference_detector call or its "
                   'training step (losses + backward) (--config)')
    p.add_argument('--config', help='mmdet config file or mmdet:: name, for '
                   'the detector modes')
    p.add_argument('--native', action='store_true',
                   help="detector modes: time the config's detector with "
                   "mmdet's own backbone (ResNet for VBResNet and back; same "
                   'weights) first, next to the config as written')
    p.add_argument('--part', default='backbone', choices=PARTS,
                   help='detector modes: what a form replaces')
    p.add_argument('--forms', nargs='*', default=['optimized'],
                   choices=list(FORMS),
                   help='optimize_for_inference forms to add (default: '
                   'optimized; none in the training modes)')
    p.add_argument('--no-peers', action='store_true',
                   help='time the VB rows only')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--size', type=int, nargs=2, default=[640, 640],
                   metavar=('H', 'W'))
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--dtype', default='fp32', choices=list(DTYPES),
                   help='dtype of every eager row')
    p.add_argument('--amp', default=None, choices=list(AMP_DTYPES),
                   help='training modes: autocast the forward in this dtype '
                   'over fp32 weights, with a loss scaler for fp16 (as '
                   "mmengine's AmpOptimWrapper)")
    p.add_argument('--channels-last', action='store_true',
                   help='eager rows in channels_last too')
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda[:N]'")
    p.add_argument('--no-complexity', action='store_true',
                   help='skip params/GMACs (and GFLOP/s)')
    p.add_argument('--no-progress', action='store_true')
    p.add_argument('--out-dir', default='work_dirs/benchmark')
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    forms = [] if args.mode in TRAIN_MODES else args.forms
    settings = Settings(
        mode=args.mode, batch=args.batch, height=args.size[0],
        width=args.size[1], warmup=args.warmup, iters=args.iters,
        threads=args.threads, dtype=args.dtype, amp=args.amp,
        channels_last=args.channels_last, device=args.device,
        config=args.config, complexity=not args.no_complexity)
    settings.check()
    if args.mode in DETECTOR_MODES:
        rows = detector_rows(args.config, forms, native=args.native,
                             part=args.part)
    else:
        archs = list(args.arch or ([] if args.backbone_cfg else
                                   ['resnet50']))
        archs += [backbone_cfg(text) for text in args.backbone_cfg]
        rows = make_rows(archs, peers=not args.no_peers, forms=forms)
    out = run_benchmark(rows, settings, progress=not args.no_progress)
    meta = out['meta']
    print(format_table(out['rows']))
    for line in summarize(out['rows']):
        print(line)
    print('peak probe: ' + '; '.join(
        f"{name} {p['peak_gflops']:.1f} GFLOP/s (matmul "
        f"{p['matmul_gflops']:.1f}, conv {p['conv_gflops']:.1f}"
        + (f", TF32 conv {p['tf32_conv']} matmul {p['tf32_matmul']}"
           if 'tf32_conv' in p else '') + ')'
        for name, p in meta['peaks'].items())
          + (f" on {meta['device_name']}" if meta.get('device_name') else '')
          + f"; threads {meta['threads']}; "
          f"load average {meta['load_average_start']:.2f} -> "
          f"{meta['load_average_end']:.2f} on {meta['cpu_count']} cores")
    paths = write_outputs(out, args.out_dir)
    print('wrote ' + ', '.join(str(p) for p in paths.values()))
    return out


if __name__ == '__main__':
    main()
