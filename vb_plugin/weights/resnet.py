"""ResNet checkpoint layouts, mapped onto mmdet's ``ResNet`` names.

torchvision, timm (plain stem), mmpretrain and mmdet already use mmdet's
names; timm's deep-stem variants (``resnet50d`` ...) and HF transformers need
renames.
"""
from .rules import HF_BLOCK, WeightSource, hf_source, stage_plus_one

RESNET_SOURCES = (
    hf_source(
        'resnet', 'HF transformers ResNetModel, ResNetBackbone or '
        'ResNetForImageClassification',
        detect=r'embedder\.embedder\.convolution\.weight$',
        rules=(
            (r'^embedder\.embedder\.convolution\.', 'conv1.'),
            (r'^embedder\.embedder\.normalization\.', 'bn1.'),
            (HF_BLOCK + r'shortcut\.convolution\.',
             stage_plus_one('layer{}.{}.downsample.0.')),
            (HF_BLOCK + r'shortcut\.normalization\.',
             stage_plus_one('layer{}.{}.downsample.1.')),
            (HF_BLOCK + r'layer\.(\d)\.convolution\.',
             lambda m: f'layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}.'),
            (HF_BLOCK + r'layer\.(\d)\.normalization\.',
             lambda m: f'layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}.'),
        )),
    WeightSource(
        name='timm-deep-stem',
        description='timm ResNet with a deep stem (resnet50d, resnet50c, ...)',
        detect=r'^conv1\.0\.weight$',
        aliases=('timm', ),
        drop=(r'^fc\.', ),
        rules=((r'^conv1\.(\d)\.', r'stem.\1.'), (r'^bn1\.', 'stem.7.'))),
    WeightSource(
        name='mmdet',
        description='mmdet/mmpretrain ResNet, torchvision resnet*, timm '
        'resnet* with a plain stem',
        detect=r'^(conv1|stem\.0)\.weight$',
        aliases=('torchvision', 'timm', 'mmpretrain', 'native'),
        drop=(r'^fc\.', )),
)
