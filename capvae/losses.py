"""Pure loss terms for beta-VAEs and capacity-annealed beta-VAEs.

Everything here acts on plain arrays and Python/JAX scalars; nothing reads a
config. Shapes follow one convention:

* reconstruction terms take a batch ``[B, ...]`` and return one number per
  example, ``[B]``, **summed** over every pixel and channel (a sum, not a pixel
  mean: a pixel mean silently divides the reconstruction by N = H·W·C and so
  multiplies the effective beta or gamma by N);
* :func:`gaussian_kl` returns the KL of every latent of every example,
  ``[B, M]``, so per-latent KL (Burgess et al. 2018, Fig. 3) is always at hand;
* objectives reduce those to ``(loss, aux)`` where ``aux`` is a dict with the
  batch-mean ``rec``, ``kl``, ``kl_per_latent`` ``[M]``, ``c`` and ``kl_minus_c``.

On the two Keras reductions of the seed question: with per-example, per-latent
KL ``k[b, m]``, reduction A is ``sum_m mean_b k`` and reduction B is
``mean_b sum_m k``. Both are the same number (sums and means commute), which is
the batch-mean total KL that :func:`capacity_objective` compares with C. Where
implementations really differ is *where the absolute value goes*:
``|mean_b KL_b − C|`` (the paper, disentanglement_lib) or
``mean_b |KL_b − C|`` (pythae). Those are not equal; see ``CAPACITY_PENALTIES``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from capvae import models, schedules

Array = jax.Array
Aux = dict[str, Array]


def _sum_per_example(x: Array) -> Array:
  """Sums every axis but the leading (batch) one."""
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


# --------------------------------------------------------------------------
# Reconstruction: negative log-likelihoods, summed over pixels.
# --------------------------------------------------------------------------


def bernoulli_nll(logits: Array, x: Array) -> Array:
  """Bernoulli negative log-likelihood of ``x`` under ``sigmoid(logits)``.

  ``-log p(x|z) = sum_i softplus(l_i) - x_i l_i``, which is the numerically
  stable form of binary cross-entropy. ``x`` may be fractional in [0, 1].

  Args:
    logits: decoder output, ``[B, ...]``.
    x: targets in [0, 1], same shape.

  Returns:
    ``[B]`` negative log-likelihood in nats, summed over pixels.
  """
  return _sum_per_example(jax.nn.softplus(logits) - x * logits)


def gaussian_nll(mean: Array, x: Array, variance: float = 1.0) -> Array:
  """Gaussian negative log-likelihood with a fixed, shared variance.

  ``-log N(x; mean, variance) = sum_i (x_i - mean_i)^2 / (2 variance)
  + 0.5 log(2 pi variance)``.

  Args:
    mean: decoder output, ``[B, ...]``.
    x: targets, same shape.
    variance: the fixed observation variance (> 0).

  Returns:
    ``[B]`` negative log-likelihood in nats, summed over pixels.
  """
  n = math.prod(x.shape[1:])
  sq = _sum_per_example(jnp.square(x - mean))
  return sq / (2.0 * variance) + 0.5 * n * jnp.log(2.0 * jnp.pi * variance)


def raw_dim_mse(mean: Array, x: Array) -> Array:
  """The seed question's reconstruction, ``raw_dim * mse``.

  Keras' ``mse`` averages over features; multiplying by ``raw_dim`` (= N)
  undoes the average, so this is the per-example **sum of squared errors**.
  That equals the Gaussian NLL with variance 1/2 minus its constant
  ``(N/2) log(pi)``, i.e. it is a proper log-likelihood scale for the KL to be
  weighed against (unlike a bare pixel-mean MSE, which is N times smaller).

  Args:
    mean: decoder output, ``[B, ...]``.
    x: targets, same shape.

  Returns:
    ``[B]`` sum of squared errors.
  """
  n = math.prod(x.shape[1:])
  mse = jnp.mean(jnp.square(x - mean), axis=tuple(range(1, x.ndim)))
  return n * mse


RECONSTRUCTIONS: dict[str, Callable[..., Array]] = {
    'bernoulli': bernoulli_nll,
    'gaussian': gaussian_nll,
    'raw_dim_mse': raw_dim_mse,
}


# --------------------------------------------------------------------------
# KL divergence.
# --------------------------------------------------------------------------


def gaussian_kl(mean: Array, logvar: Array) -> Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) for every latent.

  ``0.5 (exp(logvar) + mean^2 - 1 - logvar)``, elementwise.

  Args:
    mean: posterior means, any shape (``[B, M]`` in training).
    logvar: posterior log-variances, same shape.

  Returns:
    KL in nats, same shape as ``mean``.
  """
  return 0.5 * (jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar)


