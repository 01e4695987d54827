"""The places docs/adding_a_family.md says a family touches, checked for every
registered family: a family missing from one of them fails here, by name.
So is a family that is not exported (the family modules are imported
automatically) or has no generated section in docs/reference.md or rows in
the table of layouts of docs/pretrained.md (``tools/make_docs.py`` makes
them).

The families are found, not listed (``test_reference_docs.FAMILIES``: every
concrete ``VBBackbone`` subclass registered in MODELS or defined in
vb_plugin).
"""
import re
from pathlib import Path

import pytest
from mmengine.registry import MODELS

import vb_plugin
import vb_plugin.models
from backbone_cases import BACKBONE_CASES
from test_reference_docs import FAMILIES, REFERENCE, option_table
from vb_plugin.weights.rules import WeightSource

ROOT = Path(__file__).resolve().parents[1]
CHECKLIST = ROOT / 'docs' / 'adding_a_family.md'


def is_layout(source) -> bool:
    """A layout of load_pretrained: a WeightSource rule table, or an object
    with the same interface (VBTimmBackbone's TimmLayout)."""
    return isinstance(source, WeightSource) or all(
        hasattr(source, a) for a in ('name', 'aliases', 'description',
                                     'detect', 'matches', 'convert',
                                     'explain_dropped', 'head_reason'))


def checklist_places():
    """The paths in the first column of the checklist's table."""
    places = []
    for line in CHECKLIST.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if len(cells) == 3 and cells[0].isdigit():
            places += re.findall(r'`([^`]+)`', cells[1])
    return places


def generated_block(text: str, key: str) -> str:
    """The text between ``<!-- generated: key -->`` and its end marker."""
    m = re.search(rf'^<!-- generated: {re.escape(key)} -->$(.*?)'
                  r'^<!-- end generated -->$', text, re.M | re.S)
    return m[1] if m else ''


def test_checklist_names_existing_places():
    places = checklist_places()
    assert len(places) == 4, places
    for place in places:
        path = ROOT / place.replace('<family>.py', '')
        assert path.exists(), f'docs/adding_a_family.md names {place}'


@pytest.mark.parametrize('cls', FAMILIES, ids=lambda c: c.__name__)
def test_family_is_in_every_place(cls):
    name = cls.__name__
    missing = []
    if MODELS.get(name) is not cls:
        missing.append('1: not registered in MODELS under its class name')
    # NOTE: a family is one module or one package (VBTimmBackbone's
    # vb_plugin/models/timm/) directly under vb_plugin/models.
    if not re.fullmatch(r'vb_plugin\.models\.\w+(\.\w+)?', cls.__module__):
        missing.append(f'1: defined in {cls.__module__}, not in '
                       'vb_plugin/models/<family>.py')
    for module in (vb_plugin.models, vb_plugin):
        if name not in module.__all__ or getattr(module, name) is not cls:
            missing.append(f'1: not exported by {module.__name__}')
    if name not in BACKBONE_CASES:
        missing.append('3: no cases in tests/backbone_cases.py')
    reference = REFERENCE.read_text()
    try:
        option_table(reference, name)
        if f'<!-- generated: options {name} -->' not in reference:
            raise ValueError(f'the table of {name} is not a generated block')
    except ValueError as err:
        missing.append(f'docs/reference.md: {err}; run python '
                       'tools/make_docs.py')
    if not re.search(rf'^\| {name} \|', generated_block(
            (ROOT / 'docs' / 'pretrained.md').read_text(), 'layouts'), re.M):
        missing.append('docs/pretrained.md: no row in the table of layouts; '
                       'run python tools/make_docs.py')
    configs = [p for p in (ROOT / 'configs').rglob('*.py')
               if f"type='{name}'" in p.read_text()]
    if not configs:
        missing.append(f"4: no config in configs/ with type='{name}'")
    assert not missing, f'{name}:\n  ' + '\n  '.join(missing)


def test_every_family_declares_its_checkpoint_layouts():
    """Item 2, on built backbones (VBTimmBackbone's layouts depend on the
    instance): every family names at least one rule table."""
    for name, cases in BACKBONE_CASES.items():
        sources = MODELS.build(dict(type=name, **cases[0])).weight_sources
        assert sources, name
        for source in sources:
            assert is_layout(source), (name, source)


def _toy_family(stem_names, stage_names, built_names):
    """A two-stage family whose builders return ``stem_names`` and
    ``built_names(i)`` while ``stage_module_names(i)`` says
    ``stage_names(i)``."""
    from torch import nn

    from vb_plugin.models import VBBackbone

    class Toy(VBBackbone):

        def __init__(self, **kwargs):
            super().__init__(stage_channels=(4, 4), stage_strides=(4, 8),
                             out_indices=(0, 1), **kwargs)

        def build_stem(self):
            return {n: nn.Conv2d(3 if k == 0 else 4, 4, 1)
                    for k, n in enumerate(stem_names)}

        def build_stage(self, i):
            return {n: nn.Conv2d(4, 4, 1) for n in built_names(i)}

        def stage_module_names(self, i):
            return stage_names(i)

    return Toy


def test_builders_register_what_they_return():
    Toy = _toy_family(('stem.0', 'stem.1'), lambda i: (f'stages.{i}', ),
                      lambda i: (f'stages.{i}', ))
    model = Toy(frozen_stages=0)
    assert list(model._modules) == ['stem', 'stages']
    assert model.stem_module_names() == ('stem.0', 'stem.1')
    assert [n for n, m in model.named_modules() if not m.training] == [
        'stem.0', 'stem.1']
    assert not model.stem[1].weight.requires_grad
    assert model.stages[1].weight.requires_grad


def _layer(i):
    return (f'layer{i}', )


@pytest.mark.parametrize('stem,says,builds,message', [
    (('conv', ), _layer, _layer, None),
    (('conv', ), lambda i: _layer(i + 1), _layer,
     r"^Toy.build_stage\(0\) returned \('layer0',\), but "
     r"stage_module_names\(0\) gives \('layer1',\): the two must name "
     r'the same modules in the same order$'),
    (('stem.1', ), _layer, _layer,
     r"^Toy: a builder returned 'stem.1'; names are a plain attribute or "
     r'the next item of a list \(e.g. stages.0, stages.1, ...\)$'),
    (('stem.a.0', ), _layer, _layer,
     r"^Toy: a builder returned 'stem.a.0'; names are a plain attribute "
     r'or the next item of a list \(e.g. stages.0, stages.1, ...\)$'),
])
def test_builders_names_are_checked(stem, says, builds, message):
    Toy = _toy_family(stem, says, builds)
    if message is None:
        assert Toy()._stage_names == (('layer0', ), ('layer1', ))
        return
    with pytest.raises(TypeError, match=message):
        Toy()
