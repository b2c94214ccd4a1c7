"""Convolutions written as matrix products, with their gradients written out.

``Conv`` and ``ConvTranspose`` here compute exactly what ``flax.linen.Conv``
and ``flax.linen.ConvTranspose`` (padding ``'SAME'``, ``transpose_kernel``
False) compute, with the same parameters (``kernel [kh, kw, C_in, C_out]``,
``bias [C_out]``), so checkpoints and weights carry over unchanged. Only the
formulation differs. Every layer of the models is one *window product*
(:func:`conv_valid`: a stride-1, unpadded convolution with a small window)
between two cheap rearrangements:

* a stride-2 convolution with an even kernel is space-to-depth (2×2 blocks of
  the padded input become channels) followed by a window product with a
  ``kh/2 × kw/2`` window over blocks;
* a 4×4 stride-2 transposed convolution is a 2×2 window product with four
  times the output channels, one per output pixel of a 2×2 block, followed by
  depth-to-space. Output blocks are taken one pixel off the phase grid (pixels
  ``2j − 1`` and ``2j``), which is what makes every block depend on one 2×2
  window of the input;
* a stride-1 convolution is padding followed by a window product.

A window product is either *gather first* (the ``k²`` shifted inputs are
concatenated and multiplied by the stacked taps) or *multiply first* (one
product with all taps, then ``k²`` shifted slices are summed). It picks the
one whose intermediate is smaller: ``k²·C_in`` against ``k²·C_out`` numbers per
pixel. The encoder's 32→32 layers (128 channels after space-to-depth) multiply
first; its first layer and the decoder's 32→4·32 products gather first.

Why: XLA's CPU backend runs a convolution fast only at the top level of a
program; inside a loop body (``lax.map`` over members) and under ``vmap`` with
per-member weights (which turns it into a grouped convolution) its weight
gradients fall back to slow kernels. Products are fast in every context; what
costs time around them is moving data (slices, concatenations, transposes),
so the formulation keeps every intermediate at most ``4·max(C_in, C_out)``
channels wide. The gradients are written out (``jax.custom_vjp``) because,
differentiated automatically, XLA fuses the slices and shifted sums into the
products' operands and runs them several times slower. The weight gradients
are computed with one operand channels first (see :func:`_channels_first`);
:class:`Dense` is ``nn.Dense`` with its weight gradient written the same way.
The test suite checks outputs and gradients against the Flax modules with the same
weights.

All of this is for XLA's CPU backend. Each layer takes ``impl``: ``'matmul'``
(the above) or ``'xla'`` (the plain ``lax`` convolution and ``jnp.dot``, with
automatic gradients), the same function with the same parameters;
:func:`capvae.backend.resolve_layers` picks ``'matmul'`` on CPU and ``'xla'``
on GPU and TPU.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint


def _same_padding(size: int, k: int, s: int) -> tuple[int, int]:
  """XLA's 'SAME' padding of one spatial axis."""
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


def _space_to_depth(x):
  """``[B, 2H, 2W, C]`` → ``[B, H, W, 4C]``: each 2×2 block's pixels as channels, ``(di, dj, c)``."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // 2, w // 2, 4 * c)


def _depth_to_space(x):
  """The inverse of :func:`_space_to_depth`: ``[B, H, W, 4C]`` → ``[B, 2H, 2W, C]``."""
  b, h, w, c4 = x.shape
  x = x.reshape(b, h, w, 2, 2, c4 // 4).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, 2 * h, 2 * w, c4 // 4)


def _taps(kh: int, kw: int):
  return [(a, b) for a in range(kh) for b in range(kw)]


def _gather(x, kh: int, kw: int, channels_first: bool = False):
  """``[B, H, W, C]`` → ``[B, H−kh+1, W−kw+1, kh·kw·C]``: the shifted inputs, ``(a, b, c)`` order.

  With ``channels_first``, ``[C, B, H, W]`` → ``[kh·kw·C, B, H−kh+1, W−kw+1]``.
  """
  if (kh, kw) == (1, 1):
    return x
  if channels_first:
    oh, ow = x.shape[2] - kh + 1, x.shape[3] - kw + 1
    return jnp.concatenate([x[:, :, a:a + oh, b:b + ow] for a, b in _taps(kh, kw)], 0)
  # Stacked on a new axis, then merged: the same array as concatenating on the
  # channel axis, which XLA's CPU backend runs several times slower.
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  taps = jnp.stack([x[:, a:a + oh, b:b + ow, :] for a, b in _taps(kh, kw)], 3)
  return taps.reshape(x.shape[0], oh, ow, kh * kw * x.shape[3])


def _gather_adjoint(p, kh: int, kw: int):
  """The transpose of :func:`_gather`: each tap's channels, shifted back and summed."""
  if (kh, kw) == (1, 1):
    return p
  c = p.shape[-1] // (kh * kw)
  parts = [jnp.pad(p[..., t * c:(t + 1) * c], ((0, 0), (a, kh - 1 - a), (b, kw - 1 - b), (0, 0)))
           for t, (a, b) in enumerate(_taps(kh, kw))]
  return sum(parts[1:], parts[0])


