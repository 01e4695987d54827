"""Command-line pieces the scripts in ``tools/`` share: the Runner tools'
arguments (``tools/train.py``, ``tools/test.py``) and the toy-data writers
(``tools/make_toy_data.py``, ``tools/make_toy_seg_data.py``).

Example:
    >>> parser = runner_parser('Train a detector', 'train config file path')
    >>> args = parse_runner_args(parser, ['cfg.py', '--launcher', 'pytorch'])
    >>> args.config, args.launcher, args.work_dir
    ('cfg.py', 'pytorch', None)
"""
import argparse
import os
from typing import Callable, Dict, List, Optional

from mmengine.config import DictAction

#: The launchers of mmengine's Runner.
LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')


def runner_parser(description: str, config_help: str) -> \
        argparse.ArgumentParser:
    """A parser with the arguments every Runner tool takes: ``config``,
    ``--work-dir``, ``--cfg-options``, ``--launcher`` and ``--local_rank``
    (as mmdet's tools take them); a tool adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('config', help=config_help)
    parser.add_argument('--work-dir', help='where to save logs, models and '
                        'metrics')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    parser.add_argument('--launcher', default='none', choices=LAUNCHERS)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser


def parse_runner_args(parser: argparse.ArgumentParser,
                      argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` and set ``LOCAL_RANK`` from ``--local_rank`` when the
    launcher has not (``torch.distributed.launch`` passes the flag)."""
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def toy_data_parser(description: str, out: str, train: int,
                    val: int) -> argparse.ArgumentParser:
    """The arguments of ``tools/make_toy*_data.py``: ``--out``, ``--train``,
    ``--val`` and ``--seed``, with these defaults (seed 0)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--out', default=out)
    parser.add_argument('--train', type=int, default=train)
    parser.add_argument('--val', type=int, default=val)
    parser.add_argument('--seed', type=int, default=0)
    return parser


def write_toy_data(make: Callable[..., Dict[str, str]],
                   args: argparse.Namespace) -> Dict[str, str]:
    """Write a toy set with ``make(root, splits, seed=...)`` from the
    arguments of :func:`toy_data_parser`, and print each split's path.

    Example:
        >>> import tempfile
        >>> from vb_plugin.datasets import make_toy_coco
        >>> args = toy_data_parser('toy', 'data', 300, 60).parse_args(
        ...     ['--out', tempfile.mkdtemp(), '--train', '2', '--val', '1'])
        >>> paths = write_toy_data(make_toy_coco, args)  # doctest: +ELLIPSIS
        train: .../annotations/train.json
        val: .../annotations/val.json
    """
    paths = make(args.out, {'train': args.train, 'val': args.val},
                 seed=args.seed)
    for split, path in paths.items():
        print(f'{split}: {path}')
    return paths
