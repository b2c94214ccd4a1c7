r"""Throughput of one sweep program as the member count grows.

  python experiments/bench_sweep.py                      # M = 1, 4, 16, 64
  python experiments/bench_sweep.py --members 1,16 --loop vmap --model mlp

For each member count M it builds the sweep train step exactly as training
does (``train.make_train_step`` over a mesh of all devices, members padded to
the device count), compiles it, runs a warm-up step, then times ``--steps``
steps (at least ``--min_seconds``) and prints

* steps/s of the whole program;
* img/s each: images per second that each member trains on (batch × steps/s);
* img/s all: member-images per second, the sum over members (M × img/s each);
* vs M=1: img/s all over the single-member program's img/s, measured in the
  same run. 1.0 means training M models together costs exactly as much per
  model-step as training them one after another; above 1 the sweep is cheaper
  (on a CPU it shares the rendering of each batch; on a GPU it fills the
  device that one small model leaves idle).

Members differ in gamma, C_max, learning rate and seed.
"""

import argparse
import os
import sys

import jax

from capvae import backend, models, parallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_device  # noqa: E402  pylint: disable=g-import-not-at-top


def bench(args, num_members, mesh):
  """``(seconds per step, compile seconds, steps timed)`` of the sweep step for
  ``num_members`` members, built and timed as ``bench_device.time_step`` does."""
  return bench_device.time_step(args.model, 'auto', args.loop, num_members, args.batch_size,
                                mesh, args.min_seconds, args.steps)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--members', default='1,4,16,64')
  parser.add_argument('--model', default='burgess', choices=models.MODELS)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--loop', default='auto', choices=('auto', 'map', 'vmap'))
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--min_seconds', type=float, default=2.0)
  args = parser.parse_args(argv)
  counts = [int(m) for m in args.members.split(',')]
  mesh = parallel.make_mesh()
  loop = backend.resolve_member_loop(args.loop)
  print(f'# bench_sweep: model {args.model}, batch {args.batch_size}, members run by'
        f' {loop}; {mesh.size} {jax.devices()[0].device_kind} device(s);'
        f' jax {jax.__version__}')
  print(f'{"M":>4} {"ms/step":>9} {"steps/s":>8} {"img/s each":>11} {"img/s all":>10}'
        f' {"vs M=1":>7} {"compile s":>9} {"steps":>6}')
  base = None
  for m in counts:
    seconds, compile_s, n = bench(args, m, mesh)
    per_member = args.batch_size / seconds
    total = per_member * m
    if base is None:
      base = per_member if m == 1 else None
    ratio = f'{total / base:.2f}x' if base else '-'
    print(f'{m:4d} {seconds * 1e3:9.1f} {1 / seconds:8.2f} {per_member:11.1f}'
          f' {total:10.1f} {ratio:>7} {compile_s:9.1f} {n:6d}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
