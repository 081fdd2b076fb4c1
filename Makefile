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

# Until the demo model and `edgekit build` land: a tiny LLaVA-1.5 checkpoint, inspected and cut at layer 12.
demo: .venv/.installed
	.venv/bin/edgekit tiny llava -o out/tiny-llava --overwrite
	.venv/bin/edgekit inspect out/tiny-llava --exit-layer 12
	.venv/bin/edgekit truncate out/tiny-llava --exit-layer 12 -o out/tiny-llava-exit12 --overwrite
	.venv/bin/edgekit inspect out/tiny-llava-exit12

clean:
	rm -rf .venv out
