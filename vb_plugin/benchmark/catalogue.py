"""The rows to time: each architecture's VB backbone and its peers (mmdet,
timm ``features_only``, HF transformers, mmpretrain when importable), any
timm model (``timm:<name>``) or backbone config, and the forms of
:func:`vb_plugin.optimize_for_inference`.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

# NOTE: FORMS (the --forms names) is the inference path's table.
from ..inference import FORMS, check_forms
from ..models.convnext import CONVNEXT_ARCHS
from ..models.resnet import RESNET_ARCHS
from .schema import Row


# ----------------------------------------------------------------------
# Peers.
class _HFBackbone(nn.Module):
    """A transformers ``*Backbone`` returning a tuple of feature maps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(self.model(pixel_values=x).feature_maps)


class _TimmFeatures(nn.Module):
    """timm ``features_only`` returning a tuple (it returns a list)."""

    def __init__(self, name: str,
                 out_indices: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        import timm
        kwargs = {} if out_indices is None else dict(
            out_indices=tuple(out_indices))
        self.body = timm.create_model(name, pretrained=False,
                                      features_only=True, **kwargs)

    def forward(self, x):
        return tuple(self.body(x))


def _mmdet(type_name: str, **kwargs) -> Callable[..., nn.Module]:
    def build(train: bool = False) -> nn.Module:
        from mmdet.models import backbones
        extra = dict(frozen_stages=1, norm_eval=True) if train else {}
        return getattr(backbones, type_name)(**kwargs, **extra)
    return build


def _vb(type_name: str, row_name: Optional[str] = None,
        **kwargs) -> Callable[..., nn.Module]:
    def build(train: bool = False) -> nn.Module:
        import vb_plugin
        extra = dict(frozen_stages=1, norm_eval=True) if train else {}
        return getattr(vb_plugin, type_name)(**kwargs, **extra)
    build.row_name = row_name or type_name
    return build


def _timm(name: str, out_indices=(1, 2, 3, 4)) -> Callable[..., nn.Module]:
    def build(train: bool = False) -> nn.Module:
        return _TimmFeatures(name, out_indices)
    return build


def _hf(kind: str, **config) -> Callable[..., nn.Module]:
    def build(train: bool = False) -> nn.Module:
        import transformers
        cfg_cls = getattr(transformers, f'{kind}Config')
        model_cls = getattr(transformers, f'{kind}Backbone')
        cfg = cfg_cls(out_features=['stage1', 'stage2', 'stage3', 'stage4'],
                      **config)
        return _HFBackbone(model_cls(cfg))
    return build


def _mmpretrain_convnext(arch: str) -> Callable[..., nn.Module]:
    def build(train: bool = False) -> nn.Module:
        from mmpretrain.models import ConvNeXt
        extra = dict(frozen_stages=1) if train else {}
        return ConvNeXt(arch=arch, out_indices=(0, 1, 2, 3),
                        gap_before_final_norm=False, **extra)
    return build


def _resnet_peers(depth: int) -> List[Tuple[str, Callable, str]]:
    """mmdet's, timm's and HF's ResNet of a depth, blocks and block type
    from :data:`~vb_plugin.models.RESNET_ARCHS`."""
    arch = RESNET_ARCHS[depth]
    expansion = arch.block.expansion
    return [
        ('mmdet ResNet', _mmdet('ResNet', depth=depth), 'mmdet'),
        (f'timm resnet{depth}', _timm(f'resnet{depth}'), 'timm'),
        ('HF ResNetBackbone', _hf(
            'ResNet', depths=list(arch.stage_blocks),
            layer_type='basic' if expansion == 1 else 'bottleneck',
            hidden_sizes=[64 * expansion * 2**i for i in range(4)]),
         'transformers'),
    ]


def _convnext_peers(arch: str) -> List[Tuple[str, Callable, str]]:
    """timm's, HF's and mmpretrain's ConvNeXt of a V1 size, widths and
    depths from :data:`~vb_plugin.models.CONVNEXT_ARCHS`."""
    size = CONVNEXT_ARCHS['v1'][arch]
    return [
        (f'timm convnext_{arch}', _timm(f'convnext_{arch}', (0, 1, 2, 3)),
         'timm'),
        ('HF ConvNextBackbone', _hf('ConvNext', depths=list(size.depths),
                                    hidden_sizes=list(size.channels)),
         'transformers'),
        ('mmpretrain ConvNeXt', _mmpretrain_convnext(arch), 'mmpretrain'),
    ]


#: ViTDet-B's backbone (Li et al. 2022): ViT-B/16 with decomposed relative
#: positions, the global blocks' tables sized for 1024x1024.
VITDET_B16 = dict(model_name='vit_base_patch16_224', rel_pos=True,
                  rel_pos_img_size=1024, drop_path_rate=0.1, pyramid=None,
                  out_indices=(3, ))


def _vitdet(window_size: int,
            row_name: str) -> Callable[..., nn.Module]:
    """ViTDet-B's backbone, windowed (``window_size=14``: ViTDet's global
    blocks 2, 5, 8, 11) or with every block global (0), same tables."""
    return _vb('VBTimmBackbone', row_name, window_size=window_size,
               **VITDET_B16)


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


#: Architectures: (VB builder, [(peer name, builder, module needed)]).
#: The VB row is named after the builder's class name.
ARCHITECTURES: Dict[str, Tuple[Callable, List[Tuple[str, Callable, str]]]]
ARCHITECTURES = {
    'resnet18': (_vb('VBResNet', depth=18), _resnet_peers(18)),
    'resnet50': (_vb('VBResNet', depth=50), _resnet_peers(50)),
    'convnext_atto': (_vb('VBConvNeXt', arch='atto'),
                      _convnext_peers('atto')),
    'convnext_tiny': (_vb('VBConvNeXt', arch='tiny'),
                      _convnext_peers('tiny')),
    'regnetx_400mf': (_vb('VBRegNet', arch='regnetx_400mf'), [
        ('mmdet RegNet', _mmdet('RegNet', arch='regnetx_400mf'), 'mmdet'),
        ('timm regnetx_004', _timm('regnetx_004'), 'timm'),
    ]),
    'regnetx_3.2gf': (_vb('VBRegNet', arch='regnetx_3.2gf'), [
        ('mmdet RegNet', _mmdet('RegNet', arch='regnetx_3.2gf'), 'mmdet'),
        ('timm regnetx_032', _timm('regnetx_032'), 'timm'),
    ]),
    # NOTE: the peer is the same backbone with every block global: what the
    # window attention saves (time it at ViTDet's --size 1024 1024).
    'vitdet_b16': (_vitdet(14, 'VB ViT-B/16 windowed (ViTDet)'), [
        ('VB ViT-B/16 global attention',
         _vitdet(0, 'VB ViT-B/16 global attention'), 'timm'),
    ]),
}


def _from_cfg(cfg: dict, row_name: str) -> Callable[..., nn.Module]:
    def build(train: bool = False) -> nn.Module:
        from mmengine.registry import MODELS
        import vb_plugin  # noqa: F401 (registers the VB backbones)
        extra = dict(frozen_stages=1, norm_eval=True) if train else {}
        return MODELS.build({**cfg, **extra})
    build.row_name = row_name
    return build


def backbone_cfg(text: str) -> dict:
    """A backbone config from ``--backbone-cfg``: a ``dict(...)`` expression
    or a config file whose ``model.backbone`` is used.

    Example:
        >>> backbone_cfg("dict(type='VBConvNeXt', arch='atto')")
        {'type': 'VBConvNeXt', 'arch': 'atto'}
    """
    from mmengine.config import Config
    if text.endswith('.py'):
        cfg = Config.fromfile(text)
        if 'model' not in cfg or 'backbone' not in cfg.model:
            raise ValueError(f'--backbone-cfg {text!r}: the config has no '
                             'model.backbone')
        return cfg.model.backbone.to_dict()
    try:
        cfg = Config.fromstring(f'backbone = {text}', '.py').backbone
    except Exception as err:  # noqa: BLE001 (any syntax error)
        raise ValueError(f"--backbone-cfg {text!r} is not valid: give a "
                         "dict(type=..., ...) expression or a config file "
                         f"(.py) with model.backbone ({err})") from err
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise ValueError(f'--backbone-cfg {text!r} is not valid: it must be '
                         "a dict with a 'type'")
    return cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)


