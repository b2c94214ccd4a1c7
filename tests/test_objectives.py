"""beta-TCVAE, FactorVAE, DIP-VAE and the controlled capacity, each against an
independent computation; their state in sweeps, resumes and divergence."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from capvae import config_lib, losses, sweep, train
from capvae import workdir as workdir_lib
from capvae.errors import ConfigError
from conftest import CONFIGS, ROOT, load_config



def _log_normal(x, mean, var):
  return -0.5 * ((x - mean) ** 2 / var + np.log(2 * np.pi * var))


# ---------------------------------------------------------------------------
# beta-TCVAE: the minibatch estimators of the total correlation.
# ---------------------------------------------------------------------------

# Posterior means with a known covariance, every posterior N(mu, S2·I): the
# aggregate posterior is exactly N(0, SIGMA + S2·I), whose total correlation is
# 0.5 (Σ log diag − log det).
SIGMA = np.array([[1.0, 0.8, 0.4], [0.8, 1.0, 0.3], [0.4, 0.3, 1.0]])
S2 = 0.25


def _exact_tc():
  cov = SIGMA + S2 * np.eye(3)
  return 0.5 * (np.sum(np.log(np.diag(cov))) - np.linalg.slogdet(cov)[1])


def _estimate(batch, estimator, batches):
  k1, k2 = jax.random.split(jax.random.key(0))
  mu = jax.random.normal(k1, (batches, batch, 3)) @ np.linalg.cholesky(SIGMA).T
  mu = mu.astype(jnp.float32)
  z = mu + np.sqrt(S2) * jax.random.normal(k2, mu.shape)
  logvar = jnp.full_like(mu, np.log(S2))
  tc = jax.jit(jax.vmap(lambda z, m, lv: losses.total_correlation(z, m, lv, estimator=estimator)))
  return float(jnp.mean(tc(z, mu, logvar)))


@pytest.mark.parametrize('estimator, sign', [('mws', 1), ('mss', -1)])
def test_tc_estimators_tend_to_the_exact_gaussian_tc(estimator, sign):
  """Both estimators of log q(z) tend to the exact TC as the batch grows: 'mws'
  counts each code's own posterior (biased up), 'mss' over a population leaves
  it out (unbiased for q(z), so biased down by Jensen's inequality in the log)."""
  exact = _exact_tc()
  small = _estimate(16, estimator, 256) - exact
  large = _estimate(1024, estimator, 16) - exact
  assert sign * small > 0.15, small  # measured: +0.20 (mws), -0.38 (mss)
  assert abs(large) < 0.035, large  # measured: 0.010 and -0.010 (s.e. 0.005)
  assert abs(large) < abs(small) / 5


def test_kl_parts_add_up_and_tc_is_disentanglement_libs_plus_its_constant():
  rng = np.random.default_rng(0)
  b, m = 12, 4
  mean = rng.normal(size=(b, m)).astype(np.float32)
  logvar = rng.normal(size=(b, m)).astype(np.float32) * 0.5
  z = (mean + np.exp(0.5 * logvar) * rng.normal(size=(b, m))).astype(np.float32)
  parts = losses.kl_parts(jnp.asarray(z), jnp.asarray(mean), jnp.asarray(logvar))
  # An independent float64 computation, the way disentanglement_lib writes it.
  z64, m64, v64 = (np.asarray(a, np.float64) for a in (z, mean, np.exp(logvar)))
  pairs = _log_normal(z64[:, None, :], m64[None], v64[None])  # [i, j, m]
  lse = lambda a, axis: np.log(np.sum(np.exp(a), axis=axis))
  log_qz = lse(pairs.sum(-1), 1) - np.log(b)
  log_qz_dims = (lse(pairs, 1) - np.log(b)).sum(-1)
  dl_tc = np.mean(lse(pairs.sum(-1), 1) - lse(pairs, 1).sum(-1))
  np.testing.assert_allclose(parts['tc'], dl_tc + (m - 1) * np.log(b), rtol=1e-4)
  log_qz_x = _log_normal(z64, m64, v64).sum(-1)
  log_pz = _log_normal(z64, 0.0, 1.0).sum(-1)
  np.testing.assert_allclose(parts['mi'], np.mean(log_qz_x - log_qz), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(parts['dwkl'], np.mean(log_qz_dims - log_pz), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(parts['mi'] + parts['tc'] + parts['dwkl'],
                             np.mean(log_qz_x - log_pz), rtol=1e-4, atol=1e-4)
  # The objective: rec + KL + (beta − 1)·TC.
  rec = jnp.asarray(rng.uniform(size=b), jnp.float32)
  stats = losses.Stats(rec=rec, mean=jnp.asarray(mean), logvar=jnp.asarray(logvar),
                       z=jnp.asarray(z))
  loss, aux = losses.beta_tcvae_objective(stats, 6.0)
  kl = np.mean(np.sum(0.5 * (v64 + m64 ** 2 - 1 - np.log(v64)), -1))
  np.testing.assert_allclose(loss, np.mean(rec) + kl + 5.0 * aux['tc'], rtol=1e-5)


def test_mss_weights_are_chens_and_tend_to_leave_one_out():
  b = 5
  for n in (5, 40, 10**9):
    w = np.exp(np.asarray(losses._log_weights(b, n, 'mss'), np.float64))
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.diag(w), 1 / n, rtol=1e-6)
    np.testing.assert_allclose(w[0, 1], (n - b + 1) / (n * (b - 1)), rtol=1e-6)
    np.testing.assert_allclose(w[0, 3], 1 / (b - 1), rtol=1e-6)
  population = np.exp(np.asarray(losses._log_weights(b, 0, 'mss')))
  np.testing.assert_allclose(population, (1 - np.eye(b)) / (b - 1), rtol=1e-6)
  np.testing.assert_allclose(population, w, atol=1e-8)


# ---------------------------------------------------------------------------
# DIP-VAE.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('dip_type', ['i', 'ii'])
def test_dip_regularizer_against_numpy(dip_type):
  rng = np.random.default_rng(1)
  mean = rng.normal(size=(32, 5)) @ rng.normal(size=(5, 5))
  logvar = rng.normal(size=(32, 5)) * 0.3
  cov = np.cov(mean, rowvar=False, bias=True)
  if dip_type == 'ii':
    cov = cov + np.diag(np.mean(np.exp(logvar), axis=0))
  off = cov - np.diag(np.diag(cov))
  expected = 2.0 * np.sum(off ** 2) + 7.0 * np.sum((np.diag(cov) - 1) ** 2)
  reg, got_cov = losses.dip_regularizer(jnp.asarray(mean, jnp.float32),
                                        jnp.asarray(logvar, jnp.float32), 2.0, 7.0, dip_type)
  np.testing.assert_allclose(got_cov, cov, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(reg, expected, rtol=1e-4)
  # Through Objective: lambda_d = lambda_d_factor · lambda_od.
  hp = SimpleNamespace(lambda_od=2.0, lambda_d_factor=3.5)
  stats = losses.Stats(rec=jnp.ones(32), mean=jnp.asarray(mean, jnp.float32),
                       logvar=jnp.asarray(logvar, jnp.float32), z=jnp.zeros((32, 5)))
  loss, aux = losses.Objective(objective='dip_vae', dip_type=dip_type)(hp, 0, stats, 1)
  np.testing.assert_allclose(aux['dip'], expected, rtol=1e-4)
  np.testing.assert_allclose(loss, 1.0 + aux['kl'] + expected, rtol=1e-4)


# ---------------------------------------------------------------------------
# FactorVAE.
# ---------------------------------------------------------------------------


def test_permute_dims_permutes_each_column_on_its_own():
  z = jnp.arange(40.0).reshape(10, 4)
  p = np.asarray(losses.permute_dims(jax.random.key(3), z))
  for j in range(4):
    assert sorted(p[:, j]) == sorted(np.asarray(z[:, j]))
  rows = {tuple((p[i] - np.arange(4)) // 4) for i in range(10)}
  assert len({r for r in rows if len(set(r)) > 1}) > 0  # rows were broken up


def _train_discriminator(rho, steps=400, batch=128):
  objective = losses.Objective(objective='factor_vae', discriminator_layers=2,
                               discriminator_units=64)
  hp = SimpleNamespace(disc_learning_rate=1e-3, gamma=1.0)
  chol = np.linalg.cholesky(np.array([[1, rho], [rho, 1.0]])).astype(np.float32)

  def stats_of(z):
    return losses.Stats(rec=jnp.zeros(len(z)), mean=z, logvar=jnp.zeros_like(z), z=z)

  def step(state, t):
    key = jax.random.fold_in(jax.random.key(1), t)
    z = jax.random.normal(key, (batch, 2)) @ chol.T
    return objective.update(hp, t, stats_of(z), state, jax.random.fold_in(key, 1))

  state = objective.init_state(jax.random.key(0), 2, hp)
  state, aux = jax.jit(lambda s: jax.lax.scan(step, s, jnp.arange(steps)))(state)
  z = jax.random.normal(jax.random.key(5), (4096, 2)) @ chol.T
  _, out = objective(hp, 0, stats_of(z), 1, state)
  return float(np.mean(aux['disc_accuracy'][-50:])), float(out['tc'])


def test_factor_vae_discriminator_learns_the_total_correlation():
  """On codes from a correlated Gaussian the discriminator tells joint from
  permuted codes and its log-odds estimate the exact TC, −½ log(1 − ρ²); on
  independent codes it cannot (accuracy ½, TC 0)."""
  acc, tc = _train_discriminator(0.9)
  assert acc > 0.68, acc  # measured 0.75
  assert tc == pytest.approx(-0.5 * np.log(1 - 0.81), abs=0.2)  # 0.84 against 0.83
  acc, tc = _train_discriminator(0.0)
  assert abs(acc - 0.5) < 0.06 and abs(tc) < 0.1, (acc, tc)


# ---------------------------------------------------------------------------
# The controlled capacity.
# ---------------------------------------------------------------------------

V = 0.01  # the Gaussian channel's observation variance (tests/test_losses.py)


def _controlled_channel(c_of, kp, ki, steps=6000, lr=3e-3):
  """A linear-Gaussian VAE with closed-form expectations (x ~ N(0, 1),
  q(z|x) = N(a·x, s²), p(x|z) = N(b·z, V)) trained on rec + beta(t)·KL, beta
  set by the controller; its rate–distortion slope at KL is exp(−2 KL)/V, so
  holding KL at C takes beta = exp(−2 C)/V."""
  tx = optax.adam(lr)

  def parts(p):
    a, log_s, b = p
    s2 = jnp.exp(2 * log_s)
    return ((1 - a * b) ** 2 + b * b * s2) / (2 * V), 0.5 * (a * a + s2 - 1 - 2 * log_s)

  def step(carry, t):
    p, opt, ctrl = carry
    kl = parts(p)[1]
    beta, ctrl = losses.pi_controller(ctrl, kl, c_of(t), kp=kp, ki=ki, beta_min=1.0,
                                      beta_max=1000.0)
    g = jax.grad(lambda q: parts(q)[0] + beta * parts(q)[1])(p)
    updates, opt = tx.update(g, opt)
    return (optax.apply_updates(p, updates), opt, ctrl), (kl, beta, ctrl.integral)

  p0 = jnp.asarray([0.1, 0.0, 0.1])
  ctrl = losses.ControllerState(jnp.float32(0.0), jnp.float32(1.0))
  run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p), ctrl), jnp.arange(steps)))
  _, (kl, beta, integral) = run(p0)
  return np.asarray(kl), np.asarray(beta), np.asarray(integral)


def test_controller_holds_the_kl_at_a_moving_set_point():
  c_of = lambda t: jnp.clip(0.5 + (t - 2000) / 3000, 0.5, 1.5)  # hold, ramp, hold
  kl, beta, _ = _controlled_channel(c_of, kp=5.0, ki=0.1)
  c = np.asarray(jax.vmap(c_of)(jnp.arange(6000)))
  err = np.abs(kl - c)
  assert err[1500:2000].max() < 0.1  # held at 0.5 (measured 0.05)
  assert err[2500:5000].max() < 0.25  # follows the ramp, a little behind (0.16)
  assert err[5500:].max() < 0.01  # held at 1.5 (2e-4)
  # ... by the beta at which the channel's slope is beta: exp(−2 C) / V.
  assert beta[-1] == pytest.approx(np.exp(-2 * 1.5) / V, rel=0.01)
  # Without the controller (beta = 1) the KL goes to 0.5 ln(1/V) = 2.3 instead.
  free, _, _ = _controlled_channel(lambda t: 0.0, kp=0.0, ki=0.0)
  assert free[-1] == pytest.approx(0.5 * np.log(1 / V), abs=0.05)


def test_controller_anti_windup_keeps_the_integral_ready():
  """While C is out of reach (above the KL that beta_min allows) the integral
  stops at the floor instead of winding down, so when C comes back within
  reach the KL follows within a few hundred steps."""
  c_of = lambda t: jnp.where(t < 3000, 4.0, 1.0)
  kl, beta, integral = _controlled_channel(c_of, kp=5.0, ki=0.1)
  assert np.all(beta[:3000] < 1.001)  # at the floor
  # The integral stops where the output reaches the floor, -P (-0.83 measured);
  # integrating the error all along would take it to 0.1·(2.3 − 4)·3000 ≈ −500.
  assert integral[2999] > -2.0, integral[2999]
  assert abs(kl[3500] - 1.0) < 0.05 and abs(kl[-1] - 1.0) < 0.01


def test_controller_state_and_beta_from_objective():
  """Objective('controlled_capacity'): beta from the state and this batch's
  KL, state advanced by update, C from the schedule."""
  objective = losses.Objective(objective='controlled_capacity')
  hp = SimpleNamespace(kp=0.5, ki=0.2, beta_min=1.0, beta_max=50.0, c_max=2.0,
                       c_anneal_steps=10, c_stair_steps=1, seed=0)
  state = objective.init_state(None, 3, hp)
  mean = jnp.full((4, 3), 1.0)
  stats = losses.Stats(rec=jnp.zeros(4), mean=mean, logvar=jnp.zeros((4, 3)), z=mean)
  kl = 1.5  # 3 latents × 0.5
  _, aux = objective(hp, 5, stats, 1, state)  # C = 1.0
  e = 1.0 - kl
  expected = 1.0 + 0.5 / (1 + np.exp(e)) + 0.2 * kl - 0.2
  np.testing.assert_allclose(aux['beta_t'], expected, rtol=1e-5)
  np.testing.assert_allclose(aux['kl_minus_c'], 0.5, rtol=1e-5)
  new, out = objective.update(hp, 5, stats, state, None)
  np.testing.assert_allclose(new['controller'].integral, 0.1, rtol=1e-5)
  np.testing.assert_allclose(out['controller_integral'], 0.1, rtol=1e-5)


# ---------------------------------------------------------------------------
# Runs: sweeps equal single runs, resume, divergence, configs, bad values.
# ---------------------------------------------------------------------------

# objective -> (its swept weight, two values, config overrides)
RUNS = {
    'beta_tcvae': ('beta', [1.0, 6.0], {}),
    'factor_vae': ('gamma', [10.0, 40.0], dict(discriminator_layers=2,
                                               discriminator_units=32,
                                               disc_learning_rate=1e-3)),
    'dip_vae': ('lambda_od', [1.0, 20.0], dict(dip_type='ii')),
    'controlled_capacity': ('ki', [0.01, 0.5], dict(kp=1.0)),
}


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


def _config(objective, **overrides):
  config = load_config('test')
  config.objective = objective
  config.num_steps = 6
  config.checkpoint_every = 3
  config.update(RUNS[objective][2])
  config.update(overrides)
  return config


@pytest.mark.parametrize('objective', sorted(RUNS))
def test_sweep_member_is_its_single_run_resumed(objective, tmp_path):
  """A sweep over the objective's weight, with a third member that diverges:
  member 1 ends bitwise where a single run with its values ends, that run
  stopped at step 3 and resumed (objective state included); the diverging
  member is frozen with finite state, the others train on."""
  name, values, _ = RUNS[objective]
  config = _config(objective)
  config.sweep.zip = {name: [*values, values[0]], 'learning_rate': [5e-4, 5e-4, 1e8]}
  states = train.train_and_evaluate(config, str(tmp_path / 'sweep'))
  single = _config(objective, num_steps=3)
  single[name] = values[1]
  train.train_and_evaluate(single, str(tmp_path / 'single'))
  single.num_steps = 6
  resumed = train.train_and_evaluate(single, str(tmp_path / 'single'))
  member = lambda s, i: jax.tree.map(lambda a: a[i], s)
  assert _leaves_equal(member(states, 1), member(resumed, 0))
  if objective in ('factor_vae', 'controlled_capacity'):
    assert jax.tree.leaves(resumed.objective_state)
    assert not _leaves_equal(member(states, 0).objective_state,
                             member(states, 1).objective_state)
  assert [bool(f) for f in states.frozen] == [False, False, True]
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(member(states, 2)))
  with open(tmp_path / 'sweep' / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  keys = {'beta_tcvae': ('mi', 'tc', 'dwkl'), 'factor_vae': ('tc', 'disc_accuracy'),
          'dip_vae': ('dip', 'cov_offdiag'),
          'controlled_capacity': ('beta_t', 'kl_minus_c', 'controller_integral')}[objective]
  for key in keys:
    assert all(key in r and r[key] is not None for r in rows if r['member'] < 2)


@pytest.mark.parametrize('name, arg', [('beta_tcvae', ''), ('factor_vae', ''),
                                       ('dip_vae', 'i'), ('dip_vae', 'ii'),
                                       ('controlled_capacity', ''),
                                       ('capacity_vs_controller', 'capacity'),
                                       ('capacity_vs_controller', 'controller')])
def test_shipped_objective_configs_are_valid(name, arg):
  config = config_lib.sibling(os.path.join(CONFIGS, 'x.py'), name).get_config(arg)
  config_lib.validate(config)
  assert len(sweep.members(config)) >= 2


@pytest.mark.parametrize('field, value, message', [
    ('lambda_od', -1.0, 'config.lambda_od = -1.0: must be >= 0'),
    ('ki', -0.001, 'config.ki = -0.001: must be >= 0'),
    ('kp', float('nan'), 'config.kp = nan: must be finite'),
    ('beta_max', float('inf'), 'config.beta_max = inf: must be finite'),
    ('disc_learning_rate', 0.0, 'config.disc_learning_rate = 0.0: must be > 0'),
    ('discriminator_units', 0, 'config.discriminator_units = 0: must be > 0'),
    ('tc_estimator', 'exact', "config.tc_estimator = 'exact' is unknown"),
    ('dip_type', 'iii', "config.dip_type = 'iii' is unknown"),
])
def test_bad_objective_values_are_refused_before_anything_is_written(field, value, message,
                                                                      tmp_path):
  config = load_config('test')
  config[field] = value
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError, match=message.replace('(', r'\(')):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_controller_bounds_are_checked_for_every_member(tmp_path):
  config = load_config('test')
  config.objective = 'controlled_capacity'
  config.sweep.zip = {'beta_min': [1.0, 5.0], 'beta_max': [10.0, 2.0]}
  with pytest.raises(ConfigError, match='member 1: config.beta_min = 5.0 is above'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('objective, term', [
    ('beta_tcvae', 'tc'), ('dip_vae', 'dip'), ('controlled_capacity', 'beta_t'),
    ('factor_vae', 'disc_accuracy')])
def test_heldout_terms_of_every_objective(objective, term, tmp_path):
  """Evaluation's held-out terms (eval.json's objective_terms) for each
  objective, one per member, finite."""
  from capvae import evaluate  # pylint: disable=g-import-not-at-top
  config = load_config('test')
  config.objective = objective
  config.num_steps = 2
  config.discriminator_units = 16
  config.trackers = ()
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  run = workdir_lib.Members(workdir)
  _, _, _, _, terms = evaluate.heldout_stats(run, num_images=40, seed=0, batch=20)
  assert terms[term].shape == (1,) and np.all(np.isfinite(terms[term])), terms
  assert not os.path.exists(os.path.join(workdir, 'tb'))  # config.trackers = (): none


@pytest.mark.parametrize('config, extra, term', [
    ('beta_tcvae.py', {}, 'tc'),
    ('factor_vae.py', {'discriminator_units': 16}, 'disc_accuracy'),
    ('dip_vae.py:ii', {}, 'dip'),
    ('controlled_capacity.py', {}, 'beta_t'),
    ('capacity_vs_controller.py:capacity', {}, 'kl_minus_c'),
    ('capacity_vs_controller.py:controller', {}, 'beta_t'),
])
def test_new_objective_configs_train_through_the_cli(config, extra, term, tmp_path):
  """Each shipped config, shrunk to a few steps, trains through ``capvae.main``
  and logs its objective's own term; FactorVAE's is also evaluated (eval.json
  carries the terms, computed for every objective by the same code:
  test_heldout_terms_of_every_objective) and reported."""
  small = dict(num_steps=2, batch_size=8, log_every=1, checkpoint_every=2, latent_size=3)
  workdir = str(tmp_path / 'run')
  flags = [f'--config.{k}={v}' for k, v in {**small, **extra}.items()]
  modes = [('train', ['--config', f'configs/{config}', *flags])]
  if config == 'factor_vae.py':  # the report evaluates (eval.json) and draws its terms
    modes += [('report', ['--eval_scale=0.002', '--eval_sizes=information_images=500,'
                                                   'beta_vae_batch_size=8,factor_vae_batch_size=8'])]
  for mode, more in modes:
    proc = subprocess.run(
        [sys.executable, '-m', 'capvae.main', f'--mode={mode}', '--workdir', workdir, *more],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (config, mode, proc.stderr[-3000:])
  assert len(workdir_lib.load_members(workdir)) >= 2
  last = workdir_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))[-1]
  assert np.isfinite(last[term]), last
  if config != 'factor_vae.py':
    return
  with open(os.path.join(workdir, 'eval.json')) as f:
    result = json.load(f)
  terms = result['members'][0]['objective_terms']
  assert np.isfinite(terms[term]), terms
  # --eval_sizes reached the evaluation; the other sizes are the scale's.
  settings = result['settings']
  assert (settings['information_images'], settings['beta_vae_batch_size'],
          settings['factor_vae_batch_size'], settings['num_train']) == (500, 8, 8, 20)
  assert result['members'][0]['information']['num_images'] == 500
  if config == 'factor_vae.py':
    assert os.path.getsize(os.path.join(workdir, 'report', 'objective_terms.png')) > 5000
    with open(os.path.join(workdir, 'report', 'index.html')) as f:
      page = f.read()
    assert "The objective's own terms (factor_vae)" in page
    assert 'held-out disc_accuracy' in page
