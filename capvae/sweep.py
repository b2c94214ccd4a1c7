"""The member table: one row of traced hyperparameters per trained model.

A run is a stack of members (see DESIGN.md); a single run is a table of one
row. Every value in a row is *traced* in the train step, so members that
differ only in these values share one compiled program.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp

from capvae import train_state

Row = dict[str, Any]


def members(config) -> list[Row]:
  """The member table of ``config``: one row per member."""
  row = {name: config[name] for name in train_state.HPARAM_NAMES}
  row['member'] = 0
  return [row]


def stack(rows: Sequence[Row]) -> train_state.Hparams:
  """Stacks rows into an :class:`~capvae.train_state.Hparams` of ``[M]`` arrays."""
  cols = {}
  for name in train_state.HPARAM_NAMES:
    dtype = jnp.int32 if name in train_state.INT_HPARAMS else jnp.float32
    cols[name] = jnp.asarray([r[name] for r in rows], dtype)
  return train_state.Hparams(**cols)
