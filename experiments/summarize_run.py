r"""Prints how closely a capacity run's KL followed C, and how reconstruction went.

  python experiments/summarize_run.py runs/default

Reads ``metrics.jsonl`` and prints, per member, a table of logged steps
(C, batch KL, KL − C, reconstruction) and three numbers: the largest and mean
|KL − C| over steps where C >= 1 nat, and the reconstruction at the first and
last logged steps.
"""

import json
import os
import sys


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
      print(f'  {r["step"]:7d} {r["c"]:7.2f} {r["kl"]:7.2f} {r["kl_minus_c"]:7.2f} {r["rec"]:9.2f}')
    moved = [abs(r['kl_minus_c']) for r in mr if r['c'] >= 1.0]
    if moved:
      print(f'  |KL - C| once C >= 1 nat: max {max(moved):.2f}, mean'
            f' {sum(moved) / len(moved):.2f} nats over {len(moved)} logged steps')
    print(f'  reconstruction: {mr[0]["rec"]:.1f} nats at step {mr[0]["step"]} ->'
          f' {mr[-1]["rec"]:.1f} at step {mr[-1]["step"]}; final KL'
          f' {mr[-1]["kl"]:.2f}, C {mr[-1]["c"]:.2f}')
  return 0


if __name__ == '__main__':
  if len(sys.argv) != 2:
    print(__doc__, file=sys.stderr)
    sys.exit(2)
  sys.exit(main(sys.argv[1]))
