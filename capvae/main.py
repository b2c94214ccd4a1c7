"""Trains capvae models from a config file.

  python -m capvae.main --config configs/default.py --workdir runs/default \
      --config.gamma=500

This file is intentionally kept short: the logic lives in
:mod:`capvae.train`, which can be imported and tested on its own.
"""

import logging as pylogging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from capvae import config_lib
from capvae import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and the report.')
config_flags.DEFINE_config_file(
    'config', None, 'Training configuration file (a get_config() module).',
    lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record) -> bool:
  """Keeps orbax's per-save INFO chatter out of the progress log."""
  return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet_orbax)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except config_lib.ConfigError as e:
    print(f'capvae: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
