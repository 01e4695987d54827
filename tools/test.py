"""Evaluate a checkpoint with an mmdet config (thin wrapper over the Runner).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR]
        [--cfg-options k=v ...] [--launcher {none,pytorch,slurm,mpi}]
"""
from vb_plugin.apis import build_runner, load_config, setup_runner_config
from vb_plugin.apis.cli import parse_runner_args, runner_parser


def parse_args(argv=None):
    parser = runner_parser('Test (evaluate) a detector',
                           'test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    return parse_runner_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    setup_runner_config(cfg, args.config, work_dir=args.work_dir,
                        launcher=args.launcher)
    cfg.load_from = args.checkpoint
    return build_runner(cfg).test()


if __name__ == '__main__':
    main()
