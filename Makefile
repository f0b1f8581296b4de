# The two set-up commands of the README: `make demo` and `make test`. Both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SYSTEM_LIBS := libusb-1.0-0 libgl1 libegl1 libgomp1

.PHONY: demo test bench system-deps clean

# open3d's wheel links against these shared libraries; a bare Debian/Ubuntu image lacks some of them.
system-deps:
	@missing=""; \
	for lib in libusb-1.0.so.0 libGL.so.1 libEGL.so.1 libgomp.so.1; do \
	  ldconfig -p | grep -q "$$lib" || missing="$$missing $$lib"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system libraries for open3d (missing:$$missing)"; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_LIBS); \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev,distributed]"
	touch $@

demo: system-deps $(VENV)/.installed
	$(BIN)/mano-jax demo --out demo_out

test: system-deps $(VENV)/.installed-dev
	$(BIN)/python -m pytest -p no:dash --nbmake tests notebooks

bench: system-deps $(VENV)/.installed-dev
	$(BIN)/python bench/forward.py
	$(BIN)/python bench/registration.py
	$(BIN)/python bench/keypoints.py
	$(BIN)/python bench/learning.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
