r"""The train step's speed, against the hardware and against PyTorch.

  python experiments/bench_train_step.py                          # all models, batch 64
  python experiments/bench_train_step.py --models burgess --batch 256
  python experiments/bench_train_step.py --models burgess --profile   # + where time goes

For each model it builds the exact jitted train step that ``make train`` runs
(``train.build_program`` with ``configs/default.py``: one member, capacity
objective, Bernoulli reconstruction, Adam, the batch rendered inside the step,
members run by ``'auto'``), and prints one row:

* ms/step and img/s: median of ``--steps`` timed steps after ``--warmup``;
* GFLOP/step: the model's arithmetic, XLA's cost analysis of one member's
  step written with XLA's own convolutions (whatever formulation trains it);
  the achieved GFLOP/s, and ``%mm``: that rate as a share of the machine's
  matrix-multiply rate, measured in the same run (a jitted 2048×2048 float32
  ``a @ a``); ``floor ms`` is GFLOP/step at the matmul rate, the step's time if
  every FLOP ran as fast as a big matmul;
* products ms: every matrix product of the compiled member step (read from
  its optimised HLO, fused ones included), run alone in one jitted program on
  operands made beforehand: the time this formulation needs with no data
  movement at all, at the rate XLA's CPU products reach at these shapes;
* render ms: rendering the batch alone (``train.batch_at``, jitted), and
  ``data %``, its share of the step; ``nodata ms``: the member step alone
  (``train.make_member_step``, jitted at the top level, its state donated) on a
  pre-rendered batch;
* with ``torch`` installed: the same step in an equivalent PyTorch eager model
  (same layers and parameter count, same loss, Adam 5e-4, float32, one thread
  per core). ``torch ms`` renders each batch with capvae's (jitted JAX)
  dataset on the host inside the timed step, as the JAX step does;
  ``torch nodata ms`` cycles through a pool of batches rendered beforehand.
  ``vs torch`` is capvae img/s over torch img/s, both with rendering;
* as the machine's speed drifts by ±15 % within minutes, ``--rounds`` then
  times the step again, each time followed by the matmul and the PyTorch step,
  and prints each round's ``%mm`` and ratio, and their medians;
* ``--loop_steps N``: the whole training loop (``train.train_and_evaluate``:
  logging, checkpoints: ``python -m capvae.main`` in a process of its own) for
  N steps, against the program alone (``--bare_steps``), each in a fresh
  process: ``--loop_rounds`` pairs of them, in alternating order (each round
  of the loop resumes the last one's checkpoint), and the median of their gaps.

``--trace N`` (default 10) profiles N steps of each program with JAX's
profiler and prints the time of every executed HLO op by kind (products, data
movement, reductions, elementwise) and the costliest ops with the model layer
each comes from.

``--profile`` adds, for each model, timings of pieces of one member's step
(encoder and decoder forward, forward and backward, the optimizer update,
alternative convolution formulations), each jitted at the top level on a fixed
batch, with its XLA FLOP count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from capvae import data, layers, losses, models, sweep, train
from capvae import workdir as workdir_lib
from capvae import parallel
from capvae import backend
from capvae import train_state as ts
from capvae.config_lib import sibling

TORCH_HINT = ('torch is not installed: `pip install torch==2.13.0` installs the CPU build'
              ' here (into .venv); the PyTorch columns are left out.')


# --------------------------------------------------------------------------
# Timing helpers.
# --------------------------------------------------------------------------


def median_seconds(fn: Callable[[], Any], warmup: int, steps: int) -> float:
  """Median wall time of ``fn()`` (blocked on its result) over ``steps`` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


LOOP_PAIR_STEPS = 100


def back_to_back_seconds(fn: Callable[[], Any], steps: int) -> float:
  """Mean seconds of ``fn`` over ``steps`` calls dispatched back to back, as the loop does."""
  jax.block_until_ready(fn())
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def flops_of(compiled) -> float:
  """FLOPs of a compiled XLA program from its cost analysis (nan if unknown)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return math.nan
  if cost is None:
    return math.nan
  if isinstance(cost, dict):
    cost = [cost]
  total = [float(c.get('flops', math.nan)) for c in cost if c]
  return sum(total) if total else math.nan


def matmul_timer(n: int = 2048) -> Callable[[int], float]:
  """``rate(reps)``: FLOP/s of a jitted ``n×n @ n×n`` float32 product (median of ``reps``)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a).lower(a).compile()
  return lambda reps: 2.0 * n ** 3 / median_seconds(lambda: f(a), warmup=2, steps=reps)


def matmul_rate(n: int = 2048, reps: int = 10) -> float:
  """FLOP/s of a jitted ``n×n @ n×n`` float32 product (median of ``reps``)."""
  return matmul_timer(n)(reps)


def load_average() -> str:
  try:
    return ' '.join(f'{x:.2f}' for x in os.getloadavg())
  except OSError:
    return '?'


# --------------------------------------------------------------------------
# The capvae step.
# --------------------------------------------------------------------------


def default_config(model: str, batch: int):
  """``configs/default.py`` with ``model`` and ``batch_size`` set."""
  config = sibling(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..',
                                'configs', 'x.py'), 'default').get_config()
  config.model = model
  config.batch_size = batch
  return config


def param_count(params, leading: int = 0) -> int:
  """Parameters in a pytree; ``leading`` axes (a member stack) are not counted."""
  return sum(math.prod(p.shape[leading:]) for p in jax.tree.leaves(params))


