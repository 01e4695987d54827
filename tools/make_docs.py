"""Make the generated tables of docs/reference.md and docs/pretrained.md.

    python tools/make_docs.py [--check] [--root DIR]

Rewrites the blocks between ``<!-- generated: ... -->`` and
``<!-- end generated -->`` from the code (:mod:`vb_plugin.reference`): the
option tables from the families' signatures and docstrings, the table of
checkpoint layouts from their ``weight_sources``. The text around the blocks
is left alone. ``--check`` writes nothing and exits with 1 when a page
differs from what the code makes.

A family whose layouts depend on the instance (``VBTimmBackbone``) is built
from its first case in ``tests/backbone_cases.py``.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Make the generated tables of docs/reference.md and '
        'docs/pretrained.md from the code')
    parser.add_argument('--check', action='store_true',
                        help='write nothing; exit with 1 if a page differs')
    parser.add_argument('--root', type=Path, default=ROOT,
                        help='the repository whose docs/ to make '
                        '(default: this one)')
    return parser.parse_args(argv)


def examples():
    """The first case of each family in tests/backbone_cases.py."""
    sys.path.insert(0, str(ROOT / 'tests'))
    try:
        from backbone_cases import BACKBONE_CASES
    finally:
        sys.path.remove(str(ROOT / 'tests'))
    return {name: cases[0] for name, cases in BACKBONE_CASES.items()}


def main(argv=None) -> int:
    import vb_plugin  # noqa: F401  (registers the families)
    from vb_plugin.reference import make_pages
    args = parse_args(argv)
    stale = []
    for path, text in make_pages(args.root, examples=examples()).items():
        if path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text)
    for path in stale:
        verb = 'differs from the code' if args.check else 'rewritten'
        print(f'{path.relative_to(args.root)}: {verb}')
    if stale and args.check:
        print('run: python tools/make_docs.py')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
