"""Checkpoint layouts of :class:`vb_plugin.necks.VBSimpleFeaturePyramid`.

* ``detectron2-vitdet``: detectron2's ViTDet model zoo (``.pkl`` files of
  ``model_final_*.pkl``, Apache-2.0, github.com/facebookresearch/detectron2
  ``projects/ViTDet``). The pyramid level at stride ``2**k`` is
  ``backbone.simfp_{k}``, a sequence whose indices are the neck's own
  (``levels.p{k}.{i}``): the rescaling layers (transposed convs, LayerNorm,
  GELU, max-pool), then the 1x1 and the 3x3 conv, each with its norm at
  ``.norm``. ``backbone.net.*`` is the ViT, which the backbone loads; the
  heads sit outside the ``backbone.`` prefix.
* ``vb``: the neck's own state dict.

mmdet's ``projects/ViTDet`` ``SimpleFPN`` is not a layout here: its key
names could not be read from a stored copy of its released source.
"""
from .rules import WeightSource

VITDET_SOURCES = (
    WeightSource(
        name='detectron2-vitdet', aliases=('detectron2', 'd2'),
        description="detectron2 ViTDet (model zoo .pkl): the pyramid "
        "'backbone.simfp_{2..5}'",
        detect=r'^simfp_\d\.', rules=((r'^simfp_(\d)\.', r'levels.p\1.'), ),
        drop=(r'^net\.', ), head_reason='the ViT (VBTimmBackbone takes it)'),
    WeightSource(name='vb', aliases=('native', ),
                 description="VBSimpleFeaturePyramid's own state dict",
                 detect=r'^levels\.p\d\.\d+\.'),
)
