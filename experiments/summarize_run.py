r"""Prints how closely a capacity run's KL followed C, and how reconstruction went.

  python experiments/summarize_run.py runs/default

Reads ``metrics.jsonl`` and prints, per member, a table of logged steps
(C, batch KL, KL − C, reconstruction) and three numbers: the largest and mean
|KL − C| over steps where C >= 1 nat, and the reconstruction at the first and
last logged steps. Members frozen after diverging are listed with their
hyperparameters and the step of the refused update.
"""

import json
import os
import sys

from capvae.train_state import HPARAM_NAMES as HPARAMS


def _f(v, spec):
  """Formats a logged number; JSON null (a non-finite value) prints as nan."""
  return format(float('nan') if v is None else v, spec)


def main(workdir: str) -> int:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    print(f'summarize_run: no {path}; train first.', file=sys.stderr)
    return 2
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  for member in sorted({r['member'] for r in rows}):
    mr = sorted((r for r in rows if r['member'] == member), key=lambda r: r['step'])
    stride = max(1, len(mr) // 12)
    print(f'member {member}:')
    print(f'  {"step":>7} {"C":>7} {"KL":>7} {"KL-C":>7} {"rec":>9}')
    for r in mr[::stride] + ([mr[-1]] if (len(mr) - 1) % stride else []):
      print(f'  {r["step"]:7d} {_f(r["c"], "7.2f")} {_f(r["kl"], "7.2f")}'
            f' {_f(r["kl_minus_c"], "7.2f")} {_f(r["rec"], "9.2f")}')
    if mr[-1].get('frozen'):
      hp = ', '.join(f'{k}={mr[-1][k]:g}' for k in HPARAMS if k in mr[-1])
      print(f'  member {member} FROZEN at step {mr[-1]["frozen_step"]} (diverged; its'
            f' last finite parameters are kept): {hp}')
    moved = [abs(r['kl_minus_c']) for r in mr
             if r['c'] >= 1.0 and r['kl_minus_c'] is not None]
    if moved:
      print(f'  |KL - C| once C >= 1 nat: max {max(moved):.2f}, mean'
            f' {sum(moved) / len(moved):.2f} nats over {len(moved)} logged steps')
    print(f'  reconstruction: {_f(mr[0]["rec"], ".1f")} nats at step {mr[0]["step"]} ->'
          f' {_f(mr[-1]["rec"], ".1f")} at step {mr[-1]["step"]}; final KL'
          f' {_f(mr[-1]["kl"], ".2f")}, C {_f(mr[-1]["c"], ".2f")}')
  members = sorted({r['member'] for r in rows})
  if len(members) > 1:
    varying = [k for k in HPARAMS if len({r.get(k) for r in rows}) > 1]
    print('the grid at the last logged step (varying hyperparameters, then'
          ' KL, C, reconstruction):')
    print('  ' + ' '.join(f'{k:>14}' for k in ['member', *varying, 'KL', 'C', 'rec']))
    for member in members:
      last = max((r for r in rows if r['member'] == member), key=lambda r: r['step'])
      cells = [f'{member:>14d}'] + [f'{last[k]:>14g}' for k in varying]
      cells += [_f(last['kl'], '>14.2f'), _f(last['c'], '>14.2f'), _f(last['rec'], '>14.1f')]
      print('  ' + ' '.join(cells))
  frozen = sorted({r['member'] for r in rows if r.get('frozen')})
  print(f'frozen (diverged) members: {frozen if frozen else "none"}')
  return 0


if __name__ == '__main__':
  if len(sys.argv) != 2:
    print(__doc__, file=sys.stderr)
    sys.exit(2)
  sys.exit(main(sys.argv[1]))
