"""RegNet checkpoint layouts, mapped onto mmdet's ``RegNet`` names.

mmdet's names (``conv1``/``bn1``, ``layer{i}.{j}.conv1..3``/``bn1..3``,
``downsample.0/1``) are the model's own; RegNetY's SE is ``se.fc1``/``se.fc2``.
pycls (``s{i}.b{j}.f.a``, ``a_bn``, ``se.f_ex``, ``proj``/``bn``), timm
(``s{i}.b{j}.conv1.conv``), torchvision (``trunk_output.block{i}.block{i}-{j}
.f.a.0``) and HF transformers (``encoder.stages.{i}.layers.{j}.layer.{k}``)
are renamed. pycls and timm count blocks from 1, mmdet from 0.
"""
from .rules import (HF_BLOCK, WeightSource, hf_source, stage_plus_one,
                    timm_source)

_CONV_NORM = (r'\.f\.([abc])\.0\.', r'\.f\.([abc])\.1\.')


def _abc(kind: str):
    """pycls/torchvision ``a``, ``b``, ``c`` -> mmdet ``{kind}1..3``."""
    return lambda m: f'.{kind}{"abc".index(m[1]) + 1}.'


def _block_from_one(m) -> str:
    return f'layer{m[1]}.{int(m[2]) - 1}.'


#: pycls's stem and block names, which timm keeps: ``stem.conv``/``stem.bn``
#: and ``s{i}.b{j}`` (blocks from 1).
_PYCLS_STEM_AND_BLOCKS = (
    (r'^stem\.conv\.', 'conv1.'),
    (r'^stem\.bn\.', 'bn1.'),
    (r'^s(\d+)\.b(\d+)\.', _block_from_one),
)

REGNET_SOURCES = (
    hf_source(
        'regnet', 'HF transformers RegNetModel or '
        'RegNetForImageClassification',
        detect=r'embedder\.embedder\.convolution\.weight$',
        rules=(
            (r'^embedder\.embedder\.convolution\.', 'conv1.'),
            (r'^embedder\.embedder\.normalization\.', 'bn1.'),
            (HF_BLOCK, stage_plus_one('layer{}.{}.')),
            (r'\.shortcut\.convolution\.', '.downsample.0.'),
            (r'\.shortcut\.normalization\.', '.downsample.1.'),
            # RegNetX: layer.0..2 are the three convs; RegNetY puts the SE
            # at layer.2 and the last conv at layer.3.
            (r'\.layer\.2\.attention\.0\.', '.se.fc1.'),
            (r'\.layer\.2\.attention\.2\.', '.se.fc2.'),
            (r'\.layer\.3\.', '.layer.2.'),
            (r'\.layer\.(\d)\.convolution\.',
             lambda m: f'.conv{int(m[1]) + 1}.'),
            (r'\.layer\.(\d)\.normalization\.',
             lambda m: f'.bn{int(m[1]) + 1}.'),
        )),
    WeightSource(
        name='torchvision',
        description='torchvision regnet_x_* / regnet_y_*',
        detect=r'^trunk_output\.block1\.block1-0\.',
        drop=(r'^fc\.', ),
        rules=(
            (r'^stem\.0\.', 'conv1.'),
            (r'^stem\.1\.', 'bn1.'),
            (r'^trunk_output\.block(\d+)\.block\d+-(\d+)\.',
             r'layer\1.\2.'),
            (r'\.proj\.([01])\.', r'.downsample.\1.'),
            (_CONV_NORM[0], _abc('conv')),
            (_CONV_NORM[1], _abc('bn')),
            (r'\.f\.se\.fc([12])\.', r'.se.fc\1.'),
        )),
    timm_source(
        'timm regnetx_* / regnety_*',
        detect=r'^s1\.b1\.conv1\.conv\.weight$',
        rules=(
            *_PYCLS_STEM_AND_BLOCKS,
            (r'\.conv(\d)\.conv\.', r'.conv\1.'),
            (r'\.conv(\d)\.bn\.', r'.bn\1.'),
            (r'\.downsample\.conv\.', '.downsample.0.'),
            (r'\.downsample\.bn\.', '.downsample.1.'),
        )),
    WeightSource(
        name='pycls',
        description='pycls RegNet (the paper\'s model zoo)',
        detect=r'^s1\.b1\.f\.a\.weight$',
        drop=(r'^head\.', ),
        rules=(
            *_PYCLS_STEM_AND_BLOCKS,
            (r'^(layer\d+\.\d+)\.proj\.', r'\1.downsample.0.'),
            (r'^(layer\d+\.\d+)\.bn\.', r'\1.downsample.1.'),
            (r'\.f\.([abc])_bn\.', _abc('bn')),
            (r'\.f\.([abc])\.', _abc('conv')),
            (r'\.f\.se\.f_ex\.0\.', '.se.fc1.'),
            (r'\.f\.se\.f_ex\.2\.', '.se.fc2.'),
        )),
    WeightSource(
        name='mmdet',
        description='mmdet RegNet (pycls weights after regnet2mmdet), and '
        'VBRegNet itself',
        detect=r'^(conv1|layer1\.0\.conv1)\.weight$',
        aliases=('native', ),
        drop=(r'^fc\.', )),
)
