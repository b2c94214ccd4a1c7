"""The member table: one row of traced hyperparameters per trained model.

A run is a stack of members (see DESIGN.md); a single run is a table of one
row. Every value in a row is *traced* in the train step, so members that
differ only in these values share one compiled program.

A config declares its grid in ``config.sweep``::

  config.sweep.product = dict(gamma=[100., 1000.], seed=[0, 1])   # 4 members
  config.sweep.zip = dict(c_max=[5., 25.], c_anneal_steps=[1e4, 1e5])

``product`` takes every combination of its lists (fields in alphabetical
order, the last varying fastest); ``zip`` pairs its equal-length lists value
by value and forms one more axis of that product. Unswept fields keep the
config's value. Only the traced fields of :data:`train_state.HPARAM_NAMES`
may vary; anything that changes the program (latent size, architecture, batch
size, objective, dataset) is refused by :func:`config_lib.validate_sweep`:
run one sweep per value.

Members are laid out in *chunks* (``config.chunk_size`` members trained
together, 0 = all of them). A chunk's stacked state has one *slot* per member
on its leading axis, padded to a multiple of the device count with copies of
its last member. Padding slots train like any other but never appear in logs,
tables or extracted models. (Three words, three things: a *row* of the member
table, a *slot* of the stacked state, a *record* of the log.)
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import numpy as np

from capvae import train_state

Row = dict[str, Any]


def _cast(name, value):
  return int(value) if name in train_state.INT_HPARAMS else float(value)


def members(config) -> list[Row]:
  """The member table of ``config``: one row per member, ids ``0 … M-1``."""
  base = {name: _cast(name, config[name] if name in config
                      else train_state.LATER_HPARAMS[name])
          for name in train_state.HPARAM_NAMES}
  spec = config.get('sweep') or {}
  axes = []
  for name, values in sorted((spec.get('product') or {}).items()):
    axes.append([{name: _cast(name, v)} for v in values])
  zipped = sorted((spec.get('zip') or {}).items())
  if zipped:
    names = [n for n, _ in zipped]
    axes.append([{n: _cast(n, v) for n, v in zip(names, vals)}
                 for vals in zip(*(vs for _, vs in zipped))])
  rows = []
  for combo in itertools.product(*axes):
    row = dict(base)
    for part in combo:
      row.update(part)
    row['member'] = len(rows)
    rows.append(row)
  return rows


def chunks(num_members: int, chunk_size: int) -> list[range]:
  """Member ids of each chunk, in training order (``chunk_size`` 0: one chunk)."""
  size = chunk_size or num_members
  return [range(lo, min(lo + size, num_members)) for lo in range(0, num_members, size)]


def padded_size(num_members: int, chunk_size: int, num_devices: int) -> int:
  """Slots of every chunk's stacked state (its member axis: members, then
  padding): the chunk size rounded up to the devices."""
  size = min(chunk_size or num_members, num_members)
  return math.ceil(size / num_devices) * num_devices


def locate(member: int, num_members: int, chunk_size: int) -> tuple[int, int]:
  """``(chunk, slot)`` of member id ``member`` in the checkpoint layout."""
  if not 0 <= member < num_members:
    raise IndexError(f'member {member} is not in this run (0 … {num_members - 1}).')
  size = chunk_size or num_members
  return member // size, member % size


def pad(rows: Sequence[Row], size: int) -> list[Row]:
  """``rows`` followed by copies of the last row up to ``size`` (member -1)."""
  return list(rows) + [dict(rows[-1], member=-1)] * (size - len(rows))


def stack(rows: Sequence[Row]) -> train_state.Hparams:
  """Stacks rows into an :class:`~capvae.train_state.Hparams` of ``[M]`` arrays.

  Host (numpy) arrays, so they can be placed with any sharding.
  """
  cols = {}
  for name in train_state.HPARAM_NAMES:
    dtype = np.int32 if name in train_state.INT_HPARAMS else np.float32
    cols[name] = np.asarray([r.get(name, train_state.LATER_HPARAMS.get(name)) for r in rows],
                            dtype)
  return train_state.Hparams(**cols)
