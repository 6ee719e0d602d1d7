# seechat developer commands. `make demo` and `make test` create .venv when it is missing.
# TORCH_SPEC pins the torch/torchvision pair that lies on this machine's disk; elsewhere
# override it (e.g. `make test TORCH_SPEC=torch`) or leave pip to pick normal wheels.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench clean sync-resources

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC) -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) -m seechat.experiments.easyvqa

# Speed/memory benchmarks run on one thread each (the ratios are what they report); see README
# "Speed and memory". Each writes benchmarks/results/<name>.json.
bench: $(STAMP)
	$(PY) benchmarks/easyvqa.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/train_step.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/generate.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/feature_cache.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/packing.py
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) benchmarks/estimate.py

# The package ships copies of the adapter cards and base recipes (seechat/resources/); after
# editing adapters/*.yaml or recipes/*.yaml, copy them in (tests/test_wheel.py checks they match).
sync-resources:
	rm -f seechat/resources/adapters/*.yaml seechat/resources/recipes/*.yaml
	cp adapters/*.yaml seechat/resources/adapters/
	cp recipes/*.yaml seechat/resources/recipes/

clean:
	rm -rf runs .pytest_cache
