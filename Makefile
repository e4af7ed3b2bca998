# The two set-up commands of the README: `make run` (the main job) and `make test` (the whole suite).
# Both create or refresh the virtualenv in .venv first.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROMPT ?= Once upon a time

.PHONY: run up test venv gpu-kit gpu-check
venv: $(STAMP)

# torch==2.13.0 first: it is the CPU build on this machine's local disk; a bare `torch` requirement
# resolved by pip alone could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	command -v etcd >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server)
	command -v kubectl >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y kubectl) \
		|| echo "kubectl could not be installed: tests/test_kubernetes.py will be skipped"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch $(STAMP)

# A local cluster (etcd, 1 prefill + 1 decode node, router), one request through it, then everything stops.
run: $(STAMP)
	@$(PY) -m baton.cluster.demo "$(PROMPT)"

up: $(STAMP)
	$(VENV)/bin/baton up

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# On a machine with network: what the GPU machine lacks, into .gpu-kit/ (git-ignored; carry it there).
gpu-kit:
	bash bench/gpu/make_kit.sh

# On the GPU machine (one CUDA GPU, no network, the repository plus .gpu-kit/): the whole GPU check, results
# as JSON and logs in bench/results/gpu-check/.
gpu-check:
	bash bench/gpu/check.sh bench/results/gpu-check
