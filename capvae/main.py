"""Trains, evaluates and reports on capvae models.

  capvae train --config configs/default.py --workdir runs/default \
      --config.gamma=500
  capvae evaluate --workdir runs/default   # eval.json
  capvae report --workdir runs/default     # report/index.html

``capvae`` (:mod:`capvae.cli`) runs this module's modes as subcommands;
``python -m capvae.main --mode=train|evaluate|report ...`` does the same.
This file is intentionally kept short: the logic lives in
:mod:`capvae.train`, which can be imported and tested on its own.
"""

import difflib
import logging as pylogging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import jax

from capvae import config_lib
from capvae import backend
from capvae import train
from capvae.errors import ConfigError

FLAGS = flags.FLAGS


def _env_int(name):
  value = os.environ.get(name)
  return int(value) if value else None

MODES = ('train', 'evaluate', 'report')
flags.DEFINE_enum('mode', 'train', MODES,
                  'train: train (or resume) the config in --workdir; evaluate: metrics of'
                  ' every member into WORKDIR/eval.json; report: figures and'
                  ' WORKDIR/report/index.html (evaluating first unless eval.json is of the'
                  ' latest checkpoint and made with the --eval_* and --dci_estimator'
                  ' flags given).')
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and the report.')
config_flags.DEFINE_config_file(
    'config', None, 'Training configuration file (a get_config() module).',
    lock_config=True)
flags.DEFINE_string(
    'coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS'),
    'Multi-host: host:port of process 0 for jax.distributed (env'
    ' JAX_COORDINATOR_ADDRESS). Unset: a single process.')
flags.DEFINE_integer('num_processes', _env_int('JAX_NUM_PROCESSES'),
                     'Multi-host: the number of processes (env JAX_NUM_PROCESSES).')
flags.DEFINE_integer('process_id', _env_int('JAX_PROCESS_ID'),
                     'Multi-host: this process\'s index (env JAX_PROCESS_ID).')
flags.DEFINE_float('eval_scale', 1.0,
                   'evaluate/report: metric sample sizes as a fraction of'
                   ' disentanglement_lib\'s (1 = theirs), in (0, 1].')
flags.DEFINE_string('dci_estimator', 'fast',
                    'evaluate/report: DCI importances from \'gbt\' (gradient-boosted trees,'
                    ' the reference; slow) or \'fast\' (see capvae/metrics).')
flags.DEFINE_integer('eval_seed', 0, 'evaluate/report: seed of the metric samples.')
flags.DEFINE_string('eval_sizes', '',
                    'evaluate/report: single sample sizes set after --eval_scale, as'
                    ' KEY=N,KEY=N; keys: the metrics\' (beta_vae_batch_size, num_train, ...'
                    ' as in capvae.metrics.DEFAULT_SIZES) and information_images (the'
                    ' images of I(x;z); default max(10000, scale x grid)).')
flags.mark_flags_as_required(['workdir'])


def _quiet_orbax(record) -> bool:
  """Keeps orbax's per-save INFO chatter out of the progress log."""
  return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def _fail(message: str):
  """Reports a bad input as one line and exits with status 2."""
  print(f'capvae: error: {message}', file=sys.stderr)
  sys.exit(2)


def _config_arg(argv) -> str | None:
  """The value of --config in ``argv`` (its ``:args`` suffix included)."""
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _config_fields(spec: str) -> list[str]:
  """Every field (dotted) of the config file ``spec`` names; [] if it cannot load."""
  path, _, arg = spec.partition(':')
  try:
    name = os.path.splitext(os.path.basename(path))[0]
    module = config_lib.sibling(path, name)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return []
  def walk(d, prefix=''):
    for k, v in d.items():
      yield prefix + k
      if hasattr(v, 'items'):
        yield from walk(v, f'{prefix}{k}.')
  return sorted(walk(config))