def architecture(arch) -> Tuple[Callable, List[Tuple[str, Callable, str]]]:
    """The (VB builder, peers) of an ``--arch`` value: a name of
    :data:`ARCHITECTURES`, ``'timm:<model name>'`` (``VBTimmBackbone`` with
    timm's own ``features_only`` model as the peer) or a backbone config
    dict (no peers).

    Example:
        >>> build, peers = architecture('timm:resnet10t')
        >>> build.row_name, [p[0] for p in peers]
        ('VBTimmBackbone resnet10t', ['timm resnet10t'])
    """
    if isinstance(arch, dict):
        return _from_cfg(arch, str(arch.get('type'))), []
    if isinstance(arch, str) and arch.startswith('timm:'):
        import timm
        name = arch[len('timm:'):]
        if not timm.is_model(name):
            raise ValueError(f'arch={arch!r} is not valid: timm has no '
                             f'model {name!r}')
        return (_from_cfg(dict(type='VBTimmBackbone', model_name=name),
                          f'VBTimmBackbone {name}'),
                [(f'timm {name}', _timm(name, None), 'timm')])
    if arch not in ARCHITECTURES:
        raise ValueError(f'arch={arch!r} is not valid; choose from '
                         f"{sorted(ARCHITECTURES)} or 'timm:<model name>'")
    return ARCHITECTURES[arch]


def make_rows(archs: Sequence[str],
              peers: bool = True,
              forms: Sequence[str] = ('optimized', )) -> List[Row]:
    """The rows of a run: per architecture, the VB backbone, its peers that
    are importable, then the optimised forms of the VB backbone.

    Args:
        archs (Sequence[str | dict]): Names of :data:`ARCHITECTURES`,
            ``'timm:<model name>'`` or backbone config dicts (see
            :func:`architecture`).
        peers (bool): Add the peer rows. Defaults to True.
        forms (Sequence[str]): Names of :data:`FORMS`. Defaults to
            ('optimized', ).

    Example:
        >>> [(r.name, r.kind) for r in make_rows(['regnetx_400mf'])]
        ... # doctest: +NORMALIZE_WHITESPACE
        [('VBRegNet', 'vb'), ('mmdet RegNet', 'peer'),
         ('timm regnetx_004', 'peer'), ('VBRegNet optimized', 'optimized')]
    """
    entries = [architecture(arch) for arch in archs]
    check_forms(forms)
    rows = []
    for arch, (vb_build, peer_list) in zip(archs, entries):
        vb_name = vb_build.row_name
        if isinstance(arch, dict):
            arch = vb_name
        rows.append(Row(arch, vb_name, 'vb', vb_build))
        if peers:
            for name, build, module in peer_list:
                if _importable(module):
                    rows.append(Row(arch, name, 'peer', build))
        for form in forms:
            rows.append(Row(arch, f'{vb_name} {form}', form, vb_build,
                            form=FORMS[form], ref=vb_name))
    return rows
