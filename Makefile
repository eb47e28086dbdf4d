# The two entry points of the README. Both create .venv when missing and
# install the project (with its dev extra) into it first: uv, bootstrapped inside
# the venv with pip, installs from pip's own indexes (scripts/uv_install.py).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# no usage notices or analytics from Prefect, no update checks from DVC
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
# bytecode is written even where the environment turns it off: every process a target starts
# (DVC and its stages, Prefect, the CLI) then imports from .pyc (a stage's imports: 2.7 s, not 6.5 s)
unexport PYTHONDONTWRITEBYTECODE

.PHONY: run test install lint scenarios clean

$(STAMP): pyproject.toml
	@echo "[1/3] virtual environment $(VENV) ($(PYTHON))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "[2/3] uv (installer), with pip"
	@$(BIN)/python -m pip install --progress-bar on --upgrade pip uv
	@echo "[3/3] budgetalloc and its dependencies, with uv (under a minute here; pip alone takes about 3)"
	@$(BIN)/python scripts/uv_install.py -e '.[dev]'
	@touch $(STAMP)
	@echo "installed: source $(VENV)/bin/activate"

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m budgetalloc.stages.simulate
	$(BIN)/python -m flows.run
	$(BIN)/dvc status

# Two pytest-xdist workers, each test module whole on one of them (its module fixtures built
# once), the slowest modules first (tests/conftest.py).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

# every scenario (DVC experiment) with its budget and headline metrics only
scenarios: $(STAMP)
	@$(BIN)/dvc exp show --no-pager --md --precision 5 --drop '.*' \
	  --keep '^(Experiment|allocate\.budget|users|expected_spend|expected_response|aucc)$$'

lint: $(STAMP)
	$(BIN)/ruff check src tests flows benchmarks scripts
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV)