def bench_capvae(model_name: str, batch: int, warmup: int, steps: int,
                 extras: bool = True, data_shards: int = 1) -> dict[str, Any]:
  """Times the training program of ``make train`` for one model (and, with
  ``extras``, the render, the member step and its products alone); with
  ``data_shards``, its batch split over that many devices."""
  config = default_config(model_name, batch)
  spec = train.StepSpec.from_config(config)
  dataset = data.get(config.dataset, config.dataset_path, config.dataset_split)
  model = models.get(config.model, config.latent_size, dataset.observation_shape)
  mesh = parallel.make_mesh(jax.devices()[:data_shards], data_shards)
  rows = sweep.members(config)
  padded = sweep.padded_size(len(rows), config.chunk_size, mesh.shape['member'])
  init, step, dataset = train.build_program(model, spec, dataset, mesh, config.member_loop)
  states = init(sweep.stack(sweep.pad(rows, padded)))
  num_params = param_count(states.params, leading=1)
  t0 = time.perf_counter()
  compiled = step.lower(states, dataset).compile()
  compile_s = time.perf_counter() - t0

  # The state is donated: each call consumes the last one.
  box = {'states': states, 'metrics': None}

  def one_step():
    box['states'], box['metrics'] = compiled(box['states'], dataset)
    return box['states']

  seconds = median_seconds(one_step, warmup, steps)
  loss = np.asarray(box['metrics']['loss'])[:len(rows)]
  if not np.all(np.isfinite(loss)):
    raise FloatingPointError(f'{model_name}: non-finite loss {loss}.')
  if not extras:
    return dict(model=model_name, seconds=seconds, compile_s=compile_s, one_step=one_step,
                compiled=compiled)

  # Rendering the batch alone, as the step does it.
  render = jax.jit(lambda ds, s: train.batch_at(ds, s, spec))
  render_c = render.lower(dataset, jnp.int32(0)).compile()
  k = iter(range(1 << 30))
  render_s = median_seconds(lambda: render_c(dataset, jnp.int32(next(k))), warmup, steps)

  # The member step alone (top level, no loop, no rendering) on a fixed batch,
  # updating its state in place as the program does.
  member = jax.tree.map(lambda a: a[0], box['states'])
  x = render_c(dataset, jnp.int32(0))
  member_step = jax.jit(train.make_member_step(model, spec), donate_argnums=0)
  member_c = member_step.lower(member, x).compile()
  mbox = {'state': member}

  def one_member_step():
    mbox['state'], _ = member_c(mbox['state'], x)
    return mbox['state']

  nodata_s = median_seconds(one_member_step, warmup, steps)
  dots = hlo_dots(member_c.as_text())
  products_s = median_seconds(products_program(dots), warmup, steps)
  return dict(model=model_name, seconds=seconds,
              compile_s=compile_s, one_step=one_step,
              model_flops=reference_flops(model, spec, mbox['state'], x),
              products_s=products_s, products_flops=sum(d[-1] for d in dots),
              render_s=render_s, nodata_s=nodata_s, num_params=num_params,
              loop=backend.resolve_member_loop(config.member_loop), config=config,
              compiled=compiled,
              spec=spec, dataset=dataset, flax_model=model, render=render_c,
              state=mbox['state'], x=x)


def reference_model(model: models.VAE) -> models.VAE:
  """``model`` with XLA's own convolutions and dots (``impl='xla'``), same params."""
  return models.VAE(model.encoder.clone(impl='xla'), model.decoder.clone(impl='xla'))


def reference_flops(model, spec, state, x) -> float:
  """XLA's FLOP count of one member's step written with XLA's convolutions.

  This is the model's arithmetic, whatever formulation trains it: the window
  products compute a few more (they run over one extra row and column of
  blocks), and those do not count as work done.
  """
  step = jax.jit(train.make_member_step(reference_model(model), spec))
  return flops_of(step.lower(state, x).compile())


_SHAPE = r'f32\[([\d,]*)\]'


def hlo_dots(hlo: str) -> list[tuple[tuple[int, ...], tuple[int, ...], Any, float]]:
  """Every matrix product an optimised HLO module executes: ``(lhs shape, rhs
  shape, dimension numbers, flops)``, fused ones included, listed once per
  execution (a product in a loop with a known trip count ``n``, such as the
  micro-batch scan, ``n`` times)."""
  shapes, dots, calls, comp, entry = {}, {}, {}, None, None
  for line in hlo.splitlines():
    head = re.match(r'(ENTRY )?%([\w.\-]+) .*\{$', line)
    if head and not line.startswith(' '):
      comp = head.group(2)
      entry = comp if head.group(1) else entry
      dots[comp], calls[comp] = [], []
      continue
    if comp is None:
      continue
    m = re.search(r'%([\w.\-]+) = ' + _SHAPE, line)
    if m:
      shapes[m.group(1)] = tuple(int(d) for d in m.group(2).split(',') if d)
    m = re.search(r'= ' + _SHAPE + r'\{[\d,]*\} dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)', line)
    if m:
      dots[comp].append((tuple(int(d) for d in m.group(1).split(',') if d),
                         m.group(2), m.group(3), m.group(4)))
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    for callee in re.findall(r'(?:calls|body)=%([\w.\-]+)', line):
      calls[comp].append((callee, int(trips.group(1)) if trips and ' while(' in line else 1))
  times = {}

  def visit(name, n):
    times[name] = times.get(name, 0) + n
    for callee, k in calls.get(name, ()):
      visit(callee, n * k)

  visit(entry, 1)
  dims = lambda text, key: tuple(
      int(d) for d in (re.search(key + r'=\{([\d,]*)\}', text) or [None, ''])[1].split(',') if d)
  out = []
  for name, n in times.items():
    for result, lhs, rhs, rest in dots.get(name, ()):
      lhs, rhs = shapes[lhs], shapes[rhs]
      dn = ((dims(rest, 'lhs_contracting_dims'), dims(rest, 'rhs_contracting_dims')),
            (dims(rest, 'lhs_batch_dims'), dims(rest, 'rhs_batch_dims')))
      contracted = math.prod(lhs[d] for d in dn[0][0])
      out += [(lhs, rhs, dn, 2.0 * math.prod(result) * contracted)] * n
  return out


