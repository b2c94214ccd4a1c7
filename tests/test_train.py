"""The train step, the loop, checkpoints, exact resume and preemption."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from capvae import config_lib, data, losses, models, schedules, sweep, train
from capvae import workdir as workdir_lib
from conftest import ROOT, load_config
from capvae.errors import ConfigError


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_smoke_cli_runs_the_test_config(tmp_path):
  workdir = str(tmp_path / 'run')
  proc = subprocess.run(
      [sys.executable, '-m', 'capvae.main', '--config', 'configs/test.py',
       '--workdir', workdir], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'steps/s' in proc.stderr and 'left' in proc.stderr  # progress lines
  config = load_config('test')
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['c_max'] == config.c_max
  with open(os.path.join(workdir, 'members.json')) as f:
    assert json.load(f) == sweep.members(config)
  rows = _rows(workdir)
  assert [r['step'] for r in rows] == [0, 2, 4, 6, 8, 10, 11]
  schedule = schedules.linear(config.c_max, config.c_anneal_steps)
  for r in rows:
    assert {'step', 'member', 'loss', 'rec', 'kl', 'kl_per_latent', 'c', 'kl_minus_c',
            'steps_per_sec', 'gamma', 'c_max', 'seed'} <= set(r)
    assert r['c'] == pytest.approx(float(schedule(r['step'])))
    assert r['kl_minus_c'] == pytest.approx(r['kl'] - r['c'], abs=1e-5)
    assert len(r['kl_per_latent']) == config.latent_size
    assert sum(r['kl_per_latent']) == pytest.approx(r['kl'], rel=1e-4, abs=1e-6)
    assert r['loss'] == pytest.approx(r['rec'] + config.gamma * abs(r['kl'] - r['c']), rel=1e-4)
    assert r['steps_per_sec'] > 0
  assert rows[-1]['rec'] < rows[0]['rec'] - 10  # it learns something
  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints', 'chunk_000'))
  assert mngr.latest_step() == config.num_steps


def _train(workdir, num_steps, **overrides):
  config = load_config('test')
  config.num_steps = num_steps
  config.log_every = 1
  for k, v in overrides.items():
    config[k] = v
  return train.train_and_evaluate(config, workdir)


def test_resume_is_bitwise_exact(tmp_path):
  one_go = _train(str(tmp_path / 'a'), 8)
  first = _train(str(tmp_path / 'b'), 4)
  assert int(first.step[0]) == 4
  resumed = _train(str(tmp_path / 'b'), 8)  # reruns the same workdir to 8
  assert int(resumed.step[0]) == 8
  for x, y in zip(jax.tree.leaves(one_go), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  strip = lambda rows: [{k: v for k, v in r.items() if k != 'steps_per_sec'} for r in rows]
  rows_a, rows_b = strip(_rows(str(tmp_path / 'a'))), strip(_rows(str(tmp_path / 'b')))
  assert [r['step'] for r in rows_b] == list(range(8))
  assert rows_a == rows_b  # same C, KL, loss at every step
  assert len({r['c'] for r in rows_a}) > 4  # C moved over those steps


def _manual_member_step(model, spec, state, x):
  """A second, un-vmapped implementation of one member's update."""
  hp = state.hparams
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(hp.seed), 1), state.step)

  def loss_fn(params):
    logits, mean, logvar = model.apply(params, x, key)
    rec = losses.bernoulli_nll(logits, x)
    kl = jnp.sum(losses.gaussian_kl(mean, logvar), -1)
    c = jnp.minimum(hp.c_max, hp.c_max * state.step / hp.c_anneal_steps)
    return jnp.mean(rec) + hp.gamma * jnp.abs(jnp.mean(kl) - c)

  grads = jax.grad(loss_fn)(state.params)
  tx = optax.adam(hp.learning_rate, eps=dict(spec.optimizer_kwargs)['eps'])
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      opt_state=opt_state)
  return new, loss_fn(state.params)


