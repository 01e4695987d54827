# The whole set-up is `make demo` and `make test`: each creates .venv on first
# use, in the order ../shared/ENVIRONMENT.md explains, and is a no-op after.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.vb_installed
# mmcv's CUDA ops are compiled when nvcc is on PATH and nvidia-smi lists a
# GPU (or with VB_FORCE_CUDA=1, e.g. on a build host without one). A CUDA
# build skips pip's wheel cache, which may hold a CPU-only mmcv wheel.
FORCE_CUDA := $(shell if [ "$$VB_FORCE_CUDA" = 1 ] || { command -v nvcc >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }; then echo 1; else echo 0; fi)
MMCV_PIP_FLAGS := $(if $(filter 1,$(FORCE_CUDA)),--no-cache-dir,)
PYTEST_ARGS ?=

.PHONY: venv test test-all demo clean-venv

venv: $(STAMP)

$(STAMP): setup.py requirements/build.txt requirements/mmcv.txt requirements/runtime.txt requirements/tests.txt requirements/deploy.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -r requirements/build.txt
	MMCV_WITH_OPS=1 FORCE_CUDA=$(FORCE_CUDA) MAX_JOBS=2 $(PIP) install --no-build-isolation $(MMCV_PIP_FLAGS) -r requirements/mmcv.txt
	$(PIP) install -r requirements/runtime.txt -r requirements/tests.txt -r requirements/deploy.txt
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PY) -c "import torch, torchvision.ops, mmcv.ops, mmdet.models, timm, vb_plugin; print('environment ok: torch', torch.__version__)"
	touch $(STAMP)

# Fast suite: everything except tests marked `slow`.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Everything, slow end-to-end tests included.
test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) tools/demo.py

clean-venv:
	rm -rf $(VENV)
