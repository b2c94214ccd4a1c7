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
from typing import Any, Callable

import jax
import jax.numpy as jnp

from capvae import schedules

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


OBJECTIVES = ('beta', 'capacity')


# --------------------------------------------------------------------------
# A run's objective: its static kinds, called with its traced weights.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Objective:
  """The loss of a run, from the kinds that fix its program.

  The fields are the static choices (each a name from this module's tables);
  the numbers are traced: calls take ``hparams``, anything with the attributes
  of :class:`capvae.train_state.Hparams` (``beta``, ``gamma``, ``c_max``,
  ``c_anneal_steps``, ``c_stair_steps``, ``gaussian_variance``), scalars or
  traced arrays, so one compiled program serves every member of a sweep.
  """
  objective: str = 'capacity'  # one of OBJECTIVES
  reconstruction: str = 'bernoulli'  # a key of RECONSTRUCTIONS
  capacity_penalty: str = 'abs'  # a key of CAPACITY_PENALTIES
  schedule: str = 'linear'  # a name of capvae.schedules
  beta_norm: bool = False  # the beta objective in Higgins et al.'s normalised units

  def __post_init__(self):
    for field, allowed in (('objective', OBJECTIVES), ('reconstruction', RECONSTRUCTIONS),
                           ('capacity_penalty', CAPACITY_PENALTIES),
                           ('schedule', schedules.SCHEDULES)):
      if getattr(self, field) not in allowed:
        raise ValueError(f'{field} {getattr(self, field)!r} is unknown; allowed:'
                         f' {sorted(allowed)}.')

  def reconstruction_loss(self, out: Array, x: Array, hparams) -> Array:
    """Per-example reconstruction ``[B]`` of decoder outputs ``out`` for images ``x``."""
    if self.reconstruction == 'gaussian':
      return gaussian_nll(out, x, hparams.gaussian_variance)
    return RECONSTRUCTIONS[self.reconstruction](out, x)

  def capacity(self, hparams, step) -> Array:
    """C at optimizer step ``step`` (the capacity objective's target)."""
    return schedules.get(self.schedule, hparams.c_max, hparams.c_anneal_steps,
                         hparams.c_stair_steps)(step)

  def __call__(self, hparams, step, rec: Array, kl: Array,
               input_size: int) -> tuple[Array, Aux]:
    """``(loss, aux)`` of per-example reconstructions ``rec [B]`` and KLs
    ``kl [B, M]`` at optimizer step ``step``; ``input_size`` is N, the pixels
    of one image (for ``beta_norm``).

    Every objective is a function of per-example statistics, linear in
    ``rec`` (it enters as a batch mean), which is what lets the gradient of a
    batch be assembled from shares of it (``capvae.train``).
    """
    if self.objective == 'beta':
      return beta_objective(rec, kl, hparams.beta, normalized=self.beta_norm,
                            input_size=input_size)
    return capacity_objective(rec, kl, hparams.gamma, self.capacity(hparams, step),
                              penalty=self.capacity_penalty)
