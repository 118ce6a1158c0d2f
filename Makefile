# The two commands: `make run` (set up, then the whole pipeline) and `make test` (set up, then the tests).
VENV   ?= .venv
PY     := $(VENV)/bin/python
export DVC_NO_ANALYTICS := 1
export BENTOML_DO_NOT_TRACK := true
export PYTHONUNBUFFERED := 1

.PHONY: run test lint ui serve bento benchmark clean-env

# The venv is rebuilt when the dependencies change. torch first: the CPU build (see ../shared/STACK.md);
# the rest is pinned by constraints.txt to the versions seen working together.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(PY) -c "import torch; print('torch', torch.__version__)"
	touch $@

run: $(VENV)/.installed  ## the main job: every pipeline stage that is out of date
	. $(VENV)/bin/activate && dvc repro

test: $(VENV)/.installed  ## the test suite
	. $(VENV)/bin/activate && pytest

lint: $(VENV)/.installed
	. $(VENV)/bin/activate && ruff check src stages tests benchmarks

ui: $(VENV)/.installed  ## MLflow UI on the local store: http://127.0.0.1:5000
	. $(VENV)/bin/activate && mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

serve: $(VENV)/.installed  ## package the production version and serve it on http://127.0.0.1:3000
	. $(VENV)/bin/activate && distilops serve --port 3000

bento: $(VENV)/.installed  ## package the production version and build the Bento (then: bentoml containerize)
	. $(VENV)/bin/activate && DISTILOPS_BENTO_MODEL=$$(distilops package) bentoml build -f bentofile.yaml src

benchmark: $(VENV)/.installed  ## serving throughput, BentoML vs a naive server (needs wrk and `make run`)
	. $(VENV)/bin/activate && python benchmarks/serving_benchmark.py

clean-env:
	rm -rf $(VENV)
