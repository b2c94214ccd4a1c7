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
