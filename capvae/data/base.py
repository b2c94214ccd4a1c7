"""The ground-truth dataset interface.

A ground-truth dataset is a finite grid of factors of variation (shape, scale,
…) and an image for every point on the grid. capvae only ever asks it three
things, all usable inside a jitted train step:

* ``factor_sizes`` / ``factor_names``: the grid;
* ``sample_factors(key, n)``: ``n`` factor-index rows ``[n, K]`` drawn
  uniformly from the grid (independently per factor, which is uniform over the
  product grid);
* ``render(factors)``: the images of those rows, ``[n, H, W, C]`` float32 in
  [0, 1]. Pure JAX, so batches are made on the device, inside the step.
"""

from __future__ import annotations

import abc
import math
from typing import Sequence

import jax
import jax.numpy as jnp


class GroundTruthDataset(abc.ABC):
  """A factor grid with an image for every point."""

  #: one name per factor, in index order.
  factor_names: tuple[str, ...]
  #: number of values of each factor.
  factor_sizes: tuple[int, ...]
  #: ``(H, W, C)`` of one image.
  observation_shape: tuple[int, int, int]
  #: attributes holding device arrays (pytree leaves); see :func:`register`.
  _array_fields: tuple[str, ...] = ()

  @property
  def num_examples(self) -> int:
    return math.prod(self.factor_sizes)

  @property
  def input_size(self) -> int:
    """N, the number of input dimensions (pixels × channels)."""
    return math.prod(self.observation_shape)

  def sample_factors(self, key: jax.Array, n: int) -> jax.Array:
    """``n`` rows of factor indices, uniform over the grid, ``[n, K]`` int32."""
    keys = jax.random.split(key, len(self.factor_sizes))
    cols = [jax.random.randint(k, (n,), 0, s, jnp.int32)
            for k, s in zip(keys, self.factor_sizes)]
    return jnp.stack(cols, axis=1)

  @abc.abstractmethod
  def render(self, factors: jax.Array) -> jax.Array:
    """Images ``[n, H, W, C]`` float32 in [0, 1] for factor rows ``[n, K]``."""

  def sample(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """``(factors, images)`` for ``n`` uniform draws."""
    factors = self.sample_factors(key, n)
    return factors, self.render(factors)

  def flat_index(self, factors: jax.Array) -> jax.Array:
    """Row-major index of factor rows in the grid (last factor fastest)."""
    return jnp.sum(factors.astype(jnp.int32) * jnp.asarray(strides(self.factor_sizes), jnp.int32),
                   axis=-1)


def strides(sizes: Sequence[int]) -> tuple[int, ...]:
  """Row-major strides of a grid of ``sizes`` (the last factor fastest)."""
  out, acc = [], 1
  for s in reversed(sizes):
    out.append(acc)
    acc *= s
  return tuple(reversed(out))


def register(cls):
  """Registers a dataset class as a pytree.

  Datasets are passed *into* the jitted train step as an argument, so device
  arrays they hold (e.g. the images of a file) are inputs of the compiled
  program rather than constants baked into it. A subclass lists the attribute
  names holding arrays in ``_array_fields``; everything else in ``__dict__`` is
  static.
  """
  def flatten(ds):
    arrays = tuple(getattr(ds, f) for f in cls._array_fields)
    static = tuple(sorted((k, v) for k, v in vars(ds).items()
                          if k not in cls._array_fields))
    return arrays, static

  def unflatten(static, arrays):
    ds = object.__new__(cls)
    for k, v in static:
      setattr(ds, k, v)
    for f, a in zip(cls._array_fields, arrays):
      setattr(ds, f, a)
    return ds

  jax.tree_util.register_pytree_node(cls, flatten, unflatten)
  return cls
