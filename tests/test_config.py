"""Configs load; bad input is refused before anything is compiled or written."""

import contextlib
import os
import subprocess
import sys

import jax
import pytest

from capvae import config_lib, train
from capvae.errors import ConfigError
from conftest import CONFIGS, ROOT, load_config


@contextlib.contextmanager
def count_compiles():
  events = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if 'compile' in event:
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize('name', ['default', 'burgess_dsprites', 'higgins_dsprites', 'test'])
def test_shipped_configs_are_valid(name):
  config = load_config(name)
  config_lib.validate(config)
  assert config.num_steps > 0


def test_paper_settings():
  b = load_config('burgess_dsprites')
  assert (b.objective, b.model, b.gamma, b.c_max, b.c_anneal_steps) == (
      'capacity', 'burgess', 1000.0, 25.0, 100_000)
  assert (b.learning_rate, b.batch_size, b.schedule, b.capacity_penalty) == (
      1e-4, 64, 'linear', 'abs')  # 5e-4 collapses: docs/reproduction.md
  h = load_config('higgins_dsprites')
  assert (h.objective, h.model, h.beta, h.latent_size) == ('beta', 'mlp', 4.0, 10)
  higgins = config_lib.sibling(os.path.join(CONFIGS, 'x.py'), 'higgins_dsprites')
  c = higgins.get_config('compare,seeds=2')
  config_lib.validate(c)
  assert dict(c.sweep.product) == {'beta': [1.0, 4.0], 'seed': [0, 1]}
  assert (c.model, c.learning_rate, c.num_steps) == ('mlp', 1e-4, 300_000)
  for bad in ('beta', 'compare,seeds=0', 'compare,steps=3'):
    with pytest.raises(ValueError, match='compare'):
      higgins.get_config(bad)


def test_locatello_grids():
  grid = config_lib.sibling(os.path.join(ROOT, 'configs', 'x.py'), 'locatello_grid')
  a = grid.get_config('annealed')
  config_lib.validate(a)
  assert (a.objective, a.model, a.gamma, a.c_anneal_steps, a.num_steps) == (
      'capacity', 'locatello', 1000.0, 100_000, 300_000)
  assert (a.learning_rate, a.batch_size, a.reconstruction) == (1e-4, 64, 'bernoulli')
  assert dict(a.sweep.product) == {'c_max': [5.0, 10.0, 25.0, 50.0, 75.0, 100.0],
                                   'seed': [0, 1, 2]}
  b = grid.get_config('beta,seeds=5')
  config_lib.validate(b)
  assert (b.objective, b.beta_norm) == ('beta', False)
  assert dict(b.sweep.product) == {'beta': [1.0, 2.0, 4.0, 6.0, 8.0, 16.0],
                                   'seed': [0, 1, 2, 3, 4]}
  for arg, words in [('factor', 'annealed, beta'), ('beta,seeds=0', 'seeds=N'),
                     ('beta,lr=3', 'seeds=N')]:
    with pytest.raises(ValueError, match=words):
      grid.get_config(arg)


BAD = [
    ('beta', -1.0, '>= 0'),
    ('gamma', -5.0, '>= 0'),
    ('c_max', -0.1, '>= 0'),
    ('c_anneal_steps', 0, '> 0'),
    ('latent_size', 0, '> 0'),
    ('batch_size', -8, '> 0'),
    ('num_steps', 0, '> 0'),
    ('learning_rate', 0.0, '> 0'),
    ('c_max', float('nan'), 'finite'),
    ('seed', -1, '>= 0'),
    ('model', 'resnet', "'burgess'"),
    ('init', 'xavier', "'lecun'"),
    ('objective', 'vae', "'capacity'"),
    ('reconstruction', 'l1', "'bernoulli'"),
    ('dataset', 'mnist', "'dsprites'"),
    ('capacity_penalty', 'huber', "'abs_per_example'"),
    ('schedule', 'exp', "'cosine'"),
    ('dataset_path', '/nonexistent/dsprites.npz', 'no dSprites file'),
]