def kl_decomposition(mean_sum: Array, mean_sq_sum: Array, var_sum: Array,
                     logvar_sum: Array, n: Any) -> dict[str, Array]:
  """Splits the data-average KL of every latent into three parts.

  Averaged over examples, ``KL_m = 0.5 (E[mu^2] + E[sigma^2] - 1 - E[log sigma^2])``,
  and ``E[mu^2] = E[mu]^2 + Var[mu]``. So

  * ``offset``: ``0.5 E[mu]^2``, a shift of every posterior mean by the same
    amount. It carries no information about the input; the decoder undoes it
    with a bias. A penalty that only asks for *some* KL (``|KL - C|`` below C)
    can be paid with it.
  * ``spread``: ``0.5 Var[mu]``, the means moving with the input: the only part
    that can carry information.
  * ``variance``: ``0.5 (E[sigma^2] - 1 - E[log sigma^2])``, posteriors narrower
    (or wider) than the prior. Narrowing is what makes a spread of means
    informative; without a spread it is wasted.

  The three add up to the average KL exactly (``gaussian_kl`` averaged over
  the examples). The arguments are sums over ``n`` examples, so batches can be
  accumulated before the split.

  Args:
    mean_sum, mean_sq_sum: ``sum_b mu`` and ``sum_b mu^2``, ``[..., M]``.
    var_sum, logvar_sum: ``sum_b sigma^2`` and ``sum_b log sigma^2``, ``[..., M]``.
    n: the number of examples summed.

  Returns:
    ``{'offset', 'spread', 'variance'}``, each ``[..., M]`` in nats.
  """
  mu = mean_sum / n
  return {
      'offset': 0.5 * jnp.square(mu),
      'spread': 0.5 * jnp.maximum(mean_sq_sum / n - jnp.square(mu), 0.0),
      'variance': 0.5 * (var_sum / n - 1.0 - logvar_sum / n),
  }


# --------------------------------------------------------------------------
# Objectives.
# --------------------------------------------------------------------------


def beta_norm(beta: Any, latent_size: int, input_size: int) -> Any:
  """Higgins et al.'s normalised beta, ``beta_norm = beta · M / N``.

  M is the number of latents and N the number of input dimensions
  (64·64·1 = 4096 for dSprites), *not* the batch size. ``beta_norm`` is the
  weight on the **per-latent mean** KL that matches ``beta`` on the summed KL
  when the reconstruction is a **per-pixel mean**:
  ``(rec_sum + beta·KL_sum) / N = rec_sum/N + beta_norm · KL_sum/M``.
  """
  return beta * latent_size / input_size


# Per-example total KL quantiles in every objective's aux (and so in every
# logged row): name -> quantile. The batch KL is their mean; a penalty on each
# example's KL ('abs_per_example') pins the median to C instead.
KL_QUANTILES = {'kl_example_p10': 0.1, 'kl_example_median': 0.5, 'kl_example_p90': 0.9}


def _batch_aux(rec: Array, kl: Array, c: Any) -> Aux:
  kl_per_latent = jnp.mean(kl, axis=0)
  kl_total = jnp.sum(kl_per_latent)
  c = jnp.asarray(c, kl_total.dtype)
  quantiles = jnp.quantile(jnp.sum(kl, axis=-1), jnp.asarray(list(KL_QUANTILES.values())))
  return {
      'rec': jnp.mean(rec),
      'kl': kl_total,
      'kl_per_latent': kl_per_latent,
      'c': c,
      'kl_minus_c': kl_total - c,
      **dict(zip(KL_QUANTILES, quantiles)),
  }


