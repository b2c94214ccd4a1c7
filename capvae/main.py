"""Trains, evaluates and reports on capvae models.

  python -m capvae.main --config configs/default.py --workdir runs/default \
      --config.gamma=500
  python -m capvae.main --mode=evaluate --workdir runs/default   # eval.json
  python -m capvae.main --mode=report --workdir runs/default     # report/index.html

This file is intentionally kept short: the logic lives in
:mod:`capvae.train`, which can be imported and tested on its own.
"""

import logging as pylogging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import jax

from capvae import config_lib
from capvae import train

FLAGS = flags.FLAGS


def _env_int(name):
  value = os.environ.get(name)
  return int(value) if value else None

MODES = ('train', 'evaluate', 'report')
flags.DEFINE_enum('mode', 'train', MODES,
                  'train: train (or resume) the config in --workdir; evaluate: metrics of'
                  ' every member into WORKDIR/eval.json; report: figures and'
                  ' WORKDIR/report/index.html (evaluating first if needed).')
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
flags.mark_flags_as_required(['workdir'])


def _quiet_orbax(record) -> bool:
  """Keeps orbax's per-save INFO chatter out of the progress log."""
  return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet_orbax)
  train.keep_freed_memory()  # before JAX starts its threads
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
        raise config_lib.ConfigError('--config is required with --mode=train.')
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'evaluate':
      from capvae import evaluate  # pylint: disable=g-import-not-at-top
      evaluate.evaluate(FLAGS.workdir, scale=FLAGS.eval_scale,
                        dci_estimator=FLAGS.dci_estimator, seed=FLAGS.eval_seed)
      print(f'wrote {os.path.join(FLAGS.workdir, evaluate.EVAL_FILE)}')
    else:
      from capvae import report  # pylint: disable=g-import-not-at-top
      path = report.write_report(FLAGS.workdir, eval_scale=FLAGS.eval_scale,
                                 dci_estimator=FLAGS.dci_estimator, seed=FLAGS.eval_seed)
      print(f'wrote {path}')
  except config_lib.ConfigError as e:
    print(f'capvae: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
