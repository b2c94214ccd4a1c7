"""Process- and platform-level choices, made in one place.

What capvae's code does on every platform is written plainly in the modules
that do it; what depends on the platform it runs on is chosen here.
"""

from __future__ import annotations

import ctypes

import jax

# How layers compute (capvae.layers): 'matmul' (matrix products with their
# gradients written out), 'xla' (XLA's own convolutions and dots), 'auto'.
CONV_IMPLS = ('auto', 'matmul', 'xla')
# How a device runs its members (capvae.parallel.over_members): 'map' (one
# after another, each bit for bit a single run), 'vmap' (batched), 'auto'.
MEMBER_LOOPS = ('auto', 'map', 'vmap')


def _platform(platform: str | None) -> str:
  return platform or jax.default_backend()


def resolve_layers(conv_impl: str, platform: str | None = None) -> str:
  """``'auto'`` is ``'matmul'`` on CPU and ``'xla'`` on GPU and TPU.

  The matrix-product layers exist because XLA's CPU convolutions are slow
  inside a loop over members and under ``vmap`` with per-member weights (see
  :mod:`capvae.layers`); on GPU and TPU XLA's own convolutions are the ones
  its compilers are built for, until a measurement there
  (``experiments/bench_device.py``) says otherwise.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl {conv_impl!r} is unknown; allowed: {list(CONV_IMPLS)}.')
  if conv_impl != 'auto':
    return conv_impl
  return 'matmul' if _platform(platform) == 'cpu' else 'xla'


def resolve_member_loop(member_loop: str, platform: str | None = None) -> str:
  """``'auto'`` is ``'map'`` on CPU and ``'vmap'`` on GPU and TPU.

  On CPU, a loop over members keeps each member's step exactly a single
  run's step, at no cost in speed (a CPU runs one member's products at a
  time anyway); accelerators want fewer, larger kernels.
  """
  if member_loop not in MEMBER_LOOPS:
    raise ValueError(f'member_loop {member_loop!r} is unknown; allowed: {list(MEMBER_LOOPS)}.')
  if member_loop != 'auto':
    return member_loop
  return 'map' if _platform(platform) == 'cpu' else 'vmap'


def keep_freed_memory() -> bool:
  """Makes glibc keep freed buffers for reuse instead of handing them back.

  XLA's CPU client allocates each execution's temporaries as one block with
  ``malloc`` and frees it at the end (tens of MB a step for the conv models,
  more for the MLP). glibc serves a block above its mmap threshold, which
  cannot be set above 32 MiB, with a fresh ``mmap`` and returns it with
  ``munmap`` when it is freed, so every step faulted all of its pages in
  again, in system time that was a large share of a CPU step. So: no ``mmap``
  for allocations (every block comes from the heap), one arena (a thread's
  own arena is itself mapped, and unmapped when it empties), and no trimming
  of the heap below 1 GiB free. Once the heap has grown to the program's
  working size (a few steps), a step faults no page in.

  A process-wide setting, so entry points make it (``capvae.main``, the
  experiment scripts), before JAX starts its threads: arenas made before stay
  in use. It only changes how freed memory is kept, never a number a step
  computes. Returns whether it applied (glibc only).
  """
  try:
    libc = ctypes.CDLL('libc.so.6')
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_arena_max, 1) and
                libc.mallopt(m_trim_threshold, 1 << 30))
  except (OSError, AttributeError):  # not glibc
    return False
