"""Convolutions written as matrix products, with their gradients written out.

``Conv`` and ``ConvTranspose`` here compute exactly what ``flax.linen.Conv``
and ``flax.linen.ConvTranspose`` (padding ``'SAME'``, ``transpose_kernel``
False) compute, with the same parameters (``kernel [kh, kw, C_in, C_out]``,
``bias [C_out]``), so checkpoints and weights carry over unchanged. Only the
formulation differs:

* a stride-2 convolution is space-to-depth (2×2 blocks of the padded input
  become channels) followed by one product over 2×2 windows of blocks; other
  strides build patches from strided slices;
* a 4×4 stride-2 transposed convolution is four phase products interleaved
  (depth-to-space), or, with fewer output than input channels, one product
  with all 16 taps followed by shifted sums.

Why: XLA's CPU backend runs a convolution fast only at the top level of a
program; inside a loop body (``lax.map`` over members) and under ``vmap`` with
per-member weights (which turns it into a grouped convolution) its weight
gradients fall back to slow kernels. Products are fast in every context. Their
gradients are written out (``jax.custom_vjp``) because, differentiated
automatically, XLA fuses the slices and shifted sums into the products'
operands and runs them several times slower. The test suite checks outputs
and gradients against the Flax modules with the same weights.
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
  """``lax.conv_general_dilated(x, kernel, strides, 'SAME')`` in NHWC/HWIO, as a matmul.

  Stride-2 convolutions with even kernels on even images (every encoder layer
  here) go through :func:`_conv2d_s2d`; other shapes build the patches from
  strided slices.
  """
  kh, kw, cin, cout = kernel.shape
  sh, sw = strides
  b, h, w, _ = x.shape
  if (sh, sw) == (2, 2) and kh % 2 == 0 and kw % 2 == 0 and h % 2 == 0 and w % 2 == 0:
    return _conv2d_s2d(x, kernel)
  ph, pw = _same_padding(h, kh, sh), _same_padding(w, kw, sw)
  xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  oh, ow = -(-h // sh), -(-w // sw)
  cols = [xp[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(cols, axis=-1)  # [B, oh, ow, kh·kw·C], (i, j, c) order
  return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout))


def _s2d_patches(x, kh: int, kw: int):
  """Patches of a stride-2 'SAME' convolution: space-to-depth, then unstrided windows.

  Tap ``(i, j) = (2a + di, 2b + dj)`` of the kernel reads sub-pixel ``(di, dj)``
  of block ``(o + a, p + b)`` of the padded input; the patch's channels come in
  ``(a, b, di, dj, c)`` order (see :func:`_s2d_kernel`).
  """
  b, h, w, c = x.shape
  ph, pw = _same_padding(h, kh, 2), _same_padding(w, kw, 2)
  xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  hb, wb = xp.shape[1] // 2, xp.shape[2] // 2
  blocks = xp.reshape(b, hb, 2, wb, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hb, wb, 4 * c)
  oh, ow = h // 2, w // 2
  cols = [blocks[:, a:a + oh, bb:bb + ow, :] for a in range(kh // 2) for bb in range(kw // 2)]
  return jnp.concatenate(cols, axis=-1)


def _s2d_kernel(kernel):
  """``[kh, kw, C, F]`` → ``[kh·kw·C, F]`` in the ``(a, b, di, dj, c)`` order of the patches."""
  kh, kw, cin, cout = kernel.shape
  k = kernel.reshape(kh // 2, 2, kw // 2, 2, cin, cout).transpose(0, 2, 1, 3, 4, 5)
  return k.reshape(kh * kw * cin, cout)


@jax.custom_vjp
def _conv2d_s2d(x, kernel):
  kh, kw, _, _ = kernel.shape
  return jnp.dot(_s2d_patches(x, kh, kw), _s2d_kernel(kernel))


def _conv2d_s2d_fwd(x, kernel):
  return _conv2d_s2d(x, kernel), (x, kernel)


def _conv2d_s2d_bwd(res, dy):
  """The gradients, written out (differentiated automatically, the window sums
  fuse into the products' operands and run several times slower)."""
  x, kernel = res
  kh, kw, cin, cout = kernel.shape
  b, h, w, _ = x.shape
  patches = _s2d_patches(x, kh, kw)
  dflat = jnp.dot(patches.reshape(-1, kh * kw * cin).T, dy.reshape(-1, cout))
  dk = dflat.reshape(kh // 2, kw // 2, 2, 2, cin, cout).transpose(0, 2, 1, 3, 4, 5)
  dpatches = jnp.dot(dy, _s2d_kernel(kernel).T)  # [B, oh, ow, kh·kw·C]
  oh, ow = h // 2, w // 2
  ph, pw = _same_padding(h, kh, 2), _same_padding(w, kw, 2)
  hb, wb = (h + sum(ph)) // 2, (w + sum(pw)) // 2
  dblocks = jnp.zeros((b, hb, wb, 4 * cin), dy.dtype)
  k = 0
  for a in range(kh // 2):
    for bb in range(kw // 2):
      part = dpatches[..., k * 4 * cin:(k + 1) * 4 * cin]
      dblocks = dblocks + jnp.pad(part, ((0, 0), (a, hb - oh - a), (bb, wb - ow - bb), (0, 0)))
      k += 1
  dxp = dblocks.reshape(b, hb, wb, 2, 2, cin).transpose(0, 1, 3, 2, 4, 5).reshape(
      b, 2 * hb, 2 * wb, cin)
  dx = dxp[:, ph[0]:ph[0] + h, pw[0]:pw[0] + w, :]
  return dx, dk.reshape(kh, kw, cin, cout)


_conv2d_s2d.defvjp(_conv2d_s2d_fwd, _conv2d_s2d_bwd)


# For a 4-tap, stride-2 'SAME' transposed convolution, output pixel 2m + p
# (phase p) sums input pixels m - 1 + s over two (shift s, tap t) pairs, where
# the input is padded by one on each side: phase 0 uses taps 0 and 2, phase 1
# taps 1 and 3.
_PHASE_TAPS = {0: ((0, 0), (1, 2)), 1: ((1, 1), (2, 3))}


# Where each tap (tr, tc) of the kernel lands: output phase (pr, pc) and input
# shift (sr, sc) of the padded input (see conv_transpose2d).
_TAP_PLACES = {(tr, tc): (pr, pc, sr, sc)
               for pr in (0, 1) for sr, tr in _PHASE_TAPS[pr]
               for pc in (0, 1) for sc, tc in _PHASE_TAPS[pc]}


@jax.custom_vjp
def conv_transpose2d(x, kernel):
  """``lax.conv_transpose(x, kernel, (2, 2), 'SAME')`` for a 4×4 kernel, as matmuls.

  Each of the four output phases (row parity, column parity) sums four
  shifted copies of the input, each times one tap of the kernel; the phases
  are then interleaved (depth-to-space). Two orders compute those sums:

  * gather first (``C_out >= C_in``): the four shifted inputs are concatenated
    and multiplied by the four stacked taps, one product per phase;
  * multiply first (``C_out < C_in``): one product of the input with all 16
    taps, ``[B, H, W, C_in] @ [C_in, 16·C_out]``, then each phase adds four
    shifted slices of it. This moves 16·C_out numbers per input pixel instead
    of 16·C_in, which is what makes the last layer of a decoder (C_out = 1 or
    3) cheap.
  """
  kh, kw, cin, cout = kernel.shape
  if (kh, kw) != (4, 4):
    raise ValueError(f'conv_transpose2d supports 4×4 kernels, got {kh}×{kw}.')
  b, h, w, _ = x.shape
  if cout < cin:
    taps = jnp.dot(x, kernel.transpose(2, 0, 1, 3).reshape(cin, 16 * cout))
    taps = jnp.pad(taps.reshape(b, h, w, 16 * cout), ((0, 0), (1, 1), (1, 1), (0, 0)))
    phases = []
    for pr in (0, 1):
      row = []
      for pc in (0, 1):
        parts = [taps[:, sr:sr + h, sc:sc + w, (4 * tr + tc) * cout:(4 * tr + tc + 1) * cout]
                 for sr, tr in _PHASE_TAPS[pr] for sc, tc in _PHASE_TAPS[pc]]
        row.append((parts[0] + parts[1]) + (parts[2] + parts[3]))
      phases.append(jnp.stack(row, axis=3).reshape(b, h, 2 * w, cout))
    return jnp.stack(phases, axis=2).reshape(b, 2 * h, 2 * w, cout)
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


def _conv_transpose2d_fwd(x, kernel):
  return conv_transpose2d(x, kernel), (x, kernel)


def _conv_transpose2d_bwd(res, dy):
  """The gradients, written out: XLA fuses the automatic ones badly.

  Input pixel (i, j) reaches output (2(i + 1 − sr) + pr, 2(j + 1 − sc) + pc)
  through tap (tr, tc), so the cotangent of "input pixel times tap" is a shifted
  slice of the de-interleaved ``dy``; stacking the 16 slices gives ``dtaps``
  ``[B, H, W, 16·C_out]``, and both gradients are single matrix products with it.
  (Differentiated automatically, the shifted sums fuse into both products'
  operands; the ``32 → 1`` decoder layer's backward took 61 ms instead of 8.)
  """
  x, kernel = res
  b, h, w, cin = x.shape
  cout = kernel.shape[-1]
  d = jnp.pad(dy.reshape(b, h, 2, w, 2, cout),
              ((0, 0), (1, 1), (0, 0), (1, 1), (0, 0), (0, 0)))
  cols = []
  for tr in range(4):
    for tc in range(4):
      pr, pc, sr, sc = _TAP_PLACES[(tr, tc)]
      cols.append(d[:, 2 - sr:2 - sr + h, pr, 2 - sc:2 - sc + w, pc, :])
  dtaps = jnp.concatenate(cols, -1)
  flat = kernel.transpose(2, 0, 1, 3).reshape(cin, 16 * cout)
  dx = jnp.dot(dtaps, flat.T)
  dflat = jnp.dot(x.reshape(-1, cin).T, dtaps.reshape(-1, 16 * cout))
  return dx, dflat.reshape(cin, 4, 4, cout).transpose(1, 2, 0, 3)


conv_transpose2d.defvjp(_conv_transpose2d_fwd, _conv_transpose2d_bwd)


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
