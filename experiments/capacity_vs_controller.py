r"""One capacity schedule held by gamma·|KL − C| and by a PI controller.

  python experiments/capacity_vs_controller.py \
      --root runs/capacity_vs_controller --out docs/figures/controller

Trains (or resumes) the two sweeps of ``configs/capacity_vs_controller.py``,
``capacity`` (gamma 100 and 1000) and ``controller`` (the controller's
integral gains), in ``ROOT/capacity`` and ``ROOT/controller``, evaluates both
(``--eval_scale`` of disentanglement_lib's sample sizes; an ``eval.json`` of
the last step at that scale is reused) and writes

* ``tracking.png``: the batch KL against C(t), the tracking error |KL − C|,
  the reconstruction and the controller's beta(t), every member;
* ``summary.json``: per member, the tracking error once C ≥ 1 nat and from
  40 % of the run on (mean and largest over logged steps), the reconstruction over the last 10 % of steps,
  and the held-out reconstruction, KL and disentanglement metrics at the end;

and prints the summary as a markdown table.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from capvae import backend, config_lib, evaluate, train
from capvae import workdir as workdir_lib

FLAGS = flags.FLAGS
flags.DEFINE_string('root', 'runs/capacity_vs_controller', 'Folder of the two workdirs.')
flags.DEFINE_string('out', 'docs/figures/controller', 'Folder of the figure and summary.')
flags.DEFINE_float('eval_scale', 0.1, "Sample sizes, a fraction of disentanglement_lib's.")
flags.DEFINE_integer('num_steps', 0, 'Train this many steps instead of the config\'s (0: its).')

WAYS = ('capacity', 'controller')
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'configs', 'capacity_vs_controller.py')


def label(way: str, row: dict) -> str:
  if way == 'capacity':
    return f'gamma·|KL − C|, gamma {row["gamma"]:g}'
  return f'controller, ki {row["ki"]:g}, beta ≥ {row["beta_min"]:g}'


def read_log(workdir: str) -> dict[int, list[dict]]:
  """Each member's logged rows, in step order."""
  rows: dict[int, list[dict]] = {}
  with open(os.path.join(workdir, workdir_lib.METRICS_FILE)) as f:
    for line in f:
      r = json.loads(line)
      rows.setdefault(r['member'], []).append(r)
  return {m: sorted(rs, key=lambda r: r['step']) for m, rs in rows.items()}


def summarize(way: str, rows: list[dict], record: dict | None) -> dict:
  """One member's tracking error, reconstruction and end-of-run scores."""
  steps = np.array([r['step'] for r in rows])
  kl = np.array([r['kl'] for r in rows], float)
  c = np.array([r['c'] for r in rows], float)
  rec = np.array([r['rec'] for r in rows], float)
  on = c >= 1.0
  tail = steps >= 0.9 * steps.max()
  out = {'way': way, 'label': label(way, rows[0]), 'member': rows[0]['member'],
         'mean_abs_kl_minus_c': float(np.mean(np.abs(kl - c)[on])),
         'max_abs_kl_minus_c': float(np.max(np.abs(kl - c)[on])),
         # From 40 % of the run on (step 1,000 of 2,500): once the latents are open.
         'mean_abs_kl_minus_c_late': float(np.mean(np.abs(kl - c)[steps >= 0.4 * steps.max()])),
         'max_abs_kl_minus_c_late': float(np.max(np.abs(kl - c)[steps >= 0.4 * steps.max()])),
         'rec_last_10pct': float(np.mean(rec[tail])),
         'kl_last_10pct': float(np.mean(kl[tail])),
         'c_end': float(c[-1])}
  if way == 'controller':
    beta = np.array([r['beta_t'] for r in rows], float)
    out['beta_last_10pct'] = float(np.mean(beta[tail]))
  if record is not None:
    out.update({'heldout_rec': record['rec'], 'heldout_kl': record['kl'],
                'active_latents': record['active_latents'],
                **{k: record['metrics'][k] for k in record['metrics']}})
  return out


