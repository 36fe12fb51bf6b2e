# Both entry points build their own virtual environment (.venv) from nothing.
# torch and torchvision are installed first as a matched pair: the torchvision wheels on
# the index are CUDA builds, which fail to import against a CPU-only torch wheel. The CUDA
# build of torch runs fine on a machine without a GPU.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PAIR := torch==2.15.0 torchvision==0.29.2

.PHONY: demo audit study test bench clean-venv

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PAIR)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "import torch, torchvision, torchdiffeq, ray, optuna, pyarrow; print('environment ok: torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

# The whole pipeline on digits with smoke settings, on a local Ray instance: teachers, logits,
# students with and without KD, PGD and MI-FGSM sweeps, Parquet, Tables 1-3, Figure 1 and the
# audit report (which flags the smoke students that do not learn as degenerate).
# A rerun skips finished work (delete runs/demo to start over).
DEMO_GRID := --dataset digits --smoke-test --teachers resnet20 resnet32 --temperatures 3 10
demo: $(VENV)/.installed       ## the main job: the paper's pipeline on digits, local Ray
	$(PY) sweeps/paper.py $(DEMO_GRID) --storage runs/demo --resume

audit: $(VENV)/.installed      ## the attack audit on digits: 3 seeds at --scale digits (hours on 2 CPU cores)
	$(PY) sweeps/audit.py --storage runs/digits-audit --resume

study: $(VENV)/.installed      ## the digits study without Ray (3 seeds, ~17 min)
	$(PY) -m nodekd_ray.study --dataset digits --out runs/digits-study

test: $(VENV)/.installed       ## the whole test suite
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed      ## performance ratios (see benchmarks/)
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_attack.py
	$(PY) benchmarks/bench_object_store.py

clean-venv:
	rm -rf $(VENV)
