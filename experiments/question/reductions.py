r"""Reductions A and B of the KL, where the absolute value goes, and beta_norm: one batch.

  python experiments/question/reductions.py --workdir runs/question --out docs/figures/question

No training: it encodes and decodes one batch of 64 dSprites images with a
trained model (the gamma 1000 ``abs`` member of ``penalties.py``'s runs, so
run that first) and computes, in float64 from the model's posteriors:

* the seed question's reduction A (mean over the batch per latent, then sum)
  and B (sum over latents, then mean), and capvae's batch KL;
* for C below, inside and above the batch's per-example KLs: ``|mean KL − C|``
  (A and B), ``mean |KL − C|`` (``abs_per_example``) and how many examples
  each pushes up (gradient −gamma/B) or down (+gamma/B);
* the four ways of scaling the two terms, each evaluated on this batch and
  divided into the summed loss: the KL weight each needs for the summed
  form's optimum (beta, beta/N, beta·M/N = beta_norm, beta·M).

Writes ``reductions.json``; the page shows its numbers as tables.
"""

from __future__ import annotations

import os

from absl import app
import jax
import numpy as np

import common
from capvae import evaluate, losses
from capvae import workdir as workdir_lib

NAME = 'reductions'
BATCH, BETA = 64, 4.0


def _batch(root: str):
  workdir = os.path.join(os.path.dirname(os.path.abspath(root)), 'penalties', 'abs')
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    raise SystemExit(f'{workdir} is missing: run experiments/question/penalties.py first.')
  run = workdir_lib.Members(workdir)
  member = max(range(run.num_members), key=lambda m: (run.rows[m]['gamma'], -run.rows[m]['seed']))
  params = jax.tree.map(lambda a: a[member], run.states.params)
  key = jax.random.key(0)
  x = evaluate.draw_images(run.dataset, key, BATCH)
  out, mean, logvar = run.model.apply(params, x, jax.random.fold_in(key, 1))
  rec = np.asarray(losses.bernoulli_nll(out, x), np.float64)
  mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
  return run.rows[member], rec, mean, logvar, int(np.prod(x.shape[1:]))


def run(root: str, out: str, quick: bool = False):
  del quick  # one batch either way
  row, rec, mean, logvar, n = _batch(root)
  k = 0.5 * (np.exp(logvar) + mean ** 2 - 1.0 - logvar)  # [B, M], float64
  b, m = k.shape
  a_form = np.sum(np.mean(k, axis=0))  # reduction A
  b_form = np.mean(np.sum(k, axis=1))  # reduction B
  capvae_kl = float(losses.capacity_objective(
      rec.astype(np.float32), k.astype(np.float32), 1.0, 0.0)[1]['kl'])
  kl_b = k.sum(axis=1)
  cs = {'below every example': float(max(0.0, np.floor(kl_b.min()) - 1)),
        'at the median example': float(np.median(kl_b)),
        'at the mean': float(kl_b.mean()),
        'above every example': float(np.ceil(kl_b.max()) + 1)}
  penalties = []
  for where, c in cs.items():
    penalties.append({
        'c': c, 'where': where, 'abs_batch': float(abs(kl_b.mean() - c)),
        'abs_per_example': float(np.mean(np.abs(kl_b - c))),
        'abs_batch_pushes_up': int(b if kl_b.mean() < c else 0),
        'abs_per_example_pushes_up': int(np.sum(kl_b < c)),
        'abs_per_example_pushes_down': int(np.sum(kl_b > c))})
  summed = np.mean(rec + BETA * kl_b)
  forms = [
      ('rec summed over pixels', 'KL summed over latents', BETA, 1.0),
      ('rec averaged over pixels', 'KL summed over latents', BETA / n, 1.0 / n),
      ('rec averaged over pixels', 'KL averaged over latents (beta_norm)',
       losses.beta_norm(BETA, m, n), 1.0 / n),
      ('rec summed over pixels', 'KL averaged over latents', BETA * m, 1.0)]
  table = []
  for rec_form, kl_form, weight, scale in forms:
    r = rec if rec_form.startswith('rec summed') else rec / n
    kk = kl_b if kl_form.startswith('KL summed') else kl_b / m
    value = float(np.mean(r + weight * kk))
    table.append({'reconstruction': rec_form, 'kl': kl_form, 'weight': float(weight),
                  'loss': value, 'loss_over_summed': value / summed, 'expected_ratio': scale})
  numbers = {'member': row, 'batch': b, 'latents': m, 'pixels': n, 'beta': BETA,
             'reduction_a': float(a_form), 'reduction_b': float(b_form),
             'a_minus_b': float(a_form - b_form), 'capvae_batch_kl_float32': capvae_kl,
             'per_example_kl': {'min': float(kl_b.min()), 'median': float(np.median(kl_b)),
                                'mean': float(kl_b.mean()), 'max': float(kl_b.max())},
             'penalties': penalties, 'forms': table,
             'beta_norm_of_beta_4': float(losses.beta_norm(BETA, m, n))}
  common.write(out, NAME, {}, numbers)
  print(f'A = {a_form:.6f}, B = {b_form:.6f} (A − B = {a_form - b_form:.1e});'
        f' capvae {capvae_kl:.6f} (float32)')
  for p in penalties:
    print(f"C = {p['c']:.2f} ({p['where']}): |mean KL − C| {p['abs_batch']:.3f},"
          f" mean |KL − C| {p['abs_per_example']:.3f}; per example: up"
          f" {p['abs_per_example_pushes_up']}, down {p['abs_per_example_pushes_down']}")
  for t in table:
    print(f"{t['reconstruction']} + {t['weight']:.6g} × {t['kl']}: loss / summed ="
          f" {t['loss_over_summed']:.6g} (expected {t['expected_ratio']:.6g})")
  return numbers


if __name__ == '__main__':
  app.run(common.main_of(NAME, run))
