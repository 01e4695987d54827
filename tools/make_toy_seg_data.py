"""Write the bundled toy segmentation dataset (deterministic, no download).

    python tools/make_toy_seg_data.py [--out data/toy_seg] [--train 200]
        [--val 40] [--seed 0]
"""
from vb_plugin.apis.cli import toy_data_parser, write_toy_data
from vb_plugin.datasets import make_toy_seg


def parse_args(argv=None):
    return toy_data_parser(__doc__.splitlines()[0], 'data/toy_seg', 200,
                           40).parse_args(argv)


def main(argv=None):
    write_toy_data(make_toy_seg, parse_args(argv))


if __name__ == '__main__':
    main()