def beta_objective(
    rec: Array,
    kl: Array,
    beta: Any,
    *,
    normalized: bool = False,
    input_size: int | None = None,
) -> tuple[Array, Aux]:
  """beta-VAE loss (Higgins et al. 2017): ``mean_b [rec_b + beta · KL_b]``.

  Args:
    rec: per-example reconstruction NLL summed over pixels, ``[B]``.
    kl: per-example, per-latent KL, ``[B, M]``.
    beta: weight of the KL (a float or a traced scalar).
    normalized: if True, use the paper's normalised form
      ``rec/N + beta_norm · KL/M`` with ``beta_norm = beta·M/N``. It has the
      same minimiser and is exactly the un-normalised loss divided by N.
    input_size: N, required when ``normalized``.

  Returns:
    ``(loss, aux)``; ``aux`` also holds ``beta_eff`` (the weight actually on
    the summed KL relative to the summed reconstruction, i.e. ``beta``) and,
    when normalised, ``beta_norm``. ``c`` is 0 for this objective.
  """
  aux = _batch_aux(rec, kl, 0.0)
  kl_b = jnp.sum(kl, axis=-1)
  if normalized:
    if input_size is None:
      raise ValueError('beta_objective(normalized=True) needs input_size (N).')
    m = kl.shape[-1]
    bn = beta_norm(beta, m, input_size)
    loss = jnp.mean(rec / input_size + bn * kl_b / m)
    aux['beta_norm'] = jnp.asarray(bn, loss.dtype)
  else:
    loss = jnp.mean(rec + beta * kl_b)
  aux['loss'] = loss
  return loss, aux


def _abs_batch(kl_b: Array, c: Any) -> Array:
  return jnp.abs(jnp.mean(kl_b) - c)


def _abs_per_example(kl_b: Array, c: Any) -> Array:
  return jnp.mean(jnp.abs(kl_b - c))


def _squared(kl_b: Array, c: Any) -> Array:
  return jnp.square(jnp.mean(kl_b) - c)


CAPACITY_PENALTIES: dict[str, Callable[[Array, Any], Array]] = {
    # |mean_b KL_b - C|: Burgess et al. 2018, disentanglement_lib, 1Konny.
    'abs': _abs_batch,
    # mean_b |KL_b - C|: pythae. Pulls every example's KL to C, not the mean.
    'abs_per_example': _abs_per_example,
    # (mean_b KL_b - C)^2: gradient 2·gamma·(KL - C), weaker than 'abs' only
    # within half a nat of C. Never holds KL at C: its optimum sits above C by
    # |d rec / d KL| / (2·gamma).
    'squared': _squared,
}


def capacity_objective(
    rec: Array,
    kl: Array,
    gamma: Any,
    capacity: Any,
    *,
    penalty: str = 'abs',
) -> tuple[Array, Aux]:
  """Capacity-annealed beta-VAE loss (Burgess et al. 2018).

  ``mean_b rec_b + gamma · penalty(KL, C)``, the negative of
  ``E[log p(x|z)] - gamma |KL - C|``. Below C the absolute value's gradient
  with respect to KL is ``-gamma``: the loss *rewards* more KL until it reaches
  C, which is what lets the model buy capacity as C grows. Above C it is
  ``+gamma`` and pushes KL back down.

  Args:
    rec: per-example reconstruction NLL summed over pixels, ``[B]``.
    kl: per-example, per-latent KL, ``[B, M]``.
    gamma: penalty weight (float or traced scalar).
    capacity: the target C in nats (float or traced scalar).
    penalty: one of ``CAPACITY_PENALTIES``: ``'abs'`` (default, the paper's
      ``|mean KL - C|``), ``'abs_per_example'`` (pythae's ``mean |KL - C|``) or
      ``'squared'`` (``(mean KL - C)^2``).

  Returns:
    ``(loss, aux)``.
  """
  if penalty not in CAPACITY_PENALTIES:
    raise ValueError(
        f'capacity penalty {penalty!r} is unknown; allowed:'
        f' {sorted(CAPACITY_PENALTIES)}.')
  aux = _batch_aux(rec, kl, capacity)
  kl_b = jnp.sum(kl, axis=-1)
  loss = jnp.mean(rec) + gamma * CAPACITY_PENALTIES[penalty](kl_b, capacity)
  aux['loss'] = loss
  return loss, aux


