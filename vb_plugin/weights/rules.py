"""Checkpoint converters as data: each source is a named list of renames.

A family lists its sources in order. Each source is recognised by a tell-tale
key, then its rename rules are applied in order to every key, and keys it
marks as heads are dropped (and reported). Nothing is guessed: a key that no
rule maps onto the model makes the strict loader fail.
"""
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch

from .io import CheckpointError

Replacement = Union[str, Callable[['re.Match'], str]]


@dataclass(frozen=True)
class WeightSource:
    """One checkpoint layout and the renames that map it onto the model.

    Args:
        name (str): Short name, e.g. 'hf'.
        description (str): What produces this layout.
        detect (str): Regex; the layout is recognised when a key matches it.
        rules (tuple): Ordered ``(pattern, replacement)`` pairs for
            ``re.sub``; a replacement may be a function of the match.
        drop (tuple): Regexes of keys that are dropped as expected, such as
            a classifier head.
        aliases (tuple): Other names a user may give as ``source``.
        reshape (tuple): ``(pattern, fn)`` pairs applied to the value of
            every renamed key that matches ``pattern`` (e.g. a GRN gamma
            stored as (1, 1, 1, C)). The strict loader still checks shapes.
        head_reason (str): How the load report names the dropped keys.

    Any object with these attributes, ``matches(keys)``, ``convert(state)``
    and ``explain_dropped(keys)`` is a layout for
    :func:`vb_plugin.load_pretrained` (:class:`vb_plugin.weights.timm.
    TimmLayout` converts with timm's own code).

    Example:
        >>> src = WeightSource('demo', 'a demo', detect=r'^fc\\.',
        ...                    rules=((r'^body\\.', ''), ), drop=(r'^fc\\.', ))
        >>> sorted(src.convert({'body.w': 1, 'fc.w': 2})[0])
        ['w']
    """
    name: str
    description: str
    detect: str
    rules: Tuple[Tuple[str, Replacement], ...] = ()
    drop: Tuple[str, ...] = ()
    aliases: Tuple[str, ...] = ()
    reshape: Tuple[Tuple[str, Callable[[torch.Tensor], torch.Tensor]],
                   ...] = ()
    head_reason: str = 'classifier head'

    def matches(self, keys: Sequence[str]) -> bool:
        return any(re.search(self.detect, k) for k in keys)

    def explain_dropped(self, keys: List[str]) -> Dict[str, List[str]]:
        """The keys :meth:`convert` dropped, by reason (for the report)."""
        return {self.head_reason: keys} if keys else {}

    def convert(self, state: Dict[str, torch.Tensor]
                ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
        """Rename ``state``'s keys; return the result and the dropped keys."""
        out, dropped = {}, []
        for key, value in state.items():
            if any(re.search(p, key) for p in self.drop):
                dropped.append(key)
                continue
            new = key
            for pattern, repl in self.rules:
                new = re.sub(pattern, repl, new)
            for pattern, fn in self.reshape:
                if re.search(pattern, new):
                    value = fn(value)
            if new in out:
                raise CheckpointError(
                    f'{self.name} rules map two keys onto {new!r} (one is '
                    f'{key!r}); the checkpoint does not have this layout')
            out[new] = value
        return out, dropped


#: Other names a user may give as ``source`` for HF transformers layouts.
HF_ALIASES = ('transformers', 'huggingface')

#: HF transformers' prefix of block ``j`` of stage ``i`` (ResNet, RegNet,
#: ConvNeXt): ``encoder.stages.{i}.layers.{j}.``.
HF_BLOCK = r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.'


def hf_source(model: str, description: str, detect: str,
              rules: Tuple[Tuple[str, Replacement], ...] = (),
              drop: Tuple[str, ...] = (),
              reshape: tuple = ()) -> WeightSource:
    """The layout of an HF transformers family: the bare model, its
    backbone or its classifier, whose keys sit under ``{model}.`` (a
    regex; the prefix is removed before ``rules``) and whose head is
    ``classifier.`` (dropped, with ``drop``).

    Example:
        >>> src = hf_source('resnet', 'HF ResNet', detect='embedder.conv$')
        >>> src.matches(['resnet.embedder.conv']), src.convert(
        ...     {'resnet.embedder.conv': 1, 'classifier.1.weight': 2})
        (True, ({'embedder.conv': 1}, ['classifier.1.weight']))
    """
    return WeightSource(
        name='hf', description=description,
        detect=rf'^({model}\.)?{detect}', aliases=HF_ALIASES,
        drop=(r'^classifier\.', *drop),
        rules=((rf'^{model}\.', ''), *rules), reshape=reshape)


def timm_source(description: str, detect: str,
                rules: Tuple[Tuple[str, Replacement], ...] = (),
                reshape: tuple = ()) -> WeightSource:
    """The layout of a timm classifier family (name ``'timm'``), whose head
    is ``head.`` (dropped).

    Example:
        >>> src = timm_source('timm demo', detect='^stem', rules=(
        ...     ('^stem', 'conv1'), ))
        >>> src.convert({'stem.w': 1, 'head.fc.w': 2})
        ({'conv1.w': 1}, ['head.fc.w'])
    """
    return WeightSource(name='timm', description=description, detect=detect,
                        drop=(r'^head\.', ), rules=rules, reshape=reshape)


def stage_plus_one(template: str) -> Callable[['re.Match'], str]:
    """A replacement that writes group 1 plus one, e.g. 0-based stages into
    mmdet's 1-based ``layer{n}`` names.

    Example:
        >>> re.sub(r'stages\\.(\\d+)', stage_plus_one('layer{}'), 'stages.0')
        'layer1'
    """

    def repl(match: 're.Match') -> str:
        return template.format(int(match.group(1)) + 1, *match.groups()[1:])

    return repl


def select_source(sources: Sequence[WeightSource], keys: Sequence[str],
                  source: str = 'auto') -> WeightSource:
    """Pick the layout of ``keys`` among ``sources``.

    Args:
        sources: The family's layouts, in detection order.
        keys: The checkpoint's keys.
        source: 'auto', or a name or alias that narrows the candidates.

    Raises:
        CheckpointError: If no candidate recognises the keys.
    """
    names = sorted({n for s in sources for n in (s.name, *s.aliases)})
    if source == 'auto':
        candidates = list(sources)
    else:
        candidates = [s for s in sources if source in (s.name, *s.aliases)]
        if not candidates:
            raise CheckpointError(
                f'source={source!r} is not known for this backbone; valid '
                f"values are 'auto' or one of {names}")
    for candidate in candidates:
        if candidate.matches(keys):
            return candidate
    raise CheckpointError(
        f'checkpoint layout not recognised (source={source!r}); known '
        f'layouts: {[s.name + ": " + s.description for s in candidates]}. '
        f'First keys: {list(keys)[:6]}')
