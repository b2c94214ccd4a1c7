# capvae: `make train` and `make test` set everything up from this repository.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.capvae-installed
WORKDIR ?= runs/default
SWEEP_WORKDIR ?= runs/capacity_sweep
EVAL_FLAGS ?=
# Extra flags for make train / make sweep, e.g. TRAIN_FLAGS=--config.num_steps=8000.
TRAIN_FLAGS ?=
# pytest-xdist workers for make test (the suite's time is mostly single-threaded
# XLA compiles); TEST_WORKERS=auto takes one per core, TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2

.PHONY: install train sweep report compare tensorboard answer bench bench-step bench-device test clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev,trackers]'
	touch $(STAMP)

## install: a local virtual environment in .venv with capvae and its pinned dependencies.
install: $(STAMP)

## train: the default experiment (configs/default.py), offline; resumes if $(WORKDIR) holds it.
train: install
	$(BIN)/capvae train --config configs/default.py --workdir $(WORKDIR) $(TRAIN_FLAGS)
	$(BIN)/python experiments/summarize_run.py $(WORKDIR)

## sweep: the AnnealedVAE grid (configs/capacity_sweep.py, 12 members in one program), offline.
sweep: install
	$(BIN)/capvae train --config configs/capacity_sweep.py --workdir $(SWEEP_WORKDIR) $(TRAIN_FLAGS)
	$(BIN)/python experiments/summarize_run.py $(SWEEP_WORKDIR)

## report: evaluate every member of $(WORKDIR) (eval.json) and write $(WORKDIR)/report/index.html.
## For the sweep: make report WORKDIR=runs/capacity_sweep. EVAL_FLAGS passes e.g. --eval_scale=0.1.
report: install
	$(BIN)/capvae report --workdir $(WORKDIR) $(EVAL_FLAGS)

## compare: every member of every workdir under runs/ in one table: runs/compare/results.{csv,html}.
compare: install
	$(BIN)/capvae compare runs/ --out runs/compare

## tensorboard: serve every run under runs/ (scalars, images, hparams) at http://localhost:6006.
tensorboard: install
	$(BIN)/tensorboard --logdir runs/

## answer: every experiment behind docs/question.md (experiments/question/), offline;
## figures and numbers go to docs/figures/question, runs to runs/question (resumed if there).
answer: install
	$(BIN)/python experiments/question/answer.py --workdir runs/question --out docs/figures/question

## bench: sweep throughput for M = 1, 4, 16, 64 members against the single-member program.
bench: install
	$(BIN)/python experiments/bench_sweep.py --members 1,4,16,64

## bench-device: the device check on whatever accelerator JAX sees (experiments/bench_device.py):
## conv_impl {matmul, xla} × member_loop {vmap, map} × members {1, 16, 64}, in under 5 minutes.
bench-device: install
	$(BIN)/python experiments/bench_device.py

## bench-step: the train step of each model against the matmul rate and, when installed
## (pip install torch==2.13.0, or .[bench]), against the same step in PyTorch eager.
bench-step: install
	$(BIN)/python experiments/bench_train_step.py --loop_steps 200 --split_rounds 4

## test: the test suite, on $(TEST_WORKERS) pytest-xdist workers.
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

clean:
	rm -rf runs .pytest_cache
