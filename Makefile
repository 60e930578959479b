# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv with python3 -m venv and pip when it is missing.
# VENV may name an existing environment (an absolute path); it is reused when its stamp
# matches this pyproject.toml, so a second checkout installs nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# content-addressed: the stamp names the pyproject.toml it was installed from
PYPROJECT_SHA := $(shell $(PYTHON) -c "import hashlib; print(hashlib.sha256(open('pyproject.toml', 'rb').read()).hexdigest()[:12])")
STAMP  := $(VENV)/.medvec-installed-$(PYPROJECT_SHA)
# the checkout you run from is the code that runs, even in a venv whose editable install points elsewhere
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_HOME ?= $(CURDIR)/.medvec/prefect
export MPLBACKEND ?= Agg

.PHONY: demo ui ui-check test lint unit fuzz quality latency robustness federated-eval privacy data-bench async-bench async-ablations bench load peers install dirs clean

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch/torchvision pinned to the builds on this disk; boto3 pinned so dvc-s3's aiobotocore resolves fast;
	# --no-compile: Python byte-compiles the modules it imports when first imported, not every file of every
	# package at install (2 min 3 s → 1 min 5 s here; the first import of the stack then takes 13 s more, once)
	$(PIP) install -q --no-compile torch==2.14.1 torchvision==0.29.1 boto3==1.43.117 -e '.[dev]'
	rm -f $(VENV)/.medvec-installed*
	touch $(STAMP)

install: $(STAMP)

# every folder a library needs, made before it needs it (Prefect creates only the leaf of PREFECT_HOME)
dirs:
	@mkdir -p .medvec "$(PREFECT_HOME)"

demo: $(STAMP) dirs
	$(VENV)/bin/medvec demo $(ARGS)

# the MLflow UI (http://127.0.0.1:5000) and the Prefect UI (http://127.0.0.1:4200) on the demo's stores, until Ctrl-C;
# the Prefect server requires an auth string (PREFECT_SERVER_API_AUTH_STRING, random unless set; printed, asked once)
ui: $(STAMP) dirs
	$(PY) scripts/ui.py serve

# headless-Chromium screenshots of the lineage pages into reports/ui/ (after make demo; Debian packages chromium and
# chromium-driver; Selenium is installed here, as flwr is for peers)
ui-check: $(STAMP) dirs
	$(PIP) install -q 'selenium>=4.20'
	$(PY) scripts/ui.py check

# ruff (style, imports, docstrings of the core) and mypy over medvec/, flows/, tasks/ and pipelines/ (pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

# two xdist workers, whole files each (tests/conftest.py gives each one torch thread and its own Prefect/MLflow files)
test: $(STAMP) dirs lint
	$(PY) -m pytest -n 2 --dist loadfile --durations=25 $(PYTEST_ARGS)

unit: $(STAMP) dirs
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

fuzz: $(STAMP) dirs
	MEDVEC_FUZZ_EXAMPLES=$${MEDVEC_FUZZ_EXAMPLES:-5000} $(PY) -m pytest tests/test_intake.py -k fuzzed $(PYTEST_ARGS)

quality: $(STAMP) dirs
	$(PY) benchmarks/quality.py $(ARGS)

latency: $(STAMP) dirs
	$(PY) benchmarks/landing_latency.py $(ARGS)

# performance against same-run baselines (docs/performance.md; about 15 min on 2 cores); each script also runs alone.
# benchmarks/load.py (100 hospitals on real servers) is `make load`.
bench: $(STAMP) dirs
	$(PY) benchmarks/merge_bandwidth.py
	$(PY) benchmarks/finetune_throughput.py
	$(PY) benchmarks/vector_size.py
	$(PY) benchmarks/end_to_end.py
	$(PY) benchmarks/landing_latency.py

# 100, 200 and 400 hospitals landing signed vectors within a minute on a real Prefect server, SeaweedFS and the
# coordinator's worker (about 15 min)
load: $(STAMP) dirs
	$(PY) benchmarks/load.py --hospitals 100 200 400 $(ARGS)

robustness: $(STAMP) dirs
	$(PY) benchmarks/robustness.py $(ARGS)

# central selection (coordinator.eval_data) against the hospitals' answers (evaluate.where: hospitals), 3 seeds
federated-eval: $(STAMP) dirs
	$(PY) benchmarks/federated_eval.py $(ARGS)

# the demo on PNG and DICOM manifests vs the .npz, and a multi-label and a 4-class task over 3 seeds (about 50 min)
data-bench: $(STAMP) dirs
	$(PY) benchmarks/data_tasks.py $(ARGS)

# DP-SGD at the hospitals: test AUC and a membership-inference attack against ε (about 30 min on 2 cores)
privacy: $(STAMP) dirs
	$(PY) benchmarks/privacy_tradeoff.py $(ARGS)

# Flower, for benchmarks/async_vs_sync.py only: flwr pins an older fastapi than prefect, so prefect's is put back
# (the benchmark uses flwr's numpy FedAvg aggregation, not its server)
peers: $(STAMP)
	$(PIP) install -q 'flwr>=1.20'
	$(PIP) install -q 'fastapi>=0.139,<0.151'

# resumable: each (seed, protocol, regime) is kept in benchmarks/results/async_runs/ and skipped when rerun
async-bench: peers dirs
	$(PY) benchmarks/async_vs_sync.py $(ARGS)

# every asynchronous protocol at equal compute, 32 px, 3 seeds: what chose refine's defaults
async-ablations: peers dirs
	$(PY) benchmarks/async_vs_sync.py --ablations --seeds 0 1 2 -S model.image_size=32 $(ARGS)

clean:
	rm -rf .medvec reports/demo .pytest_cache
