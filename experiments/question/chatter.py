r"""Chatter: how much the batch KL wanders around C once C has stopped rising.

  python experiments/question/chatter.py --workdir runs/question --out docs/figures/question

``abs`` and ``squared`` penalties (one sweep each), gamma 1000, Adam's
learning rate in ``LEARNING_RATES``: C rises to ``C_MAX`` nats over
``ANNEAL`` steps, then is held; every step is logged, and the spread of
KL − C over the last ``WINDOW`` steps is measured. With the absolute value the
gradient's sign flips with the sign of a noisy batch KL − C, and Adam's step
size sets how far each flip moves it. Writes ``chatter.png`` and
``chatter.json``.
"""

from __future__ import annotations

import os

from absl import app
import matplotlib.pyplot as plt
import numpy as np

import common

NAME = 'chatter'
PENALTIES = ('abs', 'squared')
LEARNING_RATES = (1e-4, 3e-4, 1e-3)
C_MAX, ANNEAL, STEPS, WINDOW = 5.0, 400, 700, 250


def configs(quick: bool):
  return {p: common.base_config(quick, STEPS, log_every=1, capacity_penalty=p, c_max=C_MAX,
                                c_anneal_steps=ANNEAL,
                                sweep=dict(product=dict(learning_rate=list(LEARNING_RATES))))
          for p in PENALTIES}


def run(root: str, out: str, quick: bool = False):
  runs = configs(quick)
  seconds = common.train_runs(runs, root)
  steps = runs['abs'].num_steps
  window = min(WINDOW, steps // 2)
  numbers = {'c_max': C_MAX, 'anneal': runs['abs'].c_anneal_steps, 'steps': steps,
             'window': window, 'seconds': seconds, 'members': []}
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.3))
  for j, penalty in enumerate(PENALTIES):
    workdir = os.path.join(root, penalty)
    log, rows = common.logs(workdir), common.members(workdir)
    for m, row in enumerate(rows):
      tail = [r for r in log[m] if r['step'] >= steps - window]
      d = np.asarray([r['kl_minus_c'] for r in tail])
      numbers['members'].append({
          'penalty': penalty, 'learning_rate': row['learning_rate'],
          'kl_minus_c_mean': float(d.mean()), 'kl_minus_c_sd': float(d.std()),
          'kl_minus_c_abs_max': float(np.abs(d).max()),
          'step_to_step_sd': float(np.diff(d).std()) if d.size > 1 else 0.0,
          'rec_end': float(np.mean([r['rec'] for r in tail]))})
      if j == 0 or row['learning_rate'] == max(LEARNING_RATES):
        ax.plot([r['step'] for r in tail], d, color=f'C{m}', lw=0.7,
                ls='-' if penalty == 'abs' else ':',
                label=f'{penalty}, lr {row["learning_rate"]:g}')
  for j, penalty in enumerate(PENALTIES):
    mine = [m for m in numbers['members'] if m['penalty'] == penalty]
    bx.plot([m['learning_rate'] for m in mine], [m['kl_minus_c_sd'] for m in mine], 'o-',
            label=f'{penalty}: sd of KL − C')
  ax.axhline(0, color='k', lw=0.6)
  ax.set_xlabel('training step (C held)')
  ax.set_ylabel('batch KL − C (nats)')
  ax.set_title(f'The last {window} steps, every step logged', fontsize=10)
  ax.legend(fontsize=7)
  bx.set_xscale('log')
  bx.set_yscale('log')
  bx.set_xlabel("Adam's learning rate")
  bx.set_ylabel(f'sd of batch KL − C over {window} steps (nats)')
  bx.legend(fontsize=8)
  bx.grid(alpha=0.3, which='both')
  fig.tight_layout()
  common.write(out, NAME, {'chatter': fig}, numbers)
  for m in numbers['members']:
    print(f"{m['penalty']:>8} lr {m['learning_rate']:g}: KL − C {m['kl_minus_c_mean']:+.3f}"
          f" ± {m['kl_minus_c_sd']:.3f} (max |.| {m['kl_minus_c_abs_max']:.2f}),"
          f" rec {m['rec_end']:.1f}")
  return numbers


if __name__ == '__main__':
  app.run(common.main_of(NAME, run))
