"""Any timm model as a vb_plugin backbone: :class:`VBTimmBackbone`.

One job per module:

* :mod:`.levels`: timm's feature levels grouped into the contract's stages
  (stage plans, the extractor's module chain, timm-version quirks);
* :mod:`.positions`: position state made for the pretraining grid, made
  for each input's (resampled embeddings, attention tables and their hooks);
* :mod:`.probe`: which input sizes a model takes, learned on the meta device;
* :mod:`.pyramid`: which pyramid a model gets, and its layers;
* :mod:`.windows`: ViTDet's windowed form of a plain ViT (window attention,
  relative positions, RoPE per window);
* :mod:`.options`: the model name and ``create_model`` keywords, checked;
* :mod:`.decay`: layer ids for layer-wise lr decay by block;
* :mod:`.backbone`: the backbone class, which puts them together under the
  contract of :class:`~vb_plugin.models.VBBackbone`.

Its weight layouts live with the others, in :mod:`vb_plugin.weights.timm`.
"""
from .backbone import VBTimmBackbone
from .levels import (LEVEL_MODES, StagePlan, TimmLevel, plan_filled_stages,
                     plan_stages)
from .options import RESERVED_KWARGS
from .probe import ANY_SIZE_OPTIONS, SIZE_DIVISORS
from .pyramid import PYRAMIDS

__all__ = [
    'ANY_SIZE_OPTIONS', 'LEVEL_MODES', 'PYRAMIDS', 'RESERVED_KWARGS',
    'SIZE_DIVISORS', 'StagePlan', 'TimmLevel', 'VBTimmBackbone',
    'plan_filled_stages', 'plan_stages'
]