def _shift_sum(y, kh: int, kw: int):
  """``[B, H, W, kh·kw·F]`` → ``[B, H−kh+1, W−kw+1, F]``: tap ``(a, b)``'s channels, shifted by it, summed."""
  if (kh, kw) == (1, 1):
    return y
  f = y.shape[-1] // (kh * kw)
  oh, ow = y.shape[1] - kh + 1, y.shape[2] - kw + 1
  parts = [y[:, a:a + oh, b:b + ow, t * f:(t + 1) * f] for t, (a, b) in enumerate(_taps(kh, kw))]
  return sum(parts[1:], parts[0])


def _shift_sum_adjoint_t(d_t, kh: int, kw: int):
  """The transpose of :func:`_shift_sum`, channels first: ``d_t [F, B, H, W]`` placed
  at every tap's shift and stacked, ``[kh·kw·F, B, H + kh − 1, W + kw − 1]``."""
  if (kh, kw) == (1, 1):
    return d_t
  return jnp.concatenate([jnp.pad(d_t, ((0, 0), (0, 0), (a, kh - 1 - a), (b, kw - 1 - b)))
                          for a, b in _taps(kh, kw)], 0)


# A weight gradient is a product over every pixel of the batch, ``a.T·b`` with
# ``a [N, p]``, ``b [N, q]``. Written that way it contracts the major axis of its
# left operand, which XLA's CPU backend runs with Eigen, asynchronously and
# several times slower than the same product handed to YNNPACK, which takes
# only products that contract the left operand's minor axis. So the backward
# pass builds one operand of each weight gradient channels first (``a.T``,
# ``[p, N]``), from whichever array is narrow before the taps are gathered or
# stacked: the input when gathering first, the output's gradient when
# multiplying first. The transposes are materialised (:func:`_channels_first`),
# or XLA folds them back into the products or into the stacking of the taps.


def _row_major(a):
  """``a`` with a row-major layout, which makes XLA materialise it.

  A transpose is otherwise fused into its consumer, which then reads it with a
  stride: fused into the channels-first 2×2 gather, the transpose made that
  gather several times slower than the transpose and the gather run one
  after the other.
  """
  return with_layout_constraint(a, Layout(tuple(range(a.ndim))))


def _channels_first(d):
  """The last axis first (``[B, H, W, F]`` → ``[F, B, H, W]``; ``[N, C]`` → ``[C, N]``),
  materialised: XLA neither folds it into the product (the barrier) nor fuses it
  into the gather or stacking that reads it (the layout)."""
  return _row_major(jax.lax.optimization_barrier(jnp.moveaxis(d, -1, 0)))


def _from_channels_first(d):
  """``[F, B, H, W]`` → ``[B, H, W, F]``: ``d`` (a product) is materialised channels first,
  and the transpose is left to its consumers, whose copies XLA fuses it into."""
  return jax.lax.optimization_barrier(d).transpose(1, 2, 3, 0)


def _transposed(y):
  """``y.T`` of a product's result; the barrier stops XLA from folding it back in."""
  return jax.lax.optimization_barrier(y).T


