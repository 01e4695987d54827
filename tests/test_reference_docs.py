"""docs/reference.md lists every constructor option of every VB backbone with
the default the code has.

The families are found, not listed: every concrete ``VBBackbone`` subclass
registered in mmengine's ``MODELS`` (and every one defined in ``vb_plugin``,
which must be registered), so a new family is checked as soon as it exists.

Format of the page: a heading ``## `ClassName` ...`` followed by a table
``| option | default | meaning |``. The option cell is ```name```; the
default cell is a Python literal in backticks (``dict(k=v, ...)`` calls of
literals are allowed) or the word ``required``.

The tables of docs/reference.md and docs/pretrained.md are made from the
code by ``tools/make_docs.py`` (:mod:`vb_plugin.reference`); the checks
below read the page on their own, so they check the generator too. A stale
page fails ``test_committed_pages_are_what_the_code_makes``; a family
defined here (``VBToyNet``) shows that a new family gets its section and
its layouts rows without hand edits.
"""
import ast
import difflib
import importlib.util
import inspect
import re
import shutil
from pathlib import Path

import pytest
import torch
from mmengine.registry import MODELS
from torch import nn

import vb_plugin  # noqa: F401  (registers the backbones)
from backbone_cases import BACKBONE_CASES
from vb_plugin import reference
from vb_plugin.models import VBBackbone
from vb_plugin.weights.rules import WeightSource

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / 'docs' / 'reference.md'
PRETRAINED = ROOT / 'docs' / 'pretrained.md'
REQUIRED = 'required'
#: VBBackbone parameters a family computes itself instead of taking them.
FAMILY_SET = ('stage_channels', 'stage_strides')


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def vb_backbone_classes():
    """Concrete VBBackbone subclasses: registered ones and vb_plugin's."""
    registered = {
        cls for cls in MODELS.module_dict.values()
        if isinstance(cls, type) and issubclass(cls, VBBackbone)
    }
    own = {
        cls for cls in _subclasses(VBBackbone)
        if cls.__module__.startswith('vb_plugin.')
    }
    return sorted((c for c in registered | own if not inspect.isabstract(c)),
                  key=lambda c: c.__name__)


FAMILIES = vb_backbone_classes()


def contract_parameters():
    """The options every family passes on to VBBackbone, with defaults."""
    params = inspect.signature(VBBackbone.__init__).parameters
    return {n: p.default for n, p in params.items()
            if n != 'self' and n not in FAMILY_SET}


