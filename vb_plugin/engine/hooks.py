"""Training-loop hooks: exact resume and a progress bar.

mmengine's Runner saves the model, optimizer, schedulers and message hub, but
not the random number generators. A resumed run therefore samples different
RPN/RoI training examples than the uninterrupted run would have, and its
weights drift apart. :class:`RNGStateHook` closes that gap.
"""
import random

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Save the RNG states in every checkpoint and restore them on resume.

    Covers Python's ``random``, numpy's global generator and torch's CPU (and
    CUDA, when present) generators of the main process. Dataloader workers
    are re-seeded by mmengine from the config's seed, so with
    ``num_workers >= 1`` a resumed run replays exactly the data and the
    sampling of an uninterrupted one. ``vb_plugin``'s tools add this hook to
    every config.

    Example:
        >>> from mmengine.registry import HOOKS
        >>> type(HOOKS.build(dict(type='RNGStateHook'))).__name__
        'RNGStateHook'
    """

    priority = 'VERY_LOW'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        state = dict(python=random.getstate(), numpy=np.random.get_state(),
                     torch=torch.get_rng_state())
        if torch.cuda.is_available():
            state['cuda'] = torch.cuda.get_rng_state_all()
        checkpoint.setdefault('meta', {})['rng_state'] = state

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get('meta', {}).get('rng_state')
        # NOTE: only a resume continues the old run; a plain `load_from`
        # (fine-tuning) keeps the new run's own seeding.
        if state is None or not getattr(runner, '_resume', False):
            return
        random.setstate(state['python'])
        np.random.set_state(state['numpy'])
        torch.set_rng_state(state['torch'])
        if 'cuda' in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state['cuda'])


@HOOKS.register_module()
class ProgressBarHook(Hook):
    """A progress bar over training iterations, with the current loss.

    Example:
        >>> from mmengine.registry import HOOKS
        >>> HOOKS.build(dict(type='ProgressBarHook')).priority
        'LOW'
    """

    priority = 'LOW'

    def __init__(self) -> None:
        self._bar = None

    def before_train(self, runner) -> None:
        from tqdm import tqdm
        self._bar = tqdm(total=runner.max_iters, initial=runner.iter,
                         desc='training', unit='it', dynamic_ncols=True)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if self._bar is None:
            return
        if outputs and 'loss' in outputs:
            self._bar.set_postfix(loss=f"{float(outputs['loss']):.3f}")
        self._bar.update(1)

    def after_train(self, runner) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
