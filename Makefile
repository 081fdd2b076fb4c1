# Two commands do all the set-up: `make demo` and `make test` create .venv on first use.
PY := .venv/bin/python
TORCH := torch==2.13.0
LLAMA_CPP_VERSION := 0.3.36
# llama.cpp built for AVX2 x86-64, not -march=native: its AMX kernels crash on K-quant models on CPUs that have AMX.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_WHEELS := $(HOME)/.cache/edgekit/wheels/avx2

.PHONY: test test-slow lint demo clean

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q $(TORCH)
	# llama-cpp-python is an sdist: building its wheel compiles llama.cpp (about 7 minutes on 2 cores), once per
	# machine; the wheel is kept in $(LLAMA_WHEELS).
	ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		$(PY) -m pip wheel -q --no-deps --no-cache-dir -w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(PY) -m pip install -q $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: .venv/.installed
	$(PY) -m pytest -q

test-slow: .venv/.installed
	$(PY) -m pytest -q -m slow

# Formatting and lint rules live in pyproject.toml ([tool.ruff]).
lint: .venv/.installed
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

# The main job on the embedded demo model (trained on first use, then cached): scan, align at 12, truncate, export
# for the Jetson Orin Nano profile, the safety gate on every artifact, benchmarks, report. Rerunning reuses stages.
demo: .venv/.installed
	.venv/bin/edgekit build --exit-layer 12 --target jetson -o out/demo-build

clean:
	rm -rf .venv out
