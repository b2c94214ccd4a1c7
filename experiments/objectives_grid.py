r"""Scores against each objective's weight, for the shortened grids.

  python experiments/objectives_grid.py runs/objectives/beta_tcvae \
      runs/objectives/factor_vae runs/objectives/dip_vae_i \
      runs/objectives/controlled_capacity --out docs/figures/objectives

Reads evaluated sweeps (``eval.json``; e.g. ``configs/beta_tcvae.py``,
``factor_vae.py``, ``dip_vae.py``, ``controlled_capacity.py`` trained, then
``capvae evaluate``), finds each one's swept
hyperparameter, and writes

* ``grids.png``: one row per run: the headline disentanglement metrics, the
  held-out reconstruction and KL, and the objective's own held-out term against
  the swept value;
* ``grids.json``: the same numbers, per run and member;

and prints them as markdown tables.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from capvae import evaluate, train_state
from capvae import workdir as workdir_lib

FLAGS = flags.FLAGS
flags.DEFINE_string('out', 'docs/figures/objectives', 'Output folder.')

METRICS = ('beta_vae', 'factor_vae', 'mig', 'dci_disentanglement')
# The objective's own held-out term drawn for each objective.
OWN_TERM = {'beta_tcvae': 'tc', 'factor_vae': 'disc_accuracy', 'dip_vae': 'cov_offdiag',
            'controlled_capacity': 'kl_minus_c', 'capacity': 'kl_minus_c'}


def swept(records) -> str:
  """The hyperparameter that varies between members, other than the seed."""
  for name in train_state.HPARAM_NAMES:
    if name != 'seed' and len({r[name] for r in records}) > 1:
      return name
  raise ValueError('no swept hyperparameter besides the seed')


def run_table(workdir: str) -> dict:
  config = workdir_lib.load_config(workdir)
  result = evaluate.load(workdir)
  if result is None:
    raise SystemExit(f'{workdir}: no eval.json; run --mode=evaluate first.')
  records = result['members']
  axis = swept(records)
  term = OWN_TERM.get(config.objective)
  rows = []
  for r in records:
    rows.append({axis: r[axis], 'seed': r['seed'], 'rec': r['rec'], 'kl': r['kl'],
                 'active_latents': r['active_latents'],
                 **{m: r['metrics'].get(m) for m in METRICS},
                 **({term: (r.get('objective_terms') or {}).get(term)} if term else {})})
  return {'workdir': workdir, 'objective': config.objective, 'axis': axis, 'term': term,
          'step': result['step'], 'scale': result['settings']['scale'], 'rows': rows}


def plot(tables, path: str) -> None:
  cols = (*METRICS, 'rec', 'kl', 'term')
  fig, axes = plt.subplots(len(tables), len(cols), figsize=(2.7 * len(cols), 2.4 * len(tables)),
                           squeeze=False)
  for row_axes, t in zip(axes, tables):
    x = np.array([r[t['axis']] for r in t['rows']], float)
    for ax, col in zip(row_axes, cols):
      key = t['term'] if col == 'term' else col
      y = np.array([np.nan if r.get(key) is None else r[key] for r in t['rows']], float)
      ax.plot(x, y, 'o-', ms=4)
      ax.set_xscale('log')
      ax.set_title(key if col != 'term' else f'held-out {key}', fontsize=8)
      ax.tick_params(labelsize=7)
      ax.grid(alpha=0.3)
    row_axes[0].set_ylabel(f'{t["objective"]}\n{t["axis"]}', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError('give one or more evaluated workdirs')
  os.makedirs(FLAGS.out, exist_ok=True)
  tables = [run_table(w) for w in workdirs]
  plot(tables, os.path.join(FLAGS.out, 'grids.png'))
  workdir_lib.write_json(os.path.join(FLAGS.out, 'grids.json'), tables)
  for t in tables:
    cols = [t['axis'], *METRICS, 'rec', 'kl', 'active_latents', *([t['term']] if t['term'] else [])]
    print(f'\n{t["objective"]} ({t["workdir"]}, step {t["step"]}, eval_scale {t["scale"]:g})\n')
    print('| ' + ' | '.join(cols) + ' |')
    print('|' + ' --- |' * len(cols))
    for r in t['rows']:
      print('| ' + ' | '.join('–' if r.get(c) is None else
                              (f'{r[c]:.3g}' if isinstance(r[c], float) else str(r[c]))
                              for c in cols) + ' |')


if __name__ == '__main__':
  app.run(main)
