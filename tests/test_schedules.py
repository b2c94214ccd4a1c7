"""Capacity schedules against closed forms; traced parameters do not recompile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capvae import schedules

STEPS = np.arange(0, 2500, 7)


def test_linear_matches_disentanglement_lib_formula():
  got = jax.jit(schedules.linear(25.0, 1000))(jnp.asarray(STEPS))
  expected = np.minimum(25.0, 25.0 * STEPS / 1000)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_cosine_matches_closed_form():
  got = jax.jit(schedules.cosine(10.0, 1000))(jnp.asarray(STEPS))
  p = np.clip(STEPS / 1000, 0, 1)
  np.testing.assert_allclose(got, 10.0 * (1 - np.cos(np.pi * p)) / 2, rtol=1e-5, atol=1e-5)
  assert float(got[-1]) == pytest.approx(10.0)


def test_constant():
  got = jax.jit(schedules.constant(3.5))(jnp.asarray(STEPS))
  np.testing.assert_array_equal(got, np.full(STEPS.shape, 3.5, np.float32))


@pytest.mark.parametrize('name', ['linear', 'cosine'])
def test_vmapped_grid_matches_closed_form(name):
  c_max = jnp.asarray([5.0, 10.0, 25.0, 50.0])
  anneal = jnp.asarray([100, 1000, 1000, 2000])

  @jax.jit
  def grid(c, t, steps):
    return jax.vmap(lambda ci, ti: schedules.get(name, ci, ti)(steps))(c, t)

  got = grid(c_max, anneal, jnp.asarray(STEPS))
  p = np.clip(STEPS[None] / np.asarray(anneal)[:, None], 0, 1)
  shape = p if name == 'linear' else (1 - np.cos(np.pi * p)) / 2
  np.testing.assert_allclose(got, np.asarray(c_max)[:, None] * shape, rtol=1e-5, atol=1e-5)


def test_new_c_max_values_do_not_recompile():
  traces = []

  @jax.jit
  def c_at(c_max, anneal, step):
    traces.append(1)  # runs only when JAX traces (i.e. compiles) the function
    return schedules.linear(c_max, anneal)(step)

  for c_max in (5.0, 10.0, 25.0, 50.0, 75.0):
    got = c_at(jnp.float32(c_max), jnp.int32(1000), jnp.int32(500))
    assert float(got) == pytest.approx(c_max / 2)
  assert len(traces) == 1
  assert c_at._cache_size() == 1


def test_concrete_parameters_are_validated():
  with pytest.raises(ValueError, match='c_max'):
    schedules.linear(-1.0, 100)
  with pytest.raises(ValueError, match='c_anneal_steps'):
    schedules.cosine(5.0, 0)
  with pytest.raises(ValueError, match='allowed'):
    schedules.get('exponential', 5.0, 10)


def test_staircase_matches_closed_form_and_is_linear_with_one_step_stairs():
  # Held for 100 steps at a time: C(step) = min(c_max, c_max · 100·floor(step/100) / T).
  got = jax.jit(schedules.staircase(25.0, 1000, 100))(jnp.asarray(STEPS))
  expected = np.minimum(25.0, 25.0 * (100 * (STEPS // 100)) / 1000)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  assert np.all(np.diff(np.asarray(got))[(STEPS[1:] // 100) == (STEPS[:-1] // 100)] == 0)
  np.testing.assert_array_equal(jax.jit(schedules.staircase(25.0, 1000, 1))(jnp.asarray(STEPS)),
                                jax.jit(schedules.linear(25.0, 1000))(jnp.asarray(STEPS)))


def test_staircase_grid_of_stair_widths_is_one_program():
  traces = []

  @jax.jit
  def grid(stairs, steps):
    traces.append(1)
    return jax.vmap(lambda k: schedules.get('staircase', 10.0, 1000, k)(steps))(stairs)

  for stairs in ([1, 50, 250], [7, 100, 400]):
    got = grid(jnp.asarray(stairs), jnp.asarray(STEPS))
    s = np.asarray(stairs)[:, None]
    np.testing.assert_allclose(got, np.minimum(10.0, 10.0 * (s * (STEPS[None] // s)) / 1000),
                               rtol=1e-6, atol=1e-6)
  assert len(traces) == 1
  with pytest.raises(ValueError, match='c_stair_steps'):
    schedules.staircase(5.0, 100, 0)


def test_a_python_float_capacity_is_frozen_into_the_compiled_step_a_schedule_is_not():
  # The Keras bug: C kept in a Python float that a callback updates is a
  # constant of the traced graph, so the compiled loss never sees the update.
  # A step-indexed schedule reads the step, an input, so C moves in one program.
  holder = {'c': 0.0}

  @jax.jit
  def penalty_float(kl):
    return jnp.abs(kl - holder['c'])

  @jax.jit
  def penalty_step(kl, step):
    return jnp.abs(kl - schedules.staircase(10.0, 1000, 100)(step))

  assert float(penalty_float(5.0)) == 5.0
  holder['c'] = 5.0  # the "callback" raises C ...
  assert float(penalty_float(5.0)) == 5.0  # ... and the compiled graph still uses 0
  assert float(penalty_step(5.0, 0)) == 5.0
  assert float(penalty_step(5.0, 500)) == pytest.approx(0.0)
