"""Losses against closed forms, Monte Carlo, and the seed question's Keras code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from capvae import losses

RNG = np.random.default_rng(0)


def _posterior(b=16, m=10, scale=1.0, rng=None):
  rng = RNG if rng is None else rng
  mean = rng.normal(size=(b, m)).astype(np.float32) * scale
  logvar = rng.normal(size=(b, m)).astype(np.float32) * scale
  return mean, logvar


def test_gaussian_kl_matches_closed_form():
  mean, logvar = _posterior()
  sigma = np.exp(0.5 * logvar.astype(np.float64))
  # KL(N(mu, s^2) || N(0, 1)) = -log s + (s^2 + mu^2) / 2 - 1/2.
  expected = -np.log(sigma) + (sigma**2 + mean.astype(np.float64)**2) / 2 - 0.5
  got = losses.gaussian_kl(jnp.asarray(mean), jnp.asarray(logvar))
  assert got.shape == mean.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_gaussian_kl_matches_monte_carlo():
  mean = np.array([0.0, 1.5, -0.7, 0.3])
  logvar = np.array([0.0, -1.0, 0.8, -3.0])
  n = 400_000
  sigma = np.exp(0.5 * logvar)
  z = mean + sigma * RNG.normal(size=(n, 4))
  log_ratio = stats.norm.logpdf(z, mean, sigma) - stats.norm.logpdf(z)
  mc, se = log_ratio.mean(0), log_ratio.std(0) / np.sqrt(n)
  got = np.asarray(losses.gaussian_kl(jnp.asarray(mean, jnp.float32),
                                      jnp.asarray(logvar, jnp.float32)))
  assert np.all(np.abs(got - mc) < 5 * se + 1e-4), (got, mc, se)
  assert got[0] == pytest.approx(0.0, abs=1e-7)  # q = p


def _moment_sums(mean, logvar):
  return (mean.sum(0), np.square(mean).sum(0), np.exp(logvar).sum(0), logvar.sum(0),
          mean.shape[0])


def test_kl_decomposition_adds_up_to_the_average_kl():
  mean = RNG.normal(0.7, 1.3, size=(257, 6)).astype(np.float32)
  logvar = RNG.normal(-1.0, 0.8, size=(257, 6)).astype(np.float32)
  parts = losses.kl_decomposition(*map(jnp.asarray, _moment_sums(mean, logvar)[:4]), 257)
  average = np.asarray(losses.gaussian_kl(jnp.asarray(mean), jnp.asarray(logvar))).mean(0)
  np.testing.assert_allclose(parts['offset'] + parts['spread'] + parts['variance'],
                             average, rtol=1e-5)
  # Each part against numpy's own statistics, in float64.
  m64, lv64 = mean.astype(np.float64), logvar.astype(np.float64)
  np.testing.assert_allclose(parts['offset'], 0.5 * m64.mean(0)**2, rtol=1e-5)
  np.testing.assert_allclose(parts['spread'], 0.5 * m64.var(0), rtol=1e-4)
  np.testing.assert_allclose(parts['variance'],
                             0.5 * (np.exp(lv64).mean(0) - 1 - lv64.mean(0)), rtol=1e-5)


def test_kl_decomposition_of_a_constant_code_is_all_offset_and_variance():
  # Every example encoded to the same posterior: no spread, whatever its KL.
  mean = np.tile(np.array([[1.5, -2.0, 0.0]], np.float32), (64, 1))
  logvar = np.tile(np.array([[0.4, 0.0, -1.0]], np.float32), (64, 1))
  parts = losses.kl_decomposition(*map(jnp.asarray, _moment_sums(mean, logvar)[:4]), 64)
  np.testing.assert_allclose(parts['offset'], [1.125, 2.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(parts['spread'], 0.0, atol=1e-6)
  np.testing.assert_allclose(parts['variance'][2], 0.5 * (np.exp(-1.0) - 1 + 1.0), rtol=1e-6)


def test_kl_decomposition_accumulates_over_batches():
  mean = RNG.normal(size=(100, 4)).astype(np.float32) + 3.0
  logvar = RNG.normal(size=(100, 4)).astype(np.float32)
  a, b = _moment_sums(mean[:37], logvar[:37]), _moment_sums(mean[37:], logvar[37:])
  whole = losses.kl_decomposition(*_moment_sums(mean, logvar)[:4], 100)
  halves = losses.kl_decomposition(*[x + y for x, y in zip(a[:4], b[:4])], 100)
  for k in whole:
    np.testing.assert_allclose(halves[k], whole[k], rtol=1e-5, atol=1e-6)


def test_bernoulli_nll_is_binary_cross_entropy_summed():
  logits = RNG.normal(size=(4, 8, 8, 1)).astype(np.float32) * 3
  x = (RNG.uniform(size=logits.shape) > 0.5).astype(np.float32)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  expected = -(x * np.log(p) + (1 - x) * np.log1p(-p)).sum((1, 2, 3))
  np.testing.assert_allclose(losses.bernoulli_nll(logits, x), expected, rtol=1e-5)


def test_gaussian_nll_matches_scipy():
  mean = RNG.normal(size=(3, 5, 5, 2)).astype(np.float32)
  x = RNG.normal(size=mean.shape).astype(np.float32)
  for var in (1.0, 0.25):
    expected = -stats.norm.logpdf(x, mean, np.sqrt(var)).sum((1, 2, 3))
    np.testing.assert_allclose(losses.gaussian_nll(mean, x, var), expected, rtol=1e-5)


def test_raw_dim_mse_is_sum_of_squares_and_a_gaussian_nll():
  mean = RNG.uniform(size=(3, 64, 64, 1)).astype(np.float32)
  x = (RNG.uniform(size=mean.shape) > 0.5).astype(np.float32)
  n = 64 * 64
  keras_mse = np.mean((x - mean)**2, axis=(1, 2, 3))  # keras.losses.mse
  got = np.asarray(losses.raw_dim_mse(mean, x))
  np.testing.assert_allclose(got, n * keras_mse, rtol=1e-5)
  np.testing.assert_allclose(got, ((x - mean)**2).sum((1, 2, 3)), rtol=1e-5)
  # raw_dim * mse = Gaussian NLL with variance 1/2, less its constant N/2 log(pi).
  nll = np.asarray(losses.gaussian_nll(mean, x, 0.5), np.float64)
  np.testing.assert_allclose(got, nll - n / 2 * np.log(np.pi), rtol=1e-4)


def _keras_a(z_mu, z_log_var, beta, capacity):
  """Seed question, reduction A: mean over samples per latent, then sum."""
  kl = 1 + z_log_var - z_mu**2 - np.exp(z_log_var)
  kl = -0.5 * np.mean(kl, axis=0)
  kl = np.sum(kl)
  return beta * np.abs(kl - capacity)


def _keras_b(z_mu, z_log_var, beta, capacity):
  """Seed question, reduction B: sum over latents, then mean over samples."""
  kl = 1 + z_log_var - z_mu**2 - np.exp(z_log_var)
  kl = -0.5 * np.sum(kl, axis=1)
  kl = np.mean(kl)
  return beta * np.abs(kl - capacity)


@pytest.mark.parametrize('capacity', [0.0, 3.0, 50.0])
def test_keras_reductions_a_and_b_equal_capvae(capacity):
  mean, logvar = _posterior(b=32, m=10)
  a = _keras_a(mean.astype(np.float64), logvar.astype(np.float64), 4.0, capacity)
  b = _keras_b(mean.astype(np.float64), logvar.astype(np.float64), 4.0, capacity)
  np.testing.assert_allclose(a, b, rtol=1e-12)
  kl = losses.gaussian_kl(jnp.asarray(mean), jnp.asarray(logvar))
  loss, aux = losses.capacity_objective(jnp.zeros(32), kl, 4.0, capacity)
  np.testing.assert_allclose(loss, a, rtol=1e-5)
  np.testing.assert_allclose(aux['kl'], np.sum(np.mean(np.asarray(kl), 0)), rtol=1e-6)
  np.testing.assert_allclose(aux['kl_minus_c'], aux['kl'] - capacity, rtol=1e-6, atol=1e-5)


def test_per_example_abs_differs_when_examples_straddle_c():
  # Two examples, KL 1 and 5 nats: the batch mean is exactly C = 3.
  kl = jnp.array([[1.0], [5.0]])
  rec = jnp.zeros(2)
  batch, _ = losses.capacity_objective(rec, kl, 1.0, 3.0, penalty='abs')
  per_ex, _ = losses.capacity_objective(rec, kl, 1.0, 3.0, penalty='abs_per_example')
  sq, _ = losses.capacity_objective(rec, kl, 1.0, 3.0, penalty='squared')
  assert float(batch) == pytest.approx(0.0)
  assert float(per_ex) == pytest.approx(2.0)  # mean(|1-3|, |5-3|)
  assert float(sq) == pytest.approx(0.0)
  # When every example is on the same side of C the two abs forms agree.
  kl = jnp.array([[4.0], [6.0]])
  a, _ = losses.capacity_objective(rec, kl, 2.0, 3.0, penalty='abs')
  b, _ = losses.capacity_objective(rec, kl, 2.0, 3.0, penalty='abs_per_example')
  assert float(a) == pytest.approx(float(b)) == pytest.approx(4.0)


@pytest.mark.parametrize('penalty', ['abs', 'abs_per_example', 'squared'])
@pytest.mark.parametrize('capacity,direction', [(20.0, +1), (0.5, -1)])
def test_capacity_gradient_pushes_kl_towards_c(penalty, capacity, direction):
  # Its own generator: the shared one's state depends on which tests ran before
  # in this process (under xdist, which worker), and one draw put the KL at 0.498,
  # below C = 0.5. This one gives 0.75 nats.
  mean, logvar = _posterior(b=8, m=4, scale=0.5, rng=np.random.default_rng(2))
  params = (jnp.asarray(mean), jnp.asarray(logvar))

  def kl_total(p):
    return jnp.mean(jnp.sum(losses.gaussian_kl(*p), -1))

  def loss(p):
    return losses.capacity_objective(jnp.zeros(8), losses.gaussian_kl(*p), 1.0,
                                     capacity, penalty=penalty)[0]

  kl0 = float(kl_total(params))
  assert (kl0 < capacity) == (direction > 0)  # the setting is what we claim
  g = jax.grad(loss)(params)
  stepped = jax.tree.map(lambda p, gp: p - 1e-3 * gp, params, g)
  assert np.sign(float(kl_total(stepped)) - kl0) == direction
  # The directional derivative of KL along -grad has the same sign.
  dkl = jax.grad(kl_total)(params)
  inner = sum(float(jnp.vdot(a, -b)) for a, b in zip(dkl, g))
  assert np.sign(inner) == direction


def test_beta_norm_for_dsprites():
  # 10 latents on 64x64x1 inputs: beta_norm = beta * 10 / 4096.
  assert losses.beta_norm(4.0, 10, 64 * 64 * 1) == pytest.approx(0.009765625)
  assert losses.beta_norm(1.0, 10, 4096) == pytest.approx(10 / 4096)


def test_normalised_beta_objective_is_the_summed_one_over_n():
  b, m, n = 16, 10, 4096
  mean, logvar = _posterior(b=b, m=m)
  kl = losses.gaussian_kl(jnp.asarray(mean), jnp.asarray(logvar))
  rec = jnp.asarray(RNG.uniform(100, 300, size=b), jnp.float32)
  summed, aux = losses.beta_objective(rec, kl, 4.0)
  normed, aux_n = losses.beta_objective(rec, kl, 4.0, normalized=True, input_size=n)
  expected = np.mean(np.asarray(rec) + 4.0 * np.asarray(kl).sum(1))
  np.testing.assert_allclose(summed, expected, rtol=1e-6)
  np.testing.assert_allclose(normed * n, summed, rtol=1e-5)
  np.testing.assert_allclose(aux_n['beta_norm'], 4.0 * m / n, rtol=1e-6)
  assert float(aux['c']) == 0.0
  with pytest.raises(ValueError, match='input_size'):
    losses.beta_objective(rec, kl, 4.0, normalized=True)


def test_objectives_return_named_aux_with_per_latent_kl():
  mean, logvar = _posterior(b=8, m=6)
  kl = losses.gaussian_kl(jnp.asarray(mean), jnp.asarray(logvar))
  for loss, aux in (losses.capacity_objective(jnp.ones(8), kl, 10.0, 2.5),
                    losses.beta_objective(jnp.ones(8), kl, 2.0)):
    assert {'rec', 'kl', 'kl_per_latent', 'c', 'kl_minus_c', 'loss'} <= set(aux)
    assert aux['kl_per_latent'].shape == (6,)
    np.testing.assert_allclose(aux['kl_per_latent'].sum(), aux['kl'], rtol=1e-6)
    assert float(aux['loss']) == float(loss)
    # Per-example total KL statistics, against numpy's percentiles.
    kl_b = np.asarray(kl, np.float64).sum(-1)
    for name, pct in [('kl_example_p10', 10), ('kl_example_median', 50),
                      ('kl_example_p90', 90)]:
      np.testing.assert_allclose(aux[name], np.percentile(kl_b, pct), rtol=1e-5)


def test_unknown_penalty_is_refused():
  with pytest.raises(ValueError, match="allowed"):
    losses.capacity_objective(jnp.zeros(2), jnp.zeros((2, 3)), 1.0, 1.0, penalty='l1')


@pytest.mark.parametrize('gap', [-10.0, -2.0, -0.5, -0.1, 0.1, 0.5, 2.0, 10.0])
def test_squared_penalty_gradient_against_the_absolute_ones(gap):
  # d/dKL of gamma·(KL − C)² is 2·gamma·(KL − C); of gamma·|KL − C|, gamma·sign.
  # So the squared pull is the weaker one only within half a nat of C, equal at
  # exactly half a nat, and 20 times the absolute one ten nats away.
  gamma, c = 7.0, 3.0
  kl_of = lambda k: jnp.full((4, 1), k)  # four examples, one latent, KL = k each

  def grad(penalty):
    f = lambda k: losses.capacity_objective(jnp.zeros(4), kl_of(k), gamma, c,
                                            penalty=penalty)[0]
    return float(jax.grad(f)(c + gap))

  g_sq, g_abs = grad('squared'), grad('abs')
  assert g_sq == pytest.approx(2 * gamma * gap, rel=1e-5)
  assert g_abs == pytest.approx(gamma * np.sign(gap), rel=1e-6)
  assert g_sq / g_abs == pytest.approx(2 * abs(gap), rel=1e-5)
  assert (abs(g_sq) < abs(g_abs)) == (abs(gap) < 0.5)


def _gaussian_channel(objective_fn, steps=6000, lr=3e-3):
  """Adam on a linear-Gaussian VAE with closed-form expectations.

  x ~ N(0, 1), q(z|x) = N(a·x, s²), p(x|z) = N(b·z, v): the expected
  reconstruction is ((1 − a·b)² + b²·s²) / (2v) (+ a constant) and the expected
  KL 0.5·(a² + s² − 1 − ln s²). Its rate–distortion curve is the Gaussian's,
  rec(KL) = exp(−2·KL) / (2v), so |d rec / d KL| = exp(−2·KL) / v. Returns the
  KL averaged over the last 500 steps.
  """
  import optax  # pylint: disable=g-import-not-at-top

  def parts(p):
    a, log_s, b = p
    s2 = jnp.exp(2 * log_s)
    rec = ((1 - a * b) ** 2 + b * b * s2) / (2 * V)
    kl = 0.5 * (a * a + s2 - 1 - 2 * log_s)
    return rec[None], kl[None, None]

  tx = optax.adam(lr)
  p0 = jnp.asarray([0.1, 0.0, 0.1])

  def step(carry, _):
    p, opt = carry
    g = jax.grad(lambda q: objective_fn(*parts(q))[0])(p)
    updates, opt = tx.update(g, opt)
    p = optax.apply_updates(p, updates)
    return (p, opt), parts(p)[1][0, 0]

  _, kls = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, length=steps))(p0)
  return float(jnp.mean(kls[-500:]))


V = 0.01


def test_exact_penalty_condition_gamma_below_threshold_runs_past_c():
  # At C = 1 nat the threshold is |d rec / d KL| = exp(−2)/v = 13.5. Above it,
  # gamma·|KL − C| holds KL at C; below it, KL settles where exp(−2·KL)/v =
  # gamma, as a beta-VAE with beta = gamma does.
  c = 1.0
  threshold = np.exp(-2 * c) / V
  assert 13 < threshold < 14
  for gamma in (50.0, 200.0):
    kl = _gaussian_channel(lambda r, k, g=gamma: losses.capacity_objective(r, k, g, c))
    assert abs(kl - c) < 0.01, (gamma, kl)
  for gamma in (2.0, 5.0):
    kl = _gaussian_channel(lambda r, k, g=gamma: losses.capacity_objective(r, k, g, c))
    expected = 0.5 * np.log(1 / (V * gamma))  # where |d rec / d KL| = gamma
    assert kl > c + 0.3, (gamma, kl)
    assert kl == pytest.approx(expected, abs=0.02)
    beta_kl = _gaussian_channel(lambda r, k, g=gamma: losses.beta_objective(r, k, g))
    assert kl == pytest.approx(beta_kl, abs=0.02)
  # The squared penalty never holds KL at C: its optimum sits above C by
  # |d rec / d KL| / (2·gamma) (here solved with the slope at the optimum).
  gamma = 50.0
  kl = _gaussian_channel(lambda r, k: losses.capacity_objective(r, k, gamma, c,
                                                                penalty='squared'))
  assert kl - c == pytest.approx(np.exp(-2 * kl) / V / (2 * gamma), rel=0.05)
  assert kl - c > 0.05


@pytest.mark.parametrize('kinds', [
    dict(objective='beta', reconstruction='bernoulli'),
    dict(objective='beta', reconstruction='raw_dim_mse', beta_norm=True),
    dict(objective='capacity', reconstruction='gaussian', capacity_penalty='abs'),
    dict(objective='capacity', reconstruction='bernoulli', capacity_penalty='squared',
         schedule='staircase'),
    dict(objective='capacity', reconstruction='bernoulli', capacity_penalty='abs_per_example',
         schedule='cosine'),
])
def test_objective_is_the_named_loss_terms(kinds):
  """``losses.Objective`` (what a run's config names) against the terms called
  one by one, with C from the schedule computed by hand."""
  from types import SimpleNamespace
  hp = SimpleNamespace(beta=3.0, gamma=40.0, c_max=12.0, c_anneal_steps=100, c_stair_steps=30,
                       gaussian_variance=0.3)
  objective = losses.Objective(**kinds)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.uniform(size=(6, 8, 8, 1)), jnp.float32)
  out = jnp.asarray(rng.normal(size=(6, 8, 8, 1)), jnp.float32)
  mean, logvar = map(jnp.asarray, _posterior(6, 5, rng=rng))
  kl = losses.gaussian_kl(mean, logvar)
  step = 70
  rec = objective.reconstruction_loss(out, x, hp)
  kind = kinds['reconstruction']
  if kind == 'gaussian':
    expected_rec = (np.sum((np.asarray(x) - np.asarray(out))**2, axis=(1, 2, 3)) / (2 * 0.3)
                    + 0.5 * 64 * np.log(2 * np.pi * 0.3))
  elif kind == 'bernoulli':
    expected_rec = np.sum(np.logaddexp(0, np.asarray(out)) - np.asarray(x * out), axis=(1, 2, 3))
  else:
    expected_rec = np.sum((np.asarray(x) - np.asarray(out))**2, axis=(1, 2, 3))
  np.testing.assert_allclose(rec, expected_rec, rtol=1e-5)
  stats = losses.Stats(rec=rec, mean=mean, logvar=logvar, z=mean)
  loss, aux = objective(hp, step, stats, input_size=64)
  kl_b = np.sum(np.asarray(kl, np.float64), axis=1)
  r = np.asarray(rec, np.float64)
  if kinds['objective'] == 'beta':
    expected = (np.mean(r / 64 + 3.0 * 5 / 64 * kl_b / 5) if kinds.get('beta_norm')
                else np.mean(r + 3.0 * kl_b))
    c = 0.0
  else:
    schedule = kinds.get('schedule', 'linear')
    frac = {'linear': 0.7, 'staircase': 60 / 100,  # stairs of 30: C steps at 30, 60, 90
            'cosine': (1 - np.cos(np.pi * 0.7)) / 2}[schedule]
    c = 12.0 * frac
    pen = {'abs': abs(np.mean(kl_b) - c), 'squared': (np.mean(kl_b) - c)**2,
           'abs_per_example': np.mean(np.abs(kl_b - c))}[kinds['capacity_penalty']]
    expected = np.mean(r) + 40.0 * pen
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(aux['c'], c, rtol=1e-6)


def test_objective_refuses_unknown_kinds():
  for field in ('objective', 'reconstruction', 'capacity_penalty', 'schedule',
                'tc_estimator', 'dip_type'):
    with pytest.raises(ValueError, match=f'{field} .nope. is unknown; allowed'):
      losses.Objective(**{field: 'nope'})