def products_program(dots) -> Callable[[], Any]:
  """One jitted program that computes just ``dots`` (operands made beforehand)."""
  keys = jax.random.split(jax.random.key(2), 2 * len(dots))
  operands = [(jax.random.normal(keys[2 * i], lhs), jax.random.normal(keys[2 * i + 1], rhs))
              for i, (lhs, rhs, _, _) in enumerate(dots)]
  numbers = [dn for _, _, dn, _ in dots]
  fn = jax.jit(lambda ops: [jax.lax.dot_general(a, b, dn)
                            for (a, b), dn in zip(ops, numbers)])
  compiled = fn.lower(operands).compile()
  return lambda: compiled(operands)


def _run(args: list[str], env: dict[str, str]) -> str:
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
  return subprocess.run([sys.executable, *args], cwd=root, env=env, check=True,
                        capture_output=True, text=True).stdout


def bench_loop(model_name: str, batch: int, num_steps: int, rounds: int) -> dict[str, Any]:
  """The real loop (``make train``) against the bare program, in ``rounds`` pairs.

  Each round runs, in processes of their own and in alternating order:

  * the loop: ``python -m capvae.main`` on ``configs/default.py``, as ``make
    train`` runs it, to step ``r · num_steps`` in one temporary workdir (round
    ``r`` resumes round ``r − 1``'s checkpoint), logging every ``log_every``
    steps and checkpointing every ``num_steps / 2`` (more often than ``make
    train``). Its rate is taken over the round's logged intervals after its
    first, which holds the start, the restore and the compilation;
  * the bare program: this script with ``--bare_steps``, the same compiled
    step called back to back ``LOOP_PAIR_STEPS`` times, with no logging or
    checkpoints.

  Both are fresh processes (a long-lived one, and one that has loaded PyTorch,
  ran XLA's steps at other speeds here), sharing a compilation cache that an
  untimed run fills before the first round. The
  machine's speed drifts by more than the gap within minutes, so each round's
  ratio is a pair taken within a minute, and the result is their median.
  """
  config = default_config(model_name, batch)
  tmp = tempfile.mkdtemp(prefix='capvae_bench_loop_')
  workdir = os.path.join(tmp, 'run')
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(tmp, 'xla-cache'))
  every = max(num_steps // 2, 1)
  pairs, walls = [], []

  def loop(r):
    t0 = time.perf_counter()
    _run(['-m', 'capvae.main', '--config', 'configs/default.py',
          f'--config.model={model_name}', f'--config.batch_size={batch}',
          f'--config.num_steps={r * num_steps}', f'--config.checkpoint_every={every}',
          '--workdir', workdir], env)
    walls.append(time.perf_counter() - t0)
    with open(os.path.join(workdir, workdir_lib.METRICS_FILE)) as f:
      rows = [json.loads(line) for line in f]
    rows = [row for row in rows if row['step'] > (r - 1) * num_steps]
    steps = [row['step'] for row in rows]
    # Interval k ends at logged step steps[k]: (steps[k] - steps[k-1]) steps at rate k.
    spans = [(b - a, row['steps_per_sec']) for a, b, row in zip(steps, steps[1:], rows[1:])]
    return sum(n / rate for n, rate in spans) / sum(n for n, _ in spans), sum(n for n, _ in spans)

  def bare():
    out = _run([os.path.abspath(__file__), '--models', model_name, '--batch', str(batch),
                '--bare_steps', str(LOOP_PAIR_STEPS)], env)
    return float(out.split()[-1]) / 1e3

  try:
    # Fill the compilation cache first, so that every timed process loads the
    # program from it: one that compiled it itself ran its steps up to ~20 %
    # slower here for the rest of its life (the first round was always the high one).
    _run([os.path.abspath(__file__), '--models', model_name, '--batch', str(batch),
          '--bare_steps', '1'], env)
    for r in range(1, rounds + 1):
      if r % 2:
        (loop_s, timed), bare_s = loop(r), bare()
      else:
        bare_s, (loop_s, timed) = bare(), loop(r)
      pairs.append((loop_s, bare_s, timed))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return dict(pairs=pairs, walls=walls, log_every=config.log_every, checkpoint_every=every,
              gap=statistics.median(a / b - 1 for a, b, _ in pairs))


def bare_program(model_name: str, batch: int, steps: int, data_shards: int = 1) -> float:
  """ms/step of ``make train``'s compiled program called back to back (``--bare_steps``)."""
  res = bench_capvae(model_name, batch, warmup=3, steps=3, extras=False,
                     data_shards=data_shards)
  return back_to_back_seconds(res['one_step'], steps) * 1e3


def bench_split(model_name: str, batch: int, steps: int, rounds: int) -> list[tuple]:
  """The program on one CPU device against the batch split over one device per
  core (``JAX_NUM_CPU_DEVICES``, ``config.data_shards``), in ``rounds`` pairs of
  fresh processes in alternating order: ``[(one ms, split ms), ...]``."""
  cpus = os.cpu_count() or 1
  tmp = tempfile.mkdtemp(prefix='capvae_bench_split_')
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(tmp, 'xla-cache'))
  split_env = dict(env, JAX_NUM_CPU_DEVICES=str(cpus))
  args = [os.path.abspath(__file__), '--models', model_name, '--batch', str(batch)]
  one = lambda n: float(_run([*args, '--bare_steps', str(n)], env).split()[-1])
  split = lambda n: float(_run([*args, '--bare_steps', str(n), '--data_shards', str(cpus)],
                               split_env).split()[-1])
  pairs = []
  try:
    one(1), split(1)  # fill the compilation cache (see bench_loop)
    for r in range(rounds):
      if r % 2 == 0:
        a = one(steps)
        b = split(steps)
      else:
        b = split(steps)
        a = one(steps)
      pairs.append((a, b))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return pairs


