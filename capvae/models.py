"""Flax encoders and decoders for dSprites-sized images.

Every model maps an image batch ``[B, H, W, C]`` to ``(mean, logvar)`` of a
diagonal Gaussian posterior and a latent batch ``[B, M]`` back to per-pixel
decoder outputs ``[B, H, W, C]`` (Bernoulli logits, or the Gaussian mean).

Models are applied functionally (``model.apply(params, ...)``), so a stack of
members is just a stack of parameter pytrees under ``jax.vmap``.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from capvae import layers

# How weights and biases start. 'lecun': Flax's defaults (LeCun normal weights,
# zero biases). 'torch': PyTorch's defaults (weights and biases uniform in
# ±1/sqrt(fan_in); a transposed convolution's fan_in counts its *output*
# channels, as torch computes it from its weight layout). 'kaiming':
# 1Konny/Beta-VAE's ``kaiming_init`` (dense and conv weights N(0, 2/fan_in),
# zero biases; transposed convolutions keep PyTorch's defaults).
INITS = ('lecun', 'torch', 'kaiming')


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def initializers(init: str, kind: str, fan_in: int) -> dict:
  """``kernel_init`` and ``bias_init`` of a ``kind`` ('dense', 'conv' or
  'deconv') layer under scheme ``init`` (one of ``INITS``), where ``fan_in``
  is torch's: inputs per output unit, or for 'deconv' outputs per input."""
  if init not in INITS:
    raise ValueError(f'init {init!r} is unknown; allowed: {list(INITS)}.')
  if init == 'lecun':
    return {}
  if init == 'kaiming' and kind != 'deconv':
    return dict(kernel_init=nn.initializers.variance_scaling(2.0, 'fan_in', 'normal'))
  bound = 1.0 / math.sqrt(fan_in)
  return dict(kernel_init=_uniform(bound), bias_init=_uniform(bound))


class ConvEncoder(nn.Module):
  """Strided convolutions (each halving the image), then dense layers, then 2·M outputs."""
  latent_size: int
  convs: Sequence[tuple[int, int]]  # (features, kernel size), stride 2 each
  dense: Sequence[int]
  init: str = 'lecun'  # one of INITS
  impl: str = 'matmul'  # how the layers compute: capvae.layers.IMPLS

  @nn.compact
  def __call__(self, x):
    """``(mean, logvar)`` of images ``x``."""
    for features, k in self.convs:
      x = nn.relu(layers.Conv(features, (k, k), strides=(2, 2), impl=self.impl,
                              **initializers(self.init, 'conv', k * k * x.shape[-1]))(x))
    x = x.reshape(x.shape[0], -1)
    for width in self.dense:
      x = nn.relu(layers.Dense(width, impl=self.impl,
                               **initializers(self.init, 'dense', x.shape[-1]))(x))
    out = layers.Dense(2 * self.latent_size, impl=self.impl,
                       **initializers(self.init, 'dense', x.shape[-1]))(x)
    return out[:, :self.latent_size], out[:, self.latent_size:]


