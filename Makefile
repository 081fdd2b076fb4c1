# Two commands do all the set-up: `make demo` and `make test` create .venv on first use.
PY := .venv/bin/python
TORCH := torch==2.13.0

.PHONY: test test-slow demo clean

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q $(TORCH)
	# llama-cpp-python is an sdist: this step compiles llama.cpp (about 7 minutes on 2 cores).
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: .venv/.installed
	$(PY) -m pytest -q

test-slow: .venv/.installed
	$(PY) -m pytest -q -m slow

# The main job on the embedded demo model (trained on first use, then cached): scan, align at 12, truncate, export
# for the Jetson Orin Nano profile, the safety gate on every artifact, benchmarks, report. Rerunning reuses stages.
demo: .venv/.installed
	.venv/bin/edgekit build --exit-layer 12 --target jetson -o out/demo-build

clean:
	rm -rf .venv out
