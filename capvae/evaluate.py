r"""Evaluates every member of a trained run: what each model learned.

  capvae evaluate --workdir runs/default

For each member of the run in ``workdir`` (one, or all members of a sweep) at
its latest checkpoint, this computes

* the disentanglement metrics of :mod:`capvae.metrics` (BetaVAE, FactorVAE,
  MIG, DCI, SAP, Modularity, Explicitness) on the encoder means, at
  disentanglement_lib's sample sizes times ``scale``;
* per-latent KL and the reconstruction error on held-out draws (images drawn
  with a seed of their own, independent of the training batches);
* which factor each active latent encodes: the factor with which it shares
  the most mutual information (20-bin discretisation of the mean), with that
  MI divided by the factor's entropy;
* I(x; z), the information the code carries about the image, with x uniform
  over the dataset's grid (over a random subset of it when ``scale < 1``),
  and for each latent alone (:mod:`capvae.metrics.information`): the KL minus
  I(x; z) is what the code spends on not looking like the prior.

and writes ``eval.json`` to the workdir: one record per member, with its
hyperparameters. Members of a sweep are evaluated together: each image is
rendered once and encoded by every member in one program, and every grid
point's codes are computed at most once (:class:`GridCodes`), however many
times the metrics draw it.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from capvae import losses, metrics, models, progress
from capvae import workdir as workdir_lib
from capvae.metrics import information
from capvae.data import base
from capvae.errors import ConfigError

EVAL_FILE = 'eval.json'
# A latent whose held-out KL is at least this many nats counts as active.
ACTIVE_KL = 0.1
DCI_ESTIMATORS = metrics.DCI_ESTIMATORS
# Held-out draws for per-latent KL and reconstruction (times the scale).
NUM_HELDOUT = 10_000
# I(x; z) (capvae.metrics.information): images whose z the estimate averages
# over (times the scale), and the fewest images in the mixture when the scale
# shrinks it below the whole grid.
INFO_QUERIES = 1000
INFO_MIN_IMAGES = 10_000
# The sample sizes a caller may set (--eval_sizes, or evaluate's ``sizes``):
# the metrics' (capvae.metrics.DEFAULT_SIZES) and the images of I(x; z).
INFO_IMAGES_KEY = 'information_images'
SIZE_KEYS = (*metrics.DEFAULT_SIZES, INFO_IMAGES_KEY)
# The headline number of each metric (keys of metrics.evaluate_all's scores).
HEADLINE = {
    'beta_vae': 'beta_vae.eval_accuracy',
    'factor_vae': 'factor_vae.eval_accuracy',
    'mig': 'mig',
    'dci_disentanglement': 'dci.disentanglement',
    'dci_completeness': 'dci.completeness',
    'dci_informativeness': 'dci.informativeness_test',
    'sap': 'sap',
    'modularity': 'modularity',
    'explicitness': 'explicitness_test',
}


class GridCodes:
  """Encoder means of every member for grid points, each computed at most once.

  ``codes_fn(m)`` is the representation function of member ``m`` for
  :mod:`capvae.metrics`: factor rows ``[n, K]`` → means ``[n, L]``. Points
  not yet seen are rendered and encoded, in chunks of ``chunk`` images, by all
  members at once; then every member's codes for them are kept.
  """

  def __init__(self, model, dataset, params, chunk: int = 128):
    self.dataset = dataset
    self.chunk = chunk
    num_members = jax.tree.leaves(params)[0].shape[0]
    self._params = params
    # The same function with XLA's convolutions: faster for a forward pass.
    encoder = model.encoder
    if hasattr(encoder, 'impl'):
      encoder = encoder.clone(impl='xla')

    def encode(params, factors):
      x = dataset.render(factors)
      return jax.lax.map(  # means and log variances, [M, chunk, L] each
          lambda p: encoder.apply({'params': p['params']['encoder']}, x), params)

    factors_shape = jax.ShapeDtypeStruct((chunk, len(dataset.factor_sizes)), jnp.int32)
    latent = jax.eval_shape(jax.jit(encode), params, factors_shape)[0].shape[-1]
    logging.info('Compiling the encoder pass for %d member(s)...', num_members)
    self._encode = jax.jit(encode).lower(params, factors_shape).compile()
    self.codes = np.zeros((num_members, dataset.num_examples, latent), np.float32)
    self.logvars = np.zeros_like(self.codes)
    self.filled = np.zeros((dataset.num_examples,), bool)
    strides = base.strides(dataset.factor_sizes)
    self.strides = np.asarray(strides, np.int64)
    self.encoded = 0  # images encoded so far (per member)
    self.seconds = 0.0

  def _fill(self, flat: np.ndarray) -> None:
    todo = np.unique(flat[~self.filled[flat]])
    if not todo.size:
      return
    t0 = time.perf_counter()
    factors = _unflatten(todo, self.dataset.factor_sizes)
    starts = range(0, todo.size, self.chunk)
    if len(starts) >= 50:  # a pass worth watching: the whole grid, or most of it
      starts = progress.iterate(starts, len(starts), f'encoding {todo.size} images',
                                'chunk')
    for start in starts:
      part = factors[start:start + self.chunk]
      n = part.shape[0]
      if n < self.chunk:
        part = np.concatenate([part, np.repeat(part[-1:], self.chunk - n, axis=0)])
      means, logvars = jax.device_get(self._encode(self._params, jnp.asarray(part, jnp.int32)))
      self.codes[:, todo[start:start + n]] = means[:, :n]
      self.logvars[:, todo[start:start + n]] = logvars[:, :n]
    self.filled[todo] = True
    self.encoded += todo.size
    self.seconds += time.perf_counter() - t0

  def posteriors(self, member: int, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Member ``member``'s posterior means and log variances ``[n, L]`` of the
    grid points with flat indices ``flat``."""
    flat = np.asarray(flat, np.int64)
    self._fill(flat)
    return self.codes[member, flat], self.logvars[member, flat]

  def codes_fn(self, member: int):
    def fn(factors: np.ndarray) -> np.ndarray:
      flat = np.asarray(factors, np.int64) @ self.strides
      self._fill(flat)
      return self.codes[member, flat]
    return fn


