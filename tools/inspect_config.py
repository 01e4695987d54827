"""Show what a config builds: stages, freezing, BN modes, learning rates.

    python tools/inspect_config.py CONFIG [--checkpoint FILE]
        [--cfg-options k=v ...]

(Not ``tools/inspect.py``: a script's folder comes first on ``sys.path``, so
a file of that name would shadow the standard library's ``inspect`` for
every other tool in ``tools/``.)
"""
import argparse

from mmengine.config import DictAction


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
