# The two commands: `make demo` (train + evaluate on the embedded demo data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DATA ?= demo_data
DEMO_RUNS ?= runs
LOSSES ?= softmax sigmoid filip
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test demo-data fashion-mnist clean

$(VENV)/.demo: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[demo]'
	touch $@

$(VENV)/.test: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# Real images for the demo: Debian's dataset-fashion-mnist (MIT). Without root or apt, the
# builder falls back to scikit-learn's bundled digits and says so.
fashion-mnist:
	@if [ ! -d $(FMNIST) ]; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  if command -v apt-get >/dev/null && { [ -z "$$SUDO" ] || sudo -n true 2>/dev/null; }; then \
	    $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
	    echo "could not install dataset-fashion-mnist; the demo will use scikit-learn digits"; \
	  else echo "no root/apt-get: the demo will use scikit-learn digits"; fi; \
	fi

demo-data: $(VENV)/.demo fashion-mnist
	$(BIN)/jaxret data demo --out $(DEMO_DATA)

demo: demo-data
	@for loss in $(LOSSES); do \
	  $(BIN)/jaxret train --config configs/demo.py:$$loss --workdir $(DEMO_RUNS)/demo-$$loss \
	    --config.data.dir=$(DEMO_DATA) || exit 1; \
	done
	@$(BIN)/python -m jaxret.eval.compare $(addprefix $(DEMO_RUNS)/demo-,$(LOSSES))

test: $(VENV)/.test fashion-mnist
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) $(DEMO_DATA) $(DEMO_RUNS)
