"""The base class of every module that loads pretrained weights strictly.

:class:`LoadableModule` holds what :func:`vb_plugin.load_pretrained` asks of
a model, each with a default, and routes ``init_cfg=dict(type='Pretrained',
checkpoint=...)`` through that strict loader instead of mmengine's
``PretrainedInit`` (which loads with ``strict=False``). The backbones
(:class:`vb_plugin.models.VBBackbone`) and the necks
(:class:`vb_plugin.necks.VBSimpleFeaturePyramid`) derive from it, so the
checks of a pretrained ``init_cfg`` are written once.
"""
from typing import TYPE_CHECKING, Optional, Tuple

from mmengine.model import BaseModule

from .loader import load_pretrained

if TYPE_CHECKING:
    from .rules import WeightSource


class LoadableModule(BaseModule):
    """An mmengine ``BaseModule`` whose pretrained ``init_cfg`` loads
    strictly, through :func:`vb_plugin.load_pretrained`.

    A subclass declares its checkpoint layouts (:attr:`weight_sources`) and,
    where they apply, the loader's hooks below.

    Example:
        >>> from torch import nn
        >>> class Tiny(LoadableModule):
        ...     def __init__(self, init_cfg=None):
        ...         super().__init__(init_cfg=init_cfg)
        ...         self.fc = nn.Linear(2, 2)
        >>> Tiny(init_cfg=dict(type='Pretrained', checkpoint='x.pth',
        ...                    map_location='cpu')).pretrained_init_cfg()
        Traceback (most recent call last):
            ...
        ValueError: init_cfg: unknown keys ['map_location'] for type='Pretrained'; allowed: checkpoint, prefix, source
    """

    #: The checkpoint layouts the module loads (``WeightSource`` rule
    #: tables of :mod:`vb_plugin.weights`), tried in order by
    #: :func:`vb_plugin.load_pretrained`; empty: the module loads none.
    weight_sources: Tuple['WeightSource', ...] = ()

    #: Regexes of state-dict keys a checkpoint may lack: layers that the
    #: source models do not have. They keep their initial values.
    new_layer_patterns: Tuple[str, ...] = ()

    def unbuilt_module_names(self) -> Tuple[str, ...]:
        """Loader hook: names of modules of the architecture that were not
        built; a checkpoint's keys under them are dropped as expected.
        Default: none."""
        return ()

    def unused_output_prefixes(self) -> Tuple[str, ...]:
        """Loader hook: key prefixes of built layers that are not used
        (a backbone's output norms of stages that are not outputs): a
        checkpoint's keys under them that the model lacks are dropped as
        expected. Default: none."""
        return ()

    def load_hint(self, source: str) -> str:
        """Loader hook: a hint appended to the error of a strict load from
        layout ``source`` that does not fit (e.g. the arch that would).
        Default: none."""
        return ''

    def _split_init_cfg(self) -> Tuple[Optional[dict], list]:
        """The ``init_cfg`` entry of type 'Pretrained' (or None) and the
        others, from a dict or a list of dicts."""
        cfg = self.init_cfg
        entries = list(cfg) if isinstance(cfg, (list, tuple)) else (
            [] if cfg is None else [cfg])
        pretrained = [c for c in entries
                      if isinstance(c, dict) and c.get('type') == 'Pretrained']
        if len(pretrained) > 1:
            raise ValueError(
                f'init_cfg has {len(pretrained)} entries of type='
                "'Pretrained'; give one checkpoint (got "
                f"{[c.get('checkpoint') for c in pretrained]})")
        others = [c for c in entries if not any(c is p for p in pretrained)]
        return (pretrained[0] if pretrained else None), others

    def pretrained_init_cfg(self) -> Optional[dict]:
        """The ``init_cfg`` of type 'Pretrained', checked, or None. It may be
        ``init_cfg`` itself or one entry of a list.

        Raises:
            ValueError: On keys other than checkpoint, prefix and source,
                without a checkpoint, or with two such entries in a list.
        """
        cfg = self._split_init_cfg()[0]
        if cfg is None:
            return None
        extra = set(cfg) - {'type', 'checkpoint', 'prefix', 'source'}
        if extra:
            raise ValueError(
                f'init_cfg: unknown keys {sorted(extra)} for '
                "type='Pretrained'; allowed: checkpoint, prefix, source")
        if 'checkpoint' not in cfg:
            raise ValueError("init_cfg of type='Pretrained' needs "
                             "'checkpoint' (a file path)")
        return cfg

    def init_weights(self) -> None:
        """Initialise; ``init_cfg`` of type 'Pretrained' loads strictly.

        mmengine's own ``PretrainedInit`` loads with ``strict=False`` and
        would silently skip mismatched keys; a pretrained ``init_cfg`` (alone
        or as one entry of a list) is therefore routed through
        :meth:`load_pretrained_init_cfg`. Every other ``init_cfg`` (e.g.
        ``dict(type='Kaiming', layer='Conv2d')``) is applied by mmengine, then
        :meth:`init_default_weights` runs, then the pretrained weights load
        (mmengine's order: pretrained last).
        """
        cfg = self.pretrained_init_cfg()
        if cfg is None:
            super().init_weights()
            self.init_default_weights()
            return
        full, others = self.init_cfg, self._split_init_cfg()[1]
        try:
            self.init_cfg = others or None
            if others:
                super().init_weights()
            self.init_default_weights()
            self.load_pretrained_init_cfg(cfg)
        finally:
            self.init_cfg = full
        self._is_init = True

    def load_pretrained_init_cfg(self, cfg: dict) -> None:
        """Hook: load the checked ``init_cfg`` of type 'Pretrained'
        strictly; by default through :func:`vb_plugin.load_pretrained`."""
        load_pretrained(self, cfg['checkpoint'],
                        source=cfg.get('source', 'auto'),
                        prefix=cfg.get('prefix'))

    def init_default_weights(self) -> None:
        """Hook run after the default init (e.g. zero-init residuals).

        Also run before pretrained weights are loaded, so layers that the
        checkpoint lacks (``new_layer_patterns``) get their intended values.
        """
