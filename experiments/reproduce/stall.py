r"""Why a run at the Burgess schedule's shape stalls: where its KL goes.

  python experiments/reproduce/stall.py --workdir runs/reproduce/stall

Trains, as one capvae sweep, the Burgess setting (gamma 1000, Bernoulli
decoder, batch 64, C raised linearly to 25 nats) with C's schedule compressed
to 25,000 steps, at Adam's learning rate 5e-4 and 1e-4, two seeds each, for
the first ``--steps`` steps. At every checkpoint it encodes held-out images and
splits each member's KL into the part that moves with the image (``spread``,
the only part that can carry information) and the part that does not
(``offset``, ``variance``; :func:`capvae.losses.kl_decomposition`).

Writes ``stall.png`` and ``stall.json`` (every number plotted) into
``--out`` (default: the workdir). 3,000 steps took 24.7 minutes on a 2-core
AMD EPYC with another run sharing the cores (docs/reproduction.md). The
workdir resumes like any run.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from capvae import backend, config_lib, evaluate, train
from capvae import workdir as workdir_lib

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(HERE)), 'configs')

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Where the sweep trains (resumes if it exists).')
flags.DEFINE_string('out', None, 'Where stall.png and stall.json go (default: workdir).')
flags.DEFINE_string('config', os.path.join(CONFIGS, 'burgess_dsprites.py'),
                    'The config file whose model and objective are trained.')
flags.DEFINE_integer('steps', 3000, 'Training steps.')
flags.DEFINE_integer('every', 500, 'Steps between the checkpoints that are evaluated.')
flags.DEFINE_integer('anneal', 25_000, 'Steps over which C rises to c_max.')
flags.DEFINE_list('learning_rates', ['5e-4', '1e-4'], 'Adam learning rates.')
flags.DEFINE_list('seeds', ['0', '1'], 'Seeds.')
flags.DEFINE_integer('heldout', 2000, 'Held-out images for the KL split.')
flags.DEFINE_enum('init', 'lecun', ['lecun', 'torch', 'kaiming'],
                  'How parameters start (config.init): Flax\'s, PyTorch\'s or'
                  ' 1Konny/Beta-VAE\'s defaults.')
flags.mark_flags_as_required(['workdir'])


def make_config():
  name = os.path.splitext(os.path.basename(FLAGS.config))[0]
  config = config_lib.sibling(FLAGS.config, name).get_config()
  config.c_anneal_steps = FLAGS.anneal
  config.init = FLAGS.init
  config.num_steps = FLAGS.steps
  config.checkpoint_every = FLAGS.every
  config.log_every = max(1, FLAGS.every // 4)
  config.keep_checkpoints = FLAGS.steps // FLAGS.every + 1
  config.sweep.product = dict(learning_rate=[float(v) for v in FLAGS.learning_rates],
                              seed=[int(v) for v in FLAGS.seeds])
  return config


def kl_split(workdir: str, steps, heldout: int):
  """Per checkpoint step and member: held-out KL, its split, and reconstruction."""
  out = []
  for step in steps:
    run = workdir_lib.Members(workdir, step)
    kl, rec, rec_mean, parts, _ = evaluate.heldout_stats(run, heldout, seed=0)
    for m, row in enumerate(run.rows):
      out.append({'step': int(step), 'member': m, 'learning_rate': row['learning_rate'],
                  'seed': row['seed'], 'kl': float(kl[m].sum()),
                  **{k: float(v[m].sum()) for k, v in parts.items()},
                  'spread_per_latent': parts['spread'][m].tolist(),
                  'rec': float(rec[m]), 'rec_from_mean': float(rec_mean[m])})
  return out


def figure(rows, c_of_step):
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
  colours = {}
  for r in rows:
    colours.setdefault(r['learning_rate'], f'C{len(colours)}')
  for (lr, seed) in sorted({(r['learning_rate'], r['seed']) for r in rows}):
    mine = sorted((r for r in rows if r['learning_rate'] == lr and r['seed'] == seed),
                  key=lambda r: r['step'])
    steps = [r['step'] for r in mine]
    style = ['-', '--', ':', '-.'][seed % 4]
    ax.plot(steps, [r['spread'] for r in mine], style, color=colours[lr], marker='o', ms=3,
            label=f'lr {lr:g}, seed {seed}: spread (informative)')
    ax.plot(steps, [r['offset'] for r in mine], style, color=colours[lr], alpha=0.45,
            marker='x', ms=4, label=f'lr {lr:g}, seed {seed}: offset (none)')
    bx.plot(steps, [r['rec'] for r in mine], style, color=colours[lr], marker='o', ms=3,
            label=f'lr {lr:g}, seed {seed}')
  steps = sorted({r['step'] for r in rows})
  ax.plot(steps, [c_of_step(s) for s in steps], 'k', lw=0.8, alpha=0.6, label='C(t)')
  ax.set_xlabel('training step')
  ax.set_ylabel('held-out KL part (nats, summed over latents)')
  ax.set_title('Where the KL goes: spread vs offset', fontsize=10)
  ax.legend(fontsize=6.5)
  ax.grid(alpha=0.3)
  bx.set_xlabel('training step')
  bx.set_ylabel('held-out reconstruction (nats per image)')
  bx.set_title('Reconstruction', fontsize=10)
  bx.set_yscale('log')
  bx.legend(fontsize=7)
  bx.grid(alpha=0.3, which='both')
  fig.tight_layout()
  return fig


def main(argv):
  del argv
  backend.keep_freed_memory()
  t0 = time.perf_counter()
  config = make_config()
  train.train_and_evaluate(config, FLAGS.workdir)
  train_seconds = time.perf_counter() - t0
  steps = list(range(FLAGS.every, FLAGS.steps + 1, FLAGS.every))
  if steps[-1] != FLAGS.steps:
    steps.append(FLAGS.steps)
  rows = kl_split(FLAGS.workdir, steps, FLAGS.heldout)
  c_max, anneal = float(config.c_max), float(config.c_anneal_steps)
  c_of_step = lambda s: min(c_max, c_max * s / anneal)
  out = FLAGS.out or FLAGS.workdir
  os.makedirs(out, exist_ok=True)
  figure(rows, c_of_step).savefig(os.path.join(out, 'stall.png'), dpi=110)
  result = {'command': ' '.join(sys.argv), 'config': FLAGS.config, 'init': FLAGS.init,
            'steps': FLAGS.steps,
            'c_max': c_max, 'c_anneal_steps': anneal, 'heldout': FLAGS.heldout,
            'seconds': time.perf_counter() - t0, 'train_seconds': train_seconds,
            'rows': rows}
  with open(os.path.join(out, 'stall.json'), 'w') as f:
    json.dump(result, f, indent=1)
  for r in sorted(rows, key=lambda r: (r['learning_rate'], r['seed'], r['step'])):
    if r['step'] == steps[-1]:
      print(f"lr {r['learning_rate']:g} seed {r['seed']}: step {r['step']}: KL {r['kl']:.2f}"
            f" = spread {r['spread']:.2f} + offset {r['offset']:.2f} + variance"
            f" {r['variance']:.2f}; reconstruction {r['rec']:.1f}")
  print(f'wrote {os.path.join(out, "stall.png")} in {result["seconds"]:.0f} s')


if __name__ == '__main__':
  app.run(main)
