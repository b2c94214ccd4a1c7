"""What users and crashes do to a workdir: corrupt checkpoints, torn logs, bad paths."""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from capvae import config_lib, train, train_state, workdir
from capvae.errors import ConfigError
from conftest import ROOT, load_config


def _train(path, num_steps, **overrides):
  config = load_config('test')
  config.num_steps = num_steps
  config.log_every = 1
  config.checkpoint_every = 2
  for k, v in overrides.items():
    config[k] = v
  return train.train_and_evaluate(config, path)


def _rows(path):
  with open(os.path.join(path, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k != 'steps_per_sec'} for line in f]


def _steps(path):
  return ocp.CheckpointManager(os.path.join(path, 'checkpoints', 'chunk_000')).all_steps()


@pytest.fixture(scope='session')  # once per worker: see conftest.py
def reference(tmp_path_factory):
  """An uninterrupted 8-step run: its final states and its log."""
  path = str(tmp_path_factory.mktemp('reference'))
  return _train(path, 8), _rows(path)


def _files(step_dir):
  return [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]


def _zero(step_dir):
  for f in _files(step_dir):
    os.truncate(f, 0)


def _truncate_data(step_dir):
  data = [f for f in _files(step_dir) if f'{os.sep}d{os.sep}' in f]
  assert data
  for f in data:
    os.truncate(f, os.path.getsize(f) // 2)


def _drop_metadata(step_dir):
  meta = [f for f in _files(step_dir) if 'METADATA' in os.path.basename(f)]
  assert meta
  for f in meta:
    os.remove(f)


CORRUPTIONS = {'zero_length_files': _zero, 'truncated_data': _truncate_data,
               'missing_metadata': _drop_metadata}


@pytest.mark.parametrize('kind', CORRUPTIONS)
def test_resume_falls_back_past_a_corrupt_latest_checkpoint(tmp_path, reference, kind, caplog):
  path = str(tmp_path / 'run')
  _train(path, 6)
  assert _steps(path) == [4, 6]  # keep_checkpoints = 2
  CORRUPTIONS[kind](os.path.join(path, 'checkpoints', 'chunk_000', '6'))
  with caplog.at_level(logging.WARNING):
    states = _train(path, 8)
  assert 'checkpoint 6 could not be read' in caplog.text and 'step 4' in caplog.text
  # Resumed from step 4: bitwise the uninterrupted run, log included.
  for x, y in zip(jax.tree.leaves(reference[0]), jax.tree.leaves(states)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert _rows(path) == reference[1]
  # The bad checkpoint was moved aside, not deleted.
  assert os.path.isdir(os.path.join(path, 'checkpoints', 'corrupt', 'chunk_000', '6'))
  assert _steps(path) == [6, 8]


def test_no_readable_checkpoint_is_refused_and_nothing_is_touched(tmp_path):
  path = str(tmp_path / 'run')
  _train(path, 6)
  for step in (4, 6):
    _zero(os.path.join(path, 'checkpoints', 'chunk_000', str(step)))
  config_path = os.path.join(path, 'config.json')
  before = {p: open(p, 'rb').read() for p in (config_path, os.path.join(path, 'metrics.jsonl'))}
  with pytest.raises(ConfigError, match='no checkpoint could be read'):
    _train(path, 8)
  assert _steps(path) == [4, 6]
  assert not os.path.exists(os.path.join(path, 'checkpoints', 'corrupt'))
  # config.json (which a resume with a new num_steps rewrites) and the log are untouched.
  assert before == {p: open(p, 'rb').read() for p in before}
  # Evaluation names the unreadable checkpoint instead of a traceback.
  with pytest.raises(ConfigError, match='checkpoint 6 of chunk 0 could not be read'):
    workdir.Members(path)


def test_a_torn_last_log_line_is_dropped_on_resume_and_skipped_by_readers(tmp_path, reference,
                                                                          caplog):
  path = str(tmp_path / 'run')
  _train(path, 6)
  log = os.path.join(path, 'metrics.jsonl')
  with open(log, 'a') as f:
    f.write('{"step": 6, "member": 0, "loss": 12')  # a crash mid-write
  with caplog.at_level(logging.WARNING):
    assert [r['step'] for r in workdir.read_metrics(log)] == list(range(6))
  assert 'torn' in caplog.text
  _train(path, 8)
  assert _rows(path) == reference[1]


def test_malformed_log_lines_are_named(tmp_path):
  log = str(tmp_path / 'metrics.jsonl')
  with open(log, 'w') as f:
    f.write('{"step": 0, "member": 0}\n{"step": 1, "memb\n{"step": 2, "member": 0}\n')
  with pytest.raises(ConfigError, match=r'metrics.jsonl, line 2: not valid JSON'):
    workdir.read_metrics(log)
  with open(log, 'w') as f:
    f.write('{"step": 0, "member": 0}\n[1, 2]\n')
  with pytest.raises(ConfigError, match='line 2: a metrics row must be a JSON object'):
    workdir.read_metrics(log)
  # A last row complete but for its newline is kept, and terminated before appending.
  with open(log, 'w') as f:
    f.write('{"step": 0, "member": 0}\n{"step": 1, "member": 0}')
  workdir.truncate_metrics(log, [0], restored_step=5)
  with open(log) as f:
    assert f.read() == '{"step": 0, "member": 0}\n{"step": 1, "member": 0}\n'


def _cli(*args, cwd=ROOT):
  return subprocess.Popen([sys.executable, '-m', 'capvae.main', *args], cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_bad_paths_config_files_and_flags_exit_2_with_one_line(tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  bad_syntax = tmp_path / 'bad_syntax.py'
  bad_syntax.write_text('def get_config(:\n')
  new = str(tmp_path / 'new')
  cases = {
      'missing config': (['--config', 'configs/nope.py', '--workdir', new], 'configs/nope.py: no such file'),
      'syntax error': (['--config', str(bad_syntax), '--workdir', new], 'line 1: invalid syntax'),
      'unknown field': (['--config', 'configs/test.py', '--workdir', new, '--config.gama=3'],
                        "no field 'gama'. Did you mean gamma?"),
      'bad flag type': (['--config', 'configs/test.py', '--workdir', new, '--config.seed=abc'],
                        'flag --config.seed=abc'),
      'bad mode': (['--mode=bogus', '--workdir', new], 'flag --mode=bogus'),
      'config raises': (['--config', 'configs/locatello_grid.py:factor', '--workdir', new],
                        'the grid must be one of annealed, beta'),
      'workdir is a file': (['--config', 'configs/test.py', '--workdir', str(a_file)],
                            'exists and is not a directory'),
      'workdir under a file': (['--config', 'configs/test.py', '--workdir',
                                str(a_file / 'run')], 'is not a directory'),
      'report of nothing': (['--mode=report', '--workdir', new], 'no such directory'),
      'workdir cannot be made': (['--config', 'configs/test.py', '--workdir',
                                  '/proc/capvae_test_run'], 'could not read or write it'),
  }
  procs = {name: _cli(*args) for name, (args, _) in cases.items()}
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=120)
    lines = [l for l in err.splitlines() if l.startswith('capvae: error:')]
    assert proc.returncode == 2, (name, err[-2000:])
    assert len(lines) == 1 and cases[name][1] in lines[0], (name, err[-2000:])
    assert 'Traceback' not in err, (name, err[-2000:])
  assert not os.path.exists(new)  # nothing written


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes through read-only permissions')
def test_a_read_only_workdir_is_refused(tmp_path):
  path = str(tmp_path / 'run')
  _train(path, 2)
  os.chmod(path, 0o555)
  try:
    proc = _cli('--config', 'configs/test.py', '--workdir', path, '--config.num_steps=4')
    _, err = proc.communicate(timeout=300)
  finally:
    os.chmod(path, 0o755)
  assert proc.returncode == 2 and 'capvae: error:' in err and 'Traceback' not in err, err[-2000:]


def test_sigkill_during_a_checkpoint_save_resumes_bitwise(tmp_path, reference):
  """kill -9 while orbax writes a checkpoint (saving every step, the kill lands
  in a save); the rerun equals the uninterrupted run, parameters and log."""
  import signal
  import time
  path = str(tmp_path / 'run')
  chunk = os.path.join(path, 'checkpoints', 'chunk_000')
  proc = _cli('--config', 'configs/test.py', '--workdir', path, '--config.num_steps=100000',
              '--config.checkpoint_every=1', '--config.log_every=1')
  deadline, in_save = time.time() + 240, False
  while time.time() < deadline and proc.poll() is None:
    names = os.listdir(chunk) if os.path.isdir(chunk) else []
    done = [int(n) for n in names if n.isdigit()]  # at most keep_checkpoints of them
    if done and max(done) >= 3 and any('tmp' in n for n in names):
      proc.send_signal(signal.SIGKILL)
      in_save = True
      break
  if not in_save:
    proc.kill()
  out, err = proc.communicate(timeout=60)
  assert in_save, ('the run never showed a checkpoint being written', err[-2000:])
  assert max(_steps(path)) < 8  # the rerun has steps left to train
  states = _train(path, 8)
  for x, y in zip(jax.tree.leaves(reference[0]), jax.tree.leaves(states)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert _rows(path) == reference[1]


def _as_saved_by_an_earlier_version(path):
  """Rewrites a workdir as a run saved before the fields added since existed:
  config, member table, log and every checkpoint without them (the config
  fields of ``config_lib.LATER_FIELDS``, the hyperparameters of
  ``train_state.LATER_HPARAMS``, the state's ``objective_state``); and with
  the state's ``frozen`` flag, which checkpoints held before it was derived
  from ``frozen_step``."""
  later = set(config_lib.LATER_FIELDS)
  later_hparams = set(train_state.LATER_HPARAMS)
  for name in ('config.json', 'members.json'):
    p = os.path.join(path, name)
    with open(p) as f:
      obj = json.load(f)
    for item in obj if isinstance(obj, list) else [obj]:
      for k in later & set(item):
        del item[k]
    workdir.write_json(p, obj)
  rows = workdir.read_metrics(os.path.join(path, 'metrics.jsonl'))
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    for r in rows:
      f.write(json.dumps({k: v for k, v in r.items() if k not in later_hparams}) + '\n')
  chunk = os.path.join(path, 'checkpoints', 'chunk_000')
  old = ocp.CheckpointManager(chunk, item_handlers=ocp.StandardCheckpointHandler())
  steps = old.all_steps()
  states = {s: old.restore(s) for s in steps}
  old.close()
  new_dir = chunk + '.old'
  new = ocp.CheckpointManager(new_dir, item_handlers=ocp.StandardCheckpointHandler())
  for s in steps:
    tree = dict(states[s])
    tree['hparams'] = {k: v for k, v in tree['hparams'].items() if k not in later_hparams}
    tree.pop('objective_state', None)
    assert 'frozen' not in tree
    tree['frozen'] = np.asarray(tree['frozen_step']) >= 0
    new.save(s, args=ocp.args.StandardSave(tree))
  new.wait_until_finished()
  new.close()
  os.rename(chunk, chunk + '.new')
  os.rename(new_dir, chunk)
  meta = ocp.CheckpointManager(
      chunk, item_handlers=ocp.StandardCheckpointHandler()).item_metadata(steps[-1])
  tree = getattr(meta, 'tree', meta)
  assert not later_hparams & set(tree['hparams'])
  assert 'frozen' in tree and 'objective_state' not in tree


def test_a_run_saved_by_an_earlier_version_resumes_bitwise(tmp_path, reference):
  path = str(tmp_path / 'run')
  _train(path, 6)
  _as_saved_by_an_earlier_version(path)
  # Evaluation's loader reads it (each field gets the value such runs used) ...
  _, _, state, row = workdir.load_member(path, 0)
  assert int(state.hparams.c_stair_steps) == 1 and 'c_stair_steps' not in row
  assert state.hparams.ki == np.float32(train_state.LATER_HPARAMS['ki']) and 'ki' not in row
  assert state.objective_state == {}
  # ... so does extraction (its table lacks the later hyperparameters) ...
  workdir.extract_member(path, 0, str(tmp_path / 'extracted'))
  extracted = workdir.load_config(str(tmp_path / 'extracted'))
  assert extracted.ki == train_state.LATER_HPARAMS['ki'] and extracted.c_stair_steps == 1
  # ... and training resumes it bitwise as the uninterrupted run.
  states = _train(path, 8)
  for x, y in zip(jax.tree.leaves(reference[0]), jax.tree.leaves(states)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  strip = lambda rows: [{k: v for k, v in r.items() if k not in train_state.LATER_HPARAMS}
                        for r in rows]
  assert strip(_rows(path)) == strip(reference[1])
