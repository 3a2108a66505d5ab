# The two setup commands a newcomer needs: `make demo` and `make test`. `make teacher` remakes the teacher
# shipped for the built-in data (pipeline/builtin_teacher/) with its recorded command.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch/torchvision builds that lie on this machine's disk; PyPI's plain torchvision does not match the CPU torch.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test teacher

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)

demo: $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(BIN)/mimic demo

test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/python -m pytest -q

teacher: $(BIN)/python
	$(BIN)/pip install --quiet -e .
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m mimicdet.pipeline.builtin_teacher runs/builtin-teacher
