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
  conv_impl: str = 'matmul'  # see capvae.layers.Conv
  init: str = 'lecun'  # one of INITS

  @nn.compact
  def __call__(self, x, start: int = 0, stop: int | None = None):
    """``(mean, logvar)`` of images ``x``, or a part of the network.

    With ``stop``, only convolutions ``start … stop − 1`` run and the last one's
    output is returned before its ReLU; with ``start > 0``, ``x`` is such an
    output of convolution ``start − 1``. :func:`capvae.train.member_grads` uses
    this to compute the stem once for the whole batch.
    """
    if start:
      x = nn.relu(x)
    for i, (features, k) in enumerate(self.convs[start:stop], start):
      x = layers.Conv(features, (k, k), strides=(2, 2), impl=self.conv_impl,
                      name=f'Conv_{i}',
                      **initializers(self.init, 'conv', k * k * x.shape[-1]))(x)
      if stop is not None and i == stop - 1:
        return x
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    for width in self.dense:
      x = nn.relu(layers.Dense(width, **initializers(self.init, 'dense', x.shape[-1]))(x))
    out = layers.Dense(2 * self.latent_size,
                       **initializers(self.init, 'dense', x.shape[-1]))(x)
    return out[:, :self.latent_size], out[:, self.latent_size:]


def encoder_stem(model) -> int:
  """How many leading encoder convolutions form the stem, whose forward pass
  the micro-batched step (:func:`capvae.train.member_grads`) runs on the whole
  batch and whose backward pass it runs on micro-batches: up to the conv
  encoders' costliest layer, their second convolution; 0 for the others."""
  convs = getattr(model.encoder, 'convs', ())
  return 2 if len(convs) > 2 else 0


def decoder_head(model) -> int:
  """How many leading transposed convolutions (after the dense layers) the
  micro-batched step runs once for the whole batch
  (:func:`capvae.train.member_grads`): all but the last two, the costliest,
  for the conv decoders; 0 for the others."""
  deconvs = getattr(model.decoder, 'deconvs', ())
  return len(deconvs) - 1 if len(deconvs) > 1 else 0


class ConvDecoder(nn.Module):
  """Dense layers to an (H/16)×(W/16) map, then 4 transposed convs (k4 s2) to the image."""
  image_shape: Sequence[int]
  dense: Sequence[int]
  base_features: int
  deconvs: Sequence[int]  # features of the first three transposed convs
  init: str = 'lecun'  # one of INITS

  @nn.compact
  def __call__(self, z, start: int = 0, stop: int | None = None):
    """Decoder outputs for latents ``z``, or a part of the network.

    With ``stop`` (≥ 1), only the dense layers and transposed convolutions
    ``0 … stop − 1`` run and the last one's output is returned before its
    ReLU; with ``start > 0``, ``z`` is such an output of transposed
    convolution ``start − 1``. :func:`capvae.train.member_grads` uses this to
    run the head once for the whole batch.
    """
    h, w, c = self.image_shape
    features = (*self.deconvs, c)
    if start:
      x = nn.relu(z)
    else:
      base_h, base_w = h // 16, w // 16
      x = z
      for width in self.dense:
        x = nn.relu(layers.Dense(width, **initializers(self.init, 'dense', x.shape[-1]))(x))
      x = nn.relu(layers.Dense(base_h * base_w * self.base_features,
                               **initializers(self.init, 'dense', x.shape[-1]))(x))
      x = x.reshape(z.shape[0], base_h, base_w, self.base_features)
    last = len(features) if stop is None else stop
    for i in range(start, last):
      x = layers.ConvTranspose(features[i], name=f'ConvTranspose_{i}',
                               **initializers(self.init, 'deconv', 16 * features[i]))(x)
      if i < last - 1:
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

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(layers.Dense(width, **initializers(self.init, 'dense', x.shape[-1]))(x))
    out = layers.Dense(2 * self.latent_size, **initializers(self.init, 'dense', x.shape[-1]))(x)
    return out[:, :self.latent_size], out[:, self.latent_size:]


class MLPDecoder(nn.Module):
  """Higgins et al. 2017 dSprites decoder: FC 1200-1200-1200 (tanh), N outputs."""
  image_shape: Sequence[int]
  hidden: Sequence[int] = (1200, 1200, 1200)
  init: str = 'lecun'  # one of INITS

  @nn.compact
  def __call__(self, z):
    x = z
    for width in self.hidden:
      x = nn.tanh(layers.Dense(width, **initializers(self.init, 'dense', x.shape[-1]))(x))
    x = layers.Dense(math.prod(self.image_shape),
                     **initializers(self.init, 'dense', x.shape[-1]))(x)
    return x.reshape(z.shape[0], *self.image_shape)


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
    eps = jax.random.normal(key, (x.shape[0], self.encoder.latent_size), jnp.float32)
    return self.with_noise(x, eps)

  def with_noise(self, x, eps, **encoder_kwargs):
    """:meth:`__call__` with its standard normal draw ``eps [B, M]`` given.

    ``encoder_kwargs`` go to the encoder (``start``: ``x`` is the output of the
    encoder's first ``start`` convolutions, see :class:`ConvEncoder`).
    """
    mean, logvar = self.encoder(x, **encoder_kwargs)
    return self.decoder(reparameterize(mean, logvar, eps)), mean, logvar

  def encode(self, x):
    return self.encoder(x)

  def decode(self, z):
    return self.decoder(z)


def mlp(latent_size, image_shape):
  """Higgins et al. 2017: MLP 1200-1200 encoder, 1200-1200-1200 tanh decoder."""
  return MLPEncoder(latent_size), MLPDecoder(image_shape)


_MODELS = {'burgess': burgess, 'locatello': locatello, 'mlp': mlp}
MODELS = tuple(_MODELS)


def get(name: str, latent_size: int, image_shape: Sequence[int], init: str = 'lecun') -> VAE:
  """Builds the VAE called ``name`` (one of ``MODELS``), its parameters to be
  initialised by scheme ``init`` (one of ``INITS``)."""
  if name not in _MODELS:
    raise ValueError(f'model {name!r} is unknown; allowed: {sorted(_MODELS)}.')
  if init not in INITS:
    raise ValueError(f'init {init!r} is unknown; allowed: {list(INITS)}.')
  image_shape = tuple(int(s) for s in image_shape)
  if name != 'mlp' and (image_shape[0] % 16 or image_shape[1] % 16):
    raise ValueError(
        f'model {name!r} needs image height and width divisible by 16, got'
        f' {image_shape}.')
  encoder, decoder = _MODELS[name](latent_size, image_shape)
  return VAE(encoder.clone(init=init), decoder.clone(init=init))
