# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv with python3 -m venv and pip when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.medvec-installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_HOME ?= $(CURDIR)/.medvec/prefect
export MPLBACKEND ?= Agg

.PHONY: demo test unit fuzz quality latency robustness install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch/torchvision pinned to the builds on this disk; boto3 pinned so dvc-s3's aiobotocore resolves fast
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1 boto3==1.43.117 -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medvec demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

fuzz: $(STAMP)
	MEDVEC_FUZZ_EXAMPLES=$${MEDVEC_FUZZ_EXAMPLES:-5000} $(PY) -m pytest tests/test_intake.py -k fuzzed $(PYTEST_ARGS)

quality: $(STAMP)
	$(PY) benchmarks/quality.py $(ARGS)

latency: $(STAMP)
	$(PY) benchmarks/landing_latency.py $(ARGS)

robustness: $(STAMP)
	$(PY) benchmarks/robustness.py $(ARGS)

clean:
	rm -rf .medvec reports/demo .pytest_cache
