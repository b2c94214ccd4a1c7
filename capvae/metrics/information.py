r"""I(x; z): how much the code says about the image, against what the KL costs.

For images x uniform over a finite set {x_1, ..., x_N} and a Gaussian encoder
q(z | x_n) = N(mu_n, diag sigma_n^2), the aggregate posterior is the mixture
q(z) = (1/N) sum_n q(z | x_n), and

  I(x; z) = E_n E_{z ~ q(z|x_n)} [ log q(z | x_n) - log q(z) ]
          = E_n [ KL(q(z|x_n) || p(z)) ] - KL(q(z) || p(z)).

So the KL a capacity objective pays (the first term) is the information plus
KL(q(z) || p(z)), what the code spends on not looking like the prior:
offsets of the means, posteriors narrowed for nothing. And since x takes N
values, I(x; z) <= H(x) = ln N (ln 737,280 = 13.51 nats for dSprites), however
large the KL.

:func:`code_information` estimates it by Monte Carlo over z, with the mixture
summed exactly over all N components in chunks (no minibatch
approximation): an unbiased estimate of log-density differences, up to the
Monte Carlo error it reports. Over a subset of a dataset it is the
information about an image drawn from that subset (at most ln of its size).
The same is done for every latent alone, I(x; z_j), whose sum is not I(x; z)
(latents can share or split information).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_LOG_2PI = math.log(2 * math.pi)


def _log_normal(z, mean, logvar):
  """Per-dimension log densities ``[Q, C, L]`` of ``z [Q, L]`` under ``[C, L]``."""
  d = z[:, None, :] - mean[None, :, :]
  return -0.5 * ((_LOG_2PI + logvar)[None] + d * d * jnp.exp(-logvar)[None])


@jax.jit
def _log_mixture(z, means, logvars, valid):
  """``log sum_c q(z | x_c)`` for ``z [Q, L]`` against chunks ``[T, C, L]``:
  the joint ``[Q]`` and per latent ``[Q, L]``, summed over valid components."""

  def body(carry, chunk):
    joint_acc, dims_acc = carry
    mean, logvar, ok = chunk
    per_dim = _log_normal(z, mean, logvar)                       # [Q, C, L]
    mask = jnp.where(ok, 0.0, -jnp.inf)                          # [C]
    joint = jax.nn.logsumexp(per_dim.sum(-1) + mask[None], axis=1)           # [Q]
    dims = jax.nn.logsumexp(per_dim + mask[None, :, None], axis=1)           # [Q, L]
    return (jnp.logaddexp(joint_acc, joint), jnp.logaddexp(dims_acc, dims)), None

  q, l = z.shape
  init = (jnp.full((q,), -jnp.inf, z.dtype), jnp.full((q, l), -jnp.inf, z.dtype))
  (joint, dims), _ = jax.lax.scan(body, init, (means, logvars, valid))
  return joint, dims


def code_information(means: Any, logvars: Any, key: jax.Array, *,
                     num_queries: int = 2000, chunk: int = 4096,
                     query_batch: int = 500) -> dict[str, Any]:
  """Monte Carlo estimate of I(x; z), x uniform over the N given posteriors.

  Args:
    means: ``[N, L]`` posterior means of the N images.
    logvars: ``[N, L]`` posterior log variances.
    key: draws the queried images (without replacement) and one z for each.
    num_queries: images n (each with one z ~ q(z | x_n)) the expectation is
      averaged over; at most N.
    chunk: mixture components summed per step (memory ~ query_batch·chunk·L).
    query_batch: queries per program.

  Returns:
    ``{'mi', 'mi_stderr', 'per_latent', 'per_latent_stderr', 'bound',
    'num_images', 'num_queries'}``: nats; ``bound`` is ln N.
  """
  means = np.asarray(means, np.float32)
  logvars = np.asarray(logvars, np.float32)
  if means.ndim != 2 or means.shape != logvars.shape:
    raise ValueError(f'means {means.shape} and logvars {logvars.shape} must both be [N, L].')
  n, l = means.shape
  if n < 1:
    raise ValueError('code_information needs at least one image.')
  num_queries = min(int(num_queries), n)
  if num_queries < 1:
    raise ValueError(f'num_queries = {num_queries}: must be >= 1.')
  qkey, zkey = jax.random.split(key)
  idx = np.asarray(jax.random.choice(qkey, n, (num_queries,), replace=False))
  eps = np.asarray(jax.random.normal(zkey, (num_queries, l), jnp.float32))
  z = means[idx] + np.exp(0.5 * logvars[idx]) * eps
  # log q(z | x_n) of each query under its own posterior.
  own = -0.5 * (_LOG_2PI + logvars[idx] + eps * eps)               # [Q, L]
  chunk = max(1, min(int(chunk), n))
  t = -(-n // chunk)
  pad = t * chunk - n
  padded = lambda a: np.concatenate([a, np.zeros((pad, l), a.dtype)]).reshape(t, chunk, l)
  valid = (np.arange(t * chunk) < n).reshape(t, chunk)
  mix_means, mix_logvars = jnp.asarray(padded(means)), jnp.asarray(padded(logvars))
  joint, dims = [], []
  query_batch = max(1, int(query_batch))
  for s in range(0, num_queries, query_batch):
    zq = z[s:s + query_batch]
    if zq.shape[0] < query_batch:  # one compiled shape
      zq = np.concatenate([zq, np.repeat(zq[-1:], query_batch - zq.shape[0], 0)])
    j, d = jax.device_get(_log_mixture(jnp.asarray(zq), mix_means, mix_logvars,
                                       jnp.asarray(valid)))
    take = min(query_batch, num_queries - s)
    joint.append(j[:take]), dims.append(d[:take])
  log_n = math.log(n)
  terms = own.sum(-1).astype(np.float64) - (np.concatenate(joint) - log_n)      # [Q]
  dim_terms = own.astype(np.float64) - (np.concatenate(dims) - log_n)           # [Q, L]
  stderr = lambda a: float(a.std(ddof=1, axis=0) / math.sqrt(a.shape[0])) if a.shape[0] > 1 else float('nan')
  return {
      'mi': float(terms.mean()),
      'mi_stderr': stderr(terms),
      'per_latent': dim_terms.mean(0).tolist(),
      'per_latent_stderr': (dim_terms.std(ddof=1, axis=0) / math.sqrt(num_queries)).tolist()
                           if num_queries > 1 else [float('nan')] * l,
      'bound': log_n,
      'num_images': n,
      'num_queries': num_queries,
  }
