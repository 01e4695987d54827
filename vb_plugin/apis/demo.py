"""The toy demo (``make demo``): data, training, evaluation, summary.
"""
from pathlib import Path
from typing import Dict, List, Optional

from mmengine.config import Config

from .config import load_config
from .runner import build_runner, setup_runner_config


def _move_data_root(cfg: Config, data_root: str) -> None:
    """Point the datasets and evaluators of a config written for its own
    ``data_root`` (the toy configs: ``'data/toy_coco/'``) at ``data_root``.
    """
    old = cfg.get('data_root')
    if not old:
        return
    new = data_root.rstrip('/') + '/'
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dataset = (cfg.get(loader) or {}).get('dataset')
        while dataset is not None:   # through dataset wrappers
            if dataset.get('data_root') == old:
                dataset.data_root = new
            dataset = dataset.get('dataset')
    for name in ('val_evaluator', 'test_evaluator'):
        evaluator = cfg.get(name)
        if isinstance(evaluator, dict) and str(evaluator.get(
                'ann_file', '')).startswith(old):
            evaluator.ann_file = new + evaluator.ann_file[len(old):]
    cfg.data_root = new


def metric_lines(metrics: Dict[str, float]) -> List[str]:
    """The evaluation lines of the demo summary: COCO bbox and segm AP, each
    only when the evaluator computed it (a boxes-only config such as DETR's
    has no segm metric); any other metrics as they are.

    Example:
        >>> metric_lines({'coco/bbox_mAP': 0.61, 'coco/bbox_mAP_50': 0.9})
        ['  bbox AP:    0.610 (AP50 0.900)']
    """
    lines = []
    for kind in ('bbox', 'segm'):
        ap = metrics.get(f'coco/{kind}_mAP')
        if ap is not None:
            ap50 = metrics.get(f'coco/{kind}_mAP_50', float('nan'))
            lines.append(f'  {kind} AP:    {ap:.3f} (AP50 {ap50:.3f})')
    if not lines:
        lines.append(f'  metrics:    {dict(metrics)}')
    return lines


def run_demo(config: str,
             work_dir: str,
             data_root: str = 'data/toy_coco',
             max_iters: Optional[int] = None,
             log_level: str = 'WARNING') -> str:
    """Generate the toy data, train, evaluate; return a printable summary.

    Args:
        config (str): A toy-dataset config.
        work_dir (str): Where logs and checkpoints go.
        data_root (str): Where the toy dataset is written (if missing) and
            read from: it replaces the config's ``data_root``.
        max_iters (int, optional): Override the schedule's length.
        log_level (str): mmengine's console log level (the progress bar and
            the summary are printed regardless).
    """
    from ..datasets import make_toy_coco
    root = Path(data_root)
    if not (root / 'annotations' / 'val.json').is_file():
        make_toy_coco(str(root))
    # Evaluate once, after training (not also inside the training loop).
    options = {'log_level': log_level, 'train_cfg.val_begin': 10**9}
    if max_iters is not None:
        options['train_cfg.max_iters'] = max_iters
    cfg = load_config(config, options)
    _move_data_root(cfg, str(root))
    setup_runner_config(cfg, config, work_dir=work_dir)
    cfg.custom_hooks = [*cfg.custom_hooks, dict(type='ProgressBarHook')]
    runner = build_runner(cfg)
    runner.train()
    metrics = runner.val_loop.run()
    backbone = runner.model.backbone
    bcfg = {k: v for k, v in cfg.model.backbone.items() if k != 'type'}
    ckpt = Path(cfg.work_dir) / f'iter_{runner.iter}.pth'
    lines = [
        'vb_plugin demo summary',
        f'  config:     {config}',
        f'  backbone:   {type(backbone).__name__}({bcfg})',
        f'              out_channels={backbone.out_channels}, '
        f'out_strides={backbone.out_strides}',
        f'  trained:    {runner.iter} iterations on {data_root}',
        *metric_lines(metrics),
        f'  logs:       {Path(cfg.work_dir) / runner.timestamp}',
        f'  checkpoint: {ckpt}',
    ]
    return '\n'.join(lines)
