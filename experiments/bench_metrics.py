r"""Wall time of each disentanglement metric at disentanglement_lib's sample sizes.

  python experiments/bench_metrics.py                    # full sizes, DCI 'fast' and 'gbt'
  python experiments/bench_metrics.py --dci fast --scale 0.1
  python experiments/bench_metrics.py --dci fast --workdir runs/default   # a trained member

Runs :func:`capvae.metrics.evaluate_all` (DCI 'fast') on a cheap synthetic
representation of dSprites' factor grid (3, 6, 40, 32, 32): each factor,
standardised, copied into one of 10 dimensions, the other 5 fixed N(0, 1)
noise per grid point — so the time is the metrics' own, not an encoder's.
Then, on the same train/test draw, DCI with the reference gradient-boosted
trees. Prints one row per metric (seconds and headline score), the number of
observations the suite asked ``codes_fn`` for and in how many calls, and the
suite's total with either DCI estimator.

Measured at full size on 2 CPU cores shared with a training job: DCI 'gbt'
142 s (100 trees per class, 11,300 trees), DCI 'fast' 3 s, the whole suite
6 s with 'fast' and about 145 s with 'gbt'; codes_fn is asked for 2.9 million
observations in 15 calls.

With ``--workdir``, the representation is member 0 of a trained run instead:
images are rendered and encoded through :class:`capvae.evaluate.GridCodes`
(each grid point at most once), and the script also prints the encoder's
share: images encoded, images/s, achieved GFLOP/s (XLA's cost analysis of the
encoder), and the floor that the machine's matrix-multiply rate (a 2048² float32
product, measured in the same run) puts under that encoding.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from capvae import metrics
from capvae import workdir as workdir_lib

FACTOR_SIZES = (3, 6, 40, 32, 32)


def make_codes_fn(factor_sizes, seed: int = 0):
  """Copied factors + fixed noise: ``[n, K]`` rows → ``[n, K + 5]`` codes; counts its calls."""
  sizes = np.asarray(factor_sizes)
  strides = np.asarray([int(np.prod(sizes[k + 1:])) for k in range(sizes.size)])
  noise = np.random.default_rng(seed).standard_normal((int(np.prod(sizes)), 5))
  stats = {'calls': 0, 'rows': 0}

  def codes_fn(f: np.ndarray) -> np.ndarray:
    stats['calls'] += 1
    stats['rows'] += f.shape[0]
    z = ((f + 0.5) / sizes - 0.5) * math.sqrt(12.0)
    return np.concatenate([z, noise[f @ strides]], axis=1)

  return codes_fn, stats


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
  """This machine's float32 matrix-multiply rate (GFLOP/s) through XLA."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    f(a).block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def trained_codes_fn(workdir: str):
  """``(codes_fn, grid, factor_sizes, flops_per_image)`` for member 0 of ``workdir``."""
  import jax
  import jax.numpy as jnp
  from capvae import evaluate
  run = workdir_lib.Members(workdir)
  params = jax.tree.map(lambda a: a[:1], run.states.params)
  grid = evaluate.GridCodes(run.model, run.dataset, params)
  factors = jax.ShapeDtypeStruct((grid.chunk, len(run.dataset.factor_sizes)), jnp.int32)
  cost = grid._encode.lower(params, factors).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return grid.codes_fn(0), grid, run.dataset.factor_sizes, cost['flops'] / grid.chunk


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--scale', type=float, default=1.0,
                      help='sample sizes as a fraction of disentanglement_lib\'s (1 = theirs)')
  parser.add_argument('--dci', default='fast,gbt',
                      help='comma-separated DCI estimators to time: fast, gbt')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default='',
                      help='time member 0 of this trained run (encoder included)')
  args = parser.parse_args(argv)
  estimators = [e for e in args.dci.split(',') if e]
  for e in estimators:
    if e not in metrics.DCI_ESTIMATORS:
      parser.error(f'--dci: unknown estimator {e!r}; allowed: {list(metrics.DCI_ESTIMATORS)}')
  sizes = metrics.default_sizes(args.scale)
  factor_sizes = FACTOR_SIZES
  grid = None
  if args.workdir:
    fn, grid, factor_sizes, flops = trained_codes_fn(args.workdir)
    stats = {'calls': 0, 'rows': 0}

    def codes_fn(f):
      stats['calls'] += 1
      stats['rows'] += f.shape[0]
      return fn(f)
    print(f'member 0 of {args.workdir}, factor sizes {factor_sizes}, sample sizes: {sizes}')
  else:
    codes_fn, stats = make_codes_fn(FACTOR_SIZES, args.seed)
    print(f'factor sizes {FACTOR_SIZES}, 10 codes, sample sizes: {sizes}')

  result = metrics.evaluate_all(codes_fn, factor_sizes, args.seed, sizes=sizes,
                                dci_estimator='fast')
  s, t = result.scores, result.seconds
  rows = [
      ('BetaVAE', t['beta_vae'], f"eval acc {s['beta_vae.eval_accuracy']:.3f}"),
      ('FactorVAE', t['factor_vae'], f"eval acc {s['factor_vae.eval_accuracy']:.3f}"),
      ('train/test draw', t['data'], f"{sizes['num_train']} / {sizes['num_test']} points"),
      ('MIG', t['mig'], f"{s['mig']:.3f}"),
  ]
  dci_rows = {}
  if 'fast' in estimators:
    dci_rows['fast'] = (t['dci'], s['dci.disentanglement'], s['dci.completeness'],
                        s['dci.informativeness_test'])
  if 'gbt' in estimators:
    data = metrics.array_metric_data(codes_fn, factor_sizes,
                                     metrics.metric_seeds(args.seed)['arrays'],
                                     sizes['num_train'], sizes['num_test'])
    t0 = time.perf_counter()
    d = metrics.dci(*data, estimator='gbt', seed=args.seed)
    dci_rows['gbt'] = (time.perf_counter() - t0, d['disentanglement'], d['completeness'],
                       d['informativeness_test'])
  for name, (sec, dis, com, inf) in dci_rows.items():
    rows.append((f'DCI ({name})', sec, f'D {dis:.3f}  C {com:.3f}  I_test {inf:.3f}'))
  rows += [
      ('SAP', t['sap'], f"{s['sap']:.3f}"),
      ('Modularity/Explicitness', t['modularity_explicitness'],
       f"mod {s['modularity']:.3f}  expl_test {s['explicitness_test']:.3f}"),
  ]
  width = max(len(r[0]) for r in rows)
  print(f"\n{'metric':<{width}}  {'seconds':>8}  score")
  for name, sec, score in rows:
    print(f'{name:<{width}}  {sec:8.2f}  {score}')
  print(f"\ncodes_fn: {stats['rows']:,} observations in {stats['calls']} calls")
  rest = t['total'] - t['dci']
  for name, (sec, *_) in dci_rows.items():
    print(f'total with DCI ({name}): {rest + sec:8.2f} s')
  if grid is not None:
    rate = matmul_gflops()
    achieved = grid.encoded * flops / grid.seconds / 1e9
    print(f'\nencoder: {grid.encoded:,} distinct images rendered and encoded in'
          f' {grid.seconds:.1f} s ({grid.encoded / grid.seconds:,.0f} img/s,'
          f' {flops / 1e6:.1f} MFLOP/img, {achieved:.1f} GFLOP/s)')
    print(f'matrix multiply: {rate:.1f} GFLOP/s; encoder at that rate: '
          f'{grid.encoded * flops / rate / 1e9:.1f} s (the floor); metrics without the'
          f' encoder: {t["total"] - grid.seconds:.1f} s')


if __name__ == '__main__':
  main()
