r"""C raised per epoch, as a Keras callback does: a staircase against the per-step ramp.

  python experiments/question/staircase.py --workdir runs/question --out docs/figures/question

One sweep of the ``staircase`` schedule (``config.c_stair_steps`` is a traced
hyperparameter): C rises to ``C_MAX`` nats over ``ANNEAL`` steps, held for
1 (the per-step ``linear`` ramp, exactly), ``STAIRS[1]`` or ``STAIRS[2]``
steps at a time (an "epoch" of that many batches), gamma 1000, ``STEPS``
steps. At each stair KL − C jumps to minus the stair's height, and gamma's
pull closes it. Writes ``staircase.png`` and ``staircase.json``.

A capacity held in a Python float and changed by a callback never reaches a
compiled loss (it was a constant when the graph was traced); capvae's C is
``schedule(step)`` with the step an input of the compiled step, so it moves
inside one program (``tests/test_schedules.py``).
"""

from __future__ import annotations

import os

from absl import app
import matplotlib.pyplot as plt
import numpy as np

import common

NAME = 'staircase'
STAIRS = (1, 100, 250)
C_MAX, ANNEAL, STEPS = 5.0, 500, 700


def config(quick: bool):
  return common.base_config(quick, STEPS, log_every=2, schedule='staircase', c_max=C_MAX,
                            c_anneal_steps=ANNEAL,
                            sweep=dict(product=dict(c_stair_steps=list(STAIRS))))


def after_jumps(rows, stair: int, anneal: int, tol: float = 0.1):
  """For each rise of C: the most negative KL − C after it and the steps until
  |KL − C| is back under ``tol``."""
  out = []
  for start in range(stair, anneal + 1, stair):
    part = [r for r in rows if start <= r['step'] < start + stair]
    if not part:
      continue
    worst = min(r['kl_minus_c'] for r in part)
    back = next((r['step'] - start for r in part if abs(r['kl_minus_c']) < tol), None)
    out.append({'step': start, 'kl_minus_c_min': worst, 'steps_to_within_tol': back})
  return out


def run(root: str, out: str, quick: bool = False):
  cfg = config(quick)
  seconds = common.train_runs({'stairs': cfg}, root)
  workdir = os.path.join(root, 'stairs')
  log, rows = common.logs(workdir), common.members(workdir)
  numbers = {'c_max': C_MAX, 'anneal': cfg.c_anneal_steps, 'steps': cfg.num_steps,
             'seconds': seconds, 'members': []}
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.3))
  for m, row in enumerate(rows):
    stair = row['c_stair_steps']
    s, kl = common.series(log[m], 'kl')
    _, c = common.series(log[m], 'c')
    ax.plot(s, c, color=f'C{m}', lw=0.8, ls='--')
    ax.plot(s, kl, color=f'C{m}', lw=1, label=f'stairs of {stair} step{"s" * (stair > 1)}')
    _, d = common.series(log[m], 'kl_minus_c')
    bx.plot(s, d, color=f'C{m}', lw=1, label=f'stairs of {stair}')
    jumps = after_jumps(log[m], stair, row['c_anneal_steps']) if stair > 1 else []
    anneal_rows = [r for r in log[m] if 0 < r['step'] <= row['c_anneal_steps']]
    numbers['members'].append({
        'c_stair_steps': stair, 'jumps': jumps,
        'kl_minus_c_min_during_anneal': float(min(r['kl_minus_c'] for r in anneal_rows))
        if anneal_rows else float('nan'),
        'kl_minus_c_abs_mean_during_anneal': float(np.mean(
            [abs(r['kl_minus_c']) for r in anneal_rows])) if anneal_rows else float('nan'),
        'rec_end': float(np.mean([r['rec'] for r in log[m][-5:]]))})
  ax.set_xlabel('training step')
  ax.set_ylabel('batch KL (solid) and C (dashed), nats')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  bx.axhline(0, color='k', lw=0.6)
  bx.set_xlabel('training step')
  bx.set_ylabel('batch KL − C (nats)')
  bx.set_title('Each stair is a jump of C that gamma then closes', fontsize=10)
  bx.legend(fontsize=8)
  bx.grid(alpha=0.3)
  fig.tight_layout()
  common.write(out, NAME, {'staircase': fig}, numbers)
  for m in numbers['members']:
    back = [j['steps_to_within_tol'] for j in m['jumps'] if j['steps_to_within_tol'] is not None]
    print(f"stairs of {m['c_stair_steps']:>3}: min KL − C {m['kl_minus_c_min_during_anneal']:+.2f},"
          f" mean |KL − C| {m['kl_minus_c_abs_mean_during_anneal']:.3f} while C rises;"
          f" back within 0.1 nat after {back} steps; rec {m['rec_end']:.1f}")
  return numbers


if __name__ == '__main__':
  app.run(common.main_of(NAME, run))
