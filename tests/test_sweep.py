"""Sweeps: the grid grammar, one program for all members, devices, hosts, divergence."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from capvae import config_lib, sweep, train
from capvae import workdir as workdir_lib
from capvae import parallel
from capvae.errors import ConfigError
from conftest import ROOT, load_config

# Under pytest-xdist, on one worker: they share the module's sweep_run fixture.
pytestmark = pytest.mark.xdist_group('test_sweep')


def _leaves_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------
# The grammar.
# ---------------------------------------------------------------------------


def test_product_and_zip_expand_in_a_documented_order():
  config = load_config('test')
  config.sweep.product = dict(seed=[0, 1], gamma=[10.0, 100.0, 1000.0])
  config.sweep.zip = dict(c_max=[5.0, 25.0], c_anneal_steps=[100, 400])
  config_lib.validate(config)
  rows = sweep.members(config)
  assert len(rows) == 2 * 3 * 2
  assert [r['member'] for r in rows] == list(range(12))
  # Alphabetical product (gamma, seed), the zip block last and fastest.
  assert [(r['gamma'], r['seed'], r['c_max'], r['c_anneal_steps']) for r in rows[:4]] == [
      (10.0, 0, 5.0, 100), (10.0, 0, 25.0, 400), (10.0, 1, 5.0, 100), (10.0, 1, 25.0, 400)]
  assert {(r['c_max'], r['c_anneal_steps']) for r in rows} == {(5.0, 100), (25.0, 400)}
  assert all(r['learning_rate'] == config.learning_rate for r in rows)  # unswept
  assert isinstance(rows[0]['seed'], int) and isinstance(rows[0]['gamma'], float)
  # No sweep: the one-member table.
  assert sweep.members(load_config('test')) == [
      dict({n: load_config('test')[n] for n in sweep.train_state.HPARAM_NAMES}, member=0)]


@pytest.mark.parametrize('kind, block, message', [
    ('product', dict(latent_size=[4, 8]), r'latent_size.*changes the compiled program'),
    ('product', dict(batch_size=[8]), r'batch_size.*run one sweep per value'),
    ('zip', dict(objective=['beta']), r'objective.*changes the compiled program'),
    ('product', dict(gama=[1.0]), r'config.sweep.product.gama: no such field'),
    ('product', dict(gamma=[10.0, -1.0]), r'config.sweep.product.gamma\[1\] = -1.0: must be >= 0'),
    ('product', dict(seed=[0, 1.5]), r'config.sweep.product.seed\[1\] = 1.5: must be an integer'),
    ('product', dict(learning_rate=[]), r'config.sweep.product.learning_rate is empty'),
    ('product', dict(gamma=5.0), r'must be a list'),
    ('zip', dict(gamma=[1.0, 2.0], seed=[0]), r'equal lengths'),
    ('product', dict(c_max=[float('nan')]), r'c_max\[0\] = nan: must be finite'),
])
def test_bad_sweeps_are_refused_naming_the_field(kind, block, message):
  config = load_config('test')
  config.sweep[kind] = block
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)


def test_a_field_in_both_blocks_is_refused(tmp_path):
  config = load_config('test')
  config.sweep.product = dict(gamma=[1.0])
  config.sweep.zip = dict(gamma=[2.0])
  workdir = str(tmp_path / 'never')
  with pytest.raises(ConfigError, match='already swept'):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)


def test_chunks_and_padding_layout():
  assert [list(c) for c in sweep.chunks(5, 2)] == [[0, 1], [2, 3], [4]]
  assert [list(c) for c in sweep.chunks(5, 0)] == [[0, 1, 2, 3, 4]]
  assert sweep.padded_size(5, 0, 8) == 8 and sweep.padded_size(5, 2, 8) == 8
  assert sweep.padded_size(16, 0, 8) == 16 and sweep.padded_size(3, 0, 1) == 3
  assert sweep.locate(4, 5, 2) == (2, 0) and sweep.locate(3, 5, 0) == (0, 3)
  rows = sweep.pad([{'member': 0, 'gamma': 1.0}], 3)
  assert [r['member'] for r in rows] == [0, -1, -1] and rows[2]['gamma'] == 1.0


# ---------------------------------------------------------------------------
# One program: member i of a sweep is the single run with its values.
# ---------------------------------------------------------------------------


@pytest.fixture(scope='session')  # once per worker: see conftest.py
def sweep_run(tmp_path_factory):
  """``configs/test_sweep.py`` trained on this process's one device."""
  workdir = str(tmp_path_factory.mktemp('sweep') / 'run')
  config = load_config('test_sweep')
  states = train.train_and_evaluate(config, workdir)
  return workdir, config, states


