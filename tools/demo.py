"""`make demo`: the whole workflow on a CPU, in about ten minutes.

1. writes the bundled toy dataset (deterministic, no download);
2. trains Mask R-CNN with a VB backbone (configs/mask_rcnn/
   mask-rcnn_vb-r18_fpn_toy.py) from scratch, with a progress bar;
3. evaluates bbox and segm AP with mmdet's CocoMetric;
4. prints a summary.

    python tools/demo.py [--config CONFIG] [--work-dir DIR] [--iters N]
"""
import argparse
import time
from pathlib import Path

from vb_plugin.apis import run_demo

DEFAULT_CONFIG = 'configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train and evaluate a VB '
                                     'Mask R-CNN on the toy dataset')
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--data-root', default='data/toy_coco')
    parser.add_argument('--iters', type=int, default=None,
                        help='training iterations (default: the config)')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    summary = run_demo(args.config, args.work_dir, args.data_root,
                       max_iters=args.iters)
    minutes = (time.perf_counter() - start) / 60
    print('\n' + summary + f'\n  total time: {minutes:.1f} min')


if __name__ == '__main__':
    main()