def parse_flags(argv):
  """absl's flag parsing, with every bad flag or config file reported by
  :func:`_fail` (one line, exit 2) instead of a traceback."""
  spec = _config_arg(argv)
  if spec is not None:
    path = spec.partition(':')[0]
    if not os.path.isfile(path):
      _fail(f'--config {path}: no such file' +
            (' (it is a directory).' if os.path.isdir(path) else '.'))
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    if len(lines) > 1 and 'Traceback' in str(e):  # the config file raised: its own message
      _fail(f'--config {spec}: {lines[-1].strip()}')
    _fail(f'{lines[0] if lines else e}. See --helpfull for the flags.')
  except SyntaxError as e:
    _fail(f'--config {e.filename}, line {e.lineno}: {e.msg}.')
  except (AttributeError, KeyError) as e:
    # An override of a field the config does not have (--config.gama=3).
    text = str(e).strip('"\'')
    field = re.findall(r"'([^']+)'", text)
    overrides = [a[len('--config.'):].split('=', 1)[0] for a in argv
                 if a.startswith('--config.')]
    bad = next((o for o in overrides if field and o.split('.')[-1] == field[0]),
               overrides[0] if overrides else None)
    if bad is None:
      _fail(f'--config {spec}: {type(e).__name__}: {text}')
    known = _config_fields(spec)
    near = difflib.get_close_matches(bad, known, n=3, cutoff=0.6)
    _fail(f'--config.{bad}: the config has no field {bad!r}.'
          + (f' Did you mean {", ".join(near)}?' if near else '')
          + (f' Fields: {", ".join(k for k in known if "." not in k)}.' if known else ''))
  except Exception as e:  # pylint: disable=broad-except  # the config file's own error
    first = str(e).strip().splitlines()
    _fail(f'--config {spec}: {type(e).__name__}: {first[0] if first else ""}'
          + (f' ({first[-1].strip()})' if len(first) > 1 else ''))


def _check_workdir_path(path: str, mode: str) -> None:
  if os.path.exists(path) and not os.path.isdir(path):
    _fail(f'--workdir {path}: exists and is not a directory.')
  if mode != 'train':
    if not os.path.isdir(path):
      _fail(f'--workdir {path}: no such directory, so not a capvae workdir; train a run'
            ' there first.')
    return
  ancestor = os.path.abspath(path)
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    _fail(f'--workdir {path}: cannot be created, {ancestor} is not a directory.')
  if not os.access(ancestor, os.W_OK | os.X_OK):
    _fail(f'--workdir {path}: {ancestor} is not writable.')


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])} (flags are written --name=value).')
  _check_workdir_path(FLAGS.workdir, FLAGS.mode)
  logging.get_absl_handler().addFilter(_quiet_orbax)
  backend.keep_freed_memory()  # before JAX starts its threads
  if FLAGS.coordinator_address:
    if FLAGS.num_processes is None or FLAGS.process_id is None:
      print('capvae: error: --coordinator_address needs --num_processes and'
            ' --process_id.', file=sys.stderr)
      sys.exit(2)
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  try:
    if FLAGS.mode == 'train':
      if FLAGS.config is None:
        raise ConfigError('--config is required to train (a config file, e.g.'
                          ' --config configs/default.py).')
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'evaluate':
      from capvae import evaluate  # pylint: disable=g-import-not-at-top
      evaluate.evaluate(FLAGS.workdir, scale=FLAGS.eval_scale,
                        dci_estimator=FLAGS.dci_estimator, seed=FLAGS.eval_seed,
                        sizes=evaluate.parse_sizes(FLAGS.eval_sizes))
      print(f'wrote {os.path.join(FLAGS.workdir, evaluate.EVAL_FILE)}')
    else:
      from capvae import evaluate, report  # pylint: disable=g-import-not-at-top
      # Settings not on the command line: whatever eval.json was made with.
      given = lambda name: FLAGS[name].value if FLAGS[name].present else None
      path = report.write_report(FLAGS.workdir, eval_scale=given('eval_scale'),
                                 dci_estimator=given('dci_estimator'), seed=given('eval_seed'),
                                 sizes=evaluate.parse_sizes(FLAGS.eval_sizes))
      print(f'wrote {path}')
  except ConfigError as e:
    _fail(str(e))
  except OSError as e:  # the workdir or a file it names: missing, read-only, full
    where = e.filename or FLAGS.workdir
    _fail(f'{where}: {e.strerror or e}; capvae could not read or write it. Check the'
          ' path and its permissions, or choose another --workdir.')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
