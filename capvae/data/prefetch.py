"""Feeding a streamed dataset to the train step, a few steps ahead."""

from __future__ import annotations

import queue
import threading
import time

import jax


class Prefetcher:
  """Feeds a streamed dataset (``dataset.streamed``) to the step, a few steps ahead.

  The batch of step ``s`` is ``dataset.batch(data_seed, s, batch_size)``, a pure
  function of the step; a background thread reads, decodes and places the
  next ``ahead`` batches (with ``sharding``) while the device trains. Call it
  with each step in turn, then :meth:`close` it. Datasets held on the device
  need none of this: the step renders their batches itself.
  """

  def __init__(self, dataset, data_seed: int, batch_size: int, sharding, start: int,
               stop: int, ahead: int = 4):
    self._queue = queue.Queue(maxsize=ahead)
    self._done = threading.Event()
    self.wait_seconds = 0.0  # how long the step waited for batches

    def produce():
      try:
        for s in range(start, stop):
          item = jax.device_put(dataset.batch(data_seed, s, batch_size), sharding)
          while not self._done.is_set():
            try:
              self._queue.put((s, item), timeout=0.1)
              break
            except queue.Full:
              continue
          if self._done.is_set():
            return
      except BaseException as e:  # pylint: disable=broad-except
        self._queue.put((None, e))

    self._thread = threading.Thread(target=produce, name='capvae-prefetch', daemon=True)
    self._thread.start()

  def __call__(self, step: int):
    t0 = time.perf_counter()
    s, item = self._queue.get()
    self.wait_seconds += time.perf_counter() - t0
    if s is None:
      raise item
    assert s == step, (s, step)
    return item

  def close(self) -> None:
    self._done.set()
    self._thread.join(timeout=10)
