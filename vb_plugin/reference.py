"""The reference tables of the backbone families, made from their code.

docs/reference.md has one option table per family (and per neck of
:mod:`vb_plugin.necks`) and docs/pretrained.md a table of the checkpoint
layouts each family and neck recognises. Both are made here,
so a new family gets its rows without hand edits and the pages cannot drift
from the code:

* an option table lists every parameter of a class's ``__init__`` signature
  (the contract options a family passes on to :class:`VBBackbone` included),
  its default as a Python literal, and its meaning: the class docstring's
  ``Args:`` entry (a contract option that the family does not document
  itself takes :class:`VBBackbone`'s entry);
* the layouts table lists each family's ``weight_sources``: the ``source=``
  name and aliases, what produces the layout and its tell-tale key;
* :func:`render` rewrites the blocks of a page between marker comments,
  ``<!-- generated: KEY -->`` and ``<!-- end generated -->``, and leaves the
  hand-written text around them alone; a block whose marker is missing is
  appended as a new section (a heading and the block).

``tools/make_docs.py`` writes the pages (``--check`` compares them);
``tests/test_reference_docs.py`` fails when a committed page is stale.
"""
import ast
import inspect
import re
from pathlib import Path
from typing import (Callable, Dict, Iterable, List, Mapping, NamedTuple,
                    Optional, Sequence, Tuple)

from mmengine.registry import MODELS

from .models.base import FAMILY_SET, VBBackbone
from .necks import NECKS

__all__ = [
    'Block', 'args_section', 'checkpoint_layouts', 'contract_options',
    'find_families', 'layouts_table', 'literal', 'make_pages', 'meanings',
    'option_table', 'options', 'render', 'rst_to_markdown'
]

#: The default cell of an option without a default.
REQUIRED = 'required'
#: The pages made here (relative to the repository root) and their blocks.
REFERENCE_PAGE = Path('docs', 'reference.md')
PRETRAINED_PAGE = Path('docs', 'pretrained.md')

_START = re.compile(r'^<!-- generated: (.+?) -->$', re.M)
_END = '<!-- end generated -->'


class Block(NamedTuple):
    """A generated block of a page.

    Args:
        key (str): What its marker names, e.g. ``'options VBResNet'``; the
            first word is its kind.
        heading (str): The heading of the section appended when the page
            has no marker for it.
        body (str): The Markdown between the markers.
    """
    key: str
    heading: str
    body: str


# ------------------------------------------------------------------ families


