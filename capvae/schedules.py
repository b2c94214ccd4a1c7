"""Capacity schedules: step-indexed functions ``step -> C`` (optax ``Schedule``).

Their parameters may be Python numbers or traced JAX scalars, so a whole grid
of schedules can be ``jax.vmap``-ped and changing ``c_max`` never recompiles.
Validation happens only on concrete values (as in optax), so a traced
parameter passes through untouched.

The step is the optimizer's step, stored in the train state and checkpointed
with it, so C resumes exactly where it was.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Schedule = Callable[[Any], jax.Array]


def _check_concrete(name: str, value: Any, *, positive: bool) -> None:
  if isinstance(value, jax.core.Tracer):
    return
  v = float(value)
  if positive and not v > 0:
    raise ValueError(f'{name} must be > 0, got {value!r}.')
  if not positive and not v >= 0:
    raise ValueError(f'{name} must be >= 0, got {value!r}.')


def _progress(step: Any, anneal_steps: Any) -> jax.Array:
  step = jnp.asarray(step, jnp.float32)
  return jnp.clip(step / jnp.asarray(anneal_steps, jnp.float32), 0.0, 1.0)


def linear(c_max: Any, anneal_steps: Any) -> Schedule:
  """``C(step) = min(c_max, c_max · step / anneal_steps)`` (disentanglement_lib).

  Args:
    c_max: final capacity in nats (>= 0).
    anneal_steps: steps to go from 0 to ``c_max`` (> 0);
      disentanglement_lib's ``iteration_threshold``.
  """
  _check_concrete('c_max', c_max, positive=False)
  _check_concrete('c_anneal_steps', anneal_steps, positive=True)

  def schedule(step):
    return jnp.asarray(c_max, jnp.float32) * _progress(step, anneal_steps)

  return schedule


def cosine(c_max: Any, anneal_steps: Any) -> Schedule:
  """``C(step) = c_max · (1 - cos(pi · min(step / anneal_steps, 1))) / 2``.

  Starts and ends flat: C moves slowly at first, fastest half-way, and
  settles on ``c_max`` at ``anneal_steps``.
  """
  _check_concrete('c_max', c_max, positive=False)
  _check_concrete('c_anneal_steps', anneal_steps, positive=True)

  def schedule(step):
    p = _progress(step, anneal_steps)
    return jnp.asarray(c_max, jnp.float32) * 0.5 * (1.0 - jnp.cos(jnp.pi * p))

  return schedule


def staircase(c_max: Any, anneal_steps: Any, stair_steps: Any = 1) -> Schedule:
  """``linear`` raised in stairs: C is held for ``stair_steps`` steps, then raised.

  ``C(step) = linear(c_max, anneal_steps)(stair_steps · floor(step / stair_steps))``:
  what a Keras callback that sets C at the start of every epoch of
  ``stair_steps`` batches gives (when C lives in a variable the graph reads;
  a Python float is captured once at tracing and never changes). With
  ``stair_steps = 1`` it is ``linear`` exactly.

  Args:
    c_max: final capacity in nats (>= 0).
    anneal_steps: steps to go from 0 to ``c_max`` (> 0).
    stair_steps: steps C is held at each value (> 0; e.g. an epoch's batches).
  """
  _check_concrete('c_stair_steps', stair_steps, positive=True)
  ramp = linear(c_max, anneal_steps)

  def schedule(step):
    stair = jnp.asarray(stair_steps, jnp.int32)
    step = jnp.asarray(step, jnp.int32)
    return ramp((step // stair) * stair)

  return schedule


def constant(c_max: Any, anneal_steps: Any = 1) -> Schedule:
  """``C(step) = c_max`` at every step (``anneal_steps`` is ignored)."""
  del anneal_steps
  _check_concrete('c_max', c_max, positive=False)

  def schedule(step):
    return jnp.full(jnp.shape(step), c_max, jnp.float32)

  return schedule


SCHEDULES: dict[str, Callable[[Any, Any], Schedule]] = {
    'linear': linear,
    'cosine': cosine,
    'constant': constant,
    'staircase': staircase,
}


def get(name: str, c_max: Any, anneal_steps: Any, stair_steps: Any = 1) -> Schedule:
  """Builds the schedule called ``name``; see ``SCHEDULES``.

  ``stair_steps`` is used by ``staircase`` only.
  """
  if name not in SCHEDULES:
    raise ValueError(
        f'schedule {name!r} is unknown; allowed: {sorted(SCHEDULES)}.')
  if name == 'staircase':
    return staircase(c_max, anneal_steps, stair_steps)
  return SCHEDULES[name](c_max, anneal_steps)