# --------------------------------------------------------------------------
# The objectives researchers compare against (disentanglement_lib's
# definitions, ``methods/unsupervised/vae.py``), and a capacity held by a
# controller.
# --------------------------------------------------------------------------


class Stats(NamedTuple):
  """What an objective reads of a batch: per-example statistics only.

  Every objective here is a function of these (the covariances, the total
  correlation's pairwise densities and the discriminator all act on the
  batch's ``mean``, ``logvar`` and ``z``), which is what lets a data-parallel
  step gather them and take its gradient from each device's share
  (``capvae.train.data_parallel_grads``).
  """
  rec: Array  # [B] reconstruction NLL, summed over pixels
  mean: Array  # [B, M] posterior means
  logvar: Array  # [B, M] posterior log-variances
  z: Array  # [B, M] the reparameterised sample the decoder saw

  @property
  def kl(self) -> Array:
    """``[B, M]`` KL of every latent of every example."""
    return gaussian_kl(self.mean, self.logvar)


def gaussian_log_density(x: Array, mean: Array, logvar: Array) -> Array:
  """``log N(x; mean, exp(logvar))``, elementwise."""
  return -0.5 * (jnp.square(x - mean) * jnp.exp(-logvar) + logvar + math.log(2 * math.pi))


TC_ESTIMATORS = ('mws', 'mss')


def _log_weights(batch_size: int, dataset_size: int, estimator: str) -> Array:
  """``log w[i, j]``: the weight of ``q(z_i | x_j)`` in the estimate of ``q(z_i)``.

  ``'mws'`` weighs every example of the batch equally, ``1/B``. ``'mss'`` is
  Chen et al.'s minibatch-stratified sampling for a dataset of ``N`` examples:
  ``1/N`` for ``j = i``, ``(N − B + 1) / (N (B − 1))`` for one other example
  (the next), ``1/(B − 1)`` for the rest; with ``N = 0`` (a population, the
  limit N → ∞) it leaves ``x_i`` out and weighs the others ``1/(B − 1)``.
  Each row sums to 1.
  """
  b = batch_size
  if estimator == 'mws':
    return jnp.full((b, b), -math.log(b))
  if b < 2:
    raise ValueError('the mss estimator needs a batch of at least 2.')
  if dataset_size and b > dataset_size:
    raise ValueError(f'the mss estimator needs a batch ({b}) no larger than the dataset'
                     f' ({dataset_size}).')
  eye = jnp.eye(b, dtype=bool)
  nxt = jnp.roll(eye, 1, axis=1)  # [i, i+1 mod B]
  if dataset_size:
    n = float(dataset_size)
    w = jnp.where(eye, 1 / n, jnp.where(nxt, (n - b + 1) / (n * (b - 1)), 1 / (b - 1)))
    return jnp.log(w)
  return jnp.where(eye, -jnp.inf, -math.log(b - 1))


def kl_parts(z: Array, mean: Array, logvar: Array, *, estimator: str = 'mws',
             dataset_size: int = 0) -> dict[str, Array]:
  """Chen et al. 2018's split of the KL into three batch estimates (nats).

  With ``log q(z_i)`` and ``log q(z_im)`` estimated from the batch as
  ``log Σ_j w_ij q(z_i | x_j)`` (weights of :func:`_log_weights`):

  * ``mi``: index-code mutual information, ``E[log q(z|x) − log q(z)]``;
  * ``tc``: total correlation, ``E[log q(z) − Σ_m log q(z_m)]``;
  * ``dwkl``: dimension-wise KL, ``E[Σ_m log q(z_m) − log p(z)]``.

  They add up to ``E[log q(z|x) − log p(z)]``, a one-sample estimate of the KL.
  The ``tc`` of ``'mws'`` is disentanglement_lib's ``total_correlation`` plus
  the constant ``(M − 1) log B`` it drops (rtqichen/beta-tcvae adds ``(M − 1)
  log(N·B)`` instead); none of these constants changes a gradient, and with
  it the estimate tends to the true TC as the batch grows.
  """
  if estimator not in TC_ESTIMATORS:
    raise ValueError(f'tc estimator {estimator!r} is unknown; allowed: {list(TC_ESTIMATORS)}.')
  b = z.shape[0]
  pairs = gaussian_log_density(z[:, None, :], mean[None], logvar[None])  # [i, j, m]
  log_w = _log_weights(b, dataset_size, estimator)[:, :, None]
  log_qz = jax.nn.logsumexp(log_w[..., 0] + jnp.sum(pairs, -1), axis=1)
  log_qz_dims = jnp.sum(jax.nn.logsumexp(log_w + pairs, axis=1), -1)
  log_qz_x = jnp.sum(gaussian_log_density(z, mean, logvar), -1)
  log_pz = jnp.sum(gaussian_log_density(z, 0.0, jnp.zeros_like(z)), -1)
  return {'mi': jnp.mean(log_qz_x - log_qz), 'tc': jnp.mean(log_qz - log_qz_dims),
          'dwkl': jnp.mean(log_qz_dims - log_pz)}


