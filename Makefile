# Two commands for a fresh machine (see README): `make demo` and `make test`.
# Both create or update .venv idempotently; re-running them only redoes what changed.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
STAMPS := .make-stamps
# PyTorch is only used to export the pretrained backbone and for reference checks. Pinned so pip takes
# the CPU wheel the build machines carry instead of a multi-GB CUDA build. The `eval` extra (anomalib's
# PatchCore floor) pins torchvision==0.28.0, the release for torch 2.13.0: change both together.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-fast venv venv-dev system-deps clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

$(STAMPS)/base: pyproject.toml | $(VENV)/bin/python
	@mkdir -p $(STAMPS)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[export,demo]"
	@touch $@

$(STAMPS)/dev: $(STAMPS)/base tools/ensure_llama_wheel.sh
	$(PIP) install -q -e ".[export,demo,dev,eval]"
	bash tools/ensure_llama_wheel.sh $(VENV)
	@touch $@

venv: $(STAMPS)/base
venv-dev: $(STAMPS)/dev

# Debian packages the real-part tests use (mosquitto broker, chromium to render the report).
# Installed when missing and we may; otherwise those tests skip and say why.
system-deps:
	@missing=""; command -v mosquitto >/dev/null 2>&1 || missing="$$missing mosquitto"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "note: install$$missing (apt) for the broker and report-render tests; they skip without"; fi; \
	fi

demo: venv
	$(VENV)/bin/edge-inspect demo --short

test: venv-dev system-deps
	$(VENV)/bin/python -m pytest -q

test-fast: venv-dev
	$(VENV)/bin/python -m pytest -q -m "not slow"

clean:
	rm -rf $(STAMPS) demo-run .pytest_cache
