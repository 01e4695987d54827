"""Write the bundled toy COCO dataset (deterministic, no download).

    python tools/make_toy_data.py [--out data/toy_coco] [--train 300] [--val 60]
"""
import argparse

from vb_plugin.datasets import make_toy_coco


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='data/toy_coco')
    parser.add_argument('--train', type=int, default=300)
    parser.add_argument('--val', type=int, default=60)
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    files = make_toy_coco(args.out, {'train': args.train, 'val': args.val},
                          seed=args.seed)
    for split, path in files.items():
        print(f'{split}: {path}')


if __name__ == '__main__':
    main()
