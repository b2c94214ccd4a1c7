r"""The device check: the train step on whatever accelerator JAX sees.

  python experiments/bench_device.py                  # the full grid (GPU/TPU), < 5 min
  python experiments/bench_device.py --small          # a CPU-sized grid, so it cannot rot
  python experiments/bench_device.py --out bench.json # also every row as JSON

It times the sweep train step exactly as training builds it
(``train.build_program``: ``shard_map`` over a mesh of the visible devices,
members padded to the device count, states donated) for

* ``conv_impl`` in {matmul, xla}: the matrix-product layers written for CPU
  against XLA's own convolutions (:mod:`capvae.layers`);
* ``member_loop`` in {vmap, map}: members batched, or one after another;
* members in {1, 16, 64} at batch 64, and one member at batch 256,

and prints, for each, the step time, images per second over all members and
per member, and the ratio of all members' images per second to one member's
(same impl and loop, batch 64): how much cheaper a member-step is inside a
sweep than alone. ``auto`` picks per platform (:mod:`capvae.backend`); this
table is the measurement its choices should follow on a new accelerator.

A time budget (``--budget_s``) stops the grid early, saying which rows it
skipped, so a lease of device time is never overrun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from capvae import backend, config_lib, data, parallel, sweep, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = dict(members=(1, 16, 64), batches=(64, 256))
SMALL = dict(members=(1, 2), batches=(8, 16))


def grid(members, batches, impls, loops):
  """``[(impl, loop, members, batch)]``: every member count at the first batch,
  then one member at the other batches."""
  rows = []
  for impl in impls:
    for loop in loops:
      rows += [(impl, loop, m, batches[0]) for m in members]
      rows += [(impl, loop, 1, b) for b in batches[1:]]
  return rows


def time_step(model_name: str, impl: str, loop: str, num_members: int, batch: int, mesh,
              min_seconds: float, min_steps: int = 3):
  """``(seconds per step, compile seconds, steps timed)`` of the sweep step."""
  config = config_lib.sibling(os.path.join(ROOT, 'configs', 'default.py'),
                              'default').get_config()
  config.model, config.batch_size = model_name, batch
  config.conv_impl, config.member_loop = impl, loop
  spec = train.StepSpec.from_config(config)
  dataset = data.get(config.dataset)
  model = config_lib.model(config, dataset.observation_shape)
  base = sweep.members(config)[0]
  rows = [dict(base, member=i, seed=i, gamma=float(100 * (1 + i % 10)),
               c_max=float(5 + i % 20), learning_rate=float(1e-4 * (1 + i % 5)))
          for i in range(num_members)]
  padded = sweep.padded_size(num_members, 0, mesh.shape['member'])
  init, step, dataset = train.build_program(model, spec, dataset, mesh, loop)
  states = init(sweep.stack(sweep.pad(rows, padded)))
  t0 = time.perf_counter()
  compiled = step.lower(states, dataset).compile()
  compile_s = time.perf_counter() - t0
  states, metrics = compiled(states, dataset)  # warm-up
  jax.block_until_ready(states)
  n, t0 = 0, time.perf_counter()
  while n < min_steps or time.perf_counter() - t0 < min_seconds:
    states, metrics = compiled(states, dataset)
    n += 1
  jax.block_until_ready(states)
  seconds = (time.perf_counter() - t0) / n
  if not np.all(np.isfinite(np.asarray(metrics['loss'])[:num_members])):
    raise FloatingPointError(f'{impl}/{loop}/M={num_members}: a non-finite loss.')
  return seconds, compile_s, n


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--small', action='store_true',
                      help=f'members {SMALL["members"]}, batches {SMALL["batches"]} (CPU)')
  parser.add_argument('--members', help='member counts, e.g. 1,16,64 (default: the grid)')
  parser.add_argument('--batches', help='batch sizes: the first for every member count,'
                      ' the others for one member (default: the grid)')
  parser.add_argument('--impls', default='matmul,xla')
  parser.add_argument('--loops', default='vmap,map')
  parser.add_argument('--model', default='burgess')
  parser.add_argument('--min_seconds', type=float, default=2.0)
  parser.add_argument('--budget_s', type=float, default=270.0,
                      help='stop starting new rows after this many seconds')
  parser.add_argument('--out', help='write every row as JSON here')
  args = parser.parse_args(argv)
  sizes = SMALL if args.small else FULL
  members = [int(m) for m in args.members.split(',')] if args.members else sizes['members']
  batches = [int(b) for b in args.batches.split(',')] if args.batches else sizes['batches']
  impls, loops = args.impls.split(','), args.loops.split(',')
  for impl in impls:
    backend.resolve_layers(impl)  # refuses unknown names before anything compiles
  for loop in loops:
    backend.resolve_member_loop(loop)
  mesh = parallel.make_mesh()
  device = jax.devices()[0]
  print(f'# bench_device: model {args.model}; {mesh.size} × {device.platform}'
        f' {device.device_kind}; jax {jax.__version__}; auto picks conv_impl'
        f' {backend.resolve_layers("auto")}, member_loop {backend.resolve_member_loop("auto")}')
  print(f'{"conv_impl":>9} {"loop":>5} {"M":>4} {"batch":>5} {"ms/step":>9} {"img/s all":>10}'
        f' {"img/s each":>10} {"vs M=1":>7} {"compile s":>9}')
  t_start = time.perf_counter()
  records, single, skipped = [], {}, []
  for impl, loop, m, batch in grid(members, batches, impls, loops):
    if time.perf_counter() - t_start > args.budget_s:
      skipped.append(f'{impl}/{loop}/M={m}/B={batch}')
      continue
    seconds, compile_s, n = time_step(args.model, impl, loop, m, batch, mesh,
                                      args.min_seconds)
    each = batch / seconds
    if m == 1 and batch == batches[0]:
      single[impl, loop] = each
    base = single.get((impl, loop)) if batch == batches[0] else None
    ratio = each * m / base if base else None
    records.append(dict(conv_impl=impl, member_loop=loop, members=m, batch=batch,
                        seconds_per_step=seconds, images_per_s_all=each * m,
                        images_per_s_each=each, ratio_to_one_member=ratio,
                        compile_seconds=compile_s, steps_timed=n))
    print(f'{impl:>9} {loop:>5} {m:4d} {batch:5d} {seconds * 1e3:9.2f} {each * m:10.1f}'
          f' {each:10.1f} {f"{ratio:.2f}x" if ratio else "-":>7} {compile_s:9.1f}',
          flush=True)
  total = time.perf_counter() - t_start
  print(f'# {len(records)} rows in {total:.0f} s'
        + (f'; over the {args.budget_s:.0f} s budget, skipped: {", ".join(skipped)}'
           if skipped else ''))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(device=f'{device.platform} {device.device_kind}', devices=mesh.size,
                     model=args.model, jax=jax.__version__, seconds=total, skipped=skipped,
                     rows=records), f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
