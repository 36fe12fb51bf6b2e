# Both entry points build their own virtual environment (.venv) from nothing.
# torch and torchvision are installed first as a matched pair: the torchvision wheels on
# the index are CUDA builds, which fail to import against a CPU-only torch wheel. The CUDA
# build of torch runs fine on a machine without a GPU.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PAIR := torch==2.15.0 torchvision==0.29.2

.PHONY: demo study test bench clean-venv

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PAIR)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "import torch, torchvision, torchdiffeq, ray, optuna, pyarrow; print('environment ok: torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

demo: $(VENV)/.installed       ## the main job: the digits study on this machine
	$(PY) -m nodekd_ray.study --dataset digits --out runs/digits-study

test: $(VENV)/.installed       ## the whole test suite
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed      ## performance ratios (see benchmarks/)
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_attack.py

clean-venv:
	rm -rf $(VENV)