def test_stacked_members_equal_separate_runs_and_a_manual_step():
  config = load_config('test')
  # The manual step is a different program, so it rounds differently; with
  # Adam's default eps a near-zero gradient whose sign flips under float noise
  # moves a full lr either way. eps = 1 keeps small updates linear in the
  # gradient so it can be compared tightly. Stacked and single runs share the
  # member program and agree bit for bit.
  config.adam_eps = 1.0
  spec = train.StepSpec.from_config(config)
  dataset = data.get('dsprites')
  model = models.get('burgess', config.latent_size, dataset.observation_shape)
  base = sweep.members(config)[0]
  rows = [dict(base, member=0),
          dict(base, member=1, gamma=50.0, c_max=7.0, c_anneal_steps=3,
               learning_rate=1e-3, seed=5)]
  step_fn = jax.jit(train.make_train_step(model, spec))
  init = jax.jit(lambda h: train.init_states(model, h, dataset.observation_shape, spec))
  manual_step = jax.jit(lambda m, x: _manual_member_step(model, spec, m, x))

  both = init(sweep.stack(rows))
  singles = [init(sweep.stack([r])) for r in rows]
  manual = [jax.tree.map(lambda a: a[0], s) for s in singles]
  batch_at = jax.jit(lambda d, step: train.batch_at(d, step, spec))
  for _ in range(3):
    x = batch_at(dataset, both.step[0])
    manual, manual_loss = zip(*[manual_step(m, x) for m in manual])
    both, metrics = step_fn(both, dataset)
    single_out = [step_fn(s, dataset) for s in singles]
    singles = [s for s, _ in single_out]
    for i in range(2):
      np.testing.assert_allclose(metrics['loss'][i], single_out[i][1]['loss'][0], rtol=1e-5)
      np.testing.assert_allclose(metrics['loss'][i], manual_loss[i], rtol=1e-5)
      np.testing.assert_allclose(metrics['kl'][i], single_out[i][1]['kl'][0], rtol=1e-4,
                                 atol=1e-6)
  assert not np.allclose(np.asarray(metrics['c'][0]), np.asarray(metrics['c'][1]))
  for i in range(2):
    member = jax.tree.map(lambda a: a[i], both)
    for a, b, c in zip(jax.tree.leaves(member.params), jax.tree.leaves(singles[i].params),
                       jax.tree.leaves(manual[i].params)):
      np.testing.assert_array_equal(a, b[0])  # members run one by one: bitwise
      np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6)
  # Different seeds give different initial parameters.
  fresh = init(sweep.stack(rows)).params
  assert any(not np.allclose(leaf[0], leaf[1]) for leaf in jax.tree.leaves(fresh))


