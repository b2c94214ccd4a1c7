r"""Pulls one member out of a sweep as a stand-alone one-member run.

  capvae extract --workdir runs/capacity_sweep --member 3 \
      --out runs/member3

``--out`` gets the member's config (its hyperparameters, no sweep), a member
table of one row and its checkpoint (latest, or ``--step``). It evaluates and
trains on like any single run:

  capvae train --config configs/from_workdir.py:runs/member3 \
      --workdir runs/member3 --config.num_steps=4000
"""

import sys

from absl import app
from absl import flags

from capvae import workdir as workdir_lib
from capvae.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A trained (sweep) workdir.')
flags.DEFINE_integer('member', None, 'The member id (see the workdir\'s members.json).')
flags.DEFINE_string('out', None, 'A new directory for the one-member run.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
flags.mark_flags_as_required(['workdir', 'member', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    out = workdir_lib.extract_member(FLAGS.workdir, FLAGS.member, FLAGS.out, FLAGS.step)
  except ConfigError as e:
    print(f'capvae.extract: error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'Wrote member {FLAGS.member} of {FLAGS.workdir} to {out}.')


if __name__ == '__main__':
  app.run(main)
