# The two commands: `make demo` (train + evaluate on the embedded demo data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DATA ?= demo_data
DEMO_RUNS ?= runs
LOSSES ?= softmax sigmoid filip
# Held-out test captions `make demo` searches for at the end, in one `jaxret search`
# (runs/search-1.png, -2, -3).
DEMO_QUERIES := "a white coat above a green shirt" "a yellow ankle boot to the left of a magenta sandal" "a white sandal above and to the left of a white sneaker"
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test demo-data fashion-mnist clean

$(VENV)/.demo: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[demo]'
	touch $@

$(VENV)/.test: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps open-clip-torch
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
	@rm -rf $(DEMO_RUNS)/demo-softmax-test-store
	@$(BIN)/jaxret embed --model $(DEMO_RUNS)/demo-softmax --data $(DEMO_DATA) --split test \
	  --out $(DEMO_RUNS)/demo-softmax-test-store --no-progress
	@$(BIN)/jaxret search --index $(DEMO_RUNS)/demo-softmax-test-store --k 8 $(DEMO_QUERIES) \
	  --show $(DEMO_RUNS)/search.png

test: $(VENV)/.test fashion-mnist
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

clean:
	rm -rf $(VENV) $(DEMO_DATA) $(DEMO_RUNS)
