r"""The order in which latents take capacity (Burgess et al. 2018, Fig. 3).

  python experiments/reproduce/capacity_order.py runs/burgess_dsprites \
      --out docs/figures --name burgess

Reads a trained, evaluated capacity run (``metrics.jsonl`` and ``eval.json``,
from ``capvae evaluate``) and writes

* ``NAME_kl_latents.png``: each latent's KL (batch means, as logged) against
  the training step, with C(t), each active latent labelled with the factor it
  shares the most mutual information with, and a mark where it first reached
  ``--threshold`` nats;
* ``NAME_order.json``: for each active latent, that step, C there, its final
  KL and the factor with its MI / H(factor);

and prints the order as a table.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from capvae import evaluate, report

FLAGS = flags.FLAGS
flags.DEFINE_string('out', None, 'Output folder (default: WORKDIR/report).')
flags.DEFINE_string('name', 'run', 'Prefix of the output files.')
flags.DEFINE_integer('member', 0, 'Which member of a sweep.')
flags.DEFINE_float('threshold', 0.5, 'A latent counts as switched on at this KL (nats).')


def capacity_order(rows, record, threshold: float):
  """``[{latent, factor, normalized_mi, final_kl, on_step, on_c}]`` by ``on_step``."""
  steps = np.array([r['step'] for r in rows])
  kl = np.array([[report._num(v) for v in r['kl_per_latent']] for r in rows])  # pylint: disable=protected-access
  c = np.array([report._num(r.get('c')) for r in rows])  # pylint: disable=protected-access
  out = []
  for lf in record['latent_factors']:
    j = lf['latent']
    above = np.nonzero(kl[:, j] >= threshold)[0]
    first = int(above[0]) if above.size else None
    out.append({'latent': j, 'factor': lf['factor'], 'normalized_mi': lf['normalized_mi'],
                'heldout_kl': lf['kl'], 'final_kl': float(kl[-1, j]),
                'on_step': int(steps[first]) if first is not None else None,
                'on_c': float(c[first]) if first is not None else None})
  return sorted(out, key=lambda o: (o['on_step'] is None, o['on_step'] or 0))


def figure(rows, order, title: str, threshold: float):
  factor_of = {o['latent']: f"{o['factor']} ({o['normalized_mi']:.2f})" for o in order}
  fig = report.fig_kl_latents(rows, title, factor_of)
  ax = fig.axes[0]
  steps = np.array([r['step'] for r in rows])
  for o in order:
    if o['on_step'] is not None:
      ax.axvline(o['on_step'], color='0.6', lw=0.6, ls=':')
  ax.axhline(threshold, color='0.6', lw=0.6, ls=':')
  ax.set_xlim(steps[0], steps[-1])
  ax.legend(fontsize=7, ncol=2, loc='upper left',
            title='final KL, factor (MI / H(factor))', title_fontsize=7)
  return fig


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: capacity_order.py WORKDIR [--out DIR --name NAME]')
  workdir = argv[1]
  result = evaluate.load(workdir)
  if result is None:
    raise app.UsageError(f'{workdir} has no eval.json: run capvae evaluate'
                         f' --workdir {workdir} first.')
  record = next(r for r in result['members'] if r['member'] == FLAGS.member)
  rows = [r for r in report.read_metrics(workdir) if r['member'] == FLAGS.member]
  order = capacity_order(rows, record, FLAGS.threshold)
  out = FLAGS.out or os.path.join(workdir, report.REPORT_DIR)
  os.makedirs(out, exist_ok=True)
  title = (f'{os.path.basename(os.path.abspath(workdir))}: per-latent KL, step'
           f' {result["step"]}')
  figure(rows, order, title, FLAGS.threshold).savefig(
      os.path.join(out, f'{FLAGS.name}_kl_latents.png'), dpi=110)
  summary = {'workdir': workdir, 'step': result['step'], 'threshold': FLAGS.threshold,
             'metrics': record['metrics'], 'kl': record['kl'], 'rec': record['rec'],
             'kl_parts': record.get('kl_parts'), 'information': record.get('information'),
             'order': order}
  with open(os.path.join(out, f'{FLAGS.name}_order.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  print(f'{"latent":>6} {"factor":>12} {"MI/H":>5} {"on at step":>10} {"C then":>6}'
        f' {"final KL":>8}')
  for o in order:
    on = '-' if o['on_step'] is None else f"{o['on_step']:10d} {o['on_c']:6.2f}"
    print(f"{'z%d' % o['latent']:>6} {o['factor']:>12} {o['normalized_mi']:5.2f} {on:>17}"
          f" {o['final_kl']:8.2f}")
  print('metrics: ' + ', '.join(f'{k} {v:.3f}' for k, v in record['metrics'].items()))
  info = record.get('information')
  if info:
    print(f"KL {record['kl']:.2f} nats, of which I(x; z) {info['mi']:.2f} ± {info['mi_stderr']:.2f}"
          f" (at most ln {info['num_images']} = {info['bound']:.2f}); per latent: "
          + ', '.join(f'z{j} {v:.2f}' for j, v in enumerate(info['per_latent']) if v > 0.05))


if __name__ == '__main__':
  app.run(main)
