"""ConvNeXt V1/V2 checkpoint layouts, mapped onto mmpretrain's names.

* ``mmpretrain``: mmpretrain's ``ConvNeXt`` and mmdet detectors built on it
  (``backbone.`` prefix, output norms ``norm{i}``); vb_plugin's own layout
  differs only in ``out_norms.{i}``.
* ``fb``: the official facebookresearch/ConvNeXt and ConvNeXt-V2 releases
  (``dwconv``/``pwconv1``/``pwconv2``, GRN shaped ``(1, 1, 1, C)``, final
  ``norm`` and ``head``), and their detection/segmentation backbones
  (``norm{i}`` output norms).
* ``timm``: ``convnext_*``/``convnextv2_*`` (``stem``, ``stages.{i}.blocks``,
  ``mlp.fc1``; atto..nano store the MLP as 1x1 convs), plain or
  ``features_only``.
* ``hf``: transformers ``ConvNextModel``/``ConvNextBackbone``/
  ``ConvNextForImageClassification`` and their V2 counterparts.

Classifier heads and the final (pooled-feature) norm of classification
models are dropped as expected, except mmpretrain's ``norm3``, which
mmpretrain+mmdet load as the last output norm.
"""
import torch

from .rules import HF_BLOCK, WeightSource, hf_source, timm_source


def _vector(value: torch.Tensor) -> torch.Tensor:
    """(1, 1, 1, C) GRN parameters (official, HF) -> (C, )."""
    if value.ndim > 1 and all(s == 1 for s in value.shape[:-1]):
        return value.reshape(-1)
    return value


def _linear(value: torch.Tensor) -> torch.Tensor:
    """(out, in, 1, 1) 1x1-conv MLP weights (timm atto..nano) -> (out, in)."""
    if value.ndim == 4 and tuple(value.shape[2:]) == (1, 1):
        return value.flatten(1)
    return value


_RESHAPES = (
    (r'\.grn\.(gamma|beta)$', _vector),
    (r'\.pointwise_conv[12]\.weight$', _linear),
)


CONVNEXT_SOURCES = (
    hf_source(
        r'convnext(v2)?', 'HF transformers ConvNextModel, ConvNextBackbone, '
        'ConvNextForImageClassification or their ConvNextV2 forms',
        detect=r'embeddings\.patch_embeddings\.weight$',
        drop=(r'^(convnext(v2)?\.)?layernorm\.', ),
        rules=(
            (r'^embeddings\.patch_embeddings\.', 'downsample_layers.0.0.'),
            (r'^embeddings\.layernorm\.', 'downsample_layers.0.1.'),
            (r'^encoder\.stages\.(\d+)\.downsampling_layer\.(\d)\.',
             r'downsample_layers.\1.\2.'),
            (HF_BLOCK + r'dwconv\.', r'stages.\1.\2.depthwise_conv.'),
            (HF_BLOCK + r'layernorm\.', r'stages.\1.\2.norm.'),
            (HF_BLOCK + r'pwconv(\d)\.', r'stages.\1.\2.pointwise_conv\3.'),
            (HF_BLOCK + r'layer_scale_parameter$', r'stages.\1.\2.gamma'),
            (HF_BLOCK + r'grn\.weight$', r'stages.\1.\2.grn.gamma'),
            (HF_BLOCK + r'grn\.bias$', r'stages.\1.\2.grn.beta'),
            (r'^hidden_states_norms\.stage(\d)\.',
             lambda m: f'out_norms.{int(m[1]) - 1}.'),
        ),
        reshape=_RESHAPES),
    timm_source(
        'timm convnext_*/convnextv2_* (also features_only)',
        detect=r'^stem[._]0\.weight$',
        rules=(
            # features_only models flatten the first level: stem_0, stages_1
            (r'^(stem|stages)_(\d+)\.', r'\1.\2.'),
            (r'^stem\.', 'downsample_layers.0.'),
            (r'^stages\.(\d+)\.downsample\.', r'downsample_layers.\1.'),
            (r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.'),
            (r'\.conv_dw\.', '.depthwise_conv.'),
            (r'\.mlp\.fc(\d)\.', r'.pointwise_conv\1.'),
            (r'\.mlp\.grn\.weight$', '.grn.gamma'),
            (r'\.mlp\.grn\.bias$', '.grn.beta'),
        ),
        reshape=_RESHAPES),
    WeightSource(
        name='fb',
        description='official facebookresearch ConvNeXt / ConvNeXt-V2 '
        'release (classification, or its detection/segmentation backbone)',
        detect=r'^stages\.\d+\.\d+\.dwconv\.weight$',
        aliases=('official', 'facebook'),
        drop=(r'^head\.', r'^norm\.'),
        rules=(
            (r'\.dwconv\.', '.depthwise_conv.'),
            (r'\.pwconv(\d)\.', r'.pointwise_conv\1.'),
            (r'^norm(\d)\.', r'out_norms.\1.'),
        ),
        reshape=_RESHAPES),
    WeightSource(
        name='mmpretrain',
        description='mmpretrain ConvNeXt, mmdet detectors built on it, and '
        'vb_plugin VBConvNeXt',
        detect=r'^stages\.\d+\.\d+\.depthwise_conv\.weight$',
        aliases=('mmdet', 'mmcls', 'native'),
        drop=(r'^head\.', ),
        rules=((r'^norm(\d)\.', r'out_norms.\1.'), ),
        reshape=_RESHAPES),
)
