"""Every code snippet of README.md and docs/*.md runs here, so the docs cannot
drift from the code.

A fence's info string says how its snippet is checked (GitHub reads only the
first word, so the rest is invisible to readers):

* ``python``: executed, in order, in one namespace per Markdown file, with
  a temporary working directory that links ``configs``, ``tools`` and
  ``Makefile`` of the repository. A snippet with ``>>>`` prompts is a doctest
  (its printed output and exceptions are compared, with ELLIPSIS and
  NORMALIZE_WHITESPACE).
* ``python config [base=CFG]``: a config file. It is written to the working
  directory (after ``_base_ = 'CFG'`` when given), loaded with
  :func:`vb_plugin.apis.load_config`, and its model is built as the tools
  build it (:func:`vb_plugin.apis.build_detector`, which checks the neck's
  ``in_channels``; MMSegmentation configs with mmseg's builder), then its
  ``optim_wrapper`` with mmengine's builder (``AmpOptimWrapper`` becomes
  ``OptimWrapper`` without a GPU: AMP needs CUDA).
* ``python slow``: executed only by the slow test of the file (``make
  test-all``), after all the other snippets of the file.
* ``bash``: each command must be one the docs may promise: ``make T`` (T a
  target of the Makefile), ``python tools/X.py ARGS`` (ARGS parsed by the
  tool's own ``parse_args``), ``bash tools/dist_train.sh CONFIG N ...``,
  ``pip install -r FILE`` (FILE exists) or ``pip install PKG[SPEC]`` (PKG
  in ``requirements/`` and SPEC agreeing with its pin), plus ``cd``/``git clone``/``export``. Anything
  else fails, so a new kind of command gets a checker, not a pass.
* ``text`` or no info string: output shown to the reader, not code.
"""
import copy
import doctest
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch
from mmengine.logging import MMLogger
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope, init_default_scope
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))
FENCE = re.compile(r'^```(.*)$')
KINDS = {'python', 'bash', 'text', ''}


class Snippet:
    def __init__(self, path: Path, line: int, info: str, code: str):
        self.path, self.line, self.code = path, line, code
        words = info.split()
        self.lang = words[0] if words else ''
        self.flags = {w.split('=')[0]: (w.split('=', 1) + [''])[1]
                      for w in words[1:]}

    def __repr__(self):
        return f'{self.path.relative_to(ROOT)}:{self.line}'


def parse_snippets(path: Path):
    """Fenced blocks of a Markdown file, with their line numbers."""
    snippets, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start, info, body = i + 1, m.group(1).strip(), []
        i += 1
        while i < len(lines) and not lines[i].startswith('```'):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f'{path}:{start}: unclosed code fence')
        snippets.append(Snippet(path, start, info, '\n'.join(body) + '\n'))
        i += 1
    return snippets


@pytest.fixture
def docs_cwd(tmp_path, monkeypatch):
    for name in ('configs', 'tools', 'Makefile', 'requirements'):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------- python


def run_python(snippet: Snippet, namespace: dict) -> None:
    name = repr(snippet)
    if '>>>' in snippet.code:
        parser = doctest.DocTestParser()
        test = parser.get_doctest(snippet.code, namespace, name,
                                  str(snippet.path), snippet.line)
        flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        runner = doctest.DocTestRunner(optionflags=flags, verbose=False)
        out = []
        runner.run(test, out=out.append, clear_globs=False)
        namespace.update(test.globs)  # DocTest ran on a copy
        if runner.failures:
            pytest.fail(f'{name}: doctest failed\n' + ''.join(out),
                        pytrace=False)
    else:
        exec(compile(snippet.code, name, 'exec'), namespace)


def run_config(snippet: Snippet, workdir: Path) -> None:
    from vb_plugin.apis import build_detector, load_config
    code = snippet.code
    if snippet.flags.get('base'):
        code = f"_base_ = '{snippet.flags['base']}'\n" + code
    cfg_file = workdir / f'snippet_{snippet.line}.py'
    cfg_file.write_text(code)
    cfg = load_config(str(cfg_file))
    scope = cfg.get('default_scope', 'mmdet')
    if scope == 'mmseg':
        from mmseg.registry import MODELS
        init_default_scope('mmseg')
        model = MODELS.build(cfg.model)
    else:
        model = build_detector(cfg, pretrained=False)
    if 'optim_wrapper' in cfg:
        optim_cfg = copy.deepcopy(cfg.optim_wrapper)
        if (optim_cfg.get('type') == 'AmpOptimWrapper'
                and not torch.cuda.is_available()):
            optim_cfg['type'] = 'OptimWrapper'
            optim_cfg.pop('loss_scale', None)
        with DefaultScope.overwrite_default_scope(scope):
            build_optim_wrapper(model, optim_cfg)


