"""Convolutions written as patch extraction and one matrix product.

``Conv`` and ``ConvTranspose`` here compute exactly what ``flax.linen.Conv``
and ``flax.linen.ConvTranspose`` (padding ``'SAME'``, ``transpose_kernel``
False) compute, with the same parameters (``kernel [kh, kw, C_in, C_out]``,
``bias [C_out]``), so checkpoints and weights carry over unchanged. Only the
formulation differs: strided slices of the padded input are concatenated on
the channel axis and multiplied by the reshaped kernel.

Why: XLA's CPU backend runs a convolution fast only at the top level of a
program; inside a loop body (``lax.map`` over members) and under ``vmap`` with
per-member weights (which turns it into a grouped convolution) its weight
gradients fall back to slow kernels. Slices, concatenations and matrix
products are fast in every context, and under ``vmap`` become batched matrix
products. The test suite checks outputs and gradients against the Flax
modules with the same weights.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _same_padding(size: int, k: int, s: int) -> tuple[int, int]:
  """XLA's 'SAME' padding of one spatial axis."""
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


def conv2d(x, kernel, strides: Sequence[int]):
  """``lax.conv_general_dilated(x, kernel, strides, 'SAME')`` in NHWC/HWIO, as a matmul."""
  kh, kw, cin, cout = kernel.shape
  sh, sw = strides
  b, h, w, _ = x.shape
  ph, pw = _same_padding(h, kh, sh), _same_padding(w, kw, sw)
  xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  oh, ow = -(-h // sh), -(-w // sw)
  cols = [xp[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(cols, axis=-1)  # [B, oh, ow, kh·kw·C], (i, j, c) order
  return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout))


# For a 4-tap, stride-2 'SAME' transposed convolution, output pixel 2m + p
# (phase p) sums input pixels m - 1 + s over two (shift s, tap t) pairs, where
# the input is padded by one on each side: phase 0 uses taps 0 and 2, phase 1
# taps 1 and 3.
_PHASE_TAPS = {0: ((0, 0), (1, 2)), 1: ((1, 1), (2, 3))}


def conv_transpose2d(x, kernel):
  """``lax.conv_transpose(x, kernel, (2, 2), 'SAME')`` for a 4×4 kernel, as matmuls.

  Each of the four output phases (row parity, column parity) is one matrix
  product of four shifted copies of the input with four taps of the kernel;
  the phases are then interleaved (depth-to-space).
  """
  kh, kw, cin, cout = kernel.shape
  if (kh, kw) != (4, 4):
    raise ValueError(f'conv_transpose2d supports 4×4 kernels, got {kh}×{kw}.')
  b, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  phases = []
  for pr in (0, 1):
    row = []
    for pc in (0, 1):
      cols, taps = [], []
      for sr, tr in _PHASE_TAPS[pr]:
        for sc, tc in _PHASE_TAPS[pc]:
          cols.append(xp[:, sr:sr + h, sc:sc + w, :])
          taps.append(kernel[tr, tc])
      row.append(jnp.dot(jnp.concatenate(cols, -1), jnp.concatenate(taps, 0)))
    # Interleave columns: [B, H, W, 2, F] -> [B, H, 2W, F].
    phases.append(jnp.stack(row, axis=3).reshape(b, h, 2 * w, cout))
  # Interleave rows: [B, H, 2, 2W, F] -> [B, 2H, 2W, F].
  return jnp.stack(phases, axis=2).reshape(b, 2 * h, 2 * w, cout)


class Conv(nn.Module):
  """``nn.Conv(features, kernel_size, strides, padding='SAME')``, as a matmul.

  ``impl='xla'`` computes the same function with XLA's own convolution, which
  is the faster one on CPU for a forward pass at large batch (evaluation);
  ``'matmul'`` (default) is the one that trains fast in every context.
  """
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  impl: str = 'matmul'
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    if self.impl not in ('matmul', 'xla'):
      raise ValueError(f"Conv impl {self.impl!r} is unknown; allowed: ['matmul', 'xla'].")
    if self.impl == 'xla':
      y = jax.lax.conv_general_dilated(x, kernel, self.strides, 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    else:
      y = conv2d(x, kernel, self.strides)
    return y + bias


class ConvTranspose(nn.Module):
  """``nn.ConvTranspose(features, (4, 4), (2, 2), padding='SAME')``, as matmuls."""
  features: int
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init, (4, 4, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    return conv_transpose2d(x, kernel) + bias
