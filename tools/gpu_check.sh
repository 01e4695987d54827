#!/usr/bin/env bash
# The GPU check of issue 28 (docs/performance.md, "Measuring on a GPU").
#
# On this machine, from the project root (once per session; needs .venv):
#   bash tools/gpu_check.sh prepare
# puts ../shared/gpu's scripts, the wheels and mmcv's source into .gpu/
# (ignored by git; ../shared/gpu/prepare.sh) and adds pytest's wheels.
#
# Then one call of the device tool's run, with carry [".gpu"]:
#   bash .gpu/run.sh bash tools/gpu_check.sh run [STAGE ...] [--seconds N]
# run.sh sets the stack up on the GPU machine (about 2 minutes) and exports
# SHIM; tools/gpu_check.py runs the stages (default: tests bench detector;
# also compiled, train; cut at --seconds, default 450) through the shim and
# writes gpu_check.json, pytest.txt and one JSON per benchmark stage into
# $OUT.
set -eu
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    # NOTE: ../shared/gpu/prepare.sh as it is, run from a copy that works in
    # a git worktree too (there .git is a file: .gitignore ignores .gpu/
    # instead) and with the project's Python in VB_PYTHON (default
    # .venv/bin/python; mmcv's source is fetched with it).
    py=${VB_PYTHON:-.venv/bin/python}
    if [ ! -x "$py" ]; then
      echo "no $py: run from a checkout with .venv, or set VB_PYTHON=/path/to/.venv/bin/python" >&2
      exit 1
    fi
    tmp=$(mktemp -d)
    cp ../shared/gpu/*.py ../shared/gpu/*.sh "$tmp"/
    sed -i -e '/info\/exclude/d' -e "s#\.venv/bin/python#$py#g" "$tmp/prepare.sh"
    bash "$tmp/prepare.sh"
    rm -rf "$tmp"
    P="--only-binary=:all: --python-version 3.12 --implementation cp"
    for p in pytest pluggy iniconfig packaging; do
      v=$("$py" -c "import importlib.metadata as m; print(m.version('$p'))" 2>/dev/null || true)
      "$py" -m pip download -q --no-deps $P -d .gpu/whl "$p${v:+==$v}" 2>&1 | grep -v '^WARNING' || true
    done
    ls .gpu/whl | grep -iE 'pytest|pluggy|iniconfig|packaging'
    ;;
  run)
    shift
    exec python3 tools/gpu_check.py "$@"
    ;;
  *)
    echo "usage: bash tools/gpu_check.sh prepare | run [STAGE ...] [--seconds N]" >&2
    exit 2
    ;;
esac
