"""Write the bundled toy COCO dataset (deterministic, no download).

    python tools/make_toy_data.py [--out data/toy_coco] [--train 300] [--val 60]
"""
from vb_plugin.apis.cli import toy_data_parser, write_toy_data
from vb_plugin.datasets import make_toy_coco


def parse_args(argv=None):
    return toy_data_parser(__doc__.splitlines()[0], 'data/toy_coco', 300,
                           60).parse_args(argv)


def main(argv=None):
    write_toy_data(make_toy_coco, parse_args(argv))


if __name__ == '__main__':
    main()
