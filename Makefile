# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# On these machines torch must come as this pinned CPU build; where torch is already
# importable (Colab), the venv sees it through --system-site-packages and it is not reinstalled.
TORCH_PIN ?= torch==2.13.0
DEMO_WORKSPACE ?= ./training_output

.PHONY: install demo test test-browser lint format bench bench-quick bench-peers notebook-outputs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "torch is already installed: reusing it"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q --upgrade pip && \
		$(VENV)/bin/pip install -q "$(TORCH_PIN)"; \
	fi
	$(VENV)/bin/pip install -q -e '.[dev,hf,lightning,tensorboard,mlflow,examples]'
	$(PY) -m ipykernel install --prefix $(VENV) --name python3 --display-name "Python 3" >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m utils.training train --preset small --epochs 3 --workspace $(DEMO_WORKSPACE) --run-name demo
	$(PY) -m utils.training recover --checkpoint-dir $(DEMO_WORKSPACE)
	$(PY) -m utils.training verify $(DEMO_WORKSPACE)
	$(PY) -m utils.training dashboard --checkpoint-dir $(DEMO_WORKSPACE)
	$(PY) -m utils.training export --checkpoint-dir $(DEMO_WORKSPACE)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests --ignore=tests/browser
	tests/run_nbval.sh $(PY)

# training.ipynb in JupyterLab and Debian's Chromium, driven by Playwright (no browser download); screenshots
# in tests/browser/output/. Installs what it needs only when missing (apt as root on a clean machine).
BROWSER_STAMP := $(VENV)/.browser-installed
$(BROWSER_STAMP): $(STAMP)
	$(VENV)/bin/pip install -q -e '.[dev,browser]'
	touch $(BROWSER_STAMP)

test-browser: $(BROWSER_STAMP)
	@if [ ! -x /usr/lib/chromium/chromium ]; then \
		apt-get update -q && apt-get install -y -q chromium fonts-dejavu-core fonts-noto-color-emoji; \
	fi
	$(PY) -m pytest -q -p no:cacheprovider tests/browser

# Re-run the notebook (a real run in an empty folder, as `make test` checks it) and keep its outputs, after a cell's output changes on purpose.
notebook-outputs: $(STAMP)
	$(PY) tests/refresh_notebook_outputs.py training.ipynb

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP)
	$(PY) -m benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick --json

# The project beside HF Trainer, Lightning, torch.save and DCP on the same 252 MiB state (PEERS_ARGS=--state-mib 64
# for a faster run). Installs the pinned `peers` extra, keeping the torch already installed.
PEERS_ARGS ?=
bench-peers: $(STAMP)
	$(VENV)/bin/pip install -q -e '.[peers]' "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	$(PY) -m benchmarks.peers $(PEERS_ARGS)

clean:
	rm -rf $(VENV) training_output tmp_training_output .pytest_cache
