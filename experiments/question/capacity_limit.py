r"""C beyond what the data can hold: KL against I(x; z) as C_max grows.

  python experiments/question/capacity_limit.py --workdir runs/question --out docs/figures/question

dSprites has 737,280 images, so the code can carry at most
I(x; z) <= ln 737,280 = 13.51 nats about the image. One sweep trains gamma
1000 with C_max in ``C_MAXES`` (C raised over ``ANNEAL`` steps, ``STEPS``
in all; disentanglement_lib's grid goes to 100), and one beta = 1 VAE for
Burgess et al.'s rule of thumb for C_max: the KL of a low-beta model that
reconstructs well. For each member it encodes ``INFO_IMAGES`` images drawn
from the dataset (an eighth of it: encoding all 737,280 takes ~4 minutes a
member here) and estimates I(x; z) about an image drawn from them
(:func:`capvae.metrics.code_information`; at most ln 92,160 = 11.43 nats,
where the whole dataset allows 13.51), and splits the held-out KL into
spread (½ Var μ, the only part that can inform), offset (½ E[μ]²) and
variance (posteriors narrower or wider than the prior).

Writes ``capacity_limit.png`` and ``capacity_limit.json``.
"""

from __future__ import annotations

import math
import os

from absl import app
import jax
import matplotlib.pyplot as plt
import numpy as np

import common
from capvae import metrics

NAME = 'capacity_limit'
C_MAXES = (10.0, 25.0, 50.0, 100.0)
ANNEAL, STEPS = 800, 1200
INFO_IMAGES = 737_280 // 8  # 0: all 737,280
INFO_QUERIES = 1000
HELDOUT = 5000


def configs(quick: bool):
  return {
      'capacity': common.base_config(quick, STEPS, c_anneal_steps=ANNEAL,
                                     sweep=dict(product=dict(c_max=list(C_MAXES)))),
      'vae': common.base_config(quick, STEPS, objective='beta', beta=1.0),
  }


def measure(workdir: str, quick: bool):
  rows, means, logvars = common.codes(workdir, 256 if quick else INFO_IMAGES)
  _, kl, rec, parts = common.heldout(workdir, 64 if quick else HELDOUT)
  out = []
  for m, row in enumerate(rows):
    info = metrics.code_information(means[m], logvars[m], jax.random.key(m),
                                    num_queries=64 if quick else INFO_QUERIES)
    out.append({'c_max': row['c_max'], 'beta': row['beta'], 'kl': float(kl[m].sum()),
                'rec': float(rec[m]), **{k: float(v[m].sum()) for k, v in parts.items()},
                'information': float(info['mi']), 'information_stderr': float(info['mi_stderr']),
                'bound': float(info['bound']), 'num_images': int(info['num_images'])})
  return out


def run(root: str, out: str, quick: bool = False):
  runs = configs(quick)
  seconds = common.train_runs(runs, root)
  capacity = measure(os.path.join(root, 'capacity'), quick)
  vae = measure(os.path.join(root, 'vae'), quick)[0]
  log = common.logs(os.path.join(root, 'vae'))[0]
  numbers = {'steps': runs['capacity'].num_steps, 'anneal': runs['capacity'].c_anneal_steps,
             'seconds': seconds, 'capacity': capacity, 'vae': vae,
             'vae_batch_kl_end': float(np.mean([r['kl'] for r in log[-5:]])),
             'ln_dataset': math.log(737_280)}
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.3))
  c = [m['c_max'] for m in capacity]
  ax.plot(c, c, 'k:', lw=0.8, label='KL = C_max')
  ax.plot(c, [m['kl'] for m in capacity], 'o-', label='held-out KL')
  ax.errorbar(c, [m['information'] for m in capacity],
              yerr=[2 * m['information_stderr'] for m in capacity], fmt='s-',
              label='I(x; z) (±2 s.e.)')
  ax.axhline(capacity[0]['bound'], color='C3', lw=0.8,
             label=f'ln N = {capacity[0]["bound"]:.2f} (N = {capacity[0]["num_images"]:,})')
  ax.axhline(vae['kl'], color='C2', ls='--', lw=0.8,
             label=f'beta = 1 VAE: KL {vae["kl"]:.1f}, I {vae["information"]:.1f}')
  ax.set_xlabel('C_max (nats)')
  ax.set_ylabel('nats')
  ax.set_title(f'gamma 1000, C over {numbers["anneal"]} steps, {numbers["steps"]} steps',
               fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  x = np.arange(len(capacity) + 1)
  bottom = np.zeros(len(x))
  for key, colour in (('spread', 'C0'), ('offset', 'C1'), ('variance', 'C7')):
    vals = np.asarray([m[key] for m in capacity] + [vae[key]])
    bx.bar(x, vals, bottom=bottom, color=colour, label=key)
    bottom += vals
  bx.set_xticks(x, [f'C_max {m["c_max"]:g}' for m in capacity] + ['beta 1 VAE'])
  bx.set_ylabel('held-out KL, split (nats)')
  bx.set_title('Where the KL goes: spread (informative), offset, variance', fontsize=10)
  bx.legend(fontsize=8)
  fig.tight_layout()
  common.write(out, NAME, {'capacity_limit': fig}, numbers)
  for m in capacity + [vae]:
    print(f"C_max {m['c_max']:>5g} beta {m['beta']:g}: KL {m['kl']:6.2f} = spread"
          f" {m['spread']:.2f} + offset {m['offset']:.2f} + variance {m['variance']:.2f};"
          f" I(x; z) {m['information']:.2f} ± {m['information_stderr']:.2f} of"
          f" {m['bound']:.2f}; rec {m['rec']:.1f}")
  return numbers


if __name__ == '__main__':
  app.run(common.main_of(NAME, run))
