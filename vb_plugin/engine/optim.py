"""Layer-wise learning-rate decay for every backbone that numbers its
layers (:attr:`vb_plugin.models.VBBackbone.lr_decay_num_layers`)."""
from typing import Dict, List

from mmdet.engine.optimizers import LearningRateDecayOptimizerConstructor
from mmengine.model import is_model_wrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

from ..models.base import VBBackbone

#: Parameters kept out of weight decay besides norms and biases.
NO_DECAY_TOKENS = ('pos_embed', 'cls_token', 'reg_token', 'mask_token')


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class VBLayerDecayOptimizerConstructor(LearningRateDecayOptimizerConstructor):
    """mmdet's layer-wise learning-rate decay, with ``num_layers`` read from
    the backbone (``lr_decay_num_layers``) when the config leaves it out.

    ConvNeXt backbones go through mmdet's own rule (mmdet recognises them by
    class name). Any other VB backbone that numbers its layers
    (``lr_decay_num_layers`` not None; e.g. a ViT in
    :class:`vb_plugin.VBTimmBackbone`: embeddings 0, block ``i`` is
    ``i + 1``, the pyramid and everything after the backbone
    ``num_layers + 1``) gets the same groups from its own ids: a parameter
    of layer ``id`` has ``lr = lr * decay_rate ** (num_layers + 1 - id)``;
    norms, biases and position/class tokens get no weight decay.

    Example:
        >>> optim_wrapper = dict(
        ...     constructor='VBLayerDecayOptimizerConstructor',
        ...     optimizer=dict(type='AdamW', lr=1e-4),
        ...     paramwise_cfg=dict(decay_rate=0.95, decay_type='layer_wise'))
    """

    def __call__(self, model: nn.Module):
        module = model.module if is_model_wrapper(model) else model
        if self.paramwise_cfg.get('num_layers') is None:
            backbone = getattr(module, 'backbone', None)
            num = backbone.lr_decay_num_layers if isinstance(
                backbone, VBBackbone) else None
            if num is None:
                raise ValueError(
                    'paramwise_cfg.num_layers is not set and the backbone '
                    f'({type(backbone).__name__}) does not provide '
                    'lr_decay_num_layers; set num_layers')
            self.paramwise_cfg['num_layers'] = num
        return super().__call__(model)

    def add_params(self, params: List[dict], module: nn.Module,
                   **kwargs) -> None:
        backbone = getattr(module, 'backbone', None)
        # NOTE: mmdet's add_params numbers ConvNeXt by class name (also
        # stage-wise); VBConvNeXt's lr_decay_layer_id is mmdet's rule.
        if not isinstance(backbone, VBBackbone) or (
                backbone.lr_decay_num_layers is None
                or 'ConvNeXt' in type(backbone).__name__):
            return super().add_params(params, module, **kwargs)
        if self.paramwise_cfg.get('decay_type', 'layer_wise') != 'layer_wise':
            raise ValueError(
                "paramwise_cfg.decay_type="
                f"{self.paramwise_cfg.get('decay_type')!r} is not supported "
                f'for {type(backbone).__name__}; use \'layer_wise\'')
        num_layers = self.paramwise_cfg['num_layers']
        decay_rate = self.paramwise_cfg['decay_rate']
        groups: Dict[str, dict] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = (param.ndim == 1 or name.endswith('.bias')
                        or name.rpartition('.')[2] in NO_DECAY_TOKENS)
            layer_id = (backbone.lr_decay_layer_id(name[len('backbone.'):])
                        if name.startswith('backbone.') else num_layers + 1)
            key = f'layer_{layer_id}_{"no_decay" if no_decay else "decay"}'
            if key not in groups:
                scale = decay_rate**(num_layers + 1 - layer_id)
                groups[key] = dict(
                    weight_decay=0. if no_decay else self.base_wd,
                    params=[], param_names=[], lr_scale=scale,
                    group_name=key, lr=scale * self.base_lr)
            groups[key]['params'].append(param)
            groups[key]['param_names'].append(name)
        params.extend(groups.values())
