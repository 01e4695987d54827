"""Layer-wise learning-rate decay by block, for ViT-style timm models (the
layer ids that :class:`~vb_plugin.engine.VBLayerDecayOptimizerConstructor`
asks a backbone for)."""
from typing import Optional, Sequence

from timm.models._features import FeatureGetterNet
from torch import nn


def block_count(body: nn.Module) -> Optional[int]:
    """``paramwise_cfg['num_layers']`` of layer-wise decay for the timm
    extractor ``body`` of a ViT-style model: its number of (built) blocks;
    None for other models (no blocks list).

    Example:
        >>> import timm
        >>> block_count(timm.create_model('vit_tiny_patch16_224',
        ...                               features_only=True))
        12
    """
    blocks = getattr(getattr(body, 'model', None), 'blocks', None)
    if not isinstance(body, FeatureGetterNet) or blocks is None:
        return None
    return len(blocks)


def block_layer_id(name: str, num_layers: int, stem: Sequence[str]) -> int:
    """Layer id of backbone parameter ``name`` as ViTDet and BEiT count: the
    ``stem`` (names or ``'prefix.'``es: patch and position embeddings, class
    token) is 0, block ``i`` is ``i + 1``, everything else (the pyramid,
    output norms, and after the backbone) ``num_layers + 1``.

    Example:
        >>> stem = ('body.model.patch_embed.', 'body.model.pos_embed')
        >>> [block_layer_id(n, 12, stem) for n in ('body.model.pos_embed',
        ...     'body.model.blocks.3.attn.rel_pos_h', 'pyramid.0.0.weight')]
        [0, 4, 13]
    """
    if name.startswith('body.model.blocks.'):
        return int(name.split('.')[3]) + 1
    stem = tuple(stem)
    if name.startswith(stem) or name in stem:
        return 0
    return num_layers + 1
