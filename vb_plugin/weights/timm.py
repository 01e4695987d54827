"""The timm layout of a VBTimmBackbone: timm's own loading code as the
converter of :func:`vb_plugin.load_pretrained`'s one pipeline.

A checkpoint in a timm model's layout (as timm saves it, or any layout the
model's ``checkpoint_filter_fn`` converts, such as the official ConvNeXt or
Swin releases) is converted by timm's own pretrained pipeline: the family's
filter function, ``adapt_input_conv`` for ``in_channels != 3``, and a strict
``load_state_dict`` into the full model (classifier sized from the
checkpoint). The full model's tensors are then renamed onto the backbone's
keys (``body.*``); the rest of the pipeline (reading the file safely, the
``backbone.`` prefix, the strict load, the :class:`LoadReport`) is the one
every family uses.
"""
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from timm.models._features import (FeatureDictNet, FeatureGetterNet,
                                   FeatureHookNet, _module_list)
from torch import nn

from .io import CheckpointError
from .rules import WeightSource

#: A VBTimmBackbone's own state dict (keys under ``body.``).
VB_TIMM_SOURCE = WeightSource(
    name='vb-timm',
    description='a VBTimmBackbone state dict (keys under body.)',
    detect=r'^body\.')

#: ViTDet's ViT as detectron2's model zoo saves it (a ``.pkl``: the ViT
#: under ``backbone.net.``, the pyramid under ``backbone.simfp_*``, which
#: :class:`~vb_plugin.VBSimpleFeaturePyramid` loads). The windowed form
#: keeps timm's names, which are detectron2's.
D2_VITDET_SOURCE = WeightSource(
    name='detectron2-vitdet',
    description="detectron2's ViTDet (backbone.net.*)",
    detect=r'^net\.blocks\.\d+\.attn\.',
    rules=((r'^net\.', 'body.model.'), ),
    drop=(r'^simfp_\d+\.', r'^top_block\.'),
    aliases=('detectron2', 'd2'),
    head_reason='the simple feature pyramid (VBSimpleFeaturePyramid loads '
    'it)')
#: mmdet's ``projects/ViTDet`` ViT (under ``backbone.`` in a detector
#: checkpoint; the same names).
MMDET_VITDET_SOURCE = WeightSource(
    name='mmdet-vitdet',
    description="mmdet projects/ViTDet's ViT (blocks.*.attn.rel_pos_h)",
    detect=r'^blocks\.\d+\.attn\.rel_pos_h$',
    rules=((r'^', 'body.model.'), ),
    aliases=('mmdet', ))
#: The layouts of ViTDet's checkpoints, for a windowed VBTimmBackbone with
#: relative positions.
VITDET_SOURCES = (D2_VITDET_SOURCE, MMDET_VITDET_SOURCE)
#: Keys of prefix tokens, which the windowed form removes.
PREFIX_TOKENS = r'^(cls_token|reg_token|dist_token)$'