def total_correlation(z: Array, mean: Array, logvar: Array, *, estimator: str = 'mws',
                      dataset_size: int = 0) -> Array:
  """The batch estimate of TC(z) of :func:`kl_parts`."""
  return kl_parts(z, mean, logvar, estimator=estimator, dataset_size=dataset_size)['tc']


def beta_tcvae_objective(stats: Stats, beta: Any, *, estimator: str = 'mws',
                         dataset_size: int = 0) -> tuple[Array, Aux]:
  """beta-TCVAE (Chen et al. 2018), disentanglement_lib's form:
  ``mean_b rec_b + KL + (beta − 1)·TC``, KL the batch-mean analytic KL.

  So the total correlation is weighed ``beta`` and the rest of the KL 1. aux
  holds ``mi``, ``tc`` and ``dwkl`` (:func:`kl_parts`).
  """
  aux = _batch_aux(stats.rec, stats.kl, 0.0)
  parts = kl_parts(stats.z, stats.mean, stats.logvar, estimator=estimator,
                   dataset_size=dataset_size)
  loss = aux['rec'] + aux['kl'] + (beta - 1.0) * parts['tc']
  aux.update(parts, loss=loss)
  return loss, aux


def covariance(x: Array) -> Array:
  """The batch covariance ``E[x xᵀ] − E[x] E[x]ᵀ`` of ``x [B, M]`` (divided by B)."""
  mu = jnp.mean(x, axis=0)
  return jnp.mean(x[:, :, None] * x[:, None, :], axis=0) - mu[:, None] * mu[None, :]


DIP_TYPES = ('i', 'ii')


def dip_regularizer(mean: Array, logvar: Array, lambda_od: Any, lambda_d: Any,
                    dip_type: str = 'i') -> tuple[Array, Array]:
  """DIP-VAE's penalty (Kumar et al. 2018) and the covariance it acts on.

  ``lambda_od Σ_{i≠j} Cov_ij² + lambda_d Σ_i (Cov_ii − 1)²``, where Cov is the
  covariance of the encoder means (``'i'``) or of the aggregate posterior
  (``'ii'``: that plus ``E[diag σ²]``).
  """
  if dip_type not in DIP_TYPES:
    raise ValueError(f'dip_type {dip_type!r} is unknown; allowed: {list(DIP_TYPES)}.')
  cov = covariance(mean)
  if dip_type == 'ii':
    cov = cov + jnp.diag(jnp.mean(jnp.exp(logvar), axis=0))
  diag = jnp.diagonal(cov)
  off = jnp.sum(jnp.square(cov - jnp.diag(diag)))
  return lambda_od * off + lambda_d * jnp.sum(jnp.square(diag - 1.0)), cov


def dip_vae_objective(stats: Stats, lambda_od: Any, lambda_d: Any,
                      dip_type: str = 'i') -> tuple[Array, Aux]:
  """DIP-VAE: ``mean_b rec_b + KL + dip_regularizer``; aux adds ``dip``, the
  penalty, and ``cov_offdiag`` / ``cov_diag_err``, the summed squared
  off-diagonal and diagonal-minus-one terms it weighs."""
  aux = _batch_aux(stats.rec, stats.kl, 0.0)
  dip, cov = dip_regularizer(stats.mean, stats.logvar, lambda_od, lambda_d, dip_type)
  diag = jnp.diagonal(cov)
  loss = aux['rec'] + aux['kl'] + dip
  aux.update(loss=loss, dip=dip, cov_diag_err=jnp.sum(jnp.square(diag - 1.0)),
             cov_offdiag=jnp.sum(jnp.square(cov - jnp.diag(diag))))
  return loss, aux


