"""What the experiments answering the seed question share (docs/question.md).

Every experiment trains what it needs as capvae sweeps (members that differ
only in traced hyperparameters train as one program), then reads the runs'
logs and checkpoints, and writes its figures (PNG) and a JSON of every number
it quotes. Each script's ``run(workdir, out, quick)`` does that; its command
line is

  python experiments/question/NAME.py --workdir runs/question --out docs/figures/question

``--quick`` trains a few steps of a small batch instead: what the test suite
runs so that no script rots (its numbers mean nothing). A workdir resumes like
any capvae run, so an interrupted experiment continues where it stopped.

The setting is ``configs/default.py``'s (the Burgess et al. 2018 conv model,
Bernoulli decoder, batch 64) with 1Konny/Beta-VAE's initialisation and Adam
learning rate (``init='kaiming'``, 5e-4; ``SETTING``), which leave the mean
image sooner than the default's (Flax's, 1e-4), and schedules shortened to fit
a 2-core CPU; each script says how.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from absl import flags
import jax
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,unused-import
import numpy as np

from capvae import backend, config_lib, evaluate, losses, train
from capvae import workdir as workdir_lib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

flags.DEFINE_string('workdir', 'runs/question', 'Where the experiments train (one folder'
                    ' per experiment; resumes if present).')
flags.DEFINE_string('out', None, 'Where figures and numbers go (default: the workdir).')
flags.DEFINE_bool('quick', False, 'A few steps of a small batch: checks the script runs.')
FLAGS = flags.FLAGS

# Every experiment's model and optimiser (docs/reproduction.md, §1).
SETTING = dict(init='kaiming', learning_rate=5e-4)
# Quick mode: configs/test.py's shapes, so the test suite's compilation cache is
# shared with the other tests.
QUICK = dict(latent_size=4, batch_size=8, learning_rate=5e-4)


def base_config(quick: bool, steps: int, *, log_every: int = 10, **fields):
  """``configs/default.py`` trained for ``steps`` steps (4 in quick mode),
  checkpointed once at the end, with ``fields`` set."""
  config = config_lib.sibling(os.path.join(ROOT, 'configs', 'default.py'),
                              'default').get_config()
  config.num_steps = steps
  config.log_every = log_every
  for k, v in SETTING.items():
    config[k] = v
  for k, v in fields.items():
    if k == 'sweep':
      for kind, axes in v.items():
        config.sweep[kind] = axes
    else:
      config[k] = v
  if quick:
    for k, v in QUICK.items():
      config[k] = v
    scale = 4 / steps
    config.num_steps = 4
    config.log_every = 1
    config.c_anneal_steps = max(1, int(round(config.c_anneal_steps * scale)))
    config.c_stair_steps = max(1, int(round(config.c_stair_steps * scale)))
    # One member per compiled step: experiments whose static choices agree
    # share it (and the test suite's compilation cache), whatever their sweeps.
    config.chunk_size = 1
  config.checkpoint_every = config.num_steps
  config.keep_checkpoints = 1
  return config


def train_runs(runs: dict[str, Any], root: str) -> dict[str, float]:
  """Trains each ``{name: config}`` into ``root/name``; seconds per run."""
  seconds = {}
  for name, config in runs.items():
    t0 = time.perf_counter()
    states = train.train_and_evaluate(config, os.path.join(root, name))
    seconds[name] = time.perf_counter() - t0
    reached = int(np.min(jax.device_get(states.step)))
    if reached < config.num_steps:  # SIGTERM / Ctrl-C: saved; stop here, not go on
      raise SystemExit(f'{name}: stopped at step {reached} of {config.num_steps};'
                       ' run the same command again to resume.')
  return seconds


def logs(workdir: str) -> dict[int, list[dict[str, Any]]]:
  """Every member's logged rows, by member id, in step order."""
  out: dict[int, list[dict[str, Any]]] = {}
  for row in workdir_lib.read_metrics(os.path.join(workdir, workdir_lib.METRICS_FILE)):
    out.setdefault(row['member'], []).append(row)
  return {m: sorted(rows, key=lambda r: r['step']) for m, rows in sorted(out.items())}


def series(rows, key: str) -> tuple[np.ndarray, np.ndarray]:
  return (np.asarray([r['step'] for r in rows]),
          np.asarray([r[key] for r in rows], np.float64))


def members(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, workdir_lib.MEMBERS_FILE)) as f:
    return json.load(f)


def codes(workdir: str, num_images: int, seed: int = 0):
  """``(rows, means, logvars)``: every member's posterior means and log
  variances ``[M, n, L]`` of ``num_images`` grid points drawn without
  replacement (all of them if ``num_images`` is 0), at the last checkpoint."""
  run = workdir_lib.Members(workdir)
  n = run.dataset.num_examples
  flat = (np.arange(n) if not num_images or num_images >= n else
          np.sort(np.random.default_rng(seed).choice(n, num_images, replace=False)))
  grid = evaluate.GridCodes(run.model, run.dataset, run.states.params, chunk=256)
  means, logvars = zip(*(grid.posteriors(m, flat) for m in range(run.num_members)))
  return run.rows, np.stack(means), np.stack(logvars)


def example_kl(means: np.ndarray, logvars: np.ndarray) -> np.ndarray:
  """Per-example total KL ``[..., n]`` from posterior means and log variances."""
  return np.asarray(jax.device_get(losses.gaussian_kl(means, logvars))).sum(-1)


def heldout(workdir: str, num_images: int):
  """Held-out per-latent KL ``[M, L]``, reconstruction ``[M]`` and the KL's
  spread / offset / variance split (``evaluate.heldout_stats``)."""
  run = workdir_lib.Members(workdir)
  kl, rec, _, parts, _ = evaluate.heldout_stats(run, num_images, seed=0)
  return run.rows, kl, rec, parts


def label(row: dict[str, Any], keys) -> str:
  return ', '.join(f'{k} {row[k]:g}' for k in keys)


def write(out: str, name: str, figures: dict[str, Any], numbers: dict[str, Any]) -> str:
  """Saves ``figures`` (``{file stem: matplotlib figure}``) and ``numbers`` as
  ``NAME.json`` in ``out``; returns the JSON's path."""
  os.makedirs(out, exist_ok=True)
  for stem, fig in figures.items():
    fig.savefig(os.path.join(out, f'{stem}.png'), dpi=100)
    plt.close(fig)
  path = os.path.join(out, f'{name}.json')
  with open(path, 'w') as f:
    json.dump(numbers, f, indent=1, default=_jsonable)
  return path


def _jsonable(v):
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  if isinstance(v, np.ndarray):
    return v.tolist()
  raise TypeError(type(v))


def main_of(name: str, run: Callable[[str, str, bool], dict[str, Any]]):
  """The ``main`` of an experiment script: runs it with the flags, prints the
  JSON's path and the time."""
  def main(argv):
    del argv
    backend.keep_freed_memory()
    t0 = time.perf_counter()
    root = os.path.join(FLAGS.workdir, name)
    numbers = run(root, FLAGS.out or root, FLAGS.quick)
    del numbers
    print(f'{name}: {time.perf_counter() - t0:.0f} s; numbers in'
          f' {os.path.join(FLAGS.out or root, name + ".json")}')
  return main
