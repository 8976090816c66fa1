# The two commands from a fresh machine (see README): `make demo` and `make test`.
.PHONY: setup demo test bench-speed bench-quality

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/dfcompress demo

test: setup
	.venv/bin/python -m pytest -q

bench-speed: setup
	.venv/bin/python bench/speed.py

bench-quality: setup
	.venv/bin/python bench/quality.py --budget small