def permute_dims(key, z: Array) -> Array:
  """Each column of ``z [B, M]`` permuted across the batch on its own: a sample
  of the product of q(z)'s marginals (disentanglement_lib's ``shuffle_codes``)."""
  keys = jax.random.split(key, z.shape[1])
  return jax.vmap(lambda k, col: jax.random.permutation(k, col), in_axes=(0, 1),
                  out_axes=1)(keys, z)


def discriminator_loss(logits_joint: Array, logits_permuted: Array) -> tuple[Array, Array]:
  """FactorVAE's discriminator loss and accuracy.

  ``−(½ mean log p₀(z) + ½ mean log p₁(z̃))`` with the probabilities clipped
  to [1e-6, 1 − 1e-6] as disentanglement_lib does; class 0 is a joint code,
  class 1 a permuted one. The accuracy is the share of both classified right.
  """
  log_p = lambda l: jnp.log(jnp.clip(jax.nn.softmax(l), 1e-6, 1 - 1e-6))
  loss = -0.5 * (jnp.mean(log_p(logits_joint)[:, 0]) + jnp.mean(log_p(logits_permuted)[:, 1]))
  acc = 0.5 * (jnp.mean(jnp.argmax(logits_joint, -1) == 0)
               + jnp.mean(jnp.argmax(logits_permuted, -1) == 1))
  return loss, acc


def factor_vae_objective(stats: Stats, gamma: Any, logits_joint: Array) -> tuple[Array, Aux]:
  """FactorVAE (Kim & Mnih 2018): ``mean_b rec_b + KL + gamma·TC``, the total
  correlation estimated by the discriminator's log-odds on the batch's codes,
  ``TC ≈ mean(logit₀ − logit₁)`` (``logits_joint`` of ``stats.z``; the
  gradient reaches the encoder through z, never the discriminator)."""
  aux = _batch_aux(stats.rec, stats.kl, 0.0)
  tc = jnp.mean(logits_joint[:, 0] - logits_joint[:, 1])
  loss = aux['rec'] + aux['kl'] + gamma * tc
  aux.update(loss=loss, tc=tc)
  return loss, aux


class ControllerState(NamedTuple):
  """A PI controller's memory: its integral term and its last output before
  the bounds were applied (for anti-windup)."""
  integral: Array
  beta_unclipped: Array


def pi_controller(state: ControllerState, kl: Any, c: Any, *, kp: Any, ki: Any,
                  beta_min: Any, beta_max: Any) -> tuple[Array, ControllerState]:
  """ControlVAE's PI law (Shao et al. 2020), the KL weight for this step.

  Taken from shj1987/ControlVAE-ICML2020's ``Disentangling/P_PID.py`` (the
  controller its dSprites runs use), with the error ``e = C − KL``::

    P    = kp / (1 + exp(e))            # in (0, kp): large when KL > C
    I   += ki · (KL − C)                # ControlVAE's Ki = −ki; kp 0.01, ki 0.001
    beta = clip(beta_min + P + I, beta_min, beta_max)

  What is changed: ControlVAE's floor of 1 is ``beta_min`` (traced; 1 by
  default) and there is a ceiling ``beta_max`` (ControlVAE's dSprites
  controller has none). Anti-windup: ControlVAE freezes the integral whenever
  the previous unclipped output was below the floor, whichever way the error
  points; here it is frozen only while the previous output was beyond a bound
  *and* the error would push it further out (conditional integration), so the
  integral can always come back.
  """
  e = c - kl
  p = kp * jax.nn.sigmoid(-e)
  step = ki * (kl - c)
  out_low = (state.beta_unclipped < beta_min) & (step < 0)
  out_high = (state.beta_unclipped > beta_max) & (step > 0)
  integral = jnp.where(out_low | out_high, state.integral, state.integral + step)
  raw = beta_min + p + integral
  return jnp.clip(raw, beta_min, beta_max), ControllerState(integral, raw)


