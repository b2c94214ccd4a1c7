r"""Where the absolute value goes: |mean KL − C|, mean |KL − C| and (mean KL − C)².

  python experiments/question/penalties.py --workdir runs/question --out docs/figures/question

One sweep per penalty (``config.capacity_penalty`` is static), each gamma ×
seed: C rises linearly to ``C_MAX`` nats over ``ANNEAL`` steps and is held
until ``STEPS`` (the paper raises 25 nats over 100,000 steps; this is the
same shape, shortened for a CPU). Writes

* ``penalties_kl_minus_c.png``: the batch KL − C and the reconstruction over
  training, per penalty;
* ``penalties_example_kl.png``: the per-example KL of held-out images at the
  end, with its mean and median marked: ``abs_per_example`` pins the *median*
  example's KL to C, not the mean;
* ``penalties.json``: every number quoted, including the squared penalty's
  offset above C against its predicted size |d rec / d KL| / (2 gamma).
"""

from __future__ import annotations

import os

from absl import app
import matplotlib.pyplot as plt
import numpy as np

import common

NAME = 'penalties'
PENALTIES = ('abs', 'abs_per_example', 'squared')
GAMMAS = (5.0, 1000.0)
SEEDS = (0, 1)
C_MAX, ANNEAL, STEPS = 5.0, 600, 1200
HELDOUT = 5000


def configs(quick: bool):
  return {p: common.base_config(quick, STEPS, log_every=5, capacity_penalty=p, c_max=C_MAX,
                                c_anneal_steps=ANNEAL,
                                sweep=dict(product=dict(gamma=list(GAMMAS), seed=list(SEEDS))))
          for p in PENALTIES}


def plateau(rows, start: int):
  return [r for r in rows if r['step'] >= start] or rows[-1:]


def slope_rec_per_kl(rows, lo: int, hi: int) -> float:
  """|d rec / d KL| along a run that holds KL at C: the least-squares slope of
  the logged reconstruction against the logged KL between steps lo and hi."""
  part = [r for r in rows if lo <= r['step'] <= hi]
  if len(part) < 3:
    return float('nan')
  kl = np.asarray([r['kl'] for r in part])
  rec = np.asarray([r['rec'] for r in part])
  return float(-np.polyfit(kl, rec, 1)[0])


def run(root: str, out: str, quick: bool = False):
  runs = configs(quick)
  seconds = common.train_runs(runs, root)
  steps = next(iter(runs.values())).num_steps
  anneal = next(iter(runs.values())).c_anneal_steps
  start = anneal + (steps - anneal) // 3  # the plateau, once KL has settled on C_max
  numbers = {'c_max': C_MAX, 'anneal_steps': anneal, 'steps': steps, 'plateau_from': start,
             'heldout_images': HELDOUT, 'seconds': seconds, 'members': []}
  fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True)
  hist, haxes = plt.subplots(1, 3, figsize=(13, 3.6))
  slopes = {}
  for j, penalty in enumerate(PENALTIES):
    workdir = os.path.join(root, penalty)
    log = common.logs(workdir)
    rows, means, logvars = common.codes(workdir, 64 if quick else HELDOUT)
    kl_examples = common.example_kl(means, logvars)
    for m, row in enumerate(rows):
      colour = f'C{GAMMAS.index(row["gamma"]) if row["gamma"] in GAMMAS else 0}'
      style = '-' if row['seed'] == SEEDS[0] else ':'
      s, d = common.series(log[m], 'kl_minus_c')
      axes[0, j].plot(s, d, style, color=colour, lw=1, label=common.label(row, ('gamma', 'seed')))
      s, rec = common.series(log[m], 'rec')
      axes[1, j].plot(s, rec, style, color=colour, lw=1)
      tail = plateau(log[m], start)
      e = kl_examples[m]
      member = {'penalty': penalty, 'gamma': row['gamma'], 'seed': row['seed'],
                'kl_minus_c_plateau': float(np.mean([r['kl_minus_c'] for r in tail])),
                'kl_minus_c_plateau_sd': float(np.std([r['kl_minus_c'] for r in tail])),
                'batch_median_minus_c_plateau': float(np.mean(
                    [r['kl_example_median'] - r['c'] for r in tail])),
                'rec_end': float(np.mean([r['rec'] for r in tail])),
                'heldout_kl_mean': float(e.mean()), 'heldout_kl_median': float(np.median(e)),
                'heldout_kl_p10': float(np.quantile(e, 0.1)),
                'heldout_kl_p90': float(np.quantile(e, 0.9))}
      if penalty == 'abs' and row['gamma'] == max(GAMMAS):
        slopes[row['seed']] = slope_rec_per_kl(log[m], anneal // 2, anneal)
      numbers['members'].append(member)
      if row['gamma'] == max(GAMMAS) and row['seed'] == SEEDS[0]:
        ax = haxes[j]
        ax.hist(e, bins=60, color='0.6')
        ax.axvline(e.mean(), color='C3', label=f'mean {e.mean():.2f}')
        ax.axvline(np.median(e), color='C0', ls='--', label=f'median {np.median(e):.2f}')
        ax.axvline(C_MAX, color='k', lw=0.8, label=f'C = {C_MAX:g}')
        ax.set_title(f'{penalty}, gamma {row["gamma"]:g}', fontsize=10)
        ax.set_xlabel('per-example KL of a held-out image (nats)')
        ax.legend(fontsize=8)
    axes[0, j].axhline(0, color='k', lw=0.6)
    axes[0, j].set_yscale('symlog', linthresh=0.5)
    axes[0, j].set_title(penalty, fontsize=10)
    axes[0, j].legend(fontsize=7)
    axes[1, j].set_yscale('log')
    axes[1, j].set_xlabel('training step')
  axes[0, 0].set_ylabel('batch KL − C (nats)')
  axes[1, 0].set_ylabel('reconstruction (nats)')
  fig.tight_layout()
  hist.tight_layout()
  # The squared penalty's optimum: d rec/d KL + 2 gamma (KL − C) = 0.
  finite = [v for v in slopes.values() if np.isfinite(v)]
  slope = float(np.mean(finite)) if finite else float('nan')
  numbers['rec_per_kl_slope'] = slope
  numbers['rec_per_kl_slope_by_seed'] = slopes
  for member in numbers['members']:
    if member['penalty'] == 'squared':
      member['predicted_offset'] = slope / (2 * member['gamma'])
      member['implied_slope'] = 2 * member['gamma'] * member['kl_minus_c_plateau']
  common.write(out, NAME, {'penalties_kl_minus_c': fig, 'penalties_example_kl': hist},
               numbers)
  for m in numbers['members']:
    extra = (f"  predicted {m['predicted_offset']:.3f}" if 'predicted_offset' in m else '')
    print(f"{m['penalty']:>16} gamma {m['gamma']:>6g} seed {m['seed']}: KL − C"
          f" {m['kl_minus_c_plateau']:+.3f} ± {m['kl_minus_c_plateau_sd']:.3f}{extra};"
          f" median − C {m['batch_median_minus_c_plateau']:+.3f}; rec {m['rec_end']:.1f}")
  return numbers


if __name__ == '__main__':
  app.run(common.main_of(NAME, run))
