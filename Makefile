# make test   install what is missing, build (CPU + CUDA kernels when a toolkit exists), run the suite
# make bench  install what is missing, build, run the quick benchmark + correctness table
# make dev    fast CPU-only build (FUSENORM_CUDA=0)
PY ?= python3
export PYTHONPATH := $(CURDIR)/python

.PHONY: deps build dev test bench clean

deps:
	@$(PY) -c "import torch, ninja, pytest, numpy" 2>/dev/null || \
		$(PY) -m pip install --quiet --disable-pip-version-check torch ninja pytest numpy

build: deps
	@echo "building fusenorm._C (FUSENORM_CUDA=$${FUSENORM_CUDA:-auto}, TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-auto})"
	@start=$$(date +%s); $(PY) setup.py -q build_ext --inplace > build.log 2>&1 || { tail -50 build.log; exit 1; }; \
		echo "build: $$(( $$(date +%s) - start )) s (log: build.log)"
	@$(PY) -c "import fusenorm; print('fusenorm: CUDA kernels compiled:', fusenorm.cuda_kernels_compiled(), '| CPU ISA:', fusenorm.cpu_isa())"

dev:
	FUSENORM_CUDA=0 $(MAKE) build

test: build
	@$(PY) -c "import onnx, onnxscript, onnxruntime" 2>/dev/null || \
		$(PY) -m pip install --quiet --disable-pip-version-check onnx onnxscript onnxruntime || \
		echo "onnx/onnxscript/onnxruntime unavailable: the ONNX export tests skip"
	$(PY) -m pytest -q tests

bench: build
	@$(PY) -c "import matplotlib" 2>/dev/null || \
		$(PY) -m pip install --quiet --disable-pip-version-check matplotlib || echo "matplotlib unavailable: no PNG chart"
	$(PY) -m benchmarks --quick

clean:
	rm -rf build python/fusenorm/_C*.so build.log