def controlled_objective(stats: Stats, beta: Any, capacity: Any) -> tuple[Array, Aux]:
  """``mean_b rec_b + beta·KL`` with ``beta`` set by a controller (held fixed
  in the gradient); aux holds ``beta_t`` (that beta), C and ``kl_minus_c`` (the tracking
  error)."""
  aux = _batch_aux(stats.rec, stats.kl, capacity)
  beta = jax.lax.stop_gradient(jnp.asarray(beta, aux['kl'].dtype))
  loss = aux['rec'] + beta * aux['kl']
  aux.update(loss=loss, beta_t=beta)
  return loss, aux


OBJECTIVES = ('beta', 'capacity', 'beta_tcvae', 'factor_vae', 'dip_vae', 'controlled_capacity')

# The terms each objective logs of its own (beside rec, KL, C and the KL's
# quantiles), which the report draws over training and tabulates at the end.
OBJECTIVE_TERMS = {
    'beta': (),
    'capacity': ('kl_minus_c',),
    'beta_tcvae': ('tc', 'mi', 'dwkl'),
    'factor_vae': ('tc', 'disc_accuracy', 'disc_loss'),
    'dip_vae': ('dip', 'cov_offdiag', 'cov_diag_err'),
    'controlled_capacity': ('beta_t', 'kl_minus_c', 'controller_integral'),
}


