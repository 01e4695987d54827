"""Show what a config builds: stages, freezing, BN modes, learning rates.

    python tools/inspect.py CONFIG [--checkpoint FILE] [--cfg-options k=v ...]
"""
import os
import sys

# NOTE: this file is named like the standard library's `inspect`, which
# torch imports; run as a script, its folder comes first on sys.path and
# would shadow it.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(
        os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402

from mmengine.config import DictAction  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Show what a config builds (backbone stages, frozen '
        'parameters, BN modes, learning rates, neck wiring, load report)')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--checkpoint', help='a checkpoint to load into the '
                        'backbone strictly, for its load report')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    return parser.parse_args(argv)


def main(argv=None):
    from mmengine.logging import MMLogger
    from vb_plugin.apis import load_config
    from vb_plugin.inspection import format_summary, inspect_config
    args = parse_args(argv)
    # Only warnings from building the model: the summary is the output.
    MMLogger.get_instance('mmengine', log_level='WARNING')
    cfg = load_config(args.config, args.cfg_options)
    print(format_summary(inspect_config(cfg, args.checkpoint)))


if __name__ == '__main__':
    main()