def _single_config(config, row):
  single = load_config('test')
  for k in ('num_steps', 'checkpoint_every', 'log_every'):
    single[k] = config[k]
  for name in sweep.train_state.HPARAM_NAMES:
    single[name] = row[name]
  return single


def test_each_member_is_bitwise_its_single_run(sweep_run, tmp_path):
  workdir, config, states = sweep_run
  rows = sweep.members(config)
  assert len(rows) == 3 and int(states.step[0]) == config.num_steps
  for row in rows:
    single = train.train_and_evaluate(_single_config(config, row),
                                      str(tmp_path / f'single{row["member"]}'))
    member = jax.tree.map(lambda a: a[row['member']], states)
    assert _leaves_equal(member, jax.tree.map(lambda a: a[0], single))
    # The log agrees too: the member's rows are the single run's, bit for bit.
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ('steps_per_sec', 'member')}
                        for r in rs]
    mine = [r for r in _rows(workdir) if r['member'] == row['member']]
    assert strip(mine) == strip(_rows(str(tmp_path / f'single{row["member"]}')))
  # Members really differ.
  assert not np.allclose(states.params['params']['encoder']['Conv_0']['kernel'][0],
                         states.params['params']['encoder']['Conv_0']['kernel'][1])


def test_every_metrics_row_names_its_member_and_hyperparameters(sweep_run):
  workdir, config, _ = sweep_run
  rows = _rows(workdir)
  table = {r['member']: r for r in sweep.members(config)}
  with open(os.path.join(workdir, 'members.json')) as f:
    assert [r['member'] for r in json.load(f)] == [0, 1, 2]
  assert {r['member'] for r in rows} == {0, 1, 2}
  for r in rows:
    for name in sweep.train_state.HPARAM_NAMES:
      assert r[name] == table[r['member']][name]
    assert r['frozen'] is False and r['frozen_step'] == -1
    assert r['c'] == pytest.approx(min(r['c_max'], r['c_max'] * r['step'] / r['c_anneal_steps']))


def test_new_sweep_values_do_not_recompile():
  config = load_config('test_sweep')
  spec = train.StepSpec.from_config(config)
  from capvae import data, models
  dataset = data.get('dsprites')
  model = models.get('burgess', config.latent_size, dataset.observation_shape)
  mesh = parallel.make_mesh()
  step = jax.jit(train.make_train_step(model, spec, 'map', mesh))
  init = jax.jit(lambda h: train.init_states(model, h, dataset.observation_shape, spec))
  for zipped in (config.sweep.zip.to_dict(),
                 dict(gamma=[1.0, 2.0, 3.0], c_max=[9.0, 8.0, 7.0],
                      learning_rate=[1e-2, 1e-3, 1e-4], seed=[7, 8, 9])):
    config.sweep.zip = zipped
    step(init(sweep.stack(sweep.members(config))), dataset)
  assert step._cache_size() == 1 and init._cache_size() == 1