# --------------------------------------------------------------------------
# The PyTorch step.
# --------------------------------------------------------------------------


def torch_model(name: str, latent_size: int, image_shape):
  """The PyTorch (NCHW) twin of ``capvae.models.get(name, ...)``.

  Same layers, widths and parameter count. Padding: flax 'SAME' for a k4 s2
  convolution pads (1, 2) on each spatial axis, PyTorch ``padding=1`` pads
  (1, 1); the output shapes are the same (the last padded row is never read by
  a stride-2 window of 4 taps ending in range) and so are the FLOPs. For k2 s2
  'SAME' pads nothing, as ``padding=0``. ``ConvTranspose2d(k4, s2, p1)`` doubles
  the size, as flax's 'SAME' transposed convolution does.
  """
  import torch
  from torch import nn as tnn

  h, w, c = image_shape
  m = latent_size

  class Split(tnn.Module):

    def forward(self, out):
      return out[:, :m], out[:, m:]

  def conv_encoder(convs, dense, flat):
    layers, cin = [], c
    for features, k in convs:
      layers += [tnn.Conv2d(cin, features, k, 2, padding=(k - 2) // 2), tnn.ReLU()]
      cin = features
    layers.append(tnn.Flatten())
    width = flat
    for d in dense:
      layers += [tnn.Linear(width, d), tnn.ReLU()]
      width = d
    layers += [tnn.Linear(width, 2 * m), Split()]
    return tnn.Sequential(*layers)

  def conv_decoder(dense, base, deconvs):
    layers, width = [], m
    for d in dense:
      layers += [tnn.Linear(width, d), tnn.ReLU()]
      width = d
    layers += [tnn.Linear(width, base * (h // 16) * (w // 16)), tnn.ReLU(),
               tnn.Unflatten(1, (base, h // 16, w // 16))]
    cin = base
    for features in deconvs:
      layers += [tnn.ConvTranspose2d(cin, features, 4, 2, 1), tnn.ReLU()]
      cin = features
    layers.append(tnn.ConvTranspose2d(cin, c, 4, 2, 1))
    return tnn.Sequential(*layers)

  if name == 'burgess':
    enc = conv_encoder(((32, 4),) * 4, (256, 256), 32 * (h // 16) * (w // 16))
    dec = conv_decoder((256, 256), 32, (32, 32, 32))
  elif name == 'locatello':
    enc = conv_encoder(((32, 4), (32, 4), (64, 2), (64, 2)), (256,),
                       64 * (h // 16) * (w // 16))
    dec = conv_decoder((256,), 64, (64, 32, 32))
  elif name == 'mlp':
    n = h * w * c
    enc = tnn.Sequential(tnn.Flatten(), tnn.Linear(n, 1200), tnn.ReLU(),
                         tnn.Linear(1200, 1200), tnn.ReLU(), tnn.Linear(1200, 2 * m),
                         Split())
    dec = tnn.Sequential(tnn.Linear(m, 1200), tnn.Tanh(), tnn.Linear(1200, 1200),
                         tnn.Tanh(), tnn.Linear(1200, 1200), tnn.Tanh(),
                         tnn.Linear(1200, n), tnn.Unflatten(1, (c, h, w)))
  else:
    raise ValueError(f'no PyTorch twin for model {name!r}.')

  class VAE(tnn.Module):

    def __init__(self):
      super().__init__()
      self.encoder, self.decoder = enc, dec

    def forward(self, x):
      mean, logvar = self.encoder(x)
      z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
      return self.decoder(z), mean, logvar

  return VAE()


def bench_torch(res: dict[str, Any], warmup: int, steps: int, pool_size: int = 8):
  """Times the PyTorch twin of ``res['model']`` with and without rendering."""
  import torch
  import torch.nn.functional as F

  config, dataset = res['config'], res['dataset']
  torch.manual_seed(0)
  net = torch_model(res['model'], config.latent_size, dataset.observation_shape)
  num_params = sum(p.numel() for p in net.parameters())
  opt = torch.optim.Adam(net.parameters(), lr=config.learning_rate,
                         betas=(config.adam_b1, config.adam_b2), eps=config.adam_eps)
  gamma, c_max, anneal = config.gamma, config.c_max, config.c_anneal_steps
  render = res['render']

  def host_batch(step: int):
    # capvae's renderer (jitted JAX, on the host CPU), NHWC -> NCHW.
    x = np.array(render(dataset, jnp.int32(step)))  # a writable host copy
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

  counter = {'step': 0}

  def train_step(x):
    step = counter['step']
    counter['step'] += 1
    logits, mean, logvar = net(x)
    rec = F.binary_cross_entropy_with_logits(logits, x, reduction='none').sum((1, 2, 3))
    kl = 0.5 * (torch.exp(logvar) + mean.square() - 1.0 - logvar)  # [B, M]
    c = c_max * min(step / anneal, 1.0)
    loss = rec.mean() + gamma * (kl.sum(1).mean() - c).abs()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  def timed(make_x) -> float:
    for _ in range(warmup):
      train_step(make_x())
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      loss = train_step(make_x())
      times.append(time.perf_counter() - t0)
    if not math.isfinite(float(loss.detach())):
      raise FloatingPointError(f'{res["model"]} (torch): non-finite loss.')
    return statistics.median(times)

  with_data = timed(lambda: host_batch(10_000 + counter['step']))
  pool = [host_batch(20_000 + i) for i in range(pool_size)]
  nodata = timed(lambda: pool[counter['step'] % pool_size])
  again = lambda: timed(lambda: host_batch(30_000 + counter['step']))
  return dict(seconds=with_data, nodata_s=nodata, num_params=num_params, again=again)


# --------------------------------------------------------------------------
# Where the time goes inside one member's step.
# --------------------------------------------------------------------------


_MOVES = ('transpose', 'pad', 'slice', 'concatenate', 'stack', 'dynamic_slice',
          'dynamic_update_slice', 'broadcast', 'broadcast_in_dim', 'copy', 'reshape',
          'gather', 'scatter')


def _op_kind(hlo_name: str, op_name: str) -> str:
  """What an executed HLO op does: its JAX primitive (``op_name``'s last part),
  else its HLO name."""
  prim = op_name.rsplit('/', 1)[-1] if op_name else ''
  if prim == 'dot_general' or (not prim and hlo_name.startswith('dot')):
    return 'products'
  if prim.startswith('reduce') or prim in ('argmax', 'argmin', 'sort'):
    return 'reductions'
  if prim in _MOVES or (not prim and hlo_name.startswith(
      ('wrapped_broadcast', 'wrapped_copy', 'copy', 'wrapped_pad', 'wrapped_slice',
       'wrapped_dynamic', 'concatenate', 'bitcast'))):
    return 'data movement'
  return 'elementwise and other'


def trace_step(res: dict[str, Any], steps: int, top: int = 15):
  """Times every HLO op of the program over ``steps`` steps with JAX's profiler.

  Returns ``(ms a step by kind, [(ms a step, calls a step, HLO op, JAX op), …] for
  the ``top`` costliest ops, ms a step summed over the ops)``. The conv models'
  ops run one at a time (each on both cores), so their sum is about the step's
  time; independent ops may also run side by side on the two threads (mlp), and
  then the sum exceeds it.
  """
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  meta = {m.group(1): m.group(2).replace('jit(local_step)/', '').replace('while/body/', '')
          for m in re.finditer(r'^\s*%(\S+) = .*?op_name="([^"]*)"',
                               res['compiled'].as_text(), re.M)}
  f = res['one_step']
  for _ in range(3):
    jax.block_until_ready(f())
  tmp = tempfile.mkdtemp(prefix='capvae_bench_trace_')
  try:
    jax.profiler.start_trace(tmp)
    for _ in range(steps):
      jax.block_until_ready(f())
    jax.profiler.stop_trace()
    path = next(os.path.join(d, n) for d, _, names in os.walk(tmp) for n in names
                if n.endswith('.xplane.pb'))
    data = ProfileData.from_file(path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  per_op: dict[str, list[float]] = {}
  containers = ('ThunkExecutor', 'SlinkyThreadPool', 'while', 'conditional', 'call')
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith('tf_XLA'):  # the threads that run the program's ops
        continue
      for ev in line.events:
        if not ev.name.startswith(containers):
          acc = per_op.setdefault(ev.name, [0.0, 0])
          acc[0] += ev.duration_ns / 1e6 / steps
          acc[1] += 1 / steps
  kinds: dict[str, float] = {}
  for name, (ms, _) in per_op.items():
    kind = _op_kind(name, meta.get(name, ''))
    kinds[kind] = kinds.get(kind, 0.0) + ms
  rows = sorted(((ms, n, name, meta.get(name, '?')) for name, (ms, n) in per_op.items()),
                reverse=True)[:top]
  return kinds, rows, sum(ms for ms, _ in per_op.values())


def profile(res: dict[str, Any], warmup: int, steps: int) -> list[tuple[str, float, float]]:
  """``(piece, seconds, flops)`` for pieces of one member's step (top level, fixed x).

  Each piece is jitted on its own at the top level of a program; inside the
  training program (a ``fori_loop`` over members for ``'map'``) XLA may compile
  the same operations differently, so the pieces need not add up to the step.
  """
  model, spec, state, x = res['flax_model'], res['spec'], res['state'], res['x']
  params, hp = state.params, state.hparams
  key = jax.random.key(1)
  enc_p = {'params': params['params']['encoder']}
  dec_p = {'params': params['params']['decoder']}
  z, _ = model.encoder.apply(enc_p, x)
  out = []

  def add(name, fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = median_seconds(lambda: compiled(*args), warmup, steps)
    out.append((name, seconds, flops_of(compiled)))

  def loss_fn(p, x):
    return train.member_loss(p, model, hp, state.step, x, key, spec)[0]

  def enc_sum(p, x):
    m, lv = model.encoder.apply(p, x)
    return jnp.sum(m) + jnp.sum(lv)

  def dec_sum(p, z):
    return jnp.sum(losses.bernoulli_nll(model.decoder.apply(p, z), x))

  add('encoder fwd', lambda p, x: model.encoder.apply(p, x), enc_p, x)
  add('encoder fwd+bwd (dparams, no dx)', jax.grad(enc_sum), enc_p, x)
  add('decoder fwd', lambda p, z: model.decoder.apply(p, z), dec_p, z)
  add('decoder+rec fwd+bwd (dparams, dz)', jax.grad(dec_sum, argnums=(0, 1)), dec_p, z)
  add('whole loss fwd', loss_fn, params, x)
  add('whole loss fwd+bwd', jax.grad(loss_fn), params, x)
  grads = jax.grad(loss_fn)(params, x)
  opt_kwargs = dict(spec.optimizer_kwargs)

  def adam(grads, opt_state, params):
    tx = ts.make_optimizer(hp.learning_rate, **opt_kwargs)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  add('Adam update alone', adam, grads, state.opt_state, params)
  member_step = train.make_member_step(model, spec)
  add('member step (grad+Adam+checks)', member_step, state, x)

  # Alternative formulations of the same layers, same parameters.
  if isinstance(model.encoder, models.ConvEncoder):
    xla_enc = model.encoder.clone(impl='xla')

    def xla_enc_sum(p, x):
      m, lv = xla_enc.apply(p, x)
      return jnp.sum(m) + jnp.sum(lv)

    add('encoder fwd+bwd, impl=xla', jax.grad(xla_enc_sum), enc_p, x)
  if isinstance(model.decoder, models.ConvDecoder):
    xla_dec = model.decoder.clone(impl='xla')

    def xla_dec_sum(p, z):
      return jnp.sum(losses.bernoulli_nll(xla_dec.apply(p, z), x))

    add('decoder+rec fwd+bwd, impl=xla', jax.grad(xla_dec_sum, argnums=(0, 1)),
        dec_p, z)

  return out


def profile_layers(res: dict[str, Any], warmup: int, steps: int):
  """Each convolution of the model alone, at the shapes the model gives it.

  Returns rows ``(layer, flops_fwd, [fwd, bwd] as matmuls (capvae.layers),
  [fwd, bwd] as XLA convolutions)`` in seconds. ``bwd`` is the vjp alone (the
  layer is linear, so its forward output is not needed and XLA drops it) for a
  random cotangent: d kernel and d input, except for the first encoder layer,
  whose input is data.
  """
  model, x = res['flax_model'], res['x']
  params = res['state'].params['params']
  rng = np.random.default_rng(0)
  dn = ('NHWC', 'HWIO', 'NHWC')

  def timed(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    return median_seconds(lambda: compiled(*args), warmup, steps), flops_of(compiled)

  def rows_for(name, impls, kernel, xi, g, need_dx):
    row = [name, math.nan]
    for f in impls:
      fwd_s, flops = timed(f, kernel, xi)
      row[1] = flops if math.isnan(row[1]) else row[1]
      if need_dx:
        bwd = lambda k_, x_, g_, f=f: jax.vjp(f, k_, x_)[1](g_)
      else:
        bwd = lambda k_, x_, g_, f=f: jax.vjp(lambda kk: f(kk, x_), k_)[1](g_)
      row.append((fwd_s, timed(bwd, kernel, xi, g)[0]))
    return tuple(row)

  b, out = x.shape[0], []
  if isinstance(model.encoder, models.ConvEncoder):
    size, cin = x.shape[1], x.shape[-1]
    impls = (lambda k_, x_: layers.conv2d(x_, k_, (2, 2)),
             lambda k_, x_: jax.lax.conv_general_dilated(x_, k_, (2, 2), 'SAME',
                                                         dimension_numbers=dn))
    for i, (features, k) in enumerate(model.encoder.convs):
      kernel = params['encoder'][f'Conv_{i}']['kernel']
      xi = jnp.asarray(rng.random((b, size, size, cin)), jnp.float32)
      name = f'enc Conv_{i} k{k} {cin}->{features} {size}->{-(-size // 2)}'
      size = -(-size // 2)
      g = jnp.asarray(rng.standard_normal((b, size, size, features)), jnp.float32)
      out.append(rows_for(name, impls, kernel, xi, g, need_dx=i > 0))
      cin = features
  if isinstance(model.decoder, models.ConvDecoder):
    dec = model.decoder
    size, cin = dec.image_shape[0] // 16, dec.base_features
    impls = (lambda k_, x_: layers.conv_transpose2d(x_, k_),
             lambda k_, x_: jax.lax.conv_transpose(x_, k_, (2, 2), 'SAME',
                                                   dimension_numbers=dn))
    for i, features in enumerate((*dec.deconvs, dec.image_shape[-1])):
      kernel = params['decoder'][f'ConvTranspose_{i}']['kernel']
      xi = jnp.asarray(rng.random((b, size, size, cin)), jnp.float32)
      name = f'dec ConvT_{i} k4 {cin}->{features} {size}->{2 * size}'
      size *= 2
      g = jnp.asarray(rng.standard_normal((b, size, size, features)), jnp.float32)
      out.append(rows_for(name, impls, kernel, xi, g, need_dx=True))
      cin = features
  return out


# --------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--models', default=','.join(models.MODELS),
                      help='comma-separated, from ' + ', '.join(models.MODELS))
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--steps', type=int, default=20, help='timed steps (median)')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--no_torch', action='store_true', help='skip the PyTorch columns')
  parser.add_argument('--rounds', type=int, default=5,
                      help='time the step again this many times, each followed by the'
                           ' matmul and (with torch) the PyTorch step, and give each'
                           ' round\'s %%mm and ratio (the machine\'s speed drifts)')
  parser.add_argument('--loop_steps', type=int, default=0,
                      help='also train configs/default.py with the real loop (logging,'
                           ' checkpoints), this many steps a round, and compare its rate'
                           ' with the program\'s timed right after each round')
  parser.add_argument('--loop_rounds', type=int, default=3,
                      help='rounds of --loop_steps (each resumes the last one)')
  parser.add_argument('--bare_steps', type=int, default=0,
                      help='only time the program of the first of --models this many steps'
                           ' back to back and print its ms/step (what --loop_steps runs'
                           ' in a process of its own)')
  parser.add_argument('--data_shards', type=int, default=1,
                      help='with --bare_steps: split the batch over this many devices')
  parser.add_argument('--split_rounds', type=int, default=0,
                      help='also time the first of --models with its batch split over one'
                           ' CPU device per core against one device, in this many pairs of'
                           ' fresh processes (0: off)')
  parser.add_argument('--profile', action='store_true',
                      help='also time pieces of each model\'s step')
  parser.add_argument('--trace', type=int, default=10,
                      help='profile this many steps of each model\'s program with JAX\'s'
                           ' profiler and print where the time goes, op by op (0: off)')
  args = parser.parse_args(argv)
  # As capvae.main does, before JAX or torch start threads (torch allocates
  # with malloc too).
  kept = backend.keep_freed_memory()
  names = [m.strip() for m in args.models.split(',') if m.strip()]
  log_every = int(default_config(models.MODELS[0], args.batch).log_every)
  if args.loop_steps and (args.loop_steps < 2 * log_every or args.loop_steps % log_every):
    parser.error(f'--loop_steps: 0 or a multiple of the loop\'s log_every ({log_every}) of at'
                 f' least {2 * log_every} (a round is timed from its first log), got'
                 f' {args.loop_steps}.')
  if args.loop_rounds < 1:
    parser.error(f'--loop_rounds: at least 1, got {args.loop_rounds}.')
  if args.bare_steps < 0:
    parser.error(f'--bare_steps: 0 (off) or more, got {args.bare_steps}.')
  if args.data_shards < 1:
    parser.error(f'--data_shards: 1 (the whole batch on one device) or more, got'
                 f' {args.data_shards}.')
  if args.split_rounds < 0:
    parser.error(f'--split_rounds: 0 (off) or more, got {args.split_rounds}.')
  if args.bare_steps:
    ms = bare_program(names[0], args.batch, args.bare_steps, args.data_shards)
    print(f'bare ms/step {ms:.3f}')
    return 0
  for name in names:
    if name not in models.MODELS:
      parser.error(f'--models: {name!r} is unknown; allowed: {list(models.MODELS)}.')

  torch = None
  if not args.no_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      torch = None
  cpus = os.cpu_count() or 1
  if torch is not None:
    torch.set_num_threads(cpus)
  dev = jax.devices()[0]
  print(f'# bench_train_step: batch {args.batch}, median of {args.steps} steps after'
        f' {args.warmup} warm-up; malloc keeps freed memory: {"yes" if kept else "no"}')
  print(f'# jax {jax.__version__}, torch'
        f' {torch.__version__ if torch is not None else "-"}'
        f'{f" ({torch.get_num_threads()} threads)" if torch is not None else ""};'
        f' {cpus} CPU(s); device {dev.platform}: {dev.device_kind} × {len(jax.devices())};'
        f' load average {load_average()}')
  if torch is None and not args.no_torch:
    print(f'# {TORCH_HINT}')
  matmul = matmul_timer()
  rate = matmul(10)
  print(f'# matmul 2048x2048 float32 (jit): {rate / 1e9:.1f} GFLOP/s')

  cols = (f'{"model":>9} {"ms/step":>8} {"img/s":>7} {"GFLOP":>6} {"GFLOP/s":>8}'
          f' {"%mm":>5} {"floor ms":>8} {"products ms":>11} {"render ms":>9} {"data %":>6}'
          f' {"nodata ms":>9}')
  if torch is not None:
    cols += (f' | {"torch ms":>8} {"torch img/s":>11} {"torch nodata ms":>15}'
             f' {"vs torch":>8}')
  print(cols, flush=True)
  results = []
  for name in names:
    res = bench_capvae(name, args.batch, args.warmup, args.steps)
    s, flops = res['seconds'], res['model_flops']
    row = (f'{name:>9} {s * 1e3:8.1f} {args.batch / s:7.0f} {flops / 1e9:6.2f}'
           f' {flops / s / 1e9:8.1f} {100 * flops / s / rate:4.0f}%'
           f' {flops / rate * 1e3:8.1f} {res["products_s"] * 1e3:11.1f}'
           f' {res["render_s"] * 1e3:9.1f}'
           f' {100 * res["render_s"] / s:5.0f}% {res["nodata_s"] * 1e3:9.1f}')
    if torch is not None:
      tres = bench_torch(res, args.warmup, args.steps)
      res['torch'] = tres
      row += (f' | {tres["seconds"] * 1e3:8.1f} {args.batch / tres["seconds"]:11.0f}'
              f' {tres["nodata_s"] * 1e3:15.1f} {tres["seconds"] / s:7.2f}x')
    print(row, flush=True)
    results.append(res)

  print(f'# members run by {results[0]["loop"] if results else "-"};'
        ' compile s: ' + ', '.join(f'{r["model"]} {r["compile_s"]:.1f}' for r in results))
  for r in results:
    print(f'# {r["model"]}: the member step\'s products'
          f' execute {r["products_flops"] / 1e9:.2f} GFLOP (the model: {r["model_flops"] / 1e9:.2f})'
          f' and alone run at {r["products_flops"] / r["products_s"] / 1e9:.1f} GFLOP/s')
  for r in results:
    line = f'# parameters {r["model"]}: flax {r["num_params"]:,}'
    if 'torch' in r:
      same = 'same' if r['torch']['num_params'] == r['num_params'] else 'DIFFERENT'
      line += f', torch {r["torch"]["num_params"]:,} ({same})'
    print(line)
  if torch is not None:
    print('# torch ms renders each batch on the host with capvae\'s jitted renderer inside'
          ' the timed step; torch nodata ms cycles through 8 batches rendered beforehand.')
  for r in results:
    if not args.rounds:
      continue
    fractions, ratios = [], []
    for _ in range(args.rounds):
      ours = median_seconds(r['one_step'], 1, args.steps)
      fractions.append(r['model_flops'] / ours / matmul(5))
      if 'torch' in r:
        ratios.append(r['torch']['again']() / ours)
    then = ', the matmul (5 products), then torch' if ratios else ' then the matmul (5 products)'
    line = (f'# paired rounds {r["model"]} (capvae{then}; {args.steps} steps each):'
            f' %mm {" ".join(f"{100 * x:.0f}%" for x in fractions)}; median'
            f' {100 * statistics.median(fractions):.0f}%')
    if ratios:
      line += (f'; vs torch {" ".join(f"{x:.2f}x" for x in ratios)}; median'
               f' {statistics.median(ratios):.2f}x')
    print(line, flush=True)
  if args.loop_steps:
    for r in results:
      loop = bench_loop(r['model'], args.batch, args.loop_steps, args.loop_rounds)
      rounds = ', '.join(f'{a * 1e3:.1f} vs {b * 1e3:.1f} ({100 * (a / b - 1):+.1f}%)'
                         for a, b, _ in loop['pairs'])
      print(f'# loop {r["model"]}: {len(loop["pairs"])} rounds, each of python -m capvae.main'
            f' ({args.loop_steps} steps, resuming the last round; logs every'
            f' {loop["log_every"]}, a checkpoint every {loop["checkpoint_every"]};'
            f' {loop["pairs"][0][2]} steps timed after the first log;'
            f' {" ".join(f"{w:.0f}" for w in loop["walls"])} s wall) and the bare program'
            f' ({LOOP_PAIR_STEPS} steps back to back), each in a process of its own:'
            f' ms/step loop vs bare {rounds}; median gap {100 * loop["gap"]:+.1f}%', flush=True)
  if args.trace:
    for r in results:
      kinds, rows, total = trace_step(r, args.trace)
      print(f'# where the time goes, {r["model"]} (JAX profiler, {args.trace} steps; ms a step'
            f' summed over the ops, {total:.1f} in all): ' + ', '.join(
                f'{k} {v:.1f} ({100 * v / total:.0f}%)'
                for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
      for ms, n, name, op in rows:
        print(f'#   {ms:6.2f} ms  {n:4.0f}x  {name:<34} {op[:90]}')
  if args.split_rounds:
    cpus = os.cpu_count() or 1
    pairs = bench_split(names[0], args.batch, LOOP_PAIR_STEPS, args.split_rounds)
    print(f'# batch split {names[0]}: {args.split_rounds} pairs of fresh processes, the'
          f' program on 1 CPU device (both cores) and with its batch split over {cpus}'
          f' devices of one core each (JAX_NUM_CPU_DEVICES={cpus},'
          f' config.data_shards={cpus}), {LOOP_PAIR_STEPS} steps back to back: ms/step '
          + ', '.join(f'{a:.1f} vs {b:.1f} ({b / a:.3f}x)' for a, b in pairs)
          + f'; median {statistics.median(b / a for a, b in pairs):.3f}x')
  print(f'# load average at the end: {load_average()}')

  if args.profile:
    for r in results:
      print(f'\n# profile {r["model"]}, batch {args.batch}: one member, top level, fixed'
            ' batch (median ms; XLA GFLOP; % of the matmul rate)')
      for piece, seconds, flops in profile(r, args.warmup, args.steps):
        print(f'{piece:>40} {seconds * 1e3:8.2f} ms {flops / 1e9:7.3f} GFLOP'
              f' {100 * flops / seconds / rate:5.0f}%', flush=True)
      layer_rows = profile_layers(r, args.warmup, args.steps)
      if layer_rows:
        print('# layers alone (ms; bwd = vjp: d kernel, d input): capvae.layers matmul'
              ' formulation (the one trained) vs XLA\'s convolution')
        print(f'{"layer":>30} {"GFLOP fwd":>9} {"fwd":>7} {"bwd":>7} | {"xla fwd":>7}'
              f' {"xla bwd":>7}')
        for name, flops, (mf, mb), (xf, xb) in layer_rows:
          print(f'{name:>30} {flops / 1e9:9.3f} {mf * 1e3:7.2f} {mb * 1e3:7.2f} |'
                f' {xf * 1e3:7.2f} {xb * 1e3:7.2f}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
