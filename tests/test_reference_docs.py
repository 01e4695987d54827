"""docs/reference.md lists every constructor option of every VB backbone with
the default the code has.

The families are found, not listed: every concrete ``VBBackbone`` subclass
registered in mmengine's ``MODELS`` (and every one defined in ``vb_plugin``,
which must be registered), so a new family is checked as soon as it exists.

Format of the page: a heading ``## `ClassName` ...`` followed by a table
``| option | default | meaning |``. The option cell is ```name```; the
default cell is a Python literal in backticks (``dict(k=v, ...)`` calls of
literals are allowed) or the word ``required``.
"""
import ast
import inspect
import re
from pathlib import Path

import pytest
from mmengine.registry import MODELS

import vb_plugin  # noqa: F401  (registers the backbones)
from vb_plugin.models import VBBackbone

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / 'docs' / 'reference.md'
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