def test_extracted_member_is_a_standalone_run(sweep_run, tmp_path):
  workdir, config, states = sweep_run
  out = str(tmp_path / 'member1')
  proc = subprocess.run(
      [sys.executable, '-m', 'capvae.extract', '--workdir', workdir, '--member', '1',
       '--out', out], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  cfg, _, state, row = workdir_lib.load_member(out, 0)
  assert _leaves_equal(state, jax.tree.map(lambda a: a[1], states))
  assert row['gamma'] == sweep.members(config)[1]['gamma'] and cfg.gamma == row['gamma']
  assert dict(cfg.sweep.zip) == {} and cfg.chunk_size == 0
  # It trains on like any single run, from the saved step.
  resumed = train.train_and_evaluate(
      load_config_from(out, num_steps=config.num_steps + 2), out)
  assert int(resumed.step[0]) == config.num_steps + 2
  # Bad requests are refused, and nothing is overwritten.
  with pytest.raises(ConfigError, match='member 3 is not in this run'):
    workdir_lib.extract_member(workdir, 3, str(tmp_path / 'x'))
  with pytest.raises(ConfigError, match='exists'):
    workdir_lib.extract_member(workdir, 1, out)


def load_config_from(workdir, **overrides):
  config = config_lib.sibling(os.path.join(ROOT, 'configs', 'x.py'),
                              'from_workdir').get_config(workdir)
  config.update(overrides)
  return config


def test_resume_in_chunks_is_bitwise_the_one_go_run(sweep_run, tmp_path):
  workdir, config, states = sweep_run
  chunked = str(tmp_path / 'chunked')
  config = load_config('test_sweep')
  config.chunk_size = 2
  config.num_steps = 4
  config.log_every = 1
  train.train_and_evaluate(config, chunked)  # both chunks to step 4
  config.num_steps = 8
  last = train.train_and_evaluate(config, chunked)  # resumed, both chunks to 8
  assert os.listdir(os.path.join(chunked, 'checkpoints')) and sorted(
      os.listdir(os.path.join(chunked, 'checkpoints'))) == ['chunk_000', 'chunk_001']
  for i in range(3):
    _, _, state, _ = workdir_lib.load_member(chunked, i)
    assert _leaves_equal(state, jax.tree.map(lambda a: a[i], states))
  assert _leaves_equal(jax.tree.map(lambda a: a[0], last),
                       jax.tree.map(lambda a: a[2], states))
  by_member = {}
  for r in _rows(chunked):
    by_member.setdefault(r['member'], []).append(r['step'])
  assert by_member == {i: list(range(8)) for i in range(3)}


# ---------------------------------------------------------------------------
# A member that diverges is frozen; the others are untouched.
# ---------------------------------------------------------------------------


def test_a_diverging_member_is_frozen_and_the_others_are_untouched(tmp_path):
  base = load_config('test_sweep')
  base.num_steps = 6
  zipped = base.sweep.zip.to_dict()
  with_bad = {k: [v[0], v[1], v[2]] for k, v in zipped.items()}
  with_bad['learning_rate'] = [zipped['learning_rate'][0], 1e8, zipped['learning_rate'][2]]
  without = {k: [v[0], v[2]] for k, v in zipped.items()}
  base.sweep.zip = with_bad
  bad_dir, good_dir = str(tmp_path / 'bad'), str(tmp_path / 'good')
  bad = train.train_and_evaluate(base, bad_dir)
  base.sweep.zip = without
  good = train.train_and_evaluate(base, good_dir)
  member = lambda s, i: jax.tree.map(lambda a: a[i], s)
  assert _leaves_equal(member(bad, 0).params, member(good, 0).params)
  assert _leaves_equal(member(bad, 2).params, member(good, 1).params)
  assert bool(bad.frozen[1]) and not bool(bad.frozen[0]) and not bool(bad.frozen[2])
  frozen_step = int(bad.frozen_step[1])
  assert 0 <= frozen_step < 6
  # Its parameters are finite: the last ones before the refused update.
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(member(bad, 1).params))
  rows = [r for r in _rows(bad_dir) if r['member'] == 1]
  assert rows[-1]['frozen'] is True and rows[-1]['frozen_step'] == frozen_step
  assert rows[-1]['learning_rate'] == 1e8
  assert all(not r['frozen'] for r in _rows(bad_dir) if r['member'] != 1)
  summary = subprocess.run([sys.executable, 'experiments/summarize_run.py', bad_dir],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert summary.returncode == 0, summary.stderr
  assert f'member 1 FROZEN at step {frozen_step}' in summary.stdout
  assert 'learning_rate=1e+08' in summary.stdout


# ---------------------------------------------------------------------------
# Devices and hosts: the same numbers on 8 devices and on two processes.
# ---------------------------------------------------------------------------


def _env(devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      f' --xla_force_host_platform_device_count={devices}').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_cli(workdir, devices, *flags):
  proc = subprocess.run(
      [sys.executable, '-m', 'capvae.main', '--config', 'configs/test_sweep.py',
       '--workdir', workdir, *flags], cwd=ROOT, env=_env(devices), capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def _members(workdir):
  return [workdir_lib.load_member(workdir, i)[2] for i in range(3)]


def _strip(rows):
  return sorted([{k: v for k, v in r.items() if k != 'steps_per_sec'} for r in rows],
                key=lambda r: (r['member'], r['step']))


def _close_to_single_device(members, states, config):
  # Another device count is another XLA CPU client, which compiles the same
  # program with ~1-ulp differences (see README); placement within one
  # client is bitwise (the tests above). Adam divides by sqrt(v), so where a
  # gradient is near zero and its sign flips under those ulps, the parameter
  # moves up to a learning rate the other way each step. So: almost every
  # element agrees to 1e-4, and none further than Adam's bound on the
  # divergence (2 · steps · lr) allows.
  bound = 2 * config.num_steps * max(config.sweep.zip.learning_rate)
  for i, member in enumerate(members):
    for x, y in zip(jax.tree.leaves(member.params), jax.tree.leaves(states.params)):
      x, y = np.asarray(x), np.asarray(y[i])
      assert x.shape == y.shape
      off = ~np.isclose(x, y, rtol=1e-4, atol=1e-4)
      assert off.mean() <= 1e-3, f'{off.sum()} of {off.size} elements differ'
      np.testing.assert_array_less(np.abs(x - y), bound)


def test_eight_devices_give_the_single_device_result(sweep_run, tmp_path):
  _, config, states = sweep_run
  eight, one = str(tmp_path / 'eight'), str(tmp_path / 'one')
  log = _run_cli(eight, 8)
  assert 'of 8 slots over 8 device(s)' in log  # 3 members padded to 8 slots
  log = _run_cli(one, 8, '--config.num_devices=1')
  assert 'of 3 slots over 1 device(s)' in log
  # Bitwise: the members' numbers do not depend on where they run.
  for a, b in zip(_members(eight), _members(one)):
    assert _leaves_equal(a, b)
  assert _strip(_rows(eight)) == _strip(_rows(one))
  _close_to_single_device(_members(eight), states, config)


def test_a_batch_split_over_two_devices_gives_the_whole_batch_result(sweep_run, tmp_path):
  _, config, states = sweep_run
  split = str(tmp_path / 'split')
  log = _run_cli(split, 2, '--config.data_shards=2')
  # The three members run on one row of two devices, each device half the batch.
  assert 'of 3 slots over 2 device(s)' in log
  rows, whole = _strip(_rows(split)), _strip(_rows(sweep_run[0]))
  assert [(r['member'], r['step']) for r in rows] == [(r['member'], r['step']) for r in whole]
  for a, b in zip(rows, whole):  # the whole batch's loss, KL and C at every log step
    for k in ('loss', 'rec', 'kl', 'c'):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5)
  _close_to_single_device(_members(split), states, config)
  # A split that does not divide the devices is refused before anything is written.
  proc = subprocess.run(
      [sys.executable, '-m', 'capvae.main', '--config', 'configs/test_sweep.py',
       '--workdir', str(tmp_path / 'bad'), '--config.data_shards=4'], cwd=ROOT, env=_env(2),
      capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0 and 'config.data_shards = 4' in proc.stderr
  assert not os.path.exists(tmp_path / 'bad')


def test_two_processes_give_the_single_process_result(sweep_run, tmp_path):
  _, config, states = sweep_run
  two, one = str(tmp_path / 'two'), str(tmp_path / 'one')
  address = f'127.0.0.1:{_free_port()}'
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'capvae.main', '--config', 'configs/test_sweep.py',
       '--workdir', two, '--coordinator_address', address, '--num_processes', '2',
       '--process_id', str(k)], cwd=ROOT, env=_env(2), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for k in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert 'of 4 slots over 4 device(s) (2 process(es))' in outs[0]
  # Process 0 wrote the log; process 1 wrote its shards of the checkpoints.
  _run_cli(one, 2)
  for a, b in zip(_members(two), _members(one)):
    assert _leaves_equal(a, b)
  assert _strip(_rows(two)) == _strip(_rows(one))
  # Process 0 alone wrote TensorBoard: one event file per member, the one-process values.
  from test_tracking import tb_runs, tb_scalars  # pylint: disable=g-import-not-at-top
  from capvae import tracking  # pylint: disable=g-import-not-at-top
  assert sorted(os.listdir(os.path.join(two, 'tb'))) == [f'member_00{m}' for m in range(3)]
  for m in range(3):
    assert len(tracking.event_files(os.path.join(two, 'tb', f'member_00{m}'))) == 1
  _, tb_two = tb_runs(os.path.join(two, 'tb'))
  _, tb_one = tb_runs(os.path.join(one, 'tb'))
  for run in tb_one:
    a, b = tb_scalars(tb_two[run]), tb_scalars(tb_one[run])
    assert a.keys() == b.keys()
    for tag in a:
      if tag != 'train/steps_per_sec':
        assert a[tag] == b[tag], (run, tag)
  _close_to_single_device(_members(two), states, config)
  # The 4-row checkpoint resumes here on one device (3 rows): same members.
  restored = train.train_and_evaluate(load_config('test_sweep'), two)
  for i, member in enumerate(_members(two)):
    assert _leaves_equal(member, jax.tree.map(lambda a: a[i], restored))