@pytest.mark.parametrize('model_name', ['burgess', 'mlp'])
def test_the_accelerators_step_equals_the_cpus(model_name):
  """``member_loop='vmap'`` with XLA's layers (what ``'auto'`` picks on GPU and
  TPU) gives the numbers of ``'map'`` with the matrix-product layers (CPU):
  the same function, computed another way."""
  config = load_config('test')
  config.adam_eps = 1.0  # as above: small updates stay linear in the gradient
  spec = train.StepSpec.from_config(config)
  dataset = data.get('dsprites')
  base = sweep.members(config)[0]
  rows = [dict(base, member=0), dict(base, member=1, gamma=50.0, c_max=7.0, seed=5)]
  out = {}
  for loop, impl in (('map', 'matmul'), ('vmap', 'xla')):
    model = models.get(model_name, config.latent_size, dataset.observation_shape, impl=impl)
    init = jax.jit(lambda h, m=model: train.init_states(m, h, dataset.observation_shape, spec))
    step_fn = jax.jit(train.make_train_step(model, spec, loop))
    states = init(sweep.stack(rows))
    for _ in range(2):
      states, metrics = step_fn(states, dataset)
    out[loop] = states, metrics
  np.testing.assert_allclose(out['vmap'][1]['loss'], out['map'][1]['loss'], rtol=1e-5)
  moved = 0
  for a, b in zip(jax.tree.leaves(out['vmap'][0].params), jax.tree.leaves(out['map'][0].params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    moved += int(np.sum(np.asarray(a) != 0))
  assert moved > 0


@pytest.mark.parametrize('objective, penalty, shards', [
    ('capacity', 'abs', 2), ('capacity', 'abs', 4), ('beta', 'abs', 2),
    ('beta_tcvae', 'abs', 2), ('factor_vae', 'abs', 2)])
def test_data_parallel_grads_are_the_whole_batch_gradient(objective, penalty, shards):
  """Also for objectives of the whole batch's codes: the total correlation's
  pairwise densities and the discriminator (read from the objective state)."""
  config = load_config('test')
  config.objective, config.capacity_penalty = objective, penalty
  config.beta = 4.0
  config.gamma = 30.0
  config.discriminator_layers, config.discriminator_units = 2, 16
  spec = train.StepSpec.from_config(config)
  dataset = data.get('dsprites')
  model = models.get('burgess', config.latent_size, dataset.observation_shape)
  init = train.init_states(model, sweep.stack(sweep.members(config)),
                           dataset.observation_shape, spec)
  state = jax.tree.map(lambda a: a[0], init)
  x = train.batch_at(dataset, jnp.int32(3), spec)
  key, step = jax.random.key(7), jnp.int32(5)  # C is between 0 and c_max at step 5
  # Compiled: op by op, the two sides took ~50 s per case.
  whole = jax.jit(lambda xs: jax.value_and_grad(train.member_loss, has_aux=True)(
      state.params, model, state.hparams, step, xs, key, spec, state.objective_state))
  (loss, aux), grads = whole(x)
  # Each of `shards` devices (here a vmapped axis) holds consecutive images.
  shard = lambda xs: train.data_parallel_grads(state.params, model, state.hparams, step, xs,
                                               key, spec, axis='data',
                                               objective_state=state.objective_state)
  (s_loss, s_aux), s_grads = jax.jit(jax.vmap(shard, axis_name='data'))(
      x.reshape(shards, -1, *x.shape[1:]))
  for d in range(shards):  # every device holds the whole batch's loss and gradient
    np.testing.assert_allclose(s_loss[d], loss, rtol=1e-6)
    for k in aux:  # the metrics and the batch's statistics
      for a, b in zip(jax.tree.leaves(s_aux[k]), jax.tree.leaves(aux[k])):
        np.testing.assert_allclose(a[d], b, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s_grads), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a[d], b, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(b))))
  # A device's own share alone gives another gradient: the test can tell.
  (_, _), own = whole(x[:x.shape[0] // shards])
  assert not all(np.allclose(a, b, rtol=1e-2)
                 for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(grads)))


def test_data_shards_must_divide_the_batch_and_the_devices():
  config = load_config('test')  # batch 8
  for bad in (3, 16, 0, -2):
    config.data_shards = bad
    with pytest.raises(ConfigError, match='data_shards'):
      config_lib.validate(config)
  config.data_shards = 2
  config_lib.validate(config)
  with pytest.raises(ConfigError, match='must divide the 1 device'):
    config_lib.check_devices(config, 1, 1)
  config_lib.check_devices(config, 2, 1)


def test_removed_microbatch_size_is_dropped_at_zero_and_refused_otherwise():
  """Workdirs saved with ``microbatch_size`` (removed: every step takes the
  whole batch's gradient) load and resume; a config that asks for
  micro-batches is told the field is gone."""
  config = load_config('test')
  config.microbatch_size = 0
  config_lib.validate(config)
  assert config_lib.differences(config, load_config('test')) == []
  config_lib.normalize(config)
  assert 'microbatch_size' not in config
  config.microbatch_size = 4
  with pytest.raises(ConfigError, match='microbatch_size = 4: this field was removed'):
    config_lib.validate(config)


@pytest.mark.parametrize('in_place_size', [train.IN_PLACE_SIZE, 1],
                         ids=['small-arrays-chosen', 'all-arrays-in-place'])
def test_a_refused_update_leaves_the_state_as_it_was(in_place_size, monkeypatch):
  """Arrays below ``train.IN_PLACE_SIZE`` take the new or old value elementwise,
  bigger ones are updated in place under a cond; either way a live member's
  update is the same, and a refused one changes nothing."""
  config = load_config('test')
  spec = train.StepSpec.from_config(config)
  dataset = data.get('dsprites')
  model = models.get('burgess', config.latent_size, dataset.observation_shape)
  base = sweep.members(config)[0]
  # An infinite learning rate: the loss and gradients are finite, the new
  # parameters are not, so only the check of the new parameters refuses it.
  rows = [dict(base, member=0), dict(base, member=1, learning_rate=float('inf'))]
  init = jax.jit(lambda h: train.init_states(model, h, dataset.observation_shape, spec))
  reference = jax.jit(train.make_train_step(model, spec))(init(sweep.stack(rows)), dataset)
  monkeypatch.setattr(train, 'IN_PLACE_SIZE', in_place_size)
  step_fn = jax.jit(train.make_train_step(model, spec), donate_argnums=0)
  states = init(sweep.stack(rows))
  before = jax.tree.map(np.asarray, states)
  for _ in range(2):
    states, metrics = step_fn(states, dataset)
  assert list(np.asarray(states.frozen)) == [False, True]
  assert list(np.asarray(metrics['frozen_step'])) == [-1, 0]
  assert np.isfinite(np.asarray(metrics['loss'])).all()
  refused = jax.tree.map(lambda a: a[1], (states.params, states.opt_state))
  kept = jax.tree.map(lambda a: a[1], (before.params, before.opt_state))
  for a, b in zip(jax.tree.leaves(refused), jax.tree.leaves(kept)):
    np.testing.assert_array_equal(a, b)
  # The live member moved, and its first update is the one the default step makes.
  first, _ = step_fn(init(sweep.stack(rows)), dataset)
  for a, b, c in zip(jax.tree.leaves(first.params), jax.tree.leaves(reference[0].params),
                     jax.tree.leaves(before.params)):
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-9)
    assert not np.array_equal(a[0], c[0])


