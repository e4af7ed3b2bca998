# The two set-up commands of the README: `make run` (the main job) and `make test` (the whole suite).
# Both create or refresh the virtualenv in .venv first.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROMPT ?= Once upon a time

.PHONY: run test venv
venv: $(STAMP)

# torch==2.13.0 first: it is the CPU build on this machine's local disk; a bare `torch` requirement
# resolved by pip alone could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/baton generate "$(PROMPT)"

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