def _subclasses(cls: type) -> Iterable[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def find_families() -> List[type]:
    """Concrete :class:`VBBackbone` subclasses, by name: those registered in
    mmengine's ``MODELS`` and those defined in ``vb_plugin``.

    Example:
        >>> import vb_plugin
        >>> [c.__name__ for c in find_families()][:2]
        ['VBConvNeXt', 'VBRegNet']
    """
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


def contract_options() -> Dict[str, inspect.Parameter]:
    """The options every family passes on to :class:`VBBackbone`.

    Example:
        >>> list(contract_options())[:3]
        ['out_indices', 'frozen_stages', 'norm_eval']
    """
    params = inspect.signature(VBBackbone.__init__).parameters
    return {n: p for n, p in params.items()
            if n != 'self' and n not in FAMILY_SET}


def options(cls: type) -> Dict[str, inspect.Parameter]:
    """The options a user gives ``cls``, in signature order: its
    ``__init__`` parameters (a family's signature shows the contract
    options it passes on), or the contract options for
    :class:`VBBackbone` itself.

    Example:
        >>> from vb_plugin import VBRegNet
        >>> names = list(options(VBRegNet))
        >>> names[:2], names[-2:]
        (['arch', 'in_channels'], ['with_cp', 'init_cfg'])
    """
    if cls is VBBackbone:
        return contract_options()
    params = inspect.signature(cls.__init__).parameters
    found = {n: p for n, p in params.items() if n != 'self' and p.kind
             not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        # NOTE: a family's **kwargs can only go to VBBackbone.
        for name, param in contract_options().items():
            found.setdefault(name, param)
    return found


# ------------------------------------------------------------- docstrings

_ENTRY = re.compile(r'^(?P<names>\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)\s*'
                    r'(?:\((?P<type>[^)]*)\))?\s*:(?:\s+(?P<text>.*))?$')


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def args_section(doc: Optional[str], owner: str = 'docstring'
                 ) -> Dict[str, str]:
    """``{option: text}`` of a Google-style ``Args:`` section, each text
    joined into one paragraph. An entry may name several options
    (``a, b: text``), and its names may run over several lines, each but
    the last ending in a comma; ``*args``/``**kwargs`` entries are left out.

    Args:
        doc (str, optional): The docstring.
        owner (str): Who has it, for error messages.

    Raises:
        ValueError: If a line that starts an entry is not
            ``name (type): text`` or ``name, name: text``.

    Example:
        >>> args_section('''Summary.
        ...
        ... Args:
        ...     depth (int): 18 or 50.
        ...         More about it.
        ...     a, b: Shared.
        ...
        ... Example:
        ...     >>> 1
        ... ''')
        {'depth': '18 or 50. More about it.', 'a': 'Shared.', 'b': 'Shared.'}
    """
    lines = inspect.cleandoc(doc or '').splitlines()
    starts = [i for i, line in enumerate(lines)
              if line.strip() in ('Args:', 'Arguments:')]
    if not starts:
        return {}
    top = _indent(lines[starts[0]])
    body = []
    for line in lines[starts[0] + 1:]:
        if line.strip() and _indent(line) <= top:
            break
        body.append(line)
    body = [line for line in body if line.strip()]
    if not body:
        return {}
    base = _indent(body[0])
    entries: List[Tuple[str, List[str]]] = []
    header = ''
    for line in body:
        text = line.strip()
        if _indent(line) > base and not header:
            entries[-1][1].append(text)
            continue
        header = f'{header} {text}'.strip()
        if header.endswith(','):
            continue  # the names go on on the next line
        m = _ENTRY.match(header)
        if m is None:
            raise ValueError(f'{owner}: cannot read the Args entry '
                             f'{header!r}; write "name (type): text" or '
                             '"name, name: text"')
        entries.append((m['names'], [m['text'] or '']))
        header = ''
    out = {}
    for names, texts in entries:
        paragraph = ' '.join(t for t in texts if t)
        for name in re.split(r'\s*,\s*', names):
            if not name.startswith('*'):
                out[name] = paragraph
    return out


def _same(a, b) -> bool:
    """Equal and of the same types (0 is not 0.0, a list is not a tuple)."""
    return type(a) is type(b) and (a is b or a == b) and \
        (not isinstance(a, (dict, list, tuple)) or repr(a) == repr(b))


def _read_literal(node: ast.AST):
    """``ast.literal_eval`` plus ``dict(key=literal, ...)`` calls."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            and node.func.id == 'dict' and not node.args:
        return {kw.arg: _read_literal(kw.value) for kw in node.keywords}
    if isinstance(node, ast.Tuple):
        return tuple(_read_literal(e) for e in node.elts)
    if isinstance(node, ast.List):
        return [_read_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_read_literal(k): _read_literal(v)
                for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


_NOT_READ = object()


def _docstring_default(text: str):
    """The value of a closing ``Defaults to X.`` sentence whose ``X`` is a
    Python literal (in double backticks or not), and the text without that
    sentence; ``_NOT_READ`` and the text as it is otherwise."""
    at = text.rfind('Defaults to ')
    if at < 0 or (at > 0 and text[at - 1] != ' ') or not text.endswith('.'):
        return _NOT_READ, text
    written = text[at + len('Defaults to '):-1].strip()
    written = re.sub(r'^``(.*)``$', r'\1', written)
    try:
        value = _read_literal(ast.parse(written, mode='eval').body)
    except (ValueError, SyntaxError, TypeError):
        return _NOT_READ, text
    return value, text[:at].rstrip()


def meanings(cls: type) -> Dict[str, str]:
    """``{option: meaning}`` of every option of ``cls``, from docstrings.

    An option's meaning is its entry in the ``Args:`` section of ``cls``'s
    docstring, else of the nearest base class that documents it (a
    contract option: :class:`VBBackbone`'s). A closing ``Defaults to X.``
    sentence whose ``X`` is a literal is checked against the signature and
    left out (the table has the default in its own column).

    Raises:
        ValueError: If an option has no entry, if ``cls``'s ``Args:`` names
            something that is not an option, or if a docstring's default is
            not the signature's.

    Example:
        >>> from vb_plugin import VBResNet
        >>> meanings(VBResNet)['deep_stem']
        'Three 3x3 convs as the stem (V1c).'
    """
    wanted = options(cls)
    own = args_section(cls.__dict__.get('__doc__'), cls.__name__)
    signature = inspect.signature(cls.__init__).parameters
    extra = sorted(set(own) - set(wanted) - set(signature))
    if extra:
        raise ValueError(f'{cls.__name__}: its docstring documents {extra}, '
                         f'which are not options; the options are '
                         f'{list(wanted)}')
    found = {}
    for name, param in wanted.items():
        for owner in cls.__mro__:
            if owner is not cls and not (isinstance(owner, type) and
                                         issubclass(owner, VBBackbone)):
                continue
            entries = (own if owner is cls else args_section(
                owner.__dict__.get('__doc__'), owner.__name__))
            if name in entries:
                break
        else:
            raise ValueError(
                f'{cls.__name__}: option {name!r} has no entry in the Args: '
                'section of its docstring (nor of a base class); every '
                'option needs one')
        value, text = _docstring_default(entries[name])
        if value is not _NOT_READ and not _same(value, param.default):
            code = (REQUIRED if param.default is param.empty else
                    repr(param.default))
            fix = ('correct it' if owner is cls else
                   f'document {name} in {cls.__name__}\'s own docstring')
            raise ValueError(
                f'{owner.__name__}\'s docstring says {name} defaults to '
                f'{value!r}, but {cls.__name__}.__init__ has {code}; {fix}')
        found[name] = text
    return found


_CODE = re.compile(r'``(.+?)``')
_ROLE = re.compile(r':(?:class|func|meth|attr|data|mod|obj|exc):`~?([^`]+)`')
_DOCS_LINK = re.compile(r'\bdocs/([\w-]+\.md)(#[\w-]+)?')


def rst_to_markdown(text: str) -> str:
    """One docstring paragraph as the text of a Markdown table cell:
    ````code```` becomes ```code```, a role (``:class:`~a.B```) its
    target (```B```), ``docs/page.md#anchor`` a link relative to docs/,
    and ``|`` is escaped.

    Example:
        >>> rst_to_markdown('``a|b``, :func:`~x.load` (see docs/timm.md).')
        '`a\\\\|b`, `load` (see [timm.md](timm.md)).'
    """
    def role(m: 're.Match') -> str:
        target = m[1]
        if m[0].split('`')[1].startswith('~'):
            target = target.rpartition('.')[2]
        return f'``{target}``'

    text = _ROLE.sub(role, text)
    parts = _CODE.split(text)
    out = []
    for k, part in enumerate(parts):
        if k % 2:  # code
            out.append(f'`{part}`')
        else:
            out.append(_DOCS_LINK.sub(
                lambda m: f'[{m[1]}]({m[1]}{m[2] or ""})', part))
    return ''.join(out).replace('|', '\\|')


# ------------------------------------------------------------- the tables


def literal(value, name: str = 'value') -> str:
    """``value`` written as a Python literal: ``dict(key=...)`` for a dict
    with identifier keys, floats as ``1e-6`` rather than ``1e-06``.

    Args:
        value: None, a bool, int, float or str, or a tuple, list or dict of
            those.
        name (str): What ``value`` is, for error messages.

    Raises:
        TypeError: If ``value`` is of another type.

    Example:
        >>> literal(dict(type='LN2d', eps=1e-6))
        "dict(type='LN2d', eps=1e-6)"
        >>> literal((0, ))
        '(0,)'
    """
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        return re.sub(r'e([+-])0*(\d)', r'e\1\2', repr(value)).replace(
            'e+', 'e')
    if isinstance(value, tuple):
        items = [literal(v, name) for v in value]
        return f'({items[0]},)' if len(items) == 1 else \
            f'({", ".join(items)})'
    if isinstance(value, list):
        return f'[{", ".join(literal(v, name) for v in value)}]'
    if isinstance(value, dict):
        if all(isinstance(k, str) and k.isidentifier() for k in value):
            return 'dict(' + ', '.join(
                f'{k}={literal(v, name)}' for k, v in value.items()) + ')'
        return '{' + ', '.join(f'{literal(k, name)}: {literal(v, name)}'
                               for k, v in value.items()) + '}'
    raise TypeError(f'{name}={value!r} ({type(value).__name__}) cannot be '
                    'written as a Python literal; a default must be None, '
                    'a bool, int, float or str, or a tuple, list or dict of '
                    'those')


def option_table(cls: type) -> str:
    """The Markdown table ``| option | default | meaning |`` of ``cls``:
    one row per option (:func:`options`), the default as a literal in
    backticks (``required`` when there is none), the meaning from the
    docstrings (:func:`meanings`).

    Example:
        >>> from vb_plugin import VBResNet
        >>> table = option_table(VBResNet).splitlines()
        >>> print('\\n'.join(table[:2]))
        | option | default | meaning |
        |---|---|---|
        >>> print(table[6][:42])
        | `num_stages` | `4` | Stages of the archi
    """
    texts = meanings(cls)
    rows = ['| option | default | meaning |', '|---|---|---|']
    for name, param in options(cls).items():
        default = (REQUIRED if param.default is param.empty else
                   f'`{literal(param.default, f"{cls.__name__}.{name}")}`')
        rows.append(f'| `{name}` | {default} | '
                    f'{rst_to_markdown(texts[name])} |')
    return '\n'.join(rows)


def checkpoint_layouts(cls: type, example: Optional[Mapping] = None
                       ) -> Tuple[object, ...]:
    """The checkpoint layouts of a family, in detection order: its
    ``weight_sources``. A family whose layouts depend on the instance
    (``weight_sources`` a property, as :class:`VBTimmBackbone`'s) is built
    with the options ``example``.

    Raises:
        ValueError: If the layouts depend on the instance and no
            ``example`` is given.

    Example:
        >>> from vb_plugin import VBResNet, VBTimmBackbone
        >>> [s.name for s in checkpoint_layouts(VBResNet)]
        ['hf', 'timm-deep-stem', 'mmdet']
        >>> [s.name for s in checkpoint_layouts(
        ...     VBTimmBackbone, dict(model_name='resnet10t'))]
        ['timm', 'vb-timm']
    """
    sources = cls.weight_sources
    if isinstance(sources, (tuple, list)):
        return tuple(sources)
    if example is None:
        raise ValueError(
            f'{cls.__name__}.weight_sources depends on the instance: give '
            f'example options that build a small {cls.__name__} (e.g. its '
            'first case in tests/backbone_cases.py)')
    return tuple(cls(**example).weight_sources)


def _plain(text: str) -> str:
    """Plain text (a layout's description) in a Markdown table cell."""
    return re.sub(r'([*|\\])', r'\\\1', text)


def layouts_table(families: Sequence[type],
                  examples: Optional[Mapping[str, Mapping]] = None) -> str:
    """The Markdown table of the checkpoint layouts of ``families``: one row
    per layout, in each family's detection order.

    Args:
        families (Sequence[type]): The families, in table order.
        examples (Mapping[str, Mapping], optional): Options that build a
            small instance, by class name, for the families whose layouts
            depend on the instance (:func:`checkpoint_layouts`).

    Example:
        >>> from vb_plugin import VBRegNet
        >>> rows = layouts_table([VBRegNet]).splitlines()
        >>> rows[0].split(' | ')[1:3]
        ['`source=` name (aliases)', 'layout']
        >>> print(rows[-1][:37])
        | VBRegNet | `mmdet` (also `native`)
    """
    examples = examples or {}
    rows = ['| family | `source=` name (aliases) | layout | recognised by a '
            'key matching |', '|---|---|---|---|']
    for cls in families:
        sources = checkpoint_layouts(cls, examples.get(cls.__name__))
        if not sources:
            rows.append(f'| {cls.__name__} | | none: `load_pretrained` '
                        'refuses every checkpoint | |')
        for source in sources:
            names = f'`{source.name}`'
            if source.aliases:
                names += ' (also ' + ', '.join(
                    f'`{a}`' for a in source.aliases) + ')'
            detect = source.detect.replace('|', '\\|')
            rows.append(f'| {cls.__name__} | {names} | '
                        f'{_plain(source.description)} | `{detect}` |')
    return '\n'.join(rows)


# -------------------------------------------------------------- the pages


def _blocks_in(text: str) -> List[Tuple[str, int, int, int]]:
    """``(key, start, end, after)`` of each block: the marker's start, the
    end marker's start and the index after it."""
    found = []
    for m in _START.finditer(text):
        end = text.find(_END, m.end())
        if end < 0:
            raise ValueError(f'generated block {m[1]!r} has no '
                             f'"{_END}" after it')
        nested = _START.search(text, m.end(), end)
        if nested:
            raise ValueError(f'generated block {nested[1]!r} starts inside '
                             f'block {m[1]!r}')
        found.append((m[1], m.start(), end, end + len(_END)))
    return found


def _next_heading(text: str, pos: int) -> int:
    """Where the first ``#`` or ``##`` heading at or after ``pos`` starts
    (code fences skipped), or ``len(text)``."""
    offset, fenced = 0, False
    for line in text.splitlines(keepends=True):
        if line.startswith('```'):
            fenced = not fenced
        elif not fenced and offset >= pos and re.match(r'#{1,2} ', line):
            return offset
        offset += len(line)
    return len(text)


def _marked(block: Block) -> str:
    return (f'<!-- generated: {block.key} -->\n\n{block.body}\n\n{_END}')


def render(text: str, blocks: Sequence[Block]) -> str:
    """``text`` (a Markdown page) with its generated blocks made anew.

    Each block between ``<!-- generated: KEY -->`` and
    ``<!-- end generated -->`` gets ``blocks``' body for ``KEY``; the text
    outside the markers stays as it is. A block of ``blocks`` that the page
    lacks is appended as a new section (its heading, then the block): after
    the section of the last block of its kind (the first word of the key),
    before the next heading, or at the end of the page.

    Raises:
        ValueError: If the page has a block that ``blocks`` does not make,
            the same block twice, or a marker without its end.

    Example:
        >>> page = ('# Page\\n\\nProse.\\n\\n<!-- generated: options A -->\\n'
        ...         'old\\n<!-- end generated -->\\n\\n# More\\n')
        >>> out = render(page, [Block('options A', '## `A`', 'new A'),
        ...                     Block('options B', '## `B`', 'new B')])
        >>> out.splitlines()[2:7]
        ['Prose.', '', '<!-- generated: options A -->', '', 'new A']
        >>> out.count('<!-- generated:'), out.index('## `B`') < out.index(
        ...     '# More'), 'old' in out
        (2, True, False)
    """
    made = {b.key: b for b in blocks}
    found = _blocks_in(text)
    keys = [key for key, *_ in found]
    unknown = [k for k in keys if k not in made]
    if unknown:
        raise ValueError(f'the page has generated blocks {unknown} that the '
                         f'code does not make; it makes {list(made)}')
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f'the page has the generated blocks {twice} twice')
    out, last = [], 0
    for key, start, _, after in found:
        out += [text[last:start], _marked(made[key])]
        last = after
    out.append(text[last:])
    text = ''.join(out)
    for block in blocks:
        if block.key in keys:
            continue
        kind = block.key.split()[0]
        same_kind = [after for key, _, _, after in _blocks_in(text)
                     if key.split()[0] == kind]
        section = f'{block.heading}\n\n{_marked(block)}\n\n'
        at = _next_heading(text, same_kind[-1]) if same_kind else len(text)
        if at == len(text):
            text = text.rstrip('\n') + '\n\n' + section.rstrip('\n') + '\n'
        else:
            text = text[:at] + section + text[at:]
        keys.append(block.key)
    return text


def reference_blocks(families: Sequence[type],
                     necks: Sequence[type] = NECKS) -> List[Block]:
    """The blocks of docs/reference.md: the option table of
    :class:`VBBackbone` (the contract), then of each family, then of each
    neck (:data:`vb_plugin.necks.NECKS`)."""
    return [Block(f'options {cls.__name__}', f'## `{cls.__name__}`',
                  option_table(cls))
            for cls in [VBBackbone, *families, *necks]]


def pretrained_blocks(families: Sequence[type],
                      examples: Optional[Mapping[str, Mapping]] = None
                      ) -> List[Block]:
    """The block of docs/pretrained.md: the table of checkpoint layouts of
    the families, then of the necks."""
    return [Block('layouts', '## Checkpoint layouts',
                  layouts_table([*families, *NECKS], examples))]


#: Each page made here and how its blocks are made.
PAGES: Dict[Path, Callable[..., List[Block]]] = {
    REFERENCE_PAGE: lambda families, examples: reference_blocks(families),
    PRETRAINED_PAGE: pretrained_blocks,
}


def make_pages(root, families: Optional[Sequence[type]] = None,
               examples: Optional[Mapping[str, Mapping]] = None
               ) -> Dict[Path, str]:
    """The text each page of :data:`PAGES` must have, by path: the page
    under ``root`` with its generated blocks made anew (:func:`render`).

    Args:
        root (str | Path): The repository root.
        families (Sequence[type], optional): Defaults to
            :func:`find_families`.
        examples (Mapping[str, Mapping], optional): Options that build a
            small instance of a family whose layouts depend on the instance
            (:func:`checkpoint_layouts`), by class name.

    Example:
        >>> from pathlib import Path
        >>> import vb_plugin
        >>> root = Path(vb_plugin.__file__).parents[1]
        >>> pages = make_pages(root, examples=dict(
        ...     VBTimmBackbone=dict(model_name='resnet10t')))
        >>> sorted(str(p.relative_to(root)) for p in pages)
        ['docs/pretrained.md', 'docs/reference.md']
    """
    root = Path(root)
    families = find_families() if families is None else list(families)
    return {root / page: render((root / page).read_text(),
                                blocks(families, examples))
            for page, blocks in PAGES.items()}
