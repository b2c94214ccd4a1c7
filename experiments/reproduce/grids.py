r"""Scores against C_max or beta over seeds (Locatello et al. 2019's grids).

  python experiments/reproduce/grids.py runs/annealed_grid \
      --out docs/figures/grids --name annealed

Reads an evaluated sweep (``eval.json`` from ``capvae
evaluate``; e.g. ``configs/locatello_grid.py``), finds the swept
hyperparameter other than the seed, and writes

* ``NAME_scores.png``: every headline metric, the held-out reconstruction,
  KL (and its spread and offset) and I(x; z) against that hyperparameter: one
  dot per member (colour = seed), the mean over seeds as a line;
* ``NAME_grid.json``: per metric, each setting's values and mean, and the
  comparison the study is known for: how far scores move between seeds of one
  setting against how far the settings' means move apart;

and prints that comparison as a table:

* ``seed sd``: the pooled within-setting standard deviation (root of the mean
  of each setting's variance over seeds, ``ddof=1``);
* ``setting sd``: the standard deviation of the settings' means;
* ``R²``: the share of the total sum of squares that the setting explains
  (one-way ANOVA's eta squared); near 1, the hyperparameter decides the score,
  near ``(k-1)/(n-1)`` (k settings, n members), no more than chance;
* ``rho``: Spearman's rank correlation of the score with the hyperparameter
  over all members.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import scipy.stats

from capvae import evaluate, report

FLAGS = flags.FLAGS
flags.DEFINE_string('out', None, 'Output folder (default: WORKDIR/report).')
flags.DEFINE_string('name', 'grid', 'Prefix of the output files.')

# What each panel shows, beside evaluate.HEADLINE's metrics.
EXTRA = {'rec': 'held-out rec (nats)', 'kl': 'held-out KL (nats)',
         'kl_spread': 'KL spread, ½ Var μ (nats)', 'kl_offset': 'KL offset, ½ E[μ]² (nats)',
         'information': 'I(x; z) (nats)'}


def member_values(record: Mapping[str, Any]) -> dict[str, float]:
  """One member's scores: the headline metrics, rec, KL and the KL's spread."""
  out = {k: report._num(v) for k, v in record['metrics'].items()}  # pylint: disable=protected-access
  out['rec'] = float(record['rec'])
  out['kl'] = float(record['kl'])
  if record.get('kl_parts'):
    out['kl_spread'] = float(record['kl_parts']['spread'])
    out['kl_offset'] = float(record['kl_parts']['offset'])
  if record.get('information'):
    out['information'] = float(record['information']['mi'])
  return out


def seed_vs_setting(settings: Sequence[float], values: Sequence[float]) -> dict[str, float]:
  """How much of a score's spread the setting explains; see the module docstring.

  Args:
    settings: the hyperparameter of each member.
    values: the score of each member (same order).
  """
  x = np.asarray(settings, float)
  y = np.asarray(values, float)
  keep = np.isfinite(y)
  x, y = x[keep], y[keep]
  levels = np.unique(x)
  groups = [y[x == v] for v in levels]
  means = np.array([g.mean() for g in groups])
  within = [g.var(ddof=1) for g in groups if g.size > 1]
  total_ss = float(((y - y.mean()) ** 2).sum())
  between_ss = float(sum(g.size * (g.mean() - y.mean()) ** 2 for g in groups))
  rho = scipy.stats.spearmanr(x, y).statistic if np.ptp(y) > 0 and levels.size > 1 else np.nan
  return {
      'seed_sd': float(np.sqrt(np.mean(within))) if within else float('nan'),
      'setting_sd': float(means.std(ddof=1)) if levels.size > 1 else float('nan'),
      'r2': between_ss / total_ss if total_ss > 0 else float('nan'),
      'chance_r2': (levels.size - 1) / (y.size - 1) if y.size > 1 else float('nan'),
      'spearman': float(rho),
      'members': int(y.size),
  }


def swept_axis(records) -> str:
  axes = [h for h in report.varying_hparams(records) if h != 'seed']
  if len(axes) != 1:
    raise app.UsageError(f'expected one swept hyperparameter besides the seed; found {axes}.')
  return axes[0]


def figure(records, axis: str, names: Sequence[str], title: str):
  cols = 4
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
  levels = sorted({r[axis] for r in records})
  seeds = sorted({r.get('seed', 0) for r in records})
  colours = plt.cm.tab10(np.arange(len(seeds)) % 10)
  for ax, name in zip(axes.flat, names):
    for s, colour in zip(seeds, colours):
      pts = [(levels.index(r[axis]), member_values(r).get(name, np.nan))
             for r in records if r.get('seed', 0) == s]
      xs, ys = zip(*pts)
      ax.plot(np.array(xs) + 0.08 * (s - np.mean(seeds)), ys, 'o', ms=3.5,
              color=colour, label=f'seed {s}')
    means = [np.nanmean([member_values(r).get(name, np.nan) for r in records
                         if r[axis] == v]) for v in levels]
    ax.plot(range(len(levels)), means, '-', color='k', lw=1.2, label='mean')
    ax.set_xticks(range(len(levels)), [f'{v:g}' for v in levels], fontsize=7)
    ax.tick_params(labelsize=7)
    ax.set_title(EXTRA.get(name, name), fontsize=8)
    ax.set_xlabel(axis, fontsize=7)
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=6)
  for ax in axes.flat[len(names):]:
    ax.axis('off')
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: grids.py WORKDIR [--out DIR --name NAME]')
  workdir = argv[1]
  result = evaluate.load(workdir)
  if result is None:
    raise app.UsageError(f'{workdir} has no eval.json: run capvae evaluate'
                         f' --workdir {workdir} first.')
  records = result['members']
  axis = swept_axis(records)
  names = [*evaluate.HEADLINE, *EXTRA]
  names = [n for n in names if all(n in member_values(r) for r in records)]
  settings = [r[axis] for r in records]
  table = {}
  for name in names:
    values = [member_values(r)[name] for r in records]
    stats = seed_vs_setting(settings, values)
    stats['by_setting'] = {
        f'{v:g}': [member_values(r)[name] for r in records if r[axis] == v]
        for v in sorted(set(settings))}
    table[name] = stats
  out = FLAGS.out or os.path.join(workdir, report.REPORT_DIR)
  os.makedirs(out, exist_ok=True)
  title = (f'{os.path.basename(os.path.abspath(workdir))}: {len(records)} members,'
           f' step {result["step"]}')
  figure(records, axis, names, title).savefig(
      os.path.join(out, f'{FLAGS.name}_scores.png'), dpi=110)
  with open(os.path.join(out, f'{FLAGS.name}_grid.json'), 'w') as f:
    json.dump({'workdir': workdir, 'step': result['step'], 'axis': axis,
               'settings': result['settings'], 'scores': table}, f, indent=1)
  print(f'{"score":>20} {"seed sd":>8} {"setting sd":>10} {"R²":>5} {"chance":>6}'
        f' {"rho":>6}')
  for name, s in table.items():
    print(f'{name:>20} {s["seed_sd"]:8.3f} {s["setting_sd"]:10.3f} {s["r2"]:5.2f}'
          f' {s["chance_r2"]:6.2f} {s["spearman"]:6.2f}')


if __name__ == '__main__':
  app.run(main)