def test_hyperparameter_values_do_not_recompile():
  config = load_config('test')
  spec = train.StepSpec.from_config(config)
  dataset = data.get('dsprites')
  model = models.get('burgess', config.latent_size, dataset.observation_shape)
  step_fn = jax.jit(train.make_train_step(model, spec))
  init = jax.jit(lambda h: train.init_states(model, h, dataset.observation_shape, spec))
  base = sweep.members(config)[0]
  for gamma, c_max, lr in ((1000.0, 2.0, 5e-4), (10.0, 30.0, 1e-3)):
    states = init(sweep.stack([dict(base, gamma=gamma, c_max=c_max, learning_rate=lr)]))
    step_fn(states, dataset)
  assert step_fn._cache_size() == 1
  assert init._cache_size() == 1


def test_runs_with_the_same_static_choices_share_one_compiled_step(tmp_path):
  """A second run in the process with other hyperparameter values (and its
  resume) reuses the first run's jitted step: the step is compiled once, and
  the runs end bitwise where the same run on a program of its own ends.
  Another objective gets a program of its own."""
  from jax._src import dispatch, monitoring  # pylint: disable=g-import-not-at-top
  compiled = []
  def listen(event, _, fun_name='', **__):
    if event == dispatch.BACKEND_COMPILE_EVENT:
      compiled.append(fun_name)
  monitoring.register_event_duration_secs_listener(listen)
  try:
    config = load_config('test')
    config.num_steps, config.trackers = 2, ()
    train._jitted_program.cache_clear()  # pylint: disable=protected-access
    train.train_and_evaluate(config, str(tmp_path / 'a'))
    steps_compiled = compiled.count('jit(local_step)')
    other = load_config('test')
    other.num_steps, other.trackers, other.gamma, other.seed = 2, (), 7.0, 3
    first_leg = train.train_and_evaluate(other, str(tmp_path / 'b'))
    other.num_steps = 4
    resumed = train.train_and_evaluate(other, str(tmp_path / 'b'))
    assert steps_compiled == 1 and compiled.count('jit(local_step)') == 1, compiled
    info = train._jitted_program.cache_info()  # pylint: disable=protected-access
    assert (info.misses, info.hits) == (1, 2)
    # The same four steps on a program of their own.
    train._jitted_program.cache_clear()  # pylint: disable=protected-access
    fresh = train.train_and_evaluate(other, str(tmp_path / 'c'))
    assert compiled.count('jit(local_step)') == 2
    other.objective = 'beta'
    train.train_and_evaluate(other, str(tmp_path / 'd'))
    assert compiled.count('jit(local_step)') == 3
  finally:
    monitoring.unregister_event_duration_listener(listen)
  assert int(first_leg.step[0]) == 2 and int(resumed.step[0]) == 4
  for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_run_saved_before_later_fields_resumes(tmp_path):
  """A workdir whose config.json predates the fields of ``LATER_FIELDS`` (and
  still has the removed ``microbatch_size``) resumes with today's config, and
  its saved config loads and validates."""
  workdir = str(tmp_path / 'old')
  _train(workdir, 2)
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    saved = json.load(f)
  for k in config_lib.LATER_FIELDS:
    del saved[k]
  saved['microbatch_size'] = 0
  with open(path, 'w') as f:
    json.dump(saved, f)
  loaded = workdir_lib.load_config(workdir)
  assert {k: loaded[k] for k in config_lib.LATER_FIELDS} == config_lib.LATER_FIELDS
  assert 'microbatch_size' not in loaded
  config_lib.validate(loaded)
  assert int(_train(workdir, 4).step[0]) == 4
  with pytest.raises(ConfigError, match='init'):
    _train(workdir, 6, init='kaiming')  # a different trajectory is refused


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
  workdir = str(tmp_path / 'run')
  proc = subprocess.Popen(
      [sys.executable, '-m', 'capvae.main', '--config', 'configs/test.py', '--workdir',
       workdir, '--config.num_steps=100000', '--config.checkpoint_every=100000',
       '--config.log_every=3'],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 120
  while time.time() < deadline:
    if os.path.exists(metrics) and len(_rows(workdir)) >= 3:
      break
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  assert 'rerun the same command to resume' in out
  saved = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints', 'chunk_000')).latest_step()
  rows = _rows(workdir)
  assert saved is not None and 7 <= saved < 100000
  # The log holds the rows an uninterrupted run logs (every 3rd step), and no
  # extra row for the step the signal stopped at.
  grid = [s for s in range(saved) if s % 3 == 0]
  assert [r['step'] for r in rows] == grid
  resumed = _train(workdir, saved + 2, checkpoint_every=100000)  # logs every step
  assert int(resumed.step[0]) == saved + 2
  assert [r['step'] for r in _rows(workdir)] == grid + [saved, saved + 1]


def test_divergence_fails_loudly_and_keeps_the_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  _train(workdir, 4)
  before = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints', 'chunk_000')).all_steps()
  config = load_config('test')
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['learning_rate'] == config.learning_rate
  # A fresh run whose learning rate makes the parameters overflow.
  bad = str(tmp_path / 'bad')
  with pytest.raises(FloatingPointError, match='member'):
    _train(bad, 40, learning_rate=1e30)
  assert ocp.CheckpointManager(os.path.join(workdir, 'checkpoints', 'chunk_000')).all_steps() == before


_FAULTS_PROBE = r'''
import resource, sys
from capvae import backend
kept = backend.keep_freed_memory() if sys.argv[1] == 'kept' else None
import jax, jax.numpy as jnp
# A temporary of 48 MB, above the largest mmap threshold glibc allows (32 MiB).
f = jax.jit(lambda x: jnp.sum(jax.lax.optimization_barrier(jnp.sin(x)) * 2))
x = jnp.ones((12 << 20,), jnp.float32)
for _ in range(20):  # the heap grows to its working size over the first calls
  f(x).block_until_ready()
faults = []
for _ in range(11):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median call: with the setting, the heap still grows now and then over the
# first ~35 calls (one call then faults the whole temporary in, 12,289 pages).
print(kept, sorted(faults)[len(faults) // 2])
'''


def test_keep_freed_memory_stops_steps_faulting_their_temporaries_in():
  """A program's temporaries above 32 MiB come from the heap and stay there:
  after warm-up the median call faults (almost) no page in, where by default
  every call maps them afresh and faults each of their ~12,300 pages."""
  def faults(mode):
    out = subprocess.run([sys.executable, '-c', _FAULTS_PROBE, mode], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0], float(out[1])

  kept, with_it = faults('kept')
  if kept != 'True':
    pytest.skip('not glibc: keep_freed_memory does nothing here')
  _, without = faults('default')
  assert without > 5000, without  # the probe does exercise the fresh mapping
  assert with_it < 200, (with_it, without)
