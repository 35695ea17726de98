# The README's commands. Each sets up .venv/ first (a no-op once done).
PY := .venv/bin/python

.PHONY: setup test demo bench

setup:
	bash tools/setup_env.sh

test: setup
	$(PY) -m pytest tests

demo: setup
	bash tools/demo.sh

bench: setup
	$(PY) tools/benchmark/benchmark_aik_conv.py
