r"""Gamma too small, too large, and C rising too fast: the exact-penalty threshold.

  python experiments/question/gamma.py --workdir runs/question --out docs/figures/question

One sweep: gamma in ``GAMMAS`` × C raised to ``C_MAX`` nats over a slow and a
fast anneal (``ANNEALS`` steps), ``STEPS`` steps in all. ``gamma·|KL − C|``
holds KL at C only while gamma exceeds ``|d rec / d KL|`` there, what one more
nat of KL is worth to the reconstruction; below that the run is a beta-VAE
with beta = gamma, and KL settles where ``|d rec / d KL| = gamma``.

The threshold is estimated from the runs themselves, two ways:

* along the largest-gamma, slow-anneal run (KL held at C): the least-squares
  slope of reconstruction against KL in windows of the anneal (learning at a
  fixed KL also lowers the reconstruction, so this overstates it);
* from each run that settles above C: there ``|d rec / d KL| = gamma`` at its
  final KL.

Writes ``gamma.png`` and ``gamma.json``.
"""

from __future__ import annotations

import os

from absl import app
import matplotlib.pyplot as plt
import numpy as np

import common

NAME = 'gamma'
GAMMAS = (5.0, 20.0, 100.0, 1000.0)
ANNEALS = (1000, 250)  # slow, fast
C_MAX, STEPS = 10.0, 1200
WINDOWS = 6


def config(quick: bool):
  return common.base_config(quick, STEPS, c_max=C_MAX, c_anneal_steps=max(ANNEALS),
                            sweep=dict(product=dict(gamma=list(GAMMAS),
                                                    c_anneal_steps=list(ANNEALS))))


def threshold_along(rows, anneal: int, windows: int = WINDOWS):
  """``[(KL, |d rec / d KL|)]``: the slope of rec against KL in ``windows``
  equal windows of the anneal of a run that holds KL at C."""
  part = [r for r in rows if 0 < r['step'] <= anneal]
  out = []
  for chunk in np.array_split(np.arange(len(part)), windows):
    if len(chunk) < 3:
      continue
    kl = np.asarray([part[i]['kl'] for i in chunk])
    rec = np.asarray([part[i]['rec'] for i in chunk])
    if np.ptp(kl) <= 0:
      continue
    out.append((float(kl.mean()), float(-np.polyfit(kl, rec, 1)[0])))
  return out


def run(root: str, out: str, quick: bool = False):
  cfg = config(quick)
  seconds = common.train_runs({'grid': cfg}, root)
  workdir = os.path.join(root, 'grid')
  log = common.logs(workdir)
  rows = common.members(workdir)
  anneals = sorted({r['c_anneal_steps'] for r in rows}, reverse=True)
  numbers = {'c_max': C_MAX, 'steps': cfg.num_steps, 'anneals': anneals,
             'seconds': seconds, 'members': []}
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
  for m, row in enumerate(rows):
    g = sorted(GAMMAS).index(row['gamma']) if row['gamma'] in GAMMAS else 0
    j = anneals.index(row['c_anneal_steps'])
    s, d = common.series(log[m], 'kl_minus_c')
    axes[j].plot(s, d, color=f'C{g}', lw=1, label=f'gamma {row["gamma"]:g}')
    end = log[m][-5:]
    c_end = float(np.mean([r['c'] for r in end]))
    kl_end = float(np.mean([r['kl'] for r in end]))
    during = [r['kl_minus_c'] for r in log[m] if 0 < r['step'] <= row['c_anneal_steps']]
    numbers['members'].append({
        'gamma': row['gamma'], 'c_anneal_steps': row['c_anneal_steps'], 'kl_end': kl_end,
        'c_end': c_end, 'kl_minus_c_end': kl_end - c_end,
        'kl_minus_c_during_anneal_min': float(np.min(during)) if during else float('nan'),
        'kl_minus_c_during_anneal_max': float(np.max(during)) if during else float('nan'),
        'rec_end': float(np.mean([r['rec'] for r in end]))})
  for j, anneal in enumerate(anneals):
    axes[j].axhline(0, color='k', lw=0.6)
    axes[j].set_title(f'C to {C_MAX:g} nats over {anneal} steps', fontsize=10)
    axes[j].set_xlabel('training step')
    axes[j].set_ylabel('batch KL − C (nats)')
    axes[j].set_yscale('symlog', linthresh=0.5)
    axes[j].legend(fontsize=8)
    axes[j].grid(alpha=0.3)
  held = [m for m, r in enumerate(rows)
          if r['gamma'] == max(GAMMAS) and r['c_anneal_steps'] == anneals[0]]
  along = threshold_along(log[held[0]], anneals[0]) if held else []
  settled = [(m['kl_end'], m['gamma']) for m in numbers['members']
             if m['c_anneal_steps'] == anneals[0] and m['kl_minus_c_end'] > 0.5]
  numbers['threshold_along_held_run'] = along
  numbers['threshold_from_settled_runs'] = settled
  ax = axes[2]
  if along:
    ax.plot(*zip(*along), 'ko-', ms=4, label=f'slope along gamma {max(GAMMAS):g} run')
  if settled:
    ax.plot(*zip(*settled), 's', color='C3', ms=7,
            label='runs that settled above C: slope = gamma')
  for g in sorted(GAMMAS):
    ax.axhline(g, color=f'C{sorted(GAMMAS).index(g)}', lw=0.8, ls='--')
  ax.set_yscale('log')
  ax.set_xlabel('KL (nats)')
  ax.set_ylabel('|d rec / d KL| (nats per nat)')
  ax.set_title('The threshold; dashed: each gamma', fontsize=10)
  if along or settled:
    ax.legend(fontsize=8)
  ax.grid(alpha=0.3, which='both')
  fig.tight_layout()
  common.write(out, NAME, {'gamma': fig}, numbers)
  for m in numbers['members']:
    print(f"gamma {m['gamma']:>6g} anneal {m['c_anneal_steps']:>4}: KL {m['kl_end']:6.2f}"
          f" (C {m['c_end']:.1f}), KL − C during anneal [{m['kl_minus_c_during_anneal_min']:+.2f},"
          f" {m['kl_minus_c_during_anneal_max']:+.2f}], rec {m['rec_end']:.1f}")
  print('threshold along the held run (KL, slope):', [(round(a, 2), round(b, 1)) for a, b in along])
  return numbers


if __name__ == '__main__':
  app.run(common.main_of(NAME, run))
