"""Install vb_plugin: ``pip install -e .``.

The compiled part of the stack (mmcv 2.1.0 built against torch 2.13) must be
installed first, in the order given in ``requirements/`` and the Makefile.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_version() -> str:
    text = (HERE / 'vb_plugin' / 'version.py').read_text()
    return re.search(r"__version__ = '([^']+)'", text).group(1)


setup(
    name='vb_plugin',
    version=read_version(),
    description='Backbones for MMDetection 3.x with one contract across '
    'families: ResNet, RegNet, ConvNeXt and any timm model.',
    long_description=(HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['vb_plugin', 'vb_plugin.*']),
    python_requires='>=3.9',
    install_requires=[
        'torch>=2.0',
        'torchvision',
        'mmengine>=0.10,<1.0',
        'mmcv>=2.0.0rc4,<2.2.0',
        'mmdet>=3.0,<3.4',
        'mmsegmentation[multimodal]==1.2.2',
        'timm>=1.0.20',
        'safetensors>=0.4',
        'numpy',
    ],
    extras_require={
        'tests': ['pytest>=8', 'transformers>=4.40'],
        # Inference engines: export_onnx, optimize_for_inference(backend=...).
        'deploy': [
            'onnx>=1.17,<1.24',
            'onnxruntime>=1.20,<1.33',
            'openvino>=2025.0,<2026.5',
        ],
    },
    license='Apache-2.0',
)
