"""Train a detector from an mmdet config (thin wrapper over mmengine's Runner).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
        [--cfg-options k=v ...] [--launcher {none,pytorch,slurm,mpi}]
"""
from vb_plugin.apis import build_runner, load_config, setup_runner_config
from vb_plugin.apis.cli import parse_runner_args, runner_parser


def parse_args(argv=None):
    parser = runner_parser('Train a detector', 'train config file path')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from this checkpoint, or with no value from the latest '
        'checkpoint in the work dir')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision training')
    return parse_runner_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    setup_runner_config(cfg, args.config, work_dir=args.work_dir,
                        resume=args.resume, amp=args.amp,
                        launcher=args.launcher)
    build_runner(cfg).train()


if __name__ == '__main__':
    main()
