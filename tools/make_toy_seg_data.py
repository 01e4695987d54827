"""Write the bundled toy segmentation dataset (deterministic, no download).

    python tools/make_toy_seg_data.py [--out data/toy_seg] [--train 200]
        [--val 40] [--seed 0]
"""
import argparse

from vb_plugin.datasets import make_toy_seg


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='data/toy_seg')
    parser.add_argument('--train', type=int, default=200)
    parser.add_argument('--val', type=int, default=40)
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dirs = make_toy_seg(args.out, {'train': args.train, 'val': args.val},
                        seed=args.seed)
    for split, path in dirs.items():
        print(f'{split}: {path}')


if __name__ == '__main__':
    main()