def expected_options(cls):
    """``{name: default}`` a user can give ``cls`` (``inspect._empty`` when
    required). Options taken through ``**kwargs`` are the contract options
    that VBBackbone accepts (a family's ``**kwargs`` can only go there)."""
    params = inspect.signature(cls.__init__).parameters
    options = {
        n: p.default
        for n, p in params.items()
        if n != 'self' and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        for name, default in contract_parameters().items():
            options.setdefault(name, default)
    return options


# ------------------------------------------------------------------ parsing


def _literal(node):
    """``ast.literal_eval`` plus ``dict(key=literal, ...)`` calls."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            and node.func.id == 'dict' and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords}
    if isinstance(node, ast.Tuple):
        return tuple(_literal(e) for e in node.elts)
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys,
                                                         node.values)}
    return ast.literal_eval(node)


def parse_default(cell: str):
    if cell == REQUIRED:
        return inspect.Parameter.empty
    m = re.fullmatch(r'`([^`]+)`', cell)
    if m is None:
        raise ValueError(f'default {cell!r} is neither a `literal` nor '
                         f'{REQUIRED!r}')
    return _literal(ast.parse(m.group(1), mode='eval').body)


def option_table(text: str, name: str):
    """Rows ``(option, default cell)`` of the first table after the heading
    ``## `name` ...``."""
    lines = text.splitlines()
    heading = re.compile(rf'^## `{re.escape(name)}`(\W|$)')
    starts = [i for i, line in enumerate(lines) if heading.match(line)]
    if len(starts) != 1:
        raise ValueError(f'expected one heading "## `{name}`", found '
                         f'{len(starts)}')
    rows, in_table = [], False
    for line in lines[starts[0] + 1:]:
        if line.startswith('#'):
            break
        if not line.startswith('|'):
            if in_table:
                break
            continue
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if not in_table:
            if cells[:2] != ['option', 'default']:
                raise ValueError(f'table after {name}: header {cells}, '
                                 'expected | option | default | meaning |')
            in_table = True
            continue
        if set(''.join(cells)) <= set('-: '):
            continue
        m = re.fullmatch(r'`(\w+)`', cells[0])
        if m is None:
            raise ValueError(f'{name}: option cell {cells[0]!r} is not '
                             '`name`')
        rows.append((m.group(1), cells[1]))
    if not rows:
        raise ValueError(f'no option table after "## `{name}`"')
    return rows


def _same(a, b) -> bool:
    return type(a) is type(b) and (a is b or a == b) and \
        (not isinstance(a, (dict, list, tuple)) or repr(a) == repr(b))


def problems(expected: dict, rows) -> list:
    """Differences between the code's options and the documented rows."""
    out, seen = [], set()
    for option, cell in rows:
        if option in seen:
            out.append(f'{option}: listed twice')
        seen.add(option)
        if option not in expected:
            out.append(f'{option}: documented but not a parameter')
            continue
        try:
            documented = parse_default(cell)
        except (ValueError, SyntaxError) as err:
            out.append(f'{option}: cannot read the default {cell!r}: {err}')
            continue
        real = expected[option]
        if not _same(documented, real):
            shown = REQUIRED if real is inspect.Parameter.empty else repr(real)
            out.append(f'{option}: documented default {cell}, code has '
                       f'{shown}')
    for option in expected:
        if option not in seen:
            out.append(f'{option}: not documented')
    return out


# -------------------------------------------------------------------- tests


def test_families_are_found():
    names = [cls.__name__ for cls in FAMILIES]
    assert {'VBResNet', 'VBRegNet', 'VBConvNeXt', 'VBTimmBackbone'} <= set(
        names), names
    for cls in FAMILIES:
        assert MODELS.get(cls.__name__) is cls, (
            f'{cls.__name__} is not registered in MODELS')


@pytest.mark.parametrize('cls', FAMILIES, ids=lambda c: c.__name__)
def test_family_options_documented_with_defaults(cls):
    rows = option_table(REFERENCE.read_text(), cls.__name__)
    found = problems(expected_options(cls), rows)
    assert not found, (f'docs/reference.md, {cls.__name__}:\n  ' +
                       '\n  '.join(found))


@pytest.mark.parametrize('cls', FAMILIES, ids=lambda c: c.__name__)
def test_family_accepts_every_contract_option(cls):
    missing = set(contract_parameters()) - set(expected_options(cls))
    assert not missing, f'{cls.__name__} does not take {sorted(missing)}'


def test_contract_table_matches_vbbackbone():
    rows = option_table(REFERENCE.read_text(), 'VBBackbone')
    found = problems(contract_parameters(), rows)
    assert not found, 'docs/reference.md, VBBackbone:\n  ' + '\n  '.join(
        found)


def test_checker_catches_wrong_docs():
    """The checker itself fails on a wrong default, a missing option, an
    unknown option and an unreadable default."""
    text = REFERENCE.read_text()
    cls = FAMILIES[0]
    expected = expected_options(cls)
    rows = option_table(text, cls.__name__)
    assert not problems(expected, rows)
    name, cell = next((n, c) for n, c in rows if c != REQUIRED)
    wrong = [(n, '`12345`' if n == name else c) for n, c in rows]
    assert any('documented default' in p for p in problems(expected, wrong))
    assert any('not documented' in p for p in problems(expected, rows[1:]))
    extra = rows + [('no_such_option', '`None`')]
    assert any('not a parameter' in p for p in problems(expected, extra))
    unreadable = [(n, 'None' if n == name else c) for n, c in rows]
    assert any('cannot read' in p for p in problems(expected, unreadable))
    # Types count: 0 is not 0.0, a list is not a tuple.
    assert not _same(0, 0.0) and not _same([0, 1], (0, 1))
    assert _same(dict(type='BN', requires_grad=True),
                 parse_default("`dict(type='BN', requires_grad=True)`"))


# ------------------------------------------------------- generated pages

#: What tools/make_docs.py builds a family with when its layouts depend on
#: the instance (VBTimmBackbone).
EXAMPLES = {name: cases[0] for name, cases in BACKBONE_CASES.items()}


class VBToyNet(VBBackbone):
    """A toy family: not registered, not in vb_plugin, so not in FAMILIES.

    Args:
        width (int): Channels of every stage. Defaults to 4.
        frozen_stages (int): See :class:`VBBackbone`. The stem is ``stem``;
            stage ``i`` is ``stages.i`` (docs/contract.md).
    """

    weight_sources = (WeightSource('toy', 'a *toy* layout', detect=r'^stem\.',
                                   aliases=('native', )), )

    def __init__(self, width: int = 4, **kwargs) -> None:
        self.width = width
        super().__init__(stage_channels=(width, ) * 4,
                         stage_strides=(4, 8, 16, 32), **kwargs)

    def build_stem(self):
        return {'stem': nn.Conv2d(3, self.width, 4, stride=4)}

    def build_stage(self, i):
        return {f'stages.{i}': nn.Conv2d(self.width, self.width, 3,
                                         stride=1 if i == 0 else 2,
                                         padding=1)}

    def stage_module_names(self, i):
        return (f'stages.{i}', )


def _cells(text: str, name: str, option: str):
    """The cells of ``option``'s row in ``name``'s table of a page."""
    rows = [line for line in reference.option_table(
        VBBackbone if name == 'VBBackbone' else
        {c.__name__: c for c in FAMILIES + [VBToyNet]}[name]).splitlines()
        if line.startswith(f'| `{option}` |')]
    assert len(rows) == 1 and rows[0] in text, (name, option)
    return rows[0].split(' | ')


def _make_docs_tool():
    path = ROOT / 'tools' / 'make_docs.py'
    spec = importlib.util.spec_from_file_location('_make_docs', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_pages_are_what_the_code_makes():
    """The option tables are the docstrings' and the signatures', the layouts
    table the families' weight_sources."""
    pages = reference.make_pages(ROOT, examples=EXAMPLES)
    assert set(pages) == {REFERENCE, PRETRAINED}
    for path, text in pages.items():
        committed = path.read_text()
        diff = ''.join(list(difflib.unified_diff(
            committed.splitlines(True), text.splitlines(True),
            'committed', 'made from the code', n=0))[:12])
        assert committed == text, (
            f'{path.relative_to(ROOT)} is stale: run python '
            f'tools/make_docs.py\n{diff}')


def test_page_meanings_are_the_docstrings():
    """help(VBResNet) says what the page says: a family's own entry, and a
    contract option that the family does not document takes VBBackbone's
    entry (the toy family's norm_eval row is the contract's)."""
    text = REFERENCE.read_text()
    meaning = _cells(text, 'VBResNet', 'deep_stem')[2]
    assert meaning == 'Three 3x3 convs as the stem (V1c). |'
    assert 'Three 3x3 convs as the stem (V1c).' in vb_plugin.VBResNet.__doc__
    toy = reference.option_table(VBToyNet)
    contract = reference.option_table(VBBackbone)
    row = next(r for r in contract.splitlines() if r.startswith(
        '| `norm_eval` |'))
    assert row in toy.splitlines()


def test_new_family_gets_its_section_and_layouts_rows(tmp_path):
    """A family the pages have never seen: its section (heading and table)
    goes after the last family's section, its layouts rows into the table;
    nothing else of either page changes, and making the pages again changes
    nothing."""
    pages = reference.make_pages(ROOT, families=FAMILIES + [VBToyNet],
                                 examples=EXAMPLES)
    text = pages[REFERENCE]
    section = ('## `VBToyNet`\n\n<!-- generated: options VBToyNet -->\n\n'
               f'{reference.option_table(VBToyNet)}\n\n'
               '<!-- end generated -->\n\n')
    assert text.count(section) == 1
    assert text.replace(section, '') == REFERENCE.read_text()
    assert text.index(section) > text.index('options VBTimmBackbone')
    assert text.index(section) + len(section) == text.index(
        '## Compared with other libraries')
    # The page's own checker reads the new table as the code's options.
    assert not problems(expected_options(VBToyNet),
                        option_table(text, 'VBToyNet'))
    assert _cells(text, 'VBToyNet', 'width')[1:] == [
        '`4`', 'Channels of every stage. |']
    assert _cells(text, 'VBToyNet', 'frozen_stages')[2] == (
        'See `VBBackbone`. The stem is `stem`; stage `i` is `stages.i` '
        '([contract.md](contract.md)). |')

    layouts = pages[PRETRAINED]
    row = ('| VBToyNet | `toy` (also `native`) | a \\*toy\\* layout | '
           '`^stem\\.` |')
    assert row in layouts.splitlines()
    assert re.search(r'^\| VBToyNet \|', layouts, re.M)
    assert layouts.replace(row + '\n', '') == PRETRAINED.read_text()

    for path, made in pages.items():
        again = tmp_path / path.relative_to(ROOT)
        again.parent.mkdir(exist_ok=True)
        again.write_text(made)
    remade = reference.make_pages(tmp_path, families=FAMILIES + [VBToyNet],
                                  examples=EXAMPLES)
    assert {p.relative_to(tmp_path): t for p, t in remade.items()} == {
        p.relative_to(ROOT): t for p, t in pages.items()}


def test_make_docs_rewrites_a_stale_page(tmp_path, capsys):
    """tools/make_docs.py --check fails on a stale page and writes nothing;
    without --check it makes the page anew, prose included as it was."""
    tool = _make_docs_tool()
    (tmp_path / 'docs').mkdir()
    for page in (REFERENCE, PRETRAINED):
        shutil.copy(page, tmp_path / 'docs' / page.name)
    stale = tmp_path / 'docs' / 'reference.md'
    wrong = REFERENCE.read_text().replace('| `depth` | required |',
                                          '| `depth` | `50` |')
    assert wrong != REFERENCE.read_text()
    stale.write_text(wrong)
    assert tool.main(['--check', '--root', str(tmp_path)]) == 1
    assert 'run: python tools/make_docs.py' in capsys.readouterr().out
    assert stale.read_text() == wrong
    assert tool.main(['--root', str(tmp_path)]) == 0
    assert stale.read_text() == REFERENCE.read_text()
    assert tool.main(['--check', '--root', str(tmp_path)]) == 0


def _family(doc: str, init):
    """A VBToyNet with another docstring and ``__init__``."""
    return type('VBOther', (VBToyNet, ), {'__doc__': doc, '__init__': init})


def _init_depth(self, depth: int = 18, **kwargs):
    VBToyNet.__init__(self, **kwargs)


def _init_norm(self, out_norm_cfg=dict(type='LN2d'), **kwargs):
    VBToyNet.__init__(self, out_norm_cfg=out_norm_cfg, **kwargs)


def _init_object(self, act=torch.nn.ReLU, **kwargs):
    VBToyNet.__init__(self, **kwargs)


@pytest.mark.parametrize('doc,init,error,match', [
    ('Toy.', _init_depth, ValueError,
     r"^VBOther: option 'depth' has no entry in the Args: section"),
    ('Toy.\n\nArgs:\n    depth (int): Layers. Defaults to 50.\n',
     _init_depth, ValueError,
     r"^VBOther's docstring says depth defaults to 50, but "
     r'VBOther.__init__ has 18; correct it$'),
    ('Toy.\n\nArgs:\n    depth (int): Layers.\n    pretrained (str): '
     'Gone.\n', _init_depth, ValueError,
     r"^VBOther: its docstring documents \['pretrained'\], which are not "
     r'options'),
    ('Toy.\n\nArgs:\n    depth (int) Layers.\n', _init_depth, ValueError,
     r"^VBOther: cannot read the Args entry 'depth \(int\) Layers.'"),
    # A family that changes a contract default documents the option itself.
    ('Toy.', _init_norm, ValueError,
     r"^VBBackbone's docstring says out_norm_cfg defaults to None, but "
     r"VBOther.__init__ has \{'type': 'LN2d'\}; document out_norm_cfg in "
     r"VBOther's own docstring$"),
    ('Toy.\n\nArgs:\n    act (type): Activation.\n', _init_object,
     TypeError, r'^VBOther.act=<class .*ReLU.*> \(type\) cannot be written '
     r'as a Python literal; a default must be None, a bool'),
])
def test_generator_refuses_what_it_cannot_document(doc, init, error, match):
    with pytest.raises(error, match=match):
        reference.option_table(_family(doc, init))


def test_render_refuses_broken_markers():
    blocks = [reference.Block('options A', '## `A`', 'table A')]
    start, end = '<!-- generated: options A -->', '<!-- end generated -->'
    good = f'# Page\n\n{start}\nold\n{end}\n'
    assert 'table A' in reference.render(good, blocks)
    for page, match in [
            (f'{start}\nold\n', 'has no "<!-- end generated -->"'),
            (f'{start}\n{start}\n{end}\n', 'starts inside block'),
            (f'<!-- generated: options Gone -->\n{end}\n',
             r"blocks \['options Gone'\] that the code does not make"),
            (good + good, r"blocks \['options A'\] twice"),
    ]:
        with pytest.raises(ValueError, match=match):
            reference.render(page, blocks)


def test_layouts_of_the_instance_need_an_example():
    """VBTimmBackbone's layouts depend on the instance: without options to
    build one the generator says so instead of guessing."""
    with pytest.raises(ValueError, match=r'^VBTimmBackbone.weight_sources '
                       'depends on the instance: give example options'):
        reference.checkpoint_layouts(vb_plugin.VBTimmBackbone)
    names = [s.name for s in reference.checkpoint_layouts(
        vb_plugin.VBTimmBackbone, EXAMPLES['VBTimmBackbone'])]
    assert names == ['timm', 'vb-timm']


def test_generator_finds_the_same_families():
    assert reference.find_families() == FAMILIES
    assert {n: p.default for n, p in reference.options(VBToyNet).items()} \
        == expected_options(VBToyNet)
    model = VBToyNet(out_indices=(1, 3)).eval()
    assert [tuple(o.shape) for o in model(torch.rand(1, 3, 32, 32))] == [
        (1, 4, 4, 4), (1, 4, 1, 1)]


def test_neck_options_documented_with_defaults():
    """The necks' tables (vb_plugin.necks.NECKS) are checked as the
    families' are."""
    from vb_plugin.necks import NECKS
    assert [cls.__name__ for cls in NECKS] == ['VBSimpleFeaturePyramid']
    for cls in NECKS:
        rows = option_table(REFERENCE.read_text(), cls.__name__)
        found = problems(expected_options(cls), rows)
        assert not found, (f'docs/reference.md, {cls.__name__}:\n  ' +
                           '\n  '.join(found))
