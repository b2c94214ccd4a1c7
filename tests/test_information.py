"""I(x; z) of capvae.metrics.information against closed forms."""

import math

import jax
import numpy as np
import pytest

from capvae.metrics import information


def test_gaussian_channel():
  # x ~ N(0, s^2) per dimension, z = x + N(0, sigma^2): I = sum 1/2 ln(1 + s^2/sigma^2)
  # (the finite sample's I is within Monte Carlo error of it, as I << ln N).
  rng = np.random.default_rng(0)
  s2 = np.array([3.0, 0.5])
  sigma2 = 1.0
  x = rng.normal(size=(20_000, 2)) * np.sqrt(s2)
  logvar = np.full_like(x, math.log(sigma2))
  out = information.code_information(x, logvar, jax.random.key(0), num_queries=4000)
  expected = 0.5 * np.log1p(s2 / sigma2)
  assert out['mi'] == pytest.approx(expected.sum(), abs=4 * out['mi_stderr'] + 0.01)
  # Independent dimensions: each latent alone carries its own share.
  for got, err, want in zip(out['per_latent'], out['per_latent_stderr'], expected):
    assert got == pytest.approx(want, abs=4 * err + 0.01)
  assert out['bound'] == pytest.approx(math.log(20_000))


def test_separated_codes_reach_ln_n_and_identical_codes_carry_nothing():
  n = 64
  means = np.stack([np.arange(n) * 100.0, np.zeros(n)], axis=1)
  logvar = np.zeros_like(means)
  out = information.code_information(means, logvar, jax.random.key(1), num_queries=n, chunk=10)
  assert out['mi'] == pytest.approx(math.log(n), abs=1e-5)
  assert out['per_latent'][0] == pytest.approx(math.log(n), abs=1e-5)
  assert out['per_latent'][1] == pytest.approx(0.0, abs=1e-6)
  # Every posterior the same, however far from the prior: no information,
  # though each image pays a KL of 1/2 (25^2 + e^2 - 1 - 2) per latent.
  same = information.code_information(np.full((50, 3), 25.0), np.full((50, 3), 2.0),
                                      jax.random.key(2))
  assert same['mi'] == pytest.approx(0.0, abs=1e-5)


def test_offset_invariance_and_chunking():
  rng = np.random.default_rng(3)
  means = rng.normal(size=(777, 4))
  logvar = rng.normal(size=(777, 4)) * 0.5 - 1.0
  key = jax.random.key(4)
  a = information.code_information(means, logvar, key, num_queries=300, chunk=4096)
  # A constant shift of every mean (an offset) costs KL but changes no information;
  # chunks that do not divide N (padding) give the same sums.
  b = information.code_information(means + 5.0, logvar, key, num_queries=300, chunk=100,
                                   query_batch=128)
  assert b['mi'] == pytest.approx(a['mi'], abs=2e-4)
  np.testing.assert_allclose(b['per_latent'], a['per_latent'], atol=2e-4)
  assert 0 < a['mi'] <= a['bound']


def test_against_numpy():
  rng = np.random.default_rng(5)
  means = rng.normal(size=(40, 3)) * 2
  logvar = rng.normal(size=(40, 3)) * 0.3
  key = jax.random.key(6)
  out = information.code_information(means, logvar, key, num_queries=40, chunk=16)
  # The same draws, computed directly in float64.
  qkey, zkey = jax.random.split(key)
  idx = np.asarray(jax.random.choice(qkey, 40, (40,), replace=False))
  eps = np.asarray(jax.random.normal(zkey, (40, 3)), np.float64)
  z = means[idx] + np.exp(0.5 * logvar[idx]) * eps
  logq = -0.5 * (np.log(2 * np.pi) + logvar[None] + (z[:, None] - means[None]) ** 2
                 / np.exp(logvar[None]))                                   # [Q, N, L]
  own = logq[np.arange(40), idx].sum(-1)
  mix = np.logaddexp.reduce(logq.sum(-1), axis=1) - np.log(40)
  assert out['mi'] == pytest.approx(np.mean(own - mix), abs=1e-4)


def test_bad_input():
  with pytest.raises(ValueError, match=r'\[N, L\]'):
    information.code_information(np.zeros((3, 2)), np.zeros((3, 3)), jax.random.key(0))
