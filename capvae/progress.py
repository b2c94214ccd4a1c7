"""Progress a person can read: a bar on a terminal, log lines elsewhere.

On a terminal (stderr is a TTY) training, evaluation's encoder pass and its
per-member metrics, and the report's figures show a ``tqdm`` bar with the rate
and the time left. Elsewhere (CI, a batch job, a file) nothing changes: the
plain log lines stay. ``CAPVAE_PROGRESS=1`` or ``0`` forces either way.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, TypeVar

from absl import logging

T = TypeVar('T')
ENV = 'CAPVAE_PROGRESS'


def enabled(stream=None) -> bool:
  """Whether to draw bars: ``$CAPVAE_PROGRESS`` if set, else whether
  ``stream`` (stderr) is a terminal."""
  forced = os.environ.get(ENV, '').strip()
  if forced in ('0', '1'):
    return forced == '1'
  stream = sys.stderr if stream is None else stream
  return bool(getattr(stream, 'isatty', lambda: False)())


def bar(total: int, desc: str, unit: str = 'it', initial: int = 0, stream=None):
  """A ``tqdm`` bar (rate, elapsed and time left) when :func:`enabled`, else None."""
  if not enabled(stream):
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  stream = sys.stderr if stream is None else stream
  try:  # a terminal that reports no width (a bare pty) gets 100 columns
    sized = os.get_terminal_size(stream.fileno()).columns > 0
  except (AttributeError, OSError, ValueError):
    sized = False
  return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream,
              dynamic_ncols=sized, ncols=None if sized else 100, smoothing=0.05,
              mininterval=0.5)


def iterate(items: Iterable[T], total: int, desc: str, unit: str = 'it',
            log_seconds: float = 30.0, stream=None) -> Iterable[T]:
  """``items`` with a bar on a terminal; elsewhere a log line at most every
  ``log_seconds`` (count, rate, time left)."""
  b = bar(total, desc, unit, stream=stream)
  if b is not None:
    with b:
      for item in items:
        yield item
        b.update(1)
    return
  t0 = last = time.perf_counter()
  for i, item in enumerate(items, 1):
    yield item
    now = time.perf_counter()
    if now - last >= log_seconds and i < total:
      last = now
      rate = i / (now - t0)
      logging.info('%s: %d/%d %s, %.2f %s/s, %s left', desc, i, total, unit, rate, unit,
                    format_duration((total - i) / rate))


def format_duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'