def plot(logs: dict[str, dict[int, list[dict]]], path: str) -> None:
  fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
  axes = axes.flat
  colours = {'capacity': ['tab:blue', 'tab:cyan'],
             'controller': ['tab:red', 'tab:orange', 'tab:brown', 'tab:pink']}
  for way, members in logs.items():
    for i, (m, rows) in enumerate(sorted(members.items())):
      colour = colours[way][i % len(colours[way])]
      steps = np.array([r['step'] for r in rows])
      kl = np.array([r['kl'] for r in rows], float)
      c = np.array([r['c'] for r in rows], float)
      name = label(way, rows[0])
      axes[0].plot(steps, kl, color=colour, lw=1, label=name)
      axes[1].semilogy(steps, np.maximum(np.abs(kl - c), 1e-4), color=colour, lw=1)
      axes[2].plot(steps, [r['rec'] for r in rows], color=colour, lw=1)
      if way == 'controller':
        axes[3].plot(steps, [r['beta_t'] for r in rows], color=colour, lw=1, label=name)
  first = next(iter(next(iter(logs.values())).values()))
  axes[0].plot([r['step'] for r in first], [r['c'] for r in first], 'k--', lw=1, label='C(t)')
  c_max = max(r['c'] for r in first)
  axes[0].set(title='batch KL and C (nats; spikes beyond the frame clipped)', xlabel='step',
              ylim=(0, 2.5 * c_max))
  axes[1].set(title='|KL − C| (nats)', xlabel='step')
  axes[2].set(title='batch reconstruction (nats)', xlabel='step', ylim=(0, 600))
  axes[3].set_yscale('symlog', linthresh=1.0)
  axes[3].set(title='controller beta(t) (symlog)', xlabel='step')
  axes[0].legend(fontsize=7)
  axes[3].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  backend.keep_freed_memory()
  module = config_lib.sibling(CONFIG, 'capacity_vs_controller')
  os.makedirs(FLAGS.out, exist_ok=True)
  logs, results = {}, {}
  for way in WAYS:
    workdir = os.path.join(FLAGS.root, way)
    config = module.get_config(way)
    if FLAGS.num_steps:
      config.num_steps = FLAGS.num_steps
    t0 = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    logging.info('%s: trained in %.0f s', way, time.perf_counter() - t0)
    t0 = time.perf_counter()
    result = evaluate.load(workdir)  # reused when it is of the last step
    if (result is None or result['step'] != config.num_steps
        or result['settings']['scale'] != FLAGS.eval_scale):
      result = evaluate.evaluate(workdir, scale=FLAGS.eval_scale)
      logging.info('%s: evaluated in %.0f s', way, time.perf_counter() - t0)
    results[way] = result
    logs[way] = read_log(workdir)
  plot(logs, os.path.join(FLAGS.out, 'tracking.png'))
  summary = []
  for way in WAYS:
    records = {r['member']: r for r in results[way]['members']}
    for m, rows in sorted(logs[way].items()):
      summary.append(summarize(way, rows, records.get(m)))
  workdir_lib.write_json(os.path.join(FLAGS.out, 'summary.json'), summary)
  cols = ['mean_abs_kl_minus_c', 'max_abs_kl_minus_c', 'mean_abs_kl_minus_c_late',
          'max_abs_kl_minus_c_late', 'rec_last_10pct', 'heldout_rec',
          'heldout_kl', 'active_latents', 'beta_vae', 'factor_vae', 'mig', 'dci_disentanglement']
  print('| way | ' + ' | '.join(cols) + ' |')
  print('|' + ' --- |' * (len(cols) + 1))
  for s in summary:
    cells = []
    for k in cols:
      v = s.get(k)
      cells.append('–' if v is None else (f'{v:.3f}' if isinstance(v, float) else str(v)))
    print(f'| {s["label"]} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  app.run(main)