def _multiply_first(kernel) -> bool:
  """Multiply first when its intermediate (``kh·kw·C_out`` wide) is the narrower one."""
  return kernel.shape[3] <= kernel.shape[2]


@jax.custom_vjp
def conv_valid(x, kernel):
  """``lax.conv_general_dilated(x, kernel, (1, 1), 'VALID')`` in NHWC/HWIO, as one product.

  ``x [B, H, W, C]``, ``kernel [kh, kw, C, F]`` → ``[B, H − kh + 1, W − kw + 1, F]``.
  """
  kh, kw, c, f = kernel.shape
  if _multiply_first(kernel):
    return _shift_sum(jnp.dot(x, kernel.transpose(2, 0, 1, 3).reshape(c, kh * kw * f)), kh, kw)
  return jnp.dot(_gather(x, kh, kw), kernel.reshape(kh * kw * c, f))


def _conv_valid_fwd(x, kernel):
  return conv_valid(x, kernel), (x, kernel)


def _conv_valid_bwd(res, dy):
  """Both gradients share one intermediate, built channels first when multiplying
  first (``_shift_sum_adjoint_t(dy.T)``, and ``dx`` comes out channels first too);
  the gathered input is built channels first, from ``x.T``, when gathering first."""
  x, kernel = res
  kh, kw, c, f = kernel.shape
  if _multiply_first(kernel):
    dtaps_t = _shift_sum_adjoint_t(_channels_first(dy), kh, kw)
    shape = dtaps_t.shape[1:]  # [B, H, W] of x
    dtaps_t = dtaps_t.reshape(kh * kw * f, -1)  # [(a, b, F), B·H·W]
    flat = kernel.transpose(2, 0, 1, 3).reshape(c, kh * kw * f)
    dx = _from_channels_first(jnp.dot(flat, dtaps_t).reshape(c, *shape))
    dflat_t = jnp.dot(dtaps_t, x.reshape(-1, c))  # [(a, b, F), C]
    return dx, _transposed(dflat_t).reshape(c, kh, kw, f).transpose(1, 2, 0, 3)
  patches_t = _gather(_channels_first(x), kh, kw, channels_first=True)
  dk = jnp.dot(patches_t.reshape(kh * kw * c, -1), dy.reshape(-1, f))  # [(a, b, C), F]
  dx = _gather_adjoint(jnp.dot(dy, kernel.reshape(kh * kw * c, f).T), kh, kw)
  return dx, dk.reshape(kh, kw, c, f)


conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)