def _unflatten(flat: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
  return np.stack(np.unravel_index(flat, tuple(sizes)), axis=1).astype(np.int32)


def heldout_stats(run: workdir_lib.Members, num_images: int, seed: int, batch: int = 500):
  """Per-latent KL ``[M, L]``, reconstruction ``[M]`` (sampled z, the training
  estimate), reconstruction from the mean ``[M]``, averaged over
  ``num_images`` held-out draws, the per-latent KL split into offset,
  spread and variance (:func:`capvae.losses.kl_decomposition`, each ``[M, L]``),
  and the objective's own scalar terms (its loss's ``aux`` and its state's
  step, e.g. the total correlation, the discriminator's accuracy, the
  controller's beta; each ``[M]``), averaged over batches of ``batch``."""
  model, objective, dataset = run.model, run.objective, run.dataset
  pixels = int(np.prod(dataset.observation_shape))
  if objective.dataset_size:  # the 'mss' estimator's weights need B <= N
    batch = min(batch, objective.dataset_size)

  def one(args, x, key):
    params, hparams, objective_state = args
    eps = models.noise(key, x.shape[0], model.encoder.latent_size)
    out, mean, logvar = model.apply(params, x, eps, method=models.VAE.with_noise)
    out_mean = model.apply(params, mean, method=models.VAE.decode)
    rec = objective.reconstruction_loss(out, x, hparams)
    stats = losses.Stats(rec=rec, mean=mean, logvar=logvar,
                         z=models.reparameterize(mean, logvar, eps))
    _, aux = objective(hparams, run.step, stats, pixels, objective_state)
    _, more = objective.update(hparams, run.step, stats, objective_state,
                               jax.random.fold_in(key, 1))
    terms = {k: v for k, v in {**aux, **more}.items()
             if jnp.ndim(v) == 0 and k not in OBJECTIVE_TERMS_SKIPPED}
    return (jnp.sum(losses.gaussian_kl(mean, logvar), axis=0), jnp.sum(rec),
            jnp.sum(objective.reconstruction_loss(out_mean, x, hparams)),
            (jnp.sum(mean, axis=0), jnp.sum(jnp.square(mean), axis=0),
             jnp.sum(jnp.exp(logvar), axis=0), jnp.sum(logvar, axis=0)), terms)

  @jax.jit
  def stats(states, ds, key):
    fkey, zkey = jax.random.split(key)
    x = ds.render(ds.sample_factors(fkey, batch))
    return jax.lax.map(lambda a: one(a, x, zkey),
                       (states.params, states.hparams, states.objective_state))

  num_batches = max(1, math.ceil(num_images / batch))
  base = jax.random.fold_in(jax.random.key(seed), 1)
  totals = None
  for b in range(num_batches):
    # A streamed dataset gives this batch from the host (records drawn with a
    # seed no training run uses); the others render it inside the program.
    ds = dataset.batch(HELDOUT_STREAM_SEED + seed, b, batch) if _streamed(dataset) else dataset
    out = jax.device_get(stats(run.states, ds, jax.random.fold_in(base, b)))
    # The objective's terms are batch means: summed in float64, then averaged.
    out = (*out[:4], {k: np.asarray(v, np.float64) for k, v in out[4].items()})
    totals = out if totals is None else jax.tree.map(np.add, totals, out)
  n = num_batches * batch
  moments = [np.asarray(t, np.float64) for t in totals[3]]
  kl, rec, rec_mean = (np.asarray(t, np.float64) / n for t in totals[:3])
  parts = {k: np.asarray(v) for k, v in losses.kl_decomposition(*moments, n).items()}
  terms = {k: v / num_batches for k, v in totals[4].items()}
  return kl, rec, rec_mean, parts, terms


# Scalars of an objective's aux that eval.json has elsewhere (or that are
# bookkeeping): not repeated under 'objective_terms'.
OBJECTIVE_TERMS_SKIPPED = frozenset({'rec', 'kl'})


# Streamed datasets draw held-out records with data seeds from here up (training
# data seeds are below 2**31).
HELDOUT_STREAM_SEED = 2**31


def _streamed(dataset) -> bool:
  return bool(getattr(dataset, 'streamed', False))


def draw_images(dataset, key: jax.Array, n: int, seed: int = 0) -> jax.Array:
  """``n`` images of ``dataset``: rendered from a draw of factors, or, for a
  streamed dataset, read from the host (records a function of ``seed``)."""
  if _streamed(dataset):
    ds = dataset.batch(HELDOUT_STREAM_SEED + seed, 1 << 20, n)
    return ds.render(ds.sample_factors(key, n))
  return dataset.render(dataset.sample_factors(key, n))


def information_images(num_examples: int, scale: float, seed: int,
                       size: int | None = None) -> np.ndarray:
  """Flat grid indices of the images I(x; z) is computed over: ``size`` of
  them when given, else the whole grid at ``scale`` 1, else a random subset of
  ``max(INFO_MIN_IMAGES, scale·N)``."""
  n = num_examples
  if size is None:
    size = n if scale >= 1 else max(INFO_MIN_IMAGES, round(n * scale))
  size = min(n, size)
  return np.sort(np.random.default_rng([seed, 7]).choice(n, size, replace=False))


def latent_factors(kl_per_latent, mi, factor_sizes, factor_names):
  """What each active latent encodes: ``[{latent, kl, factor, mi, normalized_mi}]``,
  latents in order of decreasing KL; ``mi`` is ``[L, K]`` in nats."""
  entropy = np.log(np.asarray(factor_sizes, np.float64))  # uniform factors
  out = []
  for j in np.argsort(-np.asarray(kl_per_latent)):
    if kl_per_latent[j] < ACTIVE_KL:
      continue
    k = int(np.argmax(mi[j]))
    out.append({'latent': int(j), 'kl': float(kl_per_latent[j]),
                'factor': factor_names[k], 'mi': float(mi[j, k]),
                'normalized_mi': float(mi[j, k] / entropy[k])})
  return out


def check_settings(scale: float, dci_estimator: str, seed: int) -> None:
  if not (isinstance(scale, (int, float)) and math.isfinite(scale) and 0 < scale <= 1):
    raise ConfigError(f'--eval_scale={scale}: must be in (0, 1] (1 = disentanglement_lib'
                      ' sample sizes).')
  if dci_estimator not in DCI_ESTIMATORS:
    raise ConfigError(f'--dci_estimator={dci_estimator!r} is unknown; allowed:'
                      f' {list(DCI_ESTIMATORS)}.')
  if seed < 0:
    raise ConfigError(f'--eval_seed={seed}: must be >= 0.')


def parse_sizes(text: str) -> dict[str, int]:
  """``--eval_sizes``: ``'key=N,key=N'`` → ``{key: N}``, keys of :data:`SIZE_KEYS`
  (checked here; the values by :func:`check_sizes`)."""
  out = {}
  for part in (p.strip() for p in text.split(',')):
    if not part:
      continue
    key, eq, value = (x.strip() for x in part.partition('='))
    if not eq:
      raise ConfigError(f'--eval_sizes: {part!r} is not KEY=N (e.g. --eval_sizes='
                        f'{INFO_IMAGES_KEY}=2000,num_train=500).')
    try:
      out[key] = int(value)
    except ValueError:
      raise ConfigError(f'--eval_sizes: {key}={value!r} is not a whole number.') from None
  check_sizes(out)
  return out


def check_sizes(sizes: dict[str, Any] | None, scale: float = 1.0
                ) -> tuple[dict[str, int], int | None]:
  """``(metric sample sizes, images of I(x; z) or None for the default)``:
  disentanglement_lib's sizes times ``scale``, then ``sizes``' overrides."""
  sizes = dict(sizes or {})
  unknown = sorted(set(sizes) - set(SIZE_KEYS))
  if unknown:
    raise ConfigError(f'--eval_sizes: unknown sample size(s) {unknown}; allowed:'
                      f' {", ".join(SIZE_KEYS)}.')
  info = sizes.pop(INFO_IMAGES_KEY, None)
  if info is not None and (isinstance(info, bool) or not isinstance(info, (int, np.integer))
                           or info < 2):
    raise ConfigError(f'--eval_sizes: {INFO_IMAGES_KEY}={info!r} must be an integer >= 2.')
  try:
    merged = metrics.check_sizes({**metrics.default_sizes(scale), **sizes})
  except ValueError as e:
    raise ConfigError(f'--eval_sizes: {e}') from None
  return merged, None if info is None else int(info)


def evaluate(workdir: str, *, scale: float = 1.0, dci_estimator: str = 'fast',
             seed: int = 0, step: int | None = None,
             sizes: dict[str, int] | None = None) -> dict[str, Any]:
  """Evaluates every member of ``workdir`` and writes ``eval.json``; returns it.

  Args:
    workdir: a trained run (single or sweep).
    scale: sample sizes as a fraction of disentanglement_lib's, in (0, 1].
    dci_estimator: ``'fast'`` or ``'gbt'`` (see :func:`capvae.metrics.dci`).
    seed: seed of every metric's draws (same seed, same numbers).
    step: checkpoint step (default: the latest).
    sizes: overrides of single sample sizes, applied after ``scale``: keys of
      :data:`capvae.metrics.DEFAULT_SIZES`, and ``'information_images'``, the
      images I(x; z) is estimated over (:func:`information_images`).
  """
  check_settings(scale, dci_estimator, seed)
  sizes, info_images = check_sizes(sizes, scale)
  t0 = time.perf_counter()
  run = workdir_lib.Members(workdir, step)
  dataset = run.dataset
  num_heldout = max(100, round(NUM_HELDOUT * scale))
  logging.info('evaluating %d member(s) of %s at step %d (sample sizes %s)',
               run.num_members, workdir, run.step, sizes)
  kl, rec, rec_mean, kl_parts, terms = heldout_stats(run, num_heldout, seed)
  # Factor metrics need factors over a whole grid; an unlabelled image
  # dataset (tfds:mnist, ...) gets held-out KL and reconstruction only.
  has_factors = (getattr(dataset, 'has_factors', True)
                 and getattr(dataset, 'complete_grid', True))
  if not has_factors:
    logging.info('%s has no complete factor grid: no disentanglement metrics.',
                 run.config.dataset)
  grid = GridCodes(run.model, dataset, run.states.params) if has_factors else None
  if has_factors:
    info_flat = information_images(dataset.num_examples, scale, seed, info_images)
    info_queries = max(100, round(INFO_QUERIES * scale))
  records = []
  for m, row in progress.iterate(enumerate(run.rows), len(run.rows), 'evaluate', 'member'):
    if has_factors:
      scores, times, mi = metrics.evaluate_all(
          grid.codes_fn(m), dataset.factor_sizes, seed=seed, sizes=sizes,
          dci_estimator=dci_estimator)
      values = {name: scores[key] for name, key in HEADLINE.items()}
      factors_of = latent_factors(kl[m], mi, dataset.factor_sizes, dataset.factor_names)
      mi = np.asarray(mi).tolist()
      t_info = time.perf_counter()
      info = information.code_information(
          *grid.posteriors(m, info_flat), jax.random.fold_in(jax.random.key(seed), m),
          num_queries=info_queries)
      times['information'] = time.perf_counter() - t_info
    else:
      scores, times, values, factors_of, mi, info = {}, {}, {}, [], None, None
    frozen = bool(np.asarray(run.states.frozen[m]))
    records.append({
        **row, 'member': m, 'step': run.step, 'frozen': frozen,
        'metrics': values, 'scores': scores, 'seconds': times,
        'kl': float(kl[m].sum()), 'kl_per_latent': kl[m].tolist(),
        'rec': float(rec[m]), 'rec_from_mean': float(rec_mean[m]),
        'active_latents': int(np.sum(kl[m] >= ACTIVE_KL)),
        # The KL split into what carries information and what cannot
        # (capvae.losses.kl_decomposition): totals and per latent.
        'kl_parts': {k: float(v[m].sum()) for k, v in kl_parts.items()},
        'kl_parts_per_latent': {k: v[m].tolist() for k, v in kl_parts.items()},
        # The objective's own terms on held-out batches of 500 (the total
        # correlation, the discriminator's accuracy, the controller's beta...).
        'objective_terms': {k: float(v[m]) for k, v in terms.items()},
        'latent_factors': factors_of,
        'mutual_information': mi,
        # I(x; z) in nats, with its Monte Carlo error, per latent, and its
        # bound ln(images).
        'information': info,
    })
    logging.info('member %d: %s%s', m, ', '.join(
        f'{k} {v:.3f}' for k, v in values.items()),
        f', I(x;z) {info["mi"]:.2f} ± {info["mi_stderr"]:.2f} of KL {kl[m].sum():.2f}'
        if info else '')
  result = {
      'workdir': os.path.abspath(workdir), 'step': run.step,
      'factor_names': list(dataset.factor_names),
      'factor_sizes': list(dataset.factor_sizes),
      'settings': {'scale': scale, 'dci_estimator': dci_estimator, 'seed': seed,
                   'active_kl': ACTIVE_KL, 'num_heldout': num_heldout, **sizes,
                   INFO_IMAGES_KEY: int(info_flat.size) if has_factors else None},
      'has_factors': bool(has_factors),
      'encoded_images_per_member': grid.encoded if grid else 0,
      'encode_seconds': grid.seconds if grid else 0.0,
      'seconds': time.perf_counter() - t0,
      'members': records,
  }
  if jax.process_index() == 0:
    workdir_lib.write_json(os.path.join(workdir, EVAL_FILE), result)
    from capvae import tracking  # pylint: disable=g-import-not-at-top
    tracking.write_scores(workdir, records, run.step)
  return result


def load(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, EVAL_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
