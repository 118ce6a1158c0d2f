# The two commands: `make run` (set up, then the whole pipeline) and `make test` (set up, then the tests).
# While editing: `make test-fast` (the tests not marked slow).
VENV   ?= .venv
PY     := $(VENV)/bin/python
export DVC_NO_ANALYTICS := 1
export BENTOML_DO_NOT_TRACK := true
export PYTHONUNBUFFERED := 1

.PHONY: run test test-fast lint ui serve bento image benchmark test-tools checkov clean-env cluster-build cluster

# The venv is rebuilt when the dependencies change; constraints.txt pins the versions seen working together
# (torch 2.13.0: the CPU build where pip's find-links offer one, else PyPI's CUDA build, which runs on CPUs too:
# docs/stack.md). uv installs in ~20 s where pip takes ~3 min: it is used when on the
# PATH or installable into the venv, else pip. uv does not read pip's configuration, so pip's find-links
# (where a machine may keep a CPU build of torch) are handed to it.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	@UV=$$(command -v uv || { $(PY) -m pip install -q --disable-pip-version-check uv >/dev/null 2>&1 && echo $(VENV)/bin/uv; }); \
	LINKS=$$($(PY) -m pip config get global.find-links 2>/dev/null | tr ' ' '\n' | sed -n 's/^\(.\)/--find-links \1/p'); \
	if [ -n "$$UV" ]; then \
	  echo "installing with uv ($$UV)"; \
	  $$UV pip install --python $(PY) -q $$LINKS -c constraints.txt -e '.[dev]'; \
	else \
	  echo "uv unavailable: installing with pip (a few minutes)"; \
	  $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0 && \
	  $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'; \
	fi
	$(PY) -c "import torch; print('torch', torch.__version__)"
	touch $@

run: $(VENV)/.installed  ## the main job: every pipeline stage that is out of date
	. $(VENV)/bin/activate && dvc repro

# Besides Python, the tests need kubectl >= 1.27 (its built-in kustomize v5 renders k8s/); for the container
# test podman, buildah, debootstrap and runc; a PostgreSQL server (the shared Optuna study and the MLflow
# server's store), Chromium (the MLflow UI check), an image registry (docker-registry: deploy pins the
# digest it reports) and promtool (Debian's prometheus: the PrometheusRule and canary queries). As root on Debian these are installed here (about 90 s); otherwise this says what to
# install. Debian's kubectl (kubernetes-client) is 1.20, too old for the kustomizations: install kubectl from
# Kubernetes' own packages.
CONTAINER_TOOLS := podman buildah debootstrap runc
test-tools:
	@command -v kubectl >/dev/null || echo "kubectl not found: tests/test_k8s.py needs kubectl >= 1.27 (https://kubernetes.io/docs/tasks/tools/)"
	@missing=""; for tool in $(CONTAINER_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing="$$missing postgresql"; \
	command -v chromium >/dev/null || command -v google-chrome >/dev/null || missing="$$missing chromium"; \
	command -v docker-registry >/dev/null || missing="$$missing docker-registry"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (Debian packages, for the container, PostgreSQL, registry, UI and rule tests)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing uidmap >/dev/null; \
	  else \
	    echo "missing:$$missing. The container, PostgreSQL, registry, UI and rule tests need them: sudo apt-get install$$missing uidmap"; \
	  fi; \
	fi

# checkov scans the rendered manifests (tests/test_k8s_scan.py, offline) from a venv of its own: its pins
# (packaging<24, networkx<2.7, cachetools<6, importlib-metadata<8) clash with the project's. The version is
# pinned and a new pin reinstalls it: about 8 s with uv (the main venv's when none is on the PATH), under a
# minute with pip.
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV    := .venv-tools/checkov
$(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION):
	rm -rf $(CHECKOV_VENV) && python3 -m venv $(CHECKOV_VENV)
	@UV=$$(command -v uv || { test -x $(VENV)/bin/uv && echo $(VENV)/bin/uv; }); \
	if [ -n "$$UV" ]; then \
	  $$UV pip install --python $(CHECKOV_VENV)/bin/python -q checkov==$(CHECKOV_VERSION); \
	else \
	  $(CHECKOV_VENV)/bin/pip install -q --disable-pip-version-check checkov==$(CHECKOV_VERSION); \
	fi
	touch $@

checkov: $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)

# The control plane the cluster tests run (tests/cluster): upstream's kube-apiserver, controller-manager, scheduler,
# etcd, kwok, Argo Rollouts and prometheus-operator built from their Go modules at the versions
# tests/cluster/*/go.mod pin (Go >= 1.26 and the Go module proxy). Cached under ~/.cache/distilops/cluster, keyed by
# those pins: about 16 min cold on 2 cores, nothing once built.
cluster-build:
	@bash tests/cluster/build.sh >/dev/null

cluster: $(VENV)/.installed cluster-build  ## a real control plane on 127.0.0.1 (prints the KUBECONFIG line), to try `distilops deploy --apply` by hand
	. $(VENV)/bin/activate && python tests/cluster/controlplane.py

test: $(VENV)/.installed test-tools checkov cluster-build  ## the whole test suite (what CI runs: about 45 min on 2 cores)
	. $(VENV)/bin/activate && pytest

# The inner loop: everything but the tests marked slow (real services, real `dvc repro`, containers): it
# needs kubectl (manifests) but no PostgreSQL, Chromium or podman. About 6 min on 2 cores; `make test` before a push.
test-fast: $(VENV)/.installed
	. $(VENV)/bin/activate && pytest -m "not slow" -q

lint: $(VENV)/.installed
	. $(VENV)/bin/activate && ruff check src stages tests benchmarks

ui: $(VENV)/.installed  ## MLflow UI on the local store: http://127.0.0.1:5000
	@echo "runs: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (MLflow 3 opens on GenAI otherwise)"
	. $(VENV)/bin/activate && mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

serve: $(VENV)/.installed  ## package the production version and serve it on http://127.0.0.1:3000
	. $(VENV)/bin/activate && distilops serve --port 3000

bento: $(VENV)/.installed  ## package the production version and build the Bento alone
	. $(VENV)/bin/activate && DISTILOPS_BENTO_MODEL=$$(distilops package) bentoml build -f bentofile.yaml src

DEVICE ?= cpu
image: $(VENV)/.installed test-tools  ## the production version's serving image (DEVICE=cpu|gpu), built with buildah
	. $(VENV)/bin/activate && distilops image --device $(DEVICE)

benchmark: $(VENV)/.installed  ## serving throughput, BentoML vs a naive server (needs wrk and `make run`)
	. $(VENV)/bin/activate && python benchmarks/serving_benchmark.py

clean-env:
	rm -rf $(VENV) .venv-tools