def conv2d(x, kernel, strides: Sequence[int]):
  """``lax.conv_general_dilated(x, kernel, strides, 'SAME')`` in NHWC/HWIO, as products.

  Stride 1 is padding and a window product; stride 2 with even kernels on
  even images (every encoder layer here) is space-to-depth and a window
  product over blocks. Other strides and shapes: use ``impl='xla'``.
  """
  kh, kw, cin, cout = kernel.shape
  sh, sw = strides
  _, h, w, _ = x.shape
  ph, pw = _same_padding(h, kh, sh), _same_padding(w, kw, sw)
  xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  if (sh, sw) == (1, 1):
    return conv_valid(xp, kernel)
  if (sh, sw) == (2, 2) and kh % 2 == 0 and kw % 2 == 0 and h % 2 == 0 and w % 2 == 0:
    # Tap (2a + di, 2b + dj) reads sub-pixel (di, dj) of block (o + a, p + b).
    k = kernel.reshape(kh // 2, 2, kw // 2, 2, cin, cout).transpose(0, 2, 1, 3, 4, 5)
    return conv_valid(_space_to_depth(xp), k.reshape(kh // 2, kw // 2, 4 * cin, cout))
  raise ValueError(f'conv2d supports stride 1, or stride 2 with even kernels on even images;'
                   f' got strides {tuple(strides)}, kernel {kh}×{kw}, image {h}×{w}.'
                   " Use impl='xla' for other convolutions.")


def conv_transpose2d(x, kernel):
  """``lax.conv_transpose(x, kernel, (2, 2), 'SAME')`` for a 4×4 kernel, as one window product.

  Output pixel ``2m + p`` sums padded-input pixels ``m + s`` times kernel tap
  ``t``, with ``(s, t) ∈ {(0, 0), (1, 2)}`` for phase ``p = 0`` and
  ``{(1, 1), (2, 3)}`` for ``p = 1``. Group output pixels in blocks
  ``(2j − 1, 2j)`` instead: both then read padded-input pixels ``j`` and
  ``j + 1``, window offset ``a`` with tap ``2a + 1 − q`` for pixel ``q`` of the
  block. So the layer is a 2×2 window product with ``4·C_out`` outputs (one
  per pixel of the block) over the input padded by one, followed by
  depth-to-space, less the first and last row and column.
  """
  kh, kw, cin, cout = kernel.shape
  if (kh, kw) != (4, 4):
    raise ValueError(f'conv_transpose2d supports 4×4 kernels, got {kh}×{kw}.')
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # k[a, b, c, (q, r, f)] = kernel[2a + 1 − q, 2b + 1 − r, c, f]
  k = kernel.reshape(2, 2, 2, 2, cin, cout)[:, ::-1, :, ::-1]
  k = k.transpose(0, 2, 4, 1, 3, 5).reshape(2, 2, cin, 4 * cout)
  y = _depth_to_space(conv_valid(xp, k))  # [B, 2H + 2, 2W + 2, F]
  return y[:, 1:2 * h + 1, 1:2 * w + 1, :]


@jax.custom_vjp
def dense(x, kernel):
  """``x·kernel`` for ``x [N, C]``, ``kernel [C, F]``, with the weight gradient as
  ``x.T·dy`` built from a materialised ``x.T`` (autodiff contracts ``x``'s
  major axis, which XLA's CPU backend leaves to Eigen)."""
  return jnp.dot(x, kernel)


def _dense_fwd(x, kernel):
  return dense(x, kernel), (x, kernel)


def _dense_bwd(res, dy):
  x, kernel = res
  return jnp.dot(dy, kernel.T), jnp.dot(_channels_first(x), dy)


dense.defvjp(_dense_fwd, _dense_bwd)


IMPLS = ('matmul', 'xla')


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f'layer impl {impl!r} is unknown; allowed: {list(IMPLS)}.')


class Dense(nn.Module):
  """``nn.Dense(features)`` on ``[N, C]`` inputs: the same parameters (names, shapes,
  initialisers) and function; ``impl='matmul'`` with the weight gradient of
  :func:`dense`."""
  features: int
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  impl: str = 'matmul'  # one of IMPLS

  @nn.compact
  def __call__(self, x):
    _check_impl(self.impl)
    if x.ndim != 2:
      raise ValueError(f'Dense takes [N, C] inputs, got shape {tuple(x.shape)}; flatten first.')
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    return (dense(x, kernel) if self.impl == 'matmul' else jnp.dot(x, kernel)) + bias


class Conv(nn.Module):
  """``nn.Conv(features, kernel_size, strides, padding='SAME')``, as a matmul.

  ``impl='xla'`` computes the same function with XLA's own convolution (on
  CPU also the faster one for a forward pass at large batch: evaluation);
  ``'matmul'`` is the one that trains fast on CPU in every context.
  """
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  impl: str = 'matmul'  # one of IMPLS
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    _check_impl(self.impl)
    if self.impl == 'xla':
      y = jax.lax.conv_general_dilated(x, kernel, self.strides, 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    else:
      y = conv2d(x, kernel, self.strides)
    return y + bias


class ConvTranspose(nn.Module):
  """``nn.ConvTranspose(features, (4, 4), (2, 2), padding='SAME')``, as matmuls
  (``impl='matmul'``) or XLA's transposed convolution (``'xla'``)."""
  features: int
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  impl: str = 'matmul'  # one of IMPLS

  @nn.compact
  def __call__(self, x):
    _check_impl(self.impl)
    kernel = self.param('kernel', self.kernel_init, (4, 4, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    if self.impl == 'xla':
      y = jax.lax.conv_transpose(x, kernel, (2, 2), 'SAME',
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    else:
      y = conv_transpose2d(x, kernel)
    return y + bias
