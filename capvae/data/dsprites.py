"""dSprites: rendered procedurally in JAX, or read from the official ``.npz``.

The grid and ordering follow deepmind/dsprites-dataset: shape (square, ellipse,
heart) 3, scale ``linspace(0.5, 1, 6)``, orientation ``linspace(0, 2π, 40)``
(the first and last are the same angle, as in the original), posX and posY
``linspace(0, 1, 32)``, posY varying fastest; 64×64 binary images. The colour
factor of the original (a single value) is dropped, leaving 5 factors.

The procedural renderer is not a pixel copy of the original sprites, which are
not redistributable here; it keeps what matters to a disentanglement study:
the same factor grid, a fixed shape size at each scale, rigid rotation,
translation in image coordinates (posX → column, posY → row), and no pixel
leaving the frame at any factor value. A pixel is on when its centre is inside
the shape.
"""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np

from capvae.data import base
from capvae.errors import ConfigError

FACTOR_NAMES = ('shape', 'scale', 'orientation', 'posX', 'posY')
FACTOR_SIZES = (3, 6, 40, 32, 32)
SHAPES = ('square', 'ellipse', 'heart')
IMAGE_SIZE = 64
OFFICIAL_FILENAME = 'dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz'

# Radius (pixels) of the disc that holds every shape at scale 1, any rotation.
_RADIUS = 10.0
# Shape centres range over [_MARGIN, 64 - _MARGIN]: with radius 10 the nearest
# lit pixel centre is > 1 px from the edge, so the border rows stay dark.
_MARGIN = _RADIUS + 1.5


def scale_values():
  return np.linspace(0.5, 1.0, FACTOR_SIZES[1])


def orientation_values():
  return np.linspace(0.0, 2 * np.pi, FACTOR_SIZES[2])


def position_values():
  return np.linspace(0.0, 1.0, FACTOR_SIZES[3])


def _inside(shape, u, v):
  """Is unit-disc point (u, v) (v pointing up) inside shape 0/1/2?"""
  square = jnp.maximum(jnp.abs(u), jnp.abs(v)) <= 1.0 / math.sqrt(2.0)
  ellipse = jnp.square(u) + jnp.square(v / 0.5) <= 1.0
  # The heart curve (x²+y²−1)³ ≤ x²y³ fits a disc of radius 1.25 about (0, .25).
  hx, hy = 1.25 * u, 1.25 * v + 0.25
  heart = jnp.power(hx * hx + hy * hy - 1.0, 3) <= hx * hx * hy * hy * hy
  return jnp.where(shape == 0, square, jnp.where(shape == 1, ellipse, heart))


@base.register
class ProceduralDSprites(base.GroundTruthDataset):
  """dSprites rendered from factor indices by a pure JAX function."""

  factor_names = FACTOR_NAMES
  factor_sizes = FACTOR_SIZES
  observation_shape = (IMAGE_SIZE, IMAGE_SIZE, 1)

  def render(self, factors):
    factors = jnp.asarray(factors, jnp.int32)
    shape = factors[:, 0, None, None]
    scale = jnp.asarray(scale_values(), jnp.float32)[factors[:, 1]][:, None, None]
    theta = jnp.asarray(orientation_values(), jnp.float32)[factors[:, 2]][:, None, None]
    span = IMAGE_SIZE - 2 * _MARGIN
    pos = jnp.asarray(position_values(), jnp.float32)
    cx = (_MARGIN + span * pos[factors[:, 3]])[:, None, None]
    cy = (_MARGIN + span * pos[factors[:, 4]])[:, None, None]
    centres = jnp.arange(IMAGE_SIZE, dtype=jnp.float32) + 0.5
    dx = centres[None, None, :] - cx  # columns
    dy = centres[None, :, None] - cy  # rows, pointing down
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    r = _RADIUS * scale
    u = (cos * dx + sin * dy) / r
    v = -(-sin * dx + cos * dy) / r  # flip so v points up in the image
    return _inside(shape, u, v).astype(jnp.float32)[..., None]


@base.register
class DSpritesNpz(base.GroundTruthDataset):
  """The official dSprites file (or a smaller one in the same format).

  The file holds ``imgs`` ``[N, H, W]`` (0/1), ``latents_classes`` ``[N, 6]``
  and ``latents_values`` ``[N, 6]`` in row-major order of the classes. Factor
  sizes are read from ``latents_classes``, so a reduced grid in the same format
  works too. Binary images are kept bit-packed on the device (the full file is
  377 MB that way instead of 3 GB) and unpacked inside ``render``.
  """

  factor_names = FACTOR_NAMES
  _array_fields = ('_images',)

  def __init__(self, path: str):
    if not path or not os.path.isfile(path):
      raise ConfigError(
          f'dataset_path: no dSprites file at {path!r}; expected the official'
          f' {OFFICIAL_FILENAME} or a file in its format.')
    with np.load(path, allow_pickle=False) as f:
      missing = {'imgs', 'latents_classes'} - set(f.files)
      if missing:
        raise ConfigError(
            f'dataset_path: {path!r} lacks key(s) {sorted(missing)}; a dSprites'
            f' npz holds imgs, latents_classes and latents_values (found'
            f' {sorted(f.files)}).')
      imgs, classes = f['imgs'], f['latents_classes']
    if imgs.ndim == 4 and imgs.shape[-1] == 1:
      imgs = imgs[..., 0]
    if imgs.ndim != 3:
      raise ConfigError(
          f'dataset_path: imgs must have shape [N, H, W], got {imgs.shape}.')
    if classes.ndim != 2 or classes.shape != (imgs.shape[0], 6):
      raise ConfigError(
          f'dataset_path: latents_classes must have shape [N, 6] = '
          f'[{imgs.shape[0]}, 6] (color, shape, scale, orientation, posX, posY),'
          f' got {classes.shape}.')
    if np.issubdtype(imgs.dtype, np.floating) and not np.all(np.isfinite(imgs)):
      bad = int(np.sum(~np.isfinite(imgs)))
      raise ConfigError(f'dataset_path: imgs holds {bad} NaN or infinite values.')
    if imgs.size and (imgs.min() < 0 or imgs.max() > 1):
      raise ConfigError(
          f'dataset_path: imgs must lie in [0, 1], found [{imgs.min()}, {imgs.max()}].')
    sizes = tuple(int(s) for s in classes.max(axis=0) + 1)
    if math.prod(sizes) != imgs.shape[0]:
      raise ConfigError(
          f'dataset_path: latents_classes span a grid of {sizes} ='
          f' {math.prod(sizes)} images but imgs holds {imgs.shape[0]}.')
    flat = classes.astype(np.int64) @ np.asarray(base.strides(sizes), np.int64)
    if not np.array_equal(flat, np.arange(imgs.shape[0])):
      raise ConfigError(
          'dataset_path: images are not in dSprites order (row-major in'
          ' latents_classes, posY fastest).')
    if sizes[0] != 1:
      raise ConfigError(f'dataset_path: expected a single colour, got {sizes[0]}.')
    self.factor_sizes = sizes[1:]
    h, w = imgs.shape[1:]
    self.observation_shape = (h, w, 1)
    self._binary = bool(np.all((imgs == 0) | (imgs == 1)))
    if self._binary:
      self._images = jnp.asarray(np.packbits(imgs.astype(np.uint8), axis=-1))
    else:
      self._images = jnp.asarray(imgs, jnp.float32)

  def render(self, factors):
    rows = self._images[self.flat_index(factors)]
    if self._binary:
      rows = jnp.unpackbits(rows, axis=-1, count=self.observation_shape[1])
    return rows.astype(jnp.float32)[..., None]