# --------------------------------------------------------------------------
# A run's objective: its static kinds, called with its traced weights.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Objective:
  """The loss of a run, from the kinds that fix its program.

  The fields are the static choices (each a name from this module's tables,
  or a shape); the numbers are traced: calls take ``hparams``, anything with
  the attributes of :class:`capvae.train_state.Hparams`, scalars or traced
  arrays, so one compiled program serves every member of a sweep.

  Some objectives keep a state of their own from step to step (FactorVAE's
  discriminator and its optimizer, the controller's integral): it is created
  by :meth:`init_state`, read by :meth:`__call__` and advanced by
  :meth:`update`, and lives in the member's train state beside its
  parameters. The others' state is ``{}``.
  """
  objective: str = 'capacity'  # one of OBJECTIVES
  reconstruction: str = 'bernoulli'  # a key of RECONSTRUCTIONS
  capacity_penalty: str = 'abs'  # a key of CAPACITY_PENALTIES
  schedule: str = 'linear'  # a name of capvae.schedules
  beta_norm: bool = False  # the beta objective in Higgins et al.'s normalised units
  tc_estimator: str = 'mws'  # beta_tcvae: one of TC_ESTIMATORS
  dataset_size: int = 0  # beta_tcvae with 'mss': N (0: a population)
  dip_type: str = 'i'  # dip_vae: one of DIP_TYPES
  discriminator_layers: int = 6  # factor_vae
  discriminator_units: int = 1000  # factor_vae
  impl: str = 'matmul'  # how the discriminator's layers compute

  def __post_init__(self):
    for field, allowed in (('objective', OBJECTIVES), ('reconstruction', RECONSTRUCTIONS),
                           ('capacity_penalty', CAPACITY_PENALTIES),
                           ('schedule', schedules.SCHEDULES),
                           ('tc_estimator', TC_ESTIMATORS), ('dip_type', DIP_TYPES)):
      if getattr(self, field) not in allowed:
        raise ValueError(f'{field} {getattr(self, field)!r} is unknown; allowed:'
                         f' {sorted(allowed)}.')

  def reconstruction_loss(self, out: Array, x: Array, hparams) -> Array:
    """Per-example reconstruction ``[B]`` of decoder outputs ``out`` for images ``x``."""
    if self.reconstruction == 'gaussian':
      return gaussian_nll(out, x, hparams.gaussian_variance)
    return RECONSTRUCTIONS[self.reconstruction](out, x)

  def capacity(self, hparams, step) -> Array:
    """C at optimizer step ``step`` (the target of the capacity objectives)."""
    return schedules.get(self.schedule, hparams.c_max, hparams.c_anneal_steps,
                         hparams.c_stair_steps)(step)

  # -- the objective's own state ------------------------------------------

  def discriminator(self):
    """FactorVAE's discriminator module."""
    return models.Discriminator(self.discriminator_layers, self.discriminator_units,
                                self.impl)

  @staticmethod
  def discriminator_optimizer(hparams):
    """disentanglement_lib's discriminator optimizer: Adam, b1 0.5, b2 0.9."""
    return optax.adam(hparams.disc_learning_rate, b1=0.5, b2=0.9, eps=1e-8)

  def init_state(self, key, latent_size: int, hparams) -> Any:
    """The objective's state before the first step (``{}`` if it keeps none)."""
    if self.objective == 'factor_vae':
      params = self.discriminator().init(key, jnp.zeros((1, latent_size), jnp.float32))
      return {'discriminator': params,
              'discriminator_opt': self.discriminator_optimizer(hparams).init(params)}
    if self.objective == 'controlled_capacity':
      zero = jnp.zeros((), jnp.float32)
      return {'controller': ControllerState(zero, zero + hparams.beta_min)}
    return {}

  def _control(self, hparams, step, kl, state):
    c = self.capacity(hparams, step)
    beta, new = pi_controller(state['controller'], jax.lax.stop_gradient(kl), c,
                              kp=hparams.kp, ki=hparams.ki, beta_min=hparams.beta_min,
                              beta_max=hparams.beta_max)
    return c, beta, new

  def __call__(self, hparams, step, stats: Stats, input_size: int,
               state: Any = None) -> tuple[Array, Aux]:
    """``(loss, aux)`` of a batch's ``stats`` at optimizer step ``step``, the
    objective's ``state`` as it was before this step; ``input_size`` is N,
    the pixels of one image (for ``beta_norm``).

    The loss is a function of per-example statistics, which is what lets the
    gradient of a batch be assembled from shares of it (``capvae.train``).
    """
    if self.objective == 'beta':
      return beta_objective(stats.rec, stats.kl, hparams.beta, normalized=self.beta_norm,
                            input_size=input_size)
    if self.objective == 'capacity':
      return capacity_objective(stats.rec, stats.kl, hparams.gamma,
                                self.capacity(hparams, step), penalty=self.capacity_penalty)
    if self.objective == 'beta_tcvae':
      return beta_tcvae_objective(stats, hparams.beta, estimator=self.tc_estimator,
                                  dataset_size=self.dataset_size)
    if self.objective == 'dip_vae':
      return dip_vae_objective(stats, hparams.lambda_od,
                               hparams.lambda_d_factor * hparams.lambda_od, self.dip_type)
    if self.objective == 'factor_vae':
      logits = self.discriminator().apply(state['discriminator'], stats.z)
      return factor_vae_objective(stats, hparams.gamma, logits)
    kl = jnp.mean(jnp.sum(stats.kl, -1))
    c, beta, _ = self._control(hparams, step, kl, state)
    return controlled_objective(stats, beta, c)

  def update(self, hparams, step, stats: Stats, state: Any, key) -> tuple[Any, Aux]:
    """The objective's state after step ``step`` and what it logs: the
    discriminator's Adam step on the batch's codes (joint against permuted by
    ``key``), or the controller's integral; ``stats`` are read, never
    differentiated."""
    stats = jax.lax.stop_gradient(stats)
    if self.objective == 'factor_vae':
      disc = self.discriminator()
      z_perm = permute_dims(key, stats.z)

      def loss_fn(p):
        return discriminator_loss(disc.apply(p, stats.z), disc.apply(p, z_perm))

      (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['discriminator'])
      tx = self.discriminator_optimizer(hparams)
      updates, opt = tx.update(grads, state['discriminator_opt'], state['discriminator'])
      params = optax.apply_updates(state['discriminator'], updates)
      return ({'discriminator': params, 'discriminator_opt': opt},
              {'disc_loss': loss, 'disc_accuracy': acc})
    if self.objective == 'controlled_capacity':
      kl = jnp.mean(jnp.sum(stats.kl, -1))
      _, _, new = self._control(hparams, step, kl, state)
      return {'controller': new}, {'controller_integral': new.integral}
    return state, {}
