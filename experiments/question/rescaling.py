r"""Rescaling the reconstruction: summed, pixel-mean, beta_norm, and raw_dim · mse.

  python experiments/question/rescaling.py --workdir runs/question --out docs/figures/question

Four beta-VAE sweeps of ``STEPS`` steps (the reconstruction and the
normalised form are static choices, so one program each):

* ``summed``: ``rec_sum + beta · KL`` with beta 1 and 4 (Bernoulli);
* ``normalised`` (``config.beta_norm``): ``rec_sum/N + beta_norm · KL/M`` with
  ``beta_norm = beta·M/N``. At beta 4 it is the summed loss divided by N (the
  same optimum; under Adam nearly the same path). At beta 4·N it is
  ``rec_sum/N + 4 · KL``: a pixel-*mean* reconstruction with the same beta = 4,
  whose weight on the KL is N = 4,096 times larger;
* ``raw_dim_mse``: the seed question's ``raw_dim · mse`` (a sum of squared
  errors) with beta 1 and 0.1;
* ``gaussian``: a Gaussian likelihood with variance 0.5 and 0.05, beta 1.
  ``sum (x − x̂)² / (2 sigma²) + beta · KL`` is ``raw_dim_mse + 2 sigma² beta · KL``
  over 2 sigma², so the variance is a hidden beta, beta' = 2·sigma²·beta:
  sigma² = 0.5 is raw_dim_mse at beta 1 (up to a constant), and sigma² =
  0.05 is raw_dim_mse at beta 0.1 (up to a constant and a factor 10).

Writes ``rescaling.png`` (KL and reconstruction over training, per-latent KL
at the end) and ``rescaling.json``.
"""

from __future__ import annotations

import os

from absl import app
import matplotlib.pyplot as plt
import numpy as np

import common

NAME = 'rescaling'
N = 64 * 64
STEPS = 1000
# (run, what each member is, sweep)
RUNS = {
    'summed': (dict(objective='beta', sweep=dict(product=dict(beta=[1.0, 4.0]))),
               ['summed, beta 1', 'summed, beta 4']),
    'normalised': (dict(objective='beta', beta_norm=True,
                        sweep=dict(product=dict(beta=[4.0, 4.0 * N]))),
                   ['beta_norm form of beta 4', 'pixel-mean rec, beta 4']),
    'raw_dim_mse': (dict(objective='beta', reconstruction='raw_dim_mse',
                         sweep=dict(product=dict(beta=[1.0, 0.1]))),
                    ['raw_dim·mse, beta 1', 'raw_dim·mse, beta 0.1']),
    'gaussian': (dict(objective='beta', reconstruction='gaussian',
                      sweep=dict(product=dict(gaussian_variance=[0.5, 0.05]))),
                 ['Gaussian sigma² 0.5, beta 1', 'Gaussian sigma² 0.05, beta 1']),
}
# Pairs that should coincide: (run, member) and (run, member), and why.
PAIRS = [(('summed', 1), ('normalised', 0), 'same optimum (loss / N); Adam is nearly'
          ' invariant to the scale'),
         (('raw_dim_mse', 0), ('gaussian', 0), 'the same loss up to a constant'),
         (('raw_dim_mse', 1), ('gaussian', 1), 'same optimum (loss × 10 + constant)')]


def tail_mean(rows, key, n=5):
  return np.mean(np.asarray([r[key] for r in rows[-n:]], np.float64), axis=0)


def run(root: str, out: str, quick: bool = False):
  configs = {name: common.base_config(quick, STEPS, **fields)
             for name, (fields, _) in RUNS.items()}
  seconds = common.train_runs(configs, root)
  numbers = {'steps': configs['summed'].num_steps, 'seconds': seconds, 'members': [],
             'pairs': []}
  fig, axes = plt.subplots(2, 3, figsize=(14, 7))
  logs = {}
  for g, (name, (_, labels)) in enumerate(RUNS.items()):
    log = logs[name] = common.logs(os.path.join(root, name))
    row_of = 0 if name in ('summed', 'normalised') else 1
    for m, what in enumerate(labels):
      colour = f'C{2 * g + m}'
      s, kl = common.series(log[m], 'kl')
      axes[row_of, 0].plot(s, kl, color=colour, lw=1, label=what)
      s, rec = common.series(log[m], 'rec')
      axes[row_of, 1].plot(s, rec, color=colour, lw=1, label=what)
      per_latent = np.sort(tail_mean(log[m], 'kl_per_latent'))[::-1]
      width = 0.8 / 4
      x = np.arange(per_latent.size) + (2 * (g % 2) + m - 1.5) * width
      axes[row_of, 2].bar(x, per_latent, width, color=colour, label=what)
      numbers['members'].append({
          'run': name, 'member': m, 'what': what, 'kl_end': float(tail_mean(log[m], 'kl')),
          'rec_end': float(tail_mean(log[m], 'rec')),
          'kl_per_latent_end': per_latent.tolist(),
          'active_latents': int(np.sum(per_latent > 0.1))})
  for (a, i), (b, j), why in PAIRS:
    ka = np.asarray([r['kl'] for r in logs[a][i]])
    kb = np.asarray([r['kl'] for r in logs[b][j]])
    numbers['pairs'].append({
        'a': RUNS[a][1][i], 'b': RUNS[b][1][j], 'why': why,
        'max_abs_kl_difference': float(np.max(np.abs(ka - kb))),
        'kl_end': [float(ka[-5:].mean()), float(kb[-5:].mean())]})
  for r, title in ((0, 'Bernoulli: summed, beta_norm and pixel-mean'),
                   (1, 'Squared error: raw_dim·mse and a Gaussian with a variance')):
    axes[r, 0].set_ylabel('batch KL (nats)')
    axes[r, 0].set_title(title, fontsize=10, loc='left')
    axes[r, 0].set_xlabel('training step')
    axes[r, 1].set_ylabel('reconstruction (nats / sum of squares)')
    axes[r, 1].set_yscale('log')
    axes[r, 1].set_xlabel('training step')
    axes[r, 2].set_xlabel('latents, largest KL first')
    axes[r, 2].set_ylabel('KL per latent at the end (nats)')
    for ax in axes[r]:
      ax.legend(fontsize=7)
      ax.grid(alpha=0.3)
  fig.tight_layout()
  common.write(out, NAME, {'rescaling': fig}, numbers)
  for m in numbers['members']:
    print(f"{m['what']:>30}: KL {m['kl_end']:7.2f} in {m['active_latents']} latents,"
          f" rec {m['rec_end']:.1f}")
  for p in numbers['pairs']:
    print(f"{p['a']} vs {p['b']}: max |ΔKL| {p['max_abs_kl_difference']:.3f} ({p['why']})")
  return numbers


if __name__ == '__main__':
  app.run(common.main_of(NAME, run))
