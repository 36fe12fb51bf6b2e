# Both entry points build their own virtual environment (.venv) from nothing.
# torch and torchvision are installed first as a matched pair: the torchvision wheels on
# the index are CUDA builds, which fail to import against a CPU-only torch wheel. The CUDA
# build of torch runs fine on a machine without a GPU.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PAIR := torch==2.15.0 torchvision==0.29.2

.PHONY: demo smoke audit study test bench clean-venv

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir $(TORCH_PAIR)
	$(PY) -m pip install -q --no-cache-dir -e '.[test]'
	$(PY) -c "import torch, torchvision, torchdiffeq, ray, optuna, pyarrow; print('environment ok: torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

# The main job: the attack audit on digits, cut to about 10 minutes on 2 CPU cores, on a local Ray
# instance: a ResNet20 teacher, NODE(1) with and without KD (T = 3), the paper's PGD and MI-FGSM
# and five audit attacks at eps 0, 4, 8, 16/255 on 50 test images, Parquet, Tables 1-3, Figure 1,
# audit.md and the verdicts. One seed, so the KD and horizon verdicts say "inconclusive"; `make audit`
# runs the 3-seed study. A rerun skips finished work (delete runs/demo-digits to start over).
DEMO_ARGS := --scale demo --seeds 1 --attack pgd mifgsm pgd-conv apgd-ce square transfer-teacher tol-1e-1
demo: $(VENV)/.installed       ## the main job: a 10-minute attack audit on digits, local Ray
	$(PY) sweeps/audit.py $(DEMO_ARGS) --storage runs/demo-digits --resume

# The paper's whole pipeline (Tables 1-3, Figure 1) with smoke settings: plumbing, not results.
DEMO_GRID := --dataset digits --smoke-test --teacher resnet20 resnet32 --T 3 10
smoke: $(VENV)/.installed      ## the paper's four sweeps at smoke scale (students near chance)
	$(PY) sweeps/paper.py $(DEMO_GRID) --storage runs/demo --resume

audit: $(VENV)/.installed      ## the digits study through the audit: 3 seeds, every audit attack (~55 min on 2 cores)
	$(PY) sweeps/audit.py --storage runs/digits-audit --resume

study: $(VENV)/.installed      ## the digits study without Ray (3 seeds, ~17 min)
	$(PY) -m nodekd_ray.study --dataset digits --out runs/digits-study

# The suite in two pytest-xdist workers (the Ray end-to-end tests leave about a quarter of 2 cores idle:
# process starts, Ray's own waits), slow tests first and handed out one at a time (--maxschedchunk 1:
# xdist's default first hand-out, a quarter of each worker's share in a row, gave every slow test to one
# worker); then, alone, the tests marked serial: Ray's simulated cluster ends with `ray stop --force`,
# which would kill the other worker's Ray instance. Both parts always run; the exit status is non-zero
# if either failed.
PYTEST_WORKERS ?= 2
test: $(VENV)/.installed       ## the whole test suite
	@rc=0; \
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --maxschedchunk 1 -m "not serial" --durations=15 tests || rc=$$?; \
	$(PY) -m pytest -q -m serial --durations=3 tests || rc=$$?; \
	exit $$rc

bench: $(VENV)/.installed      ## performance ratios (see benchmarks/)
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_attack.py
	$(PY) benchmarks/bench_object_store.py
	$(PY) benchmarks/bench_student.py --memory $$($(PY) -c "import torch; print('' if torch.cuda.is_available() else '--smoke')")

clean-venv:
	rm -rf $(VENV)