@pytest.mark.parametrize('field,value,allowed', BAD)
def test_bad_values_are_refused_before_compiling_or_writing(tmp_path, field, value, allowed):
  config = load_config('test')
  with config.unlocked():
    config[field] = value
  workdir = str(tmp_path / 'run')
  with count_compiles() as compiles, pytest.raises(ConfigError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert field in message and allowed in message, message
  assert not compiles
  assert not os.path.exists(workdir)


def test_batch_larger_than_the_data_is_refused(tmp_path):
  from test_data import _write_npz
  path = str(tmp_path / 'small.npz')
  _write_npz(path)  # 192 images
  config = load_config('test')
  config.dataset_path = path
  config.batch_size = 256
  with pytest.raises(ConfigError, match='batch_size = 256.*192'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(str(tmp_path / 'run'))


def _snapshot(workdir):
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      p = os.path.join(root, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, workdir)] = (os.stat(p).st_mtime_ns, fh.read())
  return out


def test_workdir_of_another_run_is_refused_untouched(tmp_path):
  workdir = str(tmp_path / 'run')
  config = load_config('test')
  config.num_steps = 4
  train.train_and_evaluate(config, workdir)
  before = _snapshot(workdir)
  assert any(k.startswith('checkpoints') for k in before)
  other = load_config('test')
  other.num_steps = 8
  other.gamma = 10.0
  with count_compiles() as compiles, pytest.raises(ConfigError, match=r'gamma: 1000.0 -> 10.0'):
    train.train_and_evaluate(other, workdir)
  assert not compiles
  assert _snapshot(workdir) == before


def test_checkpoints_without_a_config_are_refused(tmp_path):
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / '5').mkdir(parents=True)
  with pytest.raises(ConfigError, match='no config.json'):
    train.train_and_evaluate(load_config('test'), str(workdir))
  assert os.listdir(workdir) == ['checkpoints']


def test_cli_reports_bad_values_with_exit_code_2(tmp_path):
  workdir = str(tmp_path / 'run')
  proc = subprocess.run(
      [sys.executable, '-m', 'capvae.main', '--config', 'configs/test.py',
       '--workdir', workdir, '--config.gamma=-3'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert 'config.gamma = -3.0: must be >= 0' in proc.stderr
  assert not os.path.exists(workdir)


def test_normalize_fills_only_the_fields_a_saved_config_lacks():
  """A config saved before the fields of LATER_FIELDS existed validates as it is,
  and ``normalize`` gives it those fields with the values such runs used (and
  leaves every field it has alone)."""
  import ml_collections
  config = load_config('test')
  old = ml_collections.ConfigDict({k: v for k, v in config.items()
                                   if k not in config_lib.LATER_FIELDS})
  config_lib.validate(old)  # the rules read LATER_FIELDS' values for absent fields
  old.init = 'kaiming'  # a field the saved run had: kept
  normalized = config_lib.normalize(old)
  assert normalized is old
  for k, v in config_lib.LATER_FIELDS.items():
    assert old[k] == ('kaiming' if k == 'init' else v), k
  assert config_lib.differences(config, old) == ['init: \'lecun\' -> \'kaiming\'']
  old.init = 'xavier'
  with pytest.raises(ConfigError, match="config.init = 'xavier' is unknown"):
    config_lib.validate(old)


def test_backend_choices_follow_the_platform():
  from capvae import backend
  assert backend.resolve_layers('auto', 'cpu') == 'matmul'
  assert backend.resolve_layers('auto', 'gpu') == backend.resolve_layers('auto', 'tpu') == 'xla'
  assert backend.resolve_member_loop('auto', 'cpu') == 'map'
  assert backend.resolve_member_loop('auto', 'gpu') == 'vmap'
  for impl in ('matmul', 'xla'):  # an explicit choice is kept on every platform
    assert backend.resolve_layers(impl, 'gpu') == backend.resolve_layers(impl, 'cpu') == impl
  config = load_config('test')
  config.conv_impl = 'xla'
  assert config_lib.model(config, (64, 64, 1)).encoder.impl == 'xla'
  config.conv_impl = 'cudnn'
  with pytest.raises(ConfigError, match="config.conv_impl = 'cudnn' is unknown"):
    config_lib.validate(config)
