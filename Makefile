# Set-up and the two everyday commands. `make demo` and `make test` create
# .venv on first use and install everything the project needs into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch lies on this machine's disk; on a CUDA machine pass
# TORCH_SPEC=torch (PyPI's build, a CUDA one on Linux) or another requirement.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

demo: venv
	$(VENV)/bin/ldvae demo --out ldvae_demo --overwrite

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) ldvae_demo .pytest_cache