class ConvDecoder(nn.Module):
  """Dense layers to an (H/16)×(W/16) map, then 4 transposed convs (k4 s2) to the image."""
  image_shape: Sequence[int]
  dense: Sequence[int]
  base_features: int
  deconvs: Sequence[int]  # features of the first three transposed convs
  init: str = 'lecun'  # one of INITS
  impl: str = 'matmul'  # how the layers compute: capvae.layers.IMPLS

  @nn.compact
  def __call__(self, z):
    """Decoder outputs for latents ``z``."""
    h, w, c = self.image_shape
    features = (*self.deconvs, c)
    x = z
    for width in self.dense:
      x = nn.relu(layers.Dense(width, impl=self.impl,
                               **initializers(self.init, 'dense', x.shape[-1]))(x))
    x = nn.relu(layers.Dense((h // 16) * (w // 16) * self.base_features, impl=self.impl,
                             **initializers(self.init, 'dense', x.shape[-1]))(x))
    x = x.reshape(z.shape[0], h // 16, w // 16, self.base_features)
    for i, f in enumerate(features):
      x = layers.ConvTranspose(f, impl=self.impl,
                               **initializers(self.init, 'deconv', 16 * f))(x)
      if i < len(features) - 1:
        x = nn.relu(x)
    return x


def burgess(latent_size, image_shape):
  """Burgess et al. 2018: 4× conv 32 k4 s2, 2× FC 256; the transpose to decode."""
  return (ConvEncoder(latent_size, convs=((32, 4),) * 4, dense=(256, 256)),
          ConvDecoder(image_shape, dense=(256, 256), base_features=32, deconvs=(32, 32, 32)))


def locatello(latent_size, image_shape):
  """disentanglement_lib ``conv_encoder`` / ``deconv_decoder``.

  Encoder conv 32 k4, 32 k4, 64 k2, 64 k2 (all s2), FC 256; decoder FC 256,
  FC 1024 → 4×4×64, deconv 64, 32, 32, C (all k4 s2).
  """
  return (ConvEncoder(latent_size, convs=((32, 4), (32, 4), (64, 2), (64, 2)), dense=(256,)),
          ConvDecoder(image_shape, dense=(256,), base_features=64, deconvs=(64, 32, 32)))


class MLPEncoder(nn.Module):
  """Higgins et al. 2017 dSprites encoder: FC 1200-1200 (ReLU), 2·M outputs."""
  latent_size: int
  hidden: Sequence[int] = (1200, 1200)
  init: str = 'lecun'  # one of INITS
  impl: str = 'matmul'  # how the layers compute: capvae.layers.IMPLS

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(layers.Dense(width, impl=self.impl,
                               **initializers(self.init, 'dense', x.shape[-1]))(x))
    out = layers.Dense(2 * self.latent_size, impl=self.impl,
                       **initializers(self.init, 'dense', x.shape[-1]))(x)
    return out[:, :self.latent_size], out[:, self.latent_size:]


class MLPDecoder(nn.Module):
  """Higgins et al. 2017 dSprites decoder: FC 1200-1200-1200 (tanh), N outputs."""
  image_shape: Sequence[int]
  hidden: Sequence[int] = (1200, 1200, 1200)
  init: str = 'lecun'  # one of INITS
  impl: str = 'matmul'  # how the layers compute: capvae.layers.IMPLS

  @nn.compact
  def __call__(self, z):
    x = z
    for width in self.hidden:
      x = nn.tanh(layers.Dense(width, impl=self.impl,
                               **initializers(self.init, 'dense', x.shape[-1]))(x))
    x = layers.Dense(math.prod(self.image_shape), impl=self.impl,
                     **initializers(self.init, 'dense', x.shape[-1]))(x)
    return x.reshape(z.shape[0], *self.image_shape)


def noise(key, batch_size: int, latent_size: int):
  """The standard normal draw ``eps [batch_size, latent_size]`` of the
  reparameterisation: training, its data-parallel shares and evaluation all
  draw it here, so a batch's noise is the same wherever it is computed."""
  return jax.random.normal(key, (batch_size, latent_size), jnp.float32)


def reparameterize(mean, logvar, eps):
  """The posterior sample ``mean + σ·eps`` for a standard normal draw ``eps``."""
  return mean + jnp.exp(0.5 * logvar) * eps


class VAE(nn.Module):
  """An encoder, the reparameterised sample, and a decoder."""
  encoder: nn.Module
  decoder: nn.Module

  def __call__(self, x, key):
    """Returns ``(decoder_output, mean, logvar)`` for images ``x``.

    Args:
      x: images ``[B, H, W, C]``.
      key: PRNG key for the reparameterisation noise.
    """
    return self.with_noise(x, noise(key, x.shape[0], self.encoder.latent_size))

  def with_noise(self, x, eps):
    """:meth:`__call__` with its standard normal draw ``eps [B, M]`` given."""
    mean, logvar = self.encoder(x)
    return self.decoder(reparameterize(mean, logvar, eps)), mean, logvar

  def encode(self, x):
    return self.encoder(x)

  def decode(self, z):
    return self.decoder(z)


# Latent values a traversal sets one latent to (the prior's ±2.5 sd).
TRAVERSAL_VALUES = np.linspace(-2.5, 2.5, 11)


def to_pixels(reconstruction: str, out):
  """Decoder outputs as pixels in [0, 1] (``'bernoulli'``: logits)."""
  if reconstruction == 'bernoulli':
    return jax.nn.sigmoid(out)
  return jnp.clip(out, 0.0, 1.0)


def decoded_images(model, params, x, order, reconstruction: str):
  """``(traversals [L·V, ...], reconstructions of x)`` from posterior means:
  the traversals set latent ``order[l]`` of x[0]'s code to each of the V
  :data:`TRAVERSAL_VALUES`."""
  mean, _ = model.apply(params, x, method=VAE.encode)
  recon = to_pixels(reconstruction, model.apply(params, mean, method=VAE.decode))
  values = jnp.asarray(TRAVERSAL_VALUES, jnp.float32)
  rows = order.shape[0] * values.shape[0]
  codes = jnp.tile(mean[0], (rows, 1)).at[
      jnp.arange(rows), jnp.repeat(order, values.shape[0])].set(
          jnp.tile(values, order.shape[0]))
  return to_pixels(reconstruction, model.apply(params, codes, method=VAE.decode)), recon


class Discriminator(nn.Module):
  """FactorVAE's discriminator (Kim & Mnih 2018; disentanglement_lib's
  ``fc_discriminator``): ``layers`` dense layers of ``units`` with leaky ReLU
  (slope 0.2), then 2 logits: class 0 a code of the joint q(z), class 1 one
  whose dimensions were permuted across the batch."""
  layers: int = 6
  units: int = 1000
  impl: str = 'matmul'  # one of capvae.layers.IMPLS

  @nn.compact
  def __call__(self, z):
    h = z
    for _ in range(self.layers):
      h = nn.leaky_relu(layers.Dense(self.units, impl=self.impl)(h), 0.2)
    return layers.Dense(2, impl=self.impl)(h)


def mlp(latent_size, image_shape):
  """Higgins et al. 2017: MLP 1200-1200 encoder, 1200-1200-1200 tanh decoder."""
  return MLPEncoder(latent_size), MLPDecoder(image_shape)


_MODELS = {'burgess': burgess, 'locatello': locatello, 'mlp': mlp}
MODELS = tuple(_MODELS)


def shape_problem(name: str, image_shape: Sequence[int]) -> str | None:
  """Why model ``name`` cannot take images of ``image_shape``, or None: the conv
  models halve the image four times, so its sides must be divisible by 16."""
  h, w = int(image_shape[0]), int(image_shape[1])
  if name != 'mlp' and (h % 16 or w % 16):
    return f'needs image sides divisible by 16; the images are {h}×{w}. Use model="mlp"'
  return None


def get(name: str, latent_size: int, image_shape: Sequence[int], init: str = 'lecun',
        impl: str = 'matmul') -> VAE:
  """Builds the VAE called ``name`` (one of ``MODELS``), its parameters to be
  initialised by scheme ``init`` (one of ``INITS``), its layers computed by
  ``impl`` (one of :data:`capvae.layers.IMPLS`: the same function either way)."""
  if name not in _MODELS:
    raise ValueError(f'model {name!r} is unknown; allowed: {sorted(_MODELS)}.')
  if init not in INITS:
    raise ValueError(f'init {init!r} is unknown; allowed: {list(INITS)}.')
  image_shape = tuple(int(s) for s in image_shape)
  problem = shape_problem(name, image_shape)
  if problem:
    raise ValueError(f'model {name!r} {problem}.')
  if impl not in layers.IMPLS:
    raise ValueError(f'layer impl {impl!r} is unknown; allowed: {list(layers.IMPLS)}.')
  encoder, decoder = _MODELS[name](latent_size, image_shape)
  return VAE(encoder.clone(init=init, impl=impl), decoder.clone(init=init, impl=impl))
