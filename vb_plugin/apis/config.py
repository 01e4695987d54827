"""Configs: reading them (files or ``mmdet::`` names), filling the neck's
``in_channels`` from the backbone, and building the detector.
"""
from typing import Optional, Tuple

import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from torch import nn

from ..wiring import wire_model


def load_config(config: str, cfg_options: Optional[dict] = None) -> Config:
    """Read an mmdet config, importing its ``custom_imports`` (vb_plugin).

    ``config`` is a file, or a config shipped in an installed package:
    ``mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py`` (mmengine's
    ``get_config``; nothing is downloaded).
    """
    if '::' in config:
        from mmengine.hub import get_config
        cfg = get_config(config)
    else:
        cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def _meta_backbone(cfg: Config) -> Tuple[dict, nn.Module]:
    """The config's backbone, built on the ``meta`` device (no memory, no
    initialisation), with its config (``init_cfg`` dropped)."""
    backbone_cfg = cfg.model.backbone.copy()
    backbone_cfg.pop('init_cfg', None)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    with torch.device('meta'):
        return backbone_cfg, MODELS.build(backbone_cfg)


def wire_neck_channels(cfg: Config) -> Optional[Tuple[int, ...]]:
    """Fill or check ``cfg.model.neck.in_channels`` from the backbone, and
    check the heads' strides and the input padding against it.

    The same check runs in every entry point that builds the model (see
    :mod:`vb_plugin.wiring`); calling it on the config first also puts the
    filled-in list into the config that a tool saves. With
    ``in_channels='auto'`` (or missing) the neck gets the backbone's
    ``out_channels``. A list that disagrees raises a ``ValueError`` that gives
    the right list, before any weights exist, instead of a conv shape error
    deep inside the neck. The backbone is built on the ``meta`` device, so
    this costs no memory and no initialisation.

    A list of necks (``neck=[dict(...), dict(...)]``, built by mmengine as a
    sequence) is wired through its first neck, the one that takes the
    backbone's outputs; the later ones take the previous neck's and need
    their ``in_channels`` written. An int ``in_channels`` is a neck that
    takes one map (mmdet's ``DilatedEncoder`` of YOLOF, ``CTResNetNeck``):
    it is checked against a backbone with one output.

    Returns:
        tuple | None: The backbone's out_channels, or None when the model has
        no neck or its backbone has no ``out_channels``.

    Raises:
        ValueError: If ``in_channels`` disagrees with the backbone, or a
            later neck of a list says ``'auto'``.
        TypeError: If ``in_channels`` is neither ``'auto'``, a list of ints
            nor, for a backbone with one output, an int.

    Example:
        >>> cfg = Config(dict(model=dict(
        ...     backbone=dict(type='VBResNet', depth=18, out_indices=(1, 2, 3)),
        ...     neck=dict(type='FPN', in_channels='auto', out_channels=8))))
        >>> wire_neck_channels(cfg), cfg.model.neck.in_channels
        ((128, 256, 512), [128, 256, 512])
    """
    model = cfg.get('model', {})
    if not isinstance(model, dict) or 'backbone' not in model:
        return None
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    return wire_model(model)


def build_detector(cfg: Config, pretrained: bool = True) -> nn.Module:
    """Build ``cfg.model`` under the config's default scope (mmdet).

    Args:
        cfg (Config): The config.
        pretrained (bool): Keep the backbone's pretrained ``init_cfg``. With
            False it is dropped, for machines without the weights.
    """
    wire_neck_channels(cfg)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model_cfg = cfg.model.copy()
    if not pretrained:
        model_cfg.backbone.pop('init_cfg', None)
    model = MODELS.build(model_cfg)
    model.init_weights()
    return model