# ------------------------------------------------------------------- bash


def _requirements():
    """``requirements/*.txt`` as {normalised name: Requirement}."""
    reqs = {}
    for req_file in (ROOT / 'requirements').glob('*.txt'):
        for line in req_file.read_text().splitlines():
            line = line.split('#')[0].strip()
            if line and not line.startswith('-'):
                req = Requirement(line)
                reqs[canonicalize_name(req.name)] = req
    return reqs


def check_pip_argument(arg: str) -> None:
    """A package named on a pip command line must be one of requirements/,
    and what the docs ask for must agree with its pin: ``==V`` must be a
    version the pin admits, any other clause must be one of the pin's."""
    req = Requirement(arg)
    pinned = _requirements().get(canonicalize_name(req.name))
    assert pinned is not None, f'{req.name} is not in requirements/'
    for spec in req.specifier:
        if spec.operator == '==':
            assert spec.version in pinned.specifier, (
                f'{arg}: requirements/ pins {pinned}')
        else:
            assert str(spec) in {str(c) for c in pinned.specifier}, (
                f'{arg}: requirements/ pins {pinned}')


def _tool_parse_args(tool: str, argv):
    path = ROOT / tool
    if not path.is_file():
        raise AssertionError(f'{tool} does not exist')
    spec = importlib.util.spec_from_file_location(
        f'_docs_tool_{path.stem}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f'{tool} rejects {argv}') from e


def check_command(words, workdir: Path) -> None:
    head = words[0]
    if head in ('cd', 'export'):
        return
    if words[:2] == ['git', 'clone']:
        return
    if head == 'make':
        targets = re.findall(r'^([\w-]+):', (ROOT / 'Makefile').read_text(),
                             re.M)
        for target in words[1:]:
            assert target in targets, f'no Makefile target {target!r}'
        return
    if head.endswith('python') or head.endswith('python3'):
        if words[1:3] == ['-m', 'pip']:
            return check_command(['pip'] + words[3:], workdir)
        assert words[1].startswith('tools/'), words
        _tool_parse_args(words[1], words[2:])
        return
    if head == 'bash' and words[1] == 'tools/dist_train.sh':
        assert (ROOT / words[1]).is_file()
        assert (workdir / words[2]).is_file(), f'no config {words[2]}'
        assert words[3].isdigit(), 'NPROC must be a number'
        _tool_parse_args('tools/train.py', [words[2]] + words[4:])
        return
    if head == 'pip' and words[1] == 'install':
        args = iter(words[2:])
        for arg in args:
            if arg in ('-r', '--requirement'):
                req = next(args)
                assert (workdir / req).is_file(), f'no file {req}'
            elif arg in ('--index-url', '--extra-index-url'):
                next(args)
            elif arg.startswith('-') or arg == '.':
                continue
            else:
                check_pip_argument(arg)
        return
    raise AssertionError(f'no checker for the command {" ".join(words)!r}')


def run_bash(snippet: Snippet, workdir: Path) -> None:
    text = re.sub(r'\\\n\s*', ' ', snippet.code)
    for line in text.splitlines():
        line = line.split(' #')[0].strip()
        if not line or line.startswith('#'):
            continue
        words = [w for w in shlex.split(line)
                 if not re.match(r'^[A-Z_]+=\S*$', w)]  # VAR=value prefixes
        try:
            check_command(words, workdir)
        except AssertionError as e:
            pytest.fail(f'{snippet!r}: {line}\n{e}', pytrace=False)


# ------------------------------------------------------------------ tests


def _run_file(path: Path, workdir: Path, slow: bool) -> int:
    # NOTE: mmengine's logger binds its handler to the sys.stdout of the
    # moment it is first used; make that moment now, not inside a doctest
    # (where it would make logged lines part of the compared output).
    MMLogger.get_current_instance()
    namespace = {'__name__': f'docs_{path.stem}'}
    snippets = parse_snippets(path)
    fast = [s for s in snippets if 'slow' not in s.flags]
    ordered = fast + ([s for s in snippets if 'slow' in s.flags]
                      if slow else [])
    for snippet in ordered:
        if snippet.lang == 'python' and 'config' in snippet.flags:
            run_config(snippet, workdir)
        elif snippet.lang == 'python':
            run_python(snippet, namespace)
        elif snippet.lang == 'bash':
            run_bash(snippet, workdir)
    return len(ordered)


@pytest.mark.parametrize('path', DOC_FILES, ids=lambda p: p.name)
def test_snippets_run(path, docs_cwd):
    _run_file(path, docs_cwd, slow=False)


SLOW_FILES = [p for p in DOC_FILES
              if any('slow' in s.flags for s in parse_snippets(p))]


@pytest.mark.slow
@pytest.mark.parametrize('path', SLOW_FILES, ids=lambda p: p.name)
def test_slow_snippets_run(path, docs_cwd):
    _run_file(path, docs_cwd, slow=True)


@pytest.mark.parametrize('path', DOC_FILES, ids=lambda p: p.name)
def test_every_fence_has_a_known_kind(path):
    for snippet in parse_snippets(path):
        assert snippet.lang in KINDS, (
            f'{snippet!r}: fence kind {snippet.lang!r}; use one of '
            f'{sorted(KINDS)} (see tests/test_docs.py)')
        unknown = set(snippet.flags) - {'config', 'base', 'slow'}
        assert not unknown, f'{snippet!r}: unknown fence flags {unknown}'


def test_runner_fails_on_a_wrong_snippet(tmp_path, docs_cwd):
    """The runner itself: a wrong output, a wrong option and an unknown
    command each fail."""
    bad = tmp_path / 'bad.md'
    for text in ('```python\n>>> 1 + 1\n3\n```\n',
                 '```bash\npython tools/train.py --no-such-flag\n```\n',
                 '```bash\nrm -rf /\n```\n',
                 '```bash\npip install torch==0.1\n```\n',
                 '```bash\npip install "setuptools<90"\n```\n',
                 '```bash\npip install leftpad\n```\n',
                 '```python config base=mmdet::mask_rcnn/'
                 'mask-rcnn_r50_fpn_1x_coco.py\ncustom_imports = dict('
                 "imports=['vb_plugin'])\nmodel = dict(backbone=dict("
                 "_delete_=True, type='VBResNet', depth=18))\n```\n"):
        bad.write_text(text)
        with pytest.raises((pytest.fail.Exception, AssertionError,
                            ValueError)):
            _run_file(bad, docs_cwd, slow=False)


LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')


def _anchors(path: Path):
    """GitHub's heading anchors of a Markdown file."""
    anchors, in_fence = set(), False
    for line in path.read_text().splitlines():
        if line.startswith('```'):
            in_fence = not in_fence
        elif not in_fence and line.startswith('#'):
            text = line.lstrip('#').strip().lower()
            anchors.add(re.sub(r'[^\w\- ]', '', text).replace(' ', '-'))
    return anchors


@pytest.mark.parametrize('path', DOC_FILES, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    text = re.sub(r'^```.*?^```', '', path.read_text(), flags=re.M | re.S)
    for target in LINK.findall(text):
        if re.match(r'^[a-z]+://', target) or target.startswith('mailto:'):
            continue
        file_part, _, anchor = target.partition('#')
        dest = (path.parent / file_part).resolve() if file_part else path
        assert dest.exists(), f'{path.name}: link to missing {target}'
        if anchor and dest.suffix == '.md':
            assert anchor in _anchors(dest), (
                f'{path.name}: no heading #{anchor} in {dest.name}')


def test_link_check_fails_on_missing_targets(tmp_path):
    page = tmp_path / 'page.md'
    page.write_text('[ok](#a-title-with-code)\n# A title, with `code`\n')
    test_relative_links_resolve(page)
    for text in ('[a](missing.md)\n', '[b](#nope)\n# Title\n'):
        page.write_text(text)
        with pytest.raises(AssertionError):
            test_relative_links_resolve(page)
