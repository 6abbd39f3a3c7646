# The two commands of the README. Each does its own set-up (scripts/setup.sh) first.
.PHONY: demo test setup

setup:
	@bash scripts/setup.sh

# The main job: generate the bundled sample and run ingest -> train -> predict on it.
demo: setup
	.venv/bin/unet demo --workdir demo

# The test suite. pytest exits 5 when a selection (-k/-m via PYTEST_ADDOPTS) collects nothing: not a failure.
test: setup
	@.venv/bin/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc
