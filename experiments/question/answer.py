r"""Every experiment behind docs/question.md, one after another: ``make answer``.

  python experiments/question/answer.py --workdir runs/question --out docs/figures/question

Each experiment trains into ``--workdir/NAME`` (resuming what is there) and
writes its figures and ``NAME.json`` into ``--out``; ``answer.json`` there
records each one's seconds and the total. ``--only`` runs some of them.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

from absl import app
from absl import flags

import common
import capacity_limit
import chatter
import gamma
import penalties
import reductions
import rescaling
import staircase

EXPERIMENTS = {m.NAME: m for m in (penalties, reductions, rescaling, gamma, capacity_limit,
                                   staircase, chatter)}
flags.DEFINE_list('only', [], f'Experiments to run (default: all of {list(EXPERIMENTS)}).')
FLAGS = flags.FLAGS


def cpu() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      model = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    model = platform.processor() or platform.machine()
  return f'{os.cpu_count()} × {model}'


def main(argv):
  del argv
  common.backend.keep_freed_memory()
  unknown = sorted(set(FLAGS.only) - set(EXPERIMENTS))
  if unknown:
    raise app.UsageError(f'--only: unknown {unknown}; allowed: {list(EXPERIMENTS)}.')
  out = FLAGS.out or FLAGS.workdir
  path = os.path.join(out, 'answer.json')
  seconds = {}
  t0 = time.perf_counter()
  for name, module in EXPERIMENTS.items():
    if FLAGS.only and name not in FLAGS.only:
      continue
    t = time.perf_counter()
    module.run(os.path.join(FLAGS.workdir, name), out, FLAGS.quick)
    seconds[name] = time.perf_counter() - t
    print(f'== {name}: {seconds[name]:.0f} s')
  # Read just before writing: runs of other experiments (--only) may have
  # written theirs meanwhile.
  record = {}
  if os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
  record.setdefault('seconds', {}).update(seconds)
  record.setdefault('commands', {}).update({name: ' '.join(sys.argv) for name in seconds})
  record.update(machine=cpu(), quick=FLAGS.quick,
                total_seconds=sum(record['seconds'].values()))
  os.makedirs(out, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(record, f, indent=1)
  print(f'make answer: {time.perf_counter() - t0:.0f} s this time; all experiments'
        f' {record["total_seconds"] / 60:.1f} min on {record["machine"]}')


if __name__ == '__main__':
  app.run(main)
