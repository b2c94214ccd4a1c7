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


class BurgessEncoder(nn.Module):
  """Burgess et al. 2018: 4× conv 32 k4 s2, 2× FC 256, 2·M outputs."""
  latent_size: int

  @nn.compact
  def __call__(self, x):
    for _ in range(4):
      x = nn.relu(nn.Conv(32, (4, 4), strides=(2, 2), padding='SAME')(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(256)(x))
    x = nn.relu(nn.Dense(256)(x))
    out = nn.Dense(2 * self.latent_size)(x)
    return out[:, :self.latent_size], out[:, self.latent_size:]


class BurgessDecoder(nn.Module):
  """The transpose of :class:`BurgessEncoder`: FC 256, 256, 4·4·32, 4 deconvs."""
  image_shape: Sequence[int]

  @nn.compact
  def __call__(self, z):
    h, w, c = self.image_shape
    base_h, base_w = h // 16, w // 16
    x = nn.relu(nn.Dense(256)(z))
    x = nn.relu(nn.Dense(256)(x))
    x = nn.relu(nn.Dense(base_h * base_w * 32)(x))
    x = x.reshape(z.shape[0], base_h, base_w, 32)
    for _ in range(3):
      x = nn.relu(nn.ConvTranspose(32, (4, 4), strides=(2, 2), padding='SAME')(x))
    return nn.ConvTranspose(c, (4, 4), strides=(2, 2), padding='SAME')(x)


class LocatelloEncoder(nn.Module):
  """disentanglement_lib ``conv_encoder``: conv 32,32 (k4) and 64,64 (k2), s2; FC 256."""
  latent_size: int

  @nn.compact
  def __call__(self, x):
    for features, k in ((32, 4), (32, 4), (64, 2), (64, 2)):
      x = nn.relu(nn.Conv(features, (k, k), strides=(2, 2), padding='SAME')(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(256)(x))
    out = nn.Dense(2 * self.latent_size)(x)
    return out[:, :self.latent_size], out[:, self.latent_size:]


class LocatelloDecoder(nn.Module):
  """disentanglement_lib ``deconv_decoder``: FC 256, 1024 → 4×4×64, deconv 64, 32, 32, C."""
  image_shape: Sequence[int]

  @nn.compact
  def __call__(self, z):
    h, w, c = self.image_shape
    base_h, base_w = h // 16, w // 16
    x = nn.relu(nn.Dense(256)(z))
    x = nn.relu(nn.Dense(base_h * base_w * 64)(x))
    x = x.reshape(z.shape[0], base_h, base_w, 64)
    for features in (64, 32, 32):
      x = nn.relu(nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding='SAME')(x))
    return nn.ConvTranspose(c, (4, 4), strides=(2, 2), padding='SAME')(x)


class MLPEncoder(nn.Module):
  """Higgins et al. 2017 dSprites encoder: FC 1200-1200 (ReLU), 2·M outputs."""
  latent_size: int
  hidden: Sequence[int] = (1200, 1200)

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    out = nn.Dense(2 * self.latent_size)(x)
    return out[:, :self.latent_size], out[:, self.latent_size:]


class MLPDecoder(nn.Module):
  """Higgins et al. 2017 dSprites decoder: FC 1200-1200-1200 (tanh), N outputs."""
  image_shape: Sequence[int]
  hidden: Sequence[int] = (1200, 1200, 1200)

  @nn.compact
  def __call__(self, z):
    x = z
    for width in self.hidden:
      x = nn.tanh(nn.Dense(width)(x))
    x = nn.Dense(math.prod(self.image_shape))(x)
    return x.reshape(z.shape[0], *self.image_shape)


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
    mean, logvar = self.encoder(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return self.decoder(z), mean, logvar

  def encode(self, x):
    return self.encoder(x)

  def decode(self, z):
    return self.decoder(z)


_MODELS = {
    'burgess': (BurgessEncoder, BurgessDecoder),
    'locatello': (LocatelloEncoder, LocatelloDecoder),
    'mlp': (MLPEncoder, MLPDecoder),
}
MODELS = tuple(_MODELS)


def get(name: str, latent_size: int, image_shape: Sequence[int]) -> VAE:
  """Builds the VAE called ``name`` (one of ``MODELS``)."""
  if name not in _MODELS:
    raise ValueError(f'model {name!r} is unknown; allowed: {sorted(_MODELS)}.')
  image_shape = tuple(int(s) for s in image_shape)
  if name != 'mlp' and (image_shape[0] % 16 or image_shape[1] % 16):
    raise ValueError(
        f'model {name!r} needs image height and width divisible by 16, got'
        f' {image_shape}.')
  enc, dec = _MODELS[name]
  return VAE(enc(latent_size), dec(image_shape))