def timm_key_map(model: nn.Module,
                 keys: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Map a VBTimmBackbone's state-dict keys (or ``keys``, names under
    ``body.``) to the full timm model's: a ViT-style extractor holds the
    model as ``model``; FeatureDictNet and FeatureHookNet flatten the
    model's module names ('layer1_0' for 'layer1.0', timm's own
    ``_module_list`` rule).

    Example:
        >>> from vb_plugin import VBTimmBackbone
        >>> m = VBTimmBackbone('convnext_atto', out_indices=(0, ))
        >>> timm_key_map(m)['body.stages_0.blocks.0.gamma']
        'stages.0.blocks.0.gamma'
    """
    body = model.body
    renames: Dict[str, str] = {}
    if isinstance(body, (FeatureDictNet, FeatureHookNet)):
        full = model.create_timm_model_on_meta()
        for flat in (True, False):
            for new, old, _ in _module_list(full, flat):
                renames.setdefault(new, old)
    out = {}
    for key in model.state_dict() if keys is None else keys:
        if not key.startswith('body.'):
            continue
        rest = key[len('body.'):]
        if isinstance(body, FeatureGetterNet):
            out[key] = rest[len('model.'):]
        elif renames:
            head, _, tail = rest.partition('.')
            out[key] = f'{renames.get(head, head)}.{tail}'
        else:
            out[key] = rest
    return out


def _classifier_classes(state: Dict[str, torch.Tensor],
                        pretrained_cfg: dict) -> int:
    classifiers = pretrained_cfg.get('classifier') or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers, )
    for name in classifiers:
        weight = state.get(f'{name}.weight')
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return 0


class TimmLayout:
    """The checkpoint layout of the timm model a VBTimmBackbone wraps.

    Recognised when some key is not the backbone's own (``body.*``,
    ``out_norms.*``): :attr:`detect`. Converted by timm itself (see the
    module docstring).

    Args:
        model (VBTimmBackbone): The backbone that the checkpoint is for.

    Example:
        >>> from vb_plugin import VBTimmBackbone
        >>> layout = TimmLayout(VBTimmBackbone('resnet10t'))
        >>> layout.matches(['conv1.0.weight']), layout.matches(['body.x'])
        (True, False)
    """
    name = 'timm'
    description = ("the timm model's own layout, or one its "
                   'checkpoint_filter_fn converts (official releases)')
    aliases: Tuple[str, ...] = ()
    head_reason = 'classifier head and layers outside the features'
    #: A key outside the backbone's own, as ``WeightSource.detect``.
    detect = r'^(?!body\.|out_norms\.)'

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def matches(self, keys: Sequence[str]) -> bool:
        return any(re.search(self.detect, k) for k in keys)

    def _full_state(self, state: Dict[str, torch.Tensor]
                    ) -> Dict[str, torch.Tensor]:
        """``state`` loaded strictly into the full timm model by timm."""
        model = self.model
        pretrained_cfg = model.timm_pretrained_cfg()
        # NOTE: timm loads strictly only when the model's classifier matches
        # the checkpoint's. Its size is read under timm's classifier name; a
        # layout that the filter function renames (official releases) is
        # tried with the pretrained config's class count, then without a
        # classifier.
        found = _classifier_classes(state, pretrained_cfg)
        candidates = [found] if found else list(dict.fromkeys(
            [int(pretrained_cfg.get('num_classes') or 0), 0]))
        errors = []
        for num_classes in candidates:
            try:
                return model.create_timm_model(
                    state_dict=state,
                    pretrained_cfg_overlay=dict(num_classes=num_classes),
                    num_classes=num_classes).state_dict()
            except RuntimeError as err:
                errors.append(f'with a {num_classes}-class classifier: {err}')
        raise CheckpointError(
            f'nothing was loaded into VBTimmBackbone({model.model_name!r}); '
            "timm's strict load into the full model failed\n"
            + '\n'.join(errors))

    def convert(self, state: Dict[str, torch.Tensor]
                ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
        """The full model's tensors that the backbone has, under its keys
        (``body.*``), and the other keys of the full model."""
        full = self._full_state(state)
        inverse = {timm: ours
                   for ours, timm in self.model.body_key_map().items()}
        converted = {inverse[k]: v for k, v in full.items() if k in inverse}
        return converted, [k for k in full if k not in inverse]

    def explain_dropped(self, keys: List[str]) -> Dict[str, List[str]]:
        """Split the full model's unused keys into the classifier (and
        whatever else is outside the features) and the unbuilt stages."""
        model = self.model
        probes = [f'{n}.weight' for n in model.unbuilt_module_names()]
        unbuilt = tuple(v[:-len('weight')]
                        for v in model.body_key_map(probes).values())
        not_built = [k for k in keys if unbuilt and k.startswith(unbuilt)]
        built = set(not_built)
        prefix = [k for k in keys if model.window_plan.enabled
                  and re.match(PREFIX_TOKENS, k)]
        head = [k for k in keys if k not in built and k not in prefix]
        out = {}
        if head:
            out[self.head_reason] = head
        if prefix:
            out['prefix tokens (the windowed form has none, as ViTDet)'] = (
                prefix)
        if not_built:
            out['stage not built (past the last out_indices)'] = not_built
        return out
