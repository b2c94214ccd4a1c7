"""The train step and the training loop.

``make_train_step`` builds one pure function ``(states, dataset) -> (states,
metrics)`` over a stack of members: it renders one batch from the dataset
(shared by every member: common random numbers), then updates every member,
one after another (``'map'``) or batched (``'vmap'``), inside a ``shard_map``
that splits the member axis over a device mesh. It is jitted once;
hyperparameter values are traced.

``train_and_evaluate(config, workdir)`` validates the config, restores or
creates the stacked state of each chunk of members, trains, logs
``metrics.jsonl`` and checkpoints with orbax, resuming exactly after a stop or
a preemption signal, on one process or many (``jax.distributed``).
``load_member`` and ``extract_member`` take one member back out.
"""

from __future__ import annotations

import dataclasses
import functools
import contextlib
import ctypes
import json
import math
import os
import signal
import time
from typing import Any

from absl import logging
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from capvae import config_lib, data, losses, models, schedules, sweep
from capvae import train_state as ts
from capvae import workdir as workdir_lib

# The workdir's files (capvae.workdir), by their names here too.
CHECKPOINT_DIR, CONFIG_FILE = workdir_lib.CHECKPOINT_DIR, workdir_lib.CONFIG_FILE
MEMBERS_FILE, METRICS_FILE = workdir_lib.MEMBERS_FILE, workdir_lib.METRICS_FILE


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The static (shape- or program-changing) part of a run's config."""
  objective: str
  reconstruction: str
  capacity_penalty: str
  schedule: str
  beta_norm: bool
  batch_size: int
  microbatch: int  # images per micro-batch (see member_grads); the batch size: none
  data_seed: int
  optimizer_kwargs: tuple[tuple[str, float], ...]

  @classmethod
  def from_config(cls, config) -> 'StepSpec':
    return cls(
        objective=config.objective,
        reconstruction=config.reconstruction,
        capacity_penalty=config.capacity_penalty,
        schedule=config.schedule,
        beta_norm=bool(config.beta_norm),
        batch_size=int(config.batch_size),
        microbatch=resolve_microbatch(config),
        data_seed=int(config.data_seed),
        optimizer_kwargs=(('b1', float(config.adam_b1)),
                          ('b2', float(config.adam_b2)),
                          ('eps', float(config.adam_eps))),
    )


def reconstruction(spec: StepSpec, out, x, hparams: ts.Hparams):
  """Per-example reconstruction loss of the config's kind."""
  if spec.reconstruction == 'gaussian':
    return losses.gaussian_nll(out, x, hparams.gaussian_variance)
  return losses.RECONSTRUCTIONS[spec.reconstruction](out, x)


def objective(spec: StepSpec, hparams: ts.Hparams, step, rec, kl, input_size: int):
  """The config's objective of per-example reconstructions ``rec [B]`` and KLs ``kl [B, M]``.

  Every objective is linear in ``rec`` (it enters as a weighted batch mean),
  which is what lets :func:`member_grads` split a batch into micro-batches.
  """
  if spec.objective == 'beta':
    return losses.beta_objective(rec, kl, hparams.beta, normalized=spec.beta_norm,
                                 input_size=input_size)
  c = schedules.get(spec.schedule, hparams.c_max, hparams.c_anneal_steps,
                    hparams.c_stair_steps)(step)
  return losses.capacity_objective(rec, kl, hparams.gamma, c,
                                   penalty=spec.capacity_penalty)


def member_loss(params, model, hparams: ts.Hparams, step, x, key, spec: StepSpec):
  """One member's ``(loss, aux)`` on batch ``x`` at optimizer step ``step``."""
  out, mean, logvar = model.apply(params, x, key)
  rec = reconstruction(spec, out, x, hparams)
  kl = losses.gaussian_kl(mean, logvar)
  return objective(spec, hparams, step, rec, kl, int(np.prod(x.shape[1:])))


def data_parallel_grads(params, model, hparams: ts.Hparams, step, x, key, spec: StepSpec,
                        axis: str):
  """``((loss, aux), grads)`` of the whole batch, from this device's share ``x`` of it.

  The devices along mesh axis ``axis`` each hold an equal, consecutive share of
  the batch (device ``d`` of ``D``: images ``d·n … (d+1)·n − 1``). Each runs the
  network forward on its share and keeps the per-example reconstructions and
  KLs; these are gathered (``B + B·M`` numbers), and every device evaluates the
  objective on the whole batch's statistics, so the loss, C's penalty (which can
  depend on the batch mean KL) and the metrics are the whole batch's. Every
  objective is a function of per-example statistics, so its gradient is
  ``Σ_b ∂rec_b·g_rec_b + ∂kl_b·g_kl_b``: each device takes the backward pass of
  its own images with their weights ``g`` and the parameter gradients are
  summed over ``axis``. Each image gets the noise it gets in the whole batch's
  draw. The result is the whole batch's gradient up to float rounding (the sum
  over images runs in another order).
  """
  n = x.shape[0]
  d = jax.lax.axis_index(axis)
  b = n * jax.lax.axis_size(axis)
  mine = lambda a: jax.lax.dynamic_slice_in_dim(a, d * n, n)
  eps = mine(jax.random.normal(key, (b, model.encoder.latent_size), jnp.float32))

  def stats(p):
    out, mean, logvar = model.apply(p, x, eps, method='with_noise')
    return reconstruction(spec, out, x, hparams), losses.gaussian_kl(mean, logvar)

  (rec, kl), stats_vjp = jax.vjp(stats, params)
  gather = lambda a: jax.lax.all_gather(a, axis, tiled=True)
  (loss, aux), (w_rec, w_kl) = jax.value_and_grad(
      lambda rec, kl: objective(spec, hparams, step, rec, kl, int(np.prod(x.shape[1:]))),
      argnums=(0, 1), has_aux=True)(gather(rec), gather(kl))
  grads = jax.lax.psum(stats_vjp((mine(w_rec), mine(w_kl)))[0], axis)
  return (loss, aux), grads


def member_grads(params, model, hparams: ts.Hparams, step, x, key, spec: StepSpec):
  """``((loss, aux), grads)`` of :func:`member_loss`, over micro-batches.

  With ``spec.microbatch`` below the batch size (``config.microbatch_size``;
  the default is the whole batch), the costliest layers run on micro-batches of
  that many images in ``lax.scan``s that sum their gradients, so only a
  micro-batch's activations of those layers are live at a time, while the small
  layers in the middle run once on the whole batch, where their products are
  taller and faster. In order:

  1. whole batch, forward: the encoder's stem
     (:func:`capvae.models.encoder_stem`), the rest of the encoder, the
     sample and its KL, the decoder's head (:func:`capvae.models.decoder_head`);
  2. micro-batches: the decoder's tail and the reconstruction, forward and
     backward, down to the cotangent of the head's output;
  3. whole batch, backward: the head, the sample and the KL, the encoder down
     to the cotangent of the stem's output;
  4. micro-batches: the stem's backward, recomputing its forward.

  The gradient is the full batch's, exactly up to float rounding: the
  objective is a function of per-example statistics, linear in the
  reconstructions, so its gradient is ``Σ_b ∂rec_b·g_rec_b + ∂kl_b·g_kl_b``
  with weights ``g`` that step 1 fixes (the KL penalty can depend on the batch
  mean KL). The noise is the same draw as the full batch's.
  """
  b = x.shape[0]
  n = spec.microbatch or b
  if n >= b:
    return jax.value_and_grad(member_loss, has_aux=True)(params, model, hparams, step, x,
                                                         key, spec)
  input_size = int(np.prod(x.shape[1:]))
  def part(name):
    """Applies the encoder or decoder, or layers ``start … stop − 1`` of it
    (the MLPs take no ``start``/``stop``: for them both are 0 and None)."""
    def apply(p, v, start=0, stop=None):
      kw = dict(start=start) if start else {}
      kw.update(dict(stop=stop) if stop is not None else {})
      return getattr(model, name).apply({'params': p['params'][name]}, v, **kw)
    return apply

  encode, decode = part('encoder'), part('decoder')
  k, j = models.encoder_stem(model), models.decoder_head(model)
  split = lambda a: a.reshape(b // n, n, *a.shape[1:])
  merge = lambda a: a.reshape(b, *a.shape[2:])
  add = lambda *trees: jax.tree.map(lambda *a: sum(a[1:], a[0]), *trees)

  # 1. Whole batch, forward.
  stem = encode(params, x, stop=k) if k else x
  (mean, logvar), rest_vjp = jax.vjp(lambda p, s: encode(p, s, start=k), params, stem)
  eps = jax.random.normal(key, mean.shape, mean.dtype)
  (z, kl), sample_vjp = jax.vjp(
      lambda mean, logvar: (models.reparameterize(mean, logvar, eps),
                            losses.gaussian_kl(mean, logvar)), mean, logvar)
  if j:
    head, head_vjp = jax.vjp(lambda p, z: decode(p, z, stop=j), params, z)
  else:
    head = z
  w_rec, w_kl = jax.grad(
      lambda rec, kl: objective(spec, hparams, step, rec, kl, input_size)[0],
      argnums=(0, 1))(jnp.zeros((b,), kl.dtype), kl)

  # 2. Micro-batches: the decoder's tail and the reconstruction.
  def tail_loss(p, h, xs, w):
    rec = reconstruction(spec, decode(p, h, start=j), xs, hparams)
    return jnp.sum(w * rec), rec

  # Micro-batch i's cotangent is written over its own rows of the head, which
  # the scan has just read: a stacked output would be a fresh zeroed buffer.
  def tail(carry, micro):
    total, d_head, i = carry
    (_, rec), (grads, d) = jax.value_and_grad(tail_loss, (0, 1), has_aux=True)(
        params, jax.lax.dynamic_index_in_dim(d_head, i, 0, False), *micro)
    d_head = jax.lax.dynamic_update_index_in_dim(d_head, d, i, 0)
    return (add(total, grads), d_head, i + 1), rec

  (grads, d_head, _), rec = jax.lax.scan(
      tail, (jax.tree.map(jnp.zeros_like, params), split(head), jnp.int32(0)),
      (split(x), split(w_rec)))

  # 3. Whole batch, backward.
  d_head = merge(d_head)
  if j:
    g_head, dz = head_vjp(d_head)
    grads = add(grads, g_head)
  else:
    dz = d_head
  g_rest, d_stem = rest_vjp(sample_vjp((dz, w_kl)))
  grads = add(grads, g_rest)

  # 4. Micro-batches: the stem's backward.
  if k:
    def stem_grads(total, micro):
      xs, d = micro
      return add(total, jax.vjp(lambda p: encode(p, xs, stop=k), params)[1](d)[0]), None

    grads, _ = jax.lax.scan(stem_grads, grads, (split(x), split(d_stem)))
  return objective(spec, hparams, step, merge(rec), kl, input_size), grads


def batch_at(dataset: data.GroundTruthDataset, step, spec: StepSpec):
  """The batch of images every member sees at ``step`` (a pure function of it)."""
  key = jax.random.fold_in(jax.random.key(spec.data_seed), step)
  return dataset.render(dataset.sample_factors(key, spec.batch_size))


def _all_finite(*trees) -> jax.Array:
  """Whether every element of every leaf is finite, as one materialised flag.

  The flag is the smallest of the per-leaf flags, taken by a sort: XLA turns
  ``jnp.all`` of a stack of scalars into a chain of ``and``s, one per leaf,
  and fuses a copy of the chain into every elementwise update that reads the
  flag (burgess: ~60 leaves into ~90 fusions, which doubled the member step's
  compile time, 11.1 s against 6.5 s on CPU). A sort is not fused, so the chain
  is computed once.
  """
  leaves = [l for t in trees for l in jax.tree.leaves(t)]
  flags = jnp.stack([jnp.all(jnp.isfinite(l)) for l in leaves]).astype(jnp.int32)
  return jnp.sort(flags)[0] > 0


# Arrays of the state with at least this many elements are updated in place
# under a cond rather than chosen elementwise: XLA's CPU code for an in-place
# select on a donated buffer this big (out of cache) is several times slower
# than the update itself (mlp's 14 M parameters: 129 against 91 ms a step).
# Below it, the select costs nothing measurable, and the cond measured slower
# in the step (locatello: 58 against 63 ms).
IN_PLACE_SIZE = 1 << 20


def _pick(tree, mask):
  return [leaf for leaf, m in zip(jax.tree.leaves(tree), mask) if m]


def update_or_keep(update, state, live):
  """``update(*state)`` if ``live``, else ``state`` (a tuple of pytrees).

  Arrays below :data:`IN_PLACE_SIZE` elements take the new or the old value
  elementwise; bigger ones are updated in place under a ``lax.cond``, the
  update made again in its branch (so a check of the update made beforehand
  only reads them).
  """
  leaves, treedef = jax.tree.flatten(state)
  big = [leaf.size >= IN_PLACE_SIZE for leaf in leaves]
  chosen = [None if b else jnp.where(live, n, o)
            for n, o, b in zip(jax.tree.leaves(update(*state)), leaves, big)]
  if any(big):
    in_place = iter(jax.lax.cond(live, lambda s: _pick(update(*s), big),
                                 lambda s: _pick(s, big), state))
    chosen = [next(in_place) if b else c for c, b in zip(chosen, big)]
  return jax.tree.unflatten(treedef, chosen)


def make_member_step(model, spec: StepSpec, data_axis: str | None = None):
  """One member's update ``(state, x) -> (state, aux)`` on the shared batch ``x``.

  With ``data_axis``, ``x`` is this device's share of the batch, and the
  gradient is the whole batch's (:func:`data_parallel_grads`).

  An update whose loss, gradients or new parameters are not all finite is not
  applied: the member is frozen at its last finite parameters (see
  :class:`~capvae.train_state.TrainState`), and the other members are not
  touched by it.
  """
  opt_kwargs = dict(spec.optimizer_kwargs)

  def member_step(state: ts.TrainState, x):
    _, noise_key = ts.member_keys(state.hparams.seed)
    key = jax.random.fold_in(noise_key, state.step)
    grads_fn = (member_grads if data_axis is None else
                functools.partial(data_parallel_grads, axis=data_axis))
    (loss, aux), grads = grads_fn(state.params, model, state.hparams, state.step, x, key, spec)
    tx = ts.make_optimizer(state.hparams.learning_rate, **opt_kwargs)

    def update(params, opt_state):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    old = (state.params, state.opt_state)
    finite = _all_finite(loss, grads, update(*old)[0])
    live = finite & ~state.frozen
    params, opt_state = update_or_keep(update, old, live)
    frozen = state.frozen | ~finite
    frozen_step = jnp.where(state.frozen | finite, state.frozen_step, state.step)
    aux['grad_norm'] = optax.tree.norm(grads)
    aux['param_norm'] = optax.tree.norm(params)
    aux['frozen'] = frozen
    aux['frozen_step'] = frozen_step
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                        frozen=frozen, frozen_step=frozen_step)
    return new, aux

  return member_step


def resolve_microbatch(config) -> int:
  """Images per micro-batch: ``config.microbatch_size``, or for 0 (auto) the
  whole batch.

  Micro-batches trade bigger products and one pass over the stem for
  activations that stay in cache. On a 2-core AVX2 machine the whole batch was
  faster for every model and batch measured (burgess at 64 images: 0.84–0.94×
  the step with micro-batches of 16; at 256: 0.87×; locatello at 64: 0.87×);
  on a 2-core AVX-512 machine micro-batches of 16 were slightly faster for the
  conv models (burgess at 64: 0.92–1.0×, at 256: 0.93×). The default is the
  whole batch everywhere; micro-batches bound the activations' memory.
  """
  return int(config.get('microbatch_size', 0)) or int(config.batch_size)


def resolve_member_loop(member_loop: str, platform: str | None = None) -> str:
  """``'auto'`` is ``'map'`` on CPU and ``'vmap'`` on GPU and TPU."""
  if member_loop != 'auto':
    return member_loop
  platform = platform or jax.default_backend()
  return 'map' if platform == 'cpu' else 'vmap'


def make_mesh(devices=None, data_shards: int = 1) -> jax.sharding.Mesh:
  """A ``('member', 'data')`` mesh over ``devices`` (default: all, every host).

  Members are split over the ``'member'`` axis; each member's batch is split
  over the ``data_shards`` consecutive devices of a ``'data'`` row (1: every
  device trains its members on the whole batch).
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  if data_shards < 1 or devices.size % data_shards:
    raise ValueError(f'data_shards = {data_shards} must divide the {devices.size} device(s).')
  return jax.sharding.Mesh(devices.reshape(-1, data_shards), ('member', 'data'))


def member_rows_of(mesh: jax.sharding.Mesh) -> int:
  """How many devices hold different members (the member axis's size)."""
  return mesh.shape['member']


def _loop_members(member_step, states, x):
  """``lax.map(lambda s: member_step(s, x), states)``, in place, the same program for any count.

  ``member_step(state, x) -> (state, aux)``; ``x`` (the batch) is shared by
  all members. The loop carries the stacked states and writes each member's
  new state over its old row (no copy of the stack: the program's input is
  donated). A member's result must not depend on how many members share its
  device (member i of a sweep ends bit for bit where a single run ends). XLA
  specialises a loop of one trip and a slice of an axis of length one, and
  would then fuse the member's arithmetic with the slicing differently; so the
  trip count is opaque to the compiler and the member's step sits between
  optimisation barriers. The loop body is then the same program for any count.

  ``x`` enters the member's step through the first barrier, with the state.
  Otherwise XLA hoists the member's first use of it out of the loop (the
  whole-batch padding of the first convolution) and fuses the batch's renderer
  into that, so the batch is computed twice (burgess: 1.75 ms for the fused
  padding against 0.2 for the render alone, 3 % of the step).
  """
  num = jax.tree.leaves(states)[0].shape[0]
  trips = num + jnp.minimum(states.step[0], 0)  # == num: steps are never negative
  # Traced once (the loop needs the shapes of its outputs before its body).
  one = lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
  closed, out_shape = jax.make_jaxpr(member_step, return_shape=True)(
      jax.tree.map(one, states), jax.ShapeDtypeStruct(x.shape, x.dtype))
  out_tree, aux_shape = jax.tree.structure(out_shape), out_shape[1]
  traced_step = lambda *args: jax.tree.unflatten(
      out_tree, jax.extend.core.jaxpr_as_fun(closed)(*jax.tree.leaves(args)))
  aux = jax.tree.map(lambda s: jnp.zeros((num, *s.shape), s.dtype), aux_shape)

  def body(i, carry):
    states, aux = carry
    state = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, False), states)
    new, out = jax.lax.optimization_barrier(traced_step(*jax.lax.optimization_barrier((state, x))))
    put = lambda buf, o: jax.lax.dynamic_update_index_in_dim(buf, o, i, 0)
    return jax.tree.map(put, states, new), jax.tree.map(put, aux, out)

  return jax.lax.fori_loop(0, trips, body, (states, aux))


def make_train_step(model, spec: StepSpec, member_loop: str = 'map',
                    mesh: jax.sharding.Mesh | None = None):
  """Returns the pure step ``(states, dataset) -> (states, metrics)``.

  ``states`` is a :class:`TrainState` stacked on a leading member axis, which
  is split over the devices of ``mesh`` (``shard_map``; no communication: the
  members are independent, and every device renders the shared batch itself).
  On each device the local members run one after another (``'map'``: each is
  computed exactly as a single run computes it, so a member's result does not
  depend on the others, bit for bit) or batched (``'vmap'``: fewer, larger
  kernels, which is what an accelerator wants).

  The step's randomness is a function of ``(data_seed, step)`` for the batch and
  ``(member seed, step)`` for the reparameterisation noise, so resuming from a
  checkpoint replays exactly the same stream.
  """
  data_axis = 'data' if mesh is not None and mesh.shape.get('data', 1) > 1 else None
  member_step = make_member_step(model, spec, data_axis)
  member_loop = resolve_member_loop(member_loop)

  def local_step(states: ts.TrainState, dataset):
    # Members always advance together, so the first one's step is everyone's.
    # Rendered once, on its own: fused into the first layer, XLA recomputes it per use.
    x = batch_at(dataset, states.step[0], spec)
    if data_axis is not None:  # this device's share of the batch
      n = x.shape[0] // mesh.shape[data_axis]
      x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(data_axis) * n, n)
    x = jax.lax.optimization_barrier(x)
    if member_loop == 'vmap':
      return jax.vmap(member_step, in_axes=(0, None))(states, x)
    return _loop_members(member_step, states, x)

  if mesh is None:
    return local_step
  member = jax.sharding.PartitionSpec('member')
  return jax.shard_map(local_step, mesh=mesh,
                       in_specs=(member, jax.sharding.PartitionSpec()),
                       out_specs=member, check_vma=False)


def init_states(model, hparams: ts.Hparams, observation_shape, spec: StepSpec):
  """Stacked fresh states for the member table ``hparams`` (``[M]`` arrays)."""
  example = jnp.zeros((1, *observation_shape), jnp.float32)
  opt_kwargs = dict(spec.optimizer_kwargs)
  return jax.vmap(lambda h: ts.create(model, h, example, opt_kwargs))(hparams)


# --------------------------------------------------------------------------
# Workdir bookkeeping.
# --------------------------------------------------------------------------


def _config_dict(config) -> dict[str, Any]:
  return json.loads(config.to_json())


def check_workdir(workdir: str, config) -> dict[str, Any] | None:
  """Refuses a workdir that holds another run; returns its saved config if any.

  Nothing in the workdir is written or removed here.
  """
  new = _config_dict(config)
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    diffs = config_lib.differences(saved, new)
    if diffs:
      raise config_lib.ConfigError(
          f'workdir {workdir!r} holds a run with a different config; its'
          ' checkpoints are left untouched. Use another --workdir, or the saved'
          ' config. Differences (saved -> new):\n  ' + '\n  '.join(diffs))
    return saved
  if os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    raise config_lib.ConfigError(
        f'workdir {workdir!r} has checkpoints but no {CONFIG_FILE}; refusing to'
        ' guess which run they belong to. Use another --workdir.')
  return None


def _to_python(v):
  """A JSON-ready value; non-finite floats become ``None`` (JSON has no NaN)."""
  v = np.asarray(v)
  if v.dtype.kind == 'f':
    clean = lambda e: e if math.isfinite(e) else None
    return [clean(e) for e in v.tolist()] if v.ndim else clean(v.item())
  return v.tolist() if v.ndim else v.item()


def metric_rows(step: int, member_rows, metrics, steps_per_sec: float):
  """One JSON-ready row per member: its id, hyperparameters and metrics.

  ``metrics`` are host arrays with a leading member axis; rows beyond
  ``len(member_rows)`` (padding) are dropped.
  """
  rows = []
  for i, member in enumerate(member_rows):
    row = {'step': step, **member}
    row.update({k: _to_python(v[i]) for k, v in metrics.items()})
    row['steps_per_sec'] = steps_per_sec
    rows.append(row)
  return rows


def _fetch(tree):
  """Host copies of (possibly multi-host) global arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _format_duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class _Preemption:
  """Turns SIGTERM / SIGINT into a flag the loop polls (then saves and stops)."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    logging.warning('Received signal %d: saving a checkpoint and stopping.', signum)
    # A second signal falls through to the default behaviour.
    signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


# --------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------


def _manager(workdir: str, chunk: int, keep: int | None = None, create=True):
  path = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR, f'chunk_{chunk:03d}'))
  return ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create),
      item_handlers=ocp.StandardCheckpointHandler())


def _saved_rows(mngr, step: int) -> int:
  """The length of the member axis in a saved checkpoint."""
  meta = mngr.item_metadata(step)
  return int(getattr(meta, 'tree', meta)['step'].shape[0])


def _restore(mngr, step: int, target):
  """``mngr.restore`` into ``target``. A checkpoint saved before a hyperparameter
  of :data:`train_state.LATER_HPARAMS` existed is read without it, and the
  field is filled with the value such runs used."""
  meta = mngr.item_metadata(step)
  saved = getattr(meta, 'tree', meta)['hparams']
  missing = [k for k in ts.LATER_HPARAMS if k not in saved]
  if not missing:
    return mngr.restore(step, args=ocp.args.StandardRestore(target))
  fields = {k: getattr(target.hparams, k) for k in ts.HPARAM_NAMES if k not in missing}
  states = mngr.restore(step, args=ocp.args.StandardRestore(target.replace(hparams=fields)))
  for k in missing:
    a = getattr(target.hparams, k)
    fields = dict(states.hparams)
    fields[k] = jax.device_put(np.full(a.shape, ts.LATER_HPARAMS[k], a.dtype), a.sharding)
    states = states.replace(hparams=fields)
  return states.replace(hparams=ts.Hparams(**states.hparams))


def _with_sharding(abstract, rows: int, sharding):
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((rows, *a.shape[1:]), a.dtype, sharding=sharding),
      abstract)


def relayout(states, num_real: int, rows: int):
  """The first ``num_real`` members of ``states``, padded to ``rows`` with copies
  of the last one (the layout :func:`sweep.pad` gives fresh states)."""
  def fix(x):
    x = x[:num_real]
    return jnp.concatenate([x, jnp.repeat(x[-1:], rows - num_real, axis=0)])
  return jax.tree.map(fix, states)


def restore_states(mngr, step: int, abstract, num_real: int, mesh):
  """Restores a chunk saved on any device count into this mesh's layout."""
  member = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('member'))
  rows = jax.tree.leaves(abstract)[0].shape[0]
  saved = _saved_rows(mngr, step)
  if saved == rows:
    return _restore(mngr, step, _with_sharding(abstract, rows, member))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  states = _restore(mngr, step, _with_sharding(abstract, saved, replicated))
  return jax.jit(lambda s: relayout(s, num_real, rows), out_shardings=member)(states)


CORRUPT_DIR = 'corrupt'


def _move_aside(workdir: str, chunk: int, step: int) -> str:
  """Moves checkpoint ``step`` of ``chunk`` to ``checkpoints/corrupt/chunk_NNN/``
  (never deleting it); returns where it went."""
  src = os.path.join(workdir, CHECKPOINT_DIR, f'chunk_{chunk:03d}', str(step))
  dst_dir = os.path.join(workdir, CHECKPOINT_DIR, CORRUPT_DIR, f'chunk_{chunk:03d}')
  os.makedirs(dst_dir, exist_ok=True)
  dst, n = os.path.join(dst_dir, str(step)), 0
  while os.path.exists(dst):
    n += 1
    dst = os.path.join(dst_dir, f'{step}.{n}')
  os.replace(src, dst)
  return dst


def restore_newest_readable(workdir: str, chunk: int, keep: int, abstract, num_real: int,
                            mesh):
  """``(manager, states, step)`` of chunk ``chunk`` from its newest checkpoint
  that restores; ``(manager, None, 0)`` if it has none.

  A checkpoint that fails to restore (truncated or emptied files, missing
  metadata) is moved aside to ``checkpoints/corrupt/``, with a warning, once an
  older one has restored; if none restores, nothing is moved and the run is
  refused with :class:`ConfigError`.
  """
  mngr = _manager(workdir, chunk, keep)
  failed = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      states = restore_states(mngr, step, abstract, num_real, mesh)
    except Exception as e:  # pylint: disable=broad-except  # orbax, tensorstore, json
      failed.append((step, f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'))
      continue
    if failed:
      mngr.close()
      for bad, why in failed:
        where = _move_aside(workdir, chunk, bad) if jax.process_index() == 0 else '?'
        logging.warning('Chunk %d: checkpoint %d could not be read (%s); moved it to %s and'
                        ' resumed from step %d.', chunk, bad, why[:300], where, step)
      _barrier(f'capvae:corrupt:{chunk}')
      mngr = _manager(workdir, chunk, keep)
    return mngr, states, step
  if failed:
    mngr.close()
    raise config_lib.ConfigError(
        f'{os.path.join(workdir, CHECKPOINT_DIR, f"chunk_{chunk:03d}")}: no checkpoint'
        f' could be read (steps {", ".join(str(s) for s, _ in failed)}; the newest failed'
        f' with {failed[0][1][:300]}). Nothing was moved or deleted. Check the files (a'
        ' full disk? a partial copy?), or train in a new --workdir.')
  return mngr, None, 0


def build_program(model, spec: StepSpec, dataset, mesh, member_loop: str):
  """``(init, train_step, dataset)`` placed on ``mesh``: what a run executes.

  ``init(hparams)`` gives stacked fresh states split over the member axis;
  ``train_step(states, dataset)`` is the jitted step (states donated);
  ``dataset`` is replicated on every device.
  """
  P = jax.sharding.PartitionSpec
  member = jax.sharding.NamedSharding(mesh, P('member'))
  dataset = jax.device_put(dataset, jax.sharding.NamedSharding(mesh, P()))
  init = jax.jit(lambda h: init_states(model, h, dataset.observation_shape, spec),
                 out_shardings=member)
  train_step = jax.jit(make_train_step(model, spec, member_loop, mesh),
                       donate_argnums=0)
  return init, train_step, dataset


class Prefetcher:
  """Feeds a streamed dataset (``dataset.streamed``) to the step, a few steps ahead.

  The batch of step ``s`` is ``dataset.batch(data_seed, s, batch_size)``, a pure
  function of the step; a background thread reads, decodes and places the
  next ``ahead`` batches while the device trains. Datasets held on the device
  need none of this: the step renders their batches itself.
  """

  def __init__(self, dataset, spec: StepSpec, sharding, start: int, stop: int,
               ahead: int = 4):
    import queue
    import threading
    self._queue = queue.Queue(maxsize=ahead)
    self._done = threading.Event()
    self.wait_seconds = 0.0

    def produce():
      try:
        for s in range(start, stop):
          item = jax.device_put(dataset.batch(spec.data_seed, s, spec.batch_size), sharding)
          while not self._done.is_set():
            try:
              self._queue.put((s, item), timeout=0.1)
              break
            except queue.Full:
              continue
          if self._done.is_set():
            return
      except BaseException as e:  # pylint: disable=broad-except
        self._queue.put((None, e))

    self._thread = threading.Thread(target=produce, name='capvae-prefetch', daemon=True)
    self._thread.start()

  def __call__(self, step: int):
    t0 = time.perf_counter()
    s, item = self._queue.get()
    self.wait_seconds += time.perf_counter() - t0
    if s is None:
      raise item
    assert s == step, (s, step)
    return item

  def close(self) -> None:
    self._done.set()
    self._thread.join(timeout=10)


def _flag_frozen(rows, warned: set[int]) -> None:
  for r in rows:
    if r['frozen'] and r['member'] not in warned:
      warned.add(r['member'])
      hp = {k: r[k] for k in ts.HPARAM_NAMES}
      logging.warning(
          'Member %d diverged at step %d (non-finite loss, gradient or parameter):'
          ' frozen at its last finite parameters; the other members train on.'
          ' Hyperparameters: %s', r['member'], r['frozen_step'], hp)


def keep_freed_memory() -> bool:
  """Makes glibc keep freed buffers for reuse instead of handing them back.

  XLA's CPU client allocates each execution's temporaries as one block with
  ``malloc`` and frees it at the end (a Burgess step at batch 64: 37 MB; mlp
  more). glibc serves a block above its mmap threshold, which cannot be set
  above 32 MiB, with a fresh ``mmap`` and returns it with ``munmap`` when it is
  freed, so every step faulted all of its pages in again: 9,100 minor faults
  and ~35 ms of system time a Burgess step on 2 cores, 21,500 and ~80 ms an mlp
  step. Below the threshold, its adaptive threshold and heap trimming did the
  same for the first hundred or so steps of a process. So: no ``mmap`` for
  allocations (every block comes from the heap), one arena (a thread's own
  arena is itself mapped, in heaps of at most 64 MiB, and unmapped when it
  empties), and no trimming of the heap below 1 GiB free. Once the heap has
  grown to the program's working size (a few steps), a step faults no page
  in. Best called before JAX starts its threads (``capvae.main`` does): arenas
  made before stay in use. Returns whether it applied (glibc only).
  """
  try:
    libc = ctypes.CDLL('libc.so.6')
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_arena_max, 1) and
                libc.mallopt(m_trim_threshold, 1 << 30))
  except (OSError, AttributeError):  # not glibc
    return False


def train_and_evaluate(config, workdir: str) -> ts.TrainState:
  """Trains the members of ``config`` in ``workdir``; resumes if it holds them.

  Chunks of members train one after another (all members at once unless
  ``config.chunk_size`` is set); each chunk's stacked state is split over all
  devices of all processes.

  Returns:
    The final stacked train state of the last chunk trained (members of a
    one-chunk run, plus any padding rows).
  """
  # Everything that can reject the run happens before anything is written.
  config_lib.validate(config)
  keep_freed_memory()
  dataset = data.get(config.dataset, config.dataset_path,
                 config.get('dataset_split', 'train'))
  config_lib.check_against_dataset(config, dataset)
  resuming = check_workdir(workdir, config) is not None
  config_lib.check_devices(config, len(jax.devices()), jax.process_count())
  streamed = getattr(dataset, 'streamed', False)
  if streamed and jax.process_count() > 1:
    raise config_lib.ConfigError(
        f'config.dataset = {config.dataset!r} is streamed from the host (too large for the'
        ' device); streaming runs in a single process only.')

  spec = StepSpec.from_config(config)
  member_rows = sweep.members(config)
  model = models.get(config.model, config.latent_size, dataset.observation_shape,
                     config.get('init', 'lecun'))
  mesh = make_mesh(jax.devices()[:config.num_devices or None], config.get('data_shards', 1))
  rows = sweep.padded_size(len(member_rows), config.chunk_size, member_rows_of(mesh))
  primary = jax.process_index() == 0

  def write_config():
    if primary:
      os.makedirs(workdir, exist_ok=True)
      workdir_lib.write_json(os.path.join(workdir, CONFIG_FILE), _config_dict(config))
      workdir_lib.write_json(os.path.join(workdir, MEMBERS_FILE), member_rows)
    _barrier('capvae:workdir')

  # A new run writes its config first (a workdir with checkpoints but no config
  # is refused); a resumed one rewrites it (new bookkeeping values) only once
  # its first checkpoint has been restored.
  if not resuming:
    write_config()

  stream = dataset if streamed else None
  if streamed:  # the step sees one batch at a time; compile with step 0's
    dataset = stream.batch(spec.data_seed, 0, spec.batch_size)
  init, train_step, dataset = build_program(model, spec, dataset, mesh,
                                            config.member_loop)
  logging.info('%d member(s) in %d chunk(s) of %d rows over %d device(s) (%d'
               ' process(es)); members run by %s.', len(member_rows),
               len(sweep.chunks(len(member_rows), config.chunk_size)), rows, mesh.size,
               jax.process_count(), resolve_member_loop(config.member_loop))
  metrics_path = os.path.join(workdir, METRICS_FILE)
  compiled, states = None, None
  for chunk, ids in enumerate(sweep.chunks(len(member_rows), config.chunk_size)):
    chunk_rows = [member_rows[i] for i in ids]
    hparams = sweep.stack(sweep.pad(chunk_rows, rows))
    mngr, states, step = restore_newest_readable(
        workdir, chunk, config.keep_checkpoints, jax.eval_shape(init, hparams),
        len(chunk_rows), mesh)
    try:
      if states is None:
        states, step = init(hparams), 0
      else:
        logging.info('Chunk %d: resumed at step %d.', chunk, step)
      if resuming and chunk == 0:
        write_config()
      if primary:
        workdir_lib.truncate_metrics(metrics_path, ids, step)
      _barrier(f'capvae:chunk{chunk}:{step}')
      if step >= config.num_steps:
        logging.info('Chunk %d: nothing to do (step %d >= num_steps %d).', chunk,
                     step, config.num_steps)
        continue
      if compiled is None:
        t0 = time.perf_counter()
        compiled = train_step.lower(states, dataset).compile()
        logging.info('Compiled the train step for %d row(s) in %.1fs.', rows,
                     time.perf_counter() - t0)
      feed = None
      if streamed:
        feed = Prefetcher(stream, spec, jax.tree.leaves(dataset)[0].sharding, step,
                          config.num_steps)
      try:
        states, stopped = _train_chunk(config, compiled, states, feed or dataset, step,
                                       mngr, chunk_rows, metrics_path if primary else None)
      finally:
        if feed is not None:
          feed.close()
          logging.info('Chunk %d: the step waited %.1f s for streamed batches.', chunk,
                       feed.wait_seconds)
    finally:
      # Also on an error: let an in-flight save finish so no checkpoint is torn.
      mngr.wait_until_finished()
      mngr.close()
    if stopped:
      break
  return states


def _train_chunk(config, compiled, states, dataset, step, mngr, chunk_rows,
                 metrics_path):
  """Trains one chunk from ``step`` to ``config.num_steps``; True if stopped early.

  ``dataset`` is the placed dataset, or a :class:`Prefetcher` giving each step's.
  """
  num_steps = config.num_steps
  multi = jax.process_count() > 1
  warned: set[int] = set()
  log_file = open(metrics_path, 'a') if metrics_path else contextlib.nullcontext()
  with _Preemption() as preemption, log_file as log:
    t_start, step_start = time.perf_counter(), step
    t_last, step_last = t_start, step
    while step < num_steps:
      # Metrics are those of the update *at* optimizer step `step` (C, loss,
      # noise and batch all indexed by it); the state then moves to step + 1.
      states, metrics = compiled(states, dataset(step) if callable(dataset) else dataset)
      logged = step
      step += 1
      log_now = logged % config.log_every == 0 or step == num_steps
      stop = mngr.reached_preemption(step)
      if multi:  # a signal reaches one process: agree at log steps
        stop = stop or (log_now and _any_process(preemption.requested))
      else:
        stop = stop or preemption.requested
      if log_now or stop:
        metrics = _fetch(metrics)
        now = time.perf_counter()
        rate = (step - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        rows = metric_rows(logged, chunk_rows, metrics, rate)
        _flag_frozen(rows, warned)
        if all(r['frozen'] for r in rows):
          raise FloatingPointError(
              f'Every member diverged (member(s) {[r["member"] for r in rows]},'
              f' by step {logged}); nothing is saved past the last checkpoint.')
        if log is not None and log_now:  # a stop off the log grid adds no row
          for row in rows:
            log.write(json.dumps(row) + '\n')
          log.flush()
        mean_rate = (step - step_start) / max(now - t_start, 1e-9)
        live = [r for r in rows if not r['frozen']]
        r0 = live[0]
        logging.info(
            'step %d/%d  member %d: loss %.2f  rec %.2f  kl %.2f  C %.2f  |'
            '  %d/%d live  %.2f steps/s, %s left', logged, num_steps, r0['member'],
            r0['loss'], r0['rec'], r0['kl'], r0['c'], len(live), len(rows), rate,
            _format_duration((num_steps - step) / mean_rate))
      if step % config.checkpoint_every == 0 or step == num_steps or stop:
        mngr.save(step, args=ocp.args.StandardSave(states))
      if stop:
        logging.warning('Stopped at step %d; rerun the same command to resume.', step)
        return states, True
  return states, False


# --------------------------------------------------------------------------
# One member out of a sweep.
# --------------------------------------------------------------------------


def load_config(workdir: str):
  """The config a workdir was trained with (its ``config.json``)."""
  import ml_collections
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise config_lib.ConfigError(f'{path} does not exist: not a capvae workdir.')
  with open(path) as f:
    config = json.load(f)
  for k, v in config_lib.LATER_FIELDS.items():
    config.setdefault(k, v)
  return ml_collections.ConfigDict(config)


def load_chunk(workdir: str, chunk: int, ids, member_rows, model, dataset,
               spec: StepSpec, step: int | None = None):
  """``(states, step)``: chunk ``chunk``'s saved stack (every saved row, padding
  included) at ``step`` (default: the latest), restored on one device."""
  mngr = _manager(workdir, chunk, create=False)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
      raise config_lib.ConfigError(
          f'{workdir}: no checkpoint {"" if step is None else step} for chunk {chunk}'
          f' (members {ids[0]}..{ids[-1]}); saved steps: {list(mngr.all_steps())}.')
    hparams = sweep.stack([member_rows[i] for i in ids])
    abstract = jax.eval_shape(
        lambda h: init_states(model, h, dataset.observation_shape, spec), hparams)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    try:
      states = _restore(mngr, step, _with_sharding(abstract, _saved_rows(mngr, step), one))
    except Exception as e:  # pylint: disable=broad-except  # orbax, tensorstore, json
      raise config_lib.ConfigError(
          f'{workdir}: checkpoint {step} of chunk {chunk} could not be read'
          f' ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}).'
          ' Rerun training in this workdir to move it aside and resume from an older'
          ' one.') from None
  finally:
    mngr.close()
  return states, step


def load_member(workdir: str, member: int, step: int | None = None):
  """``(config, model, state, row)`` of one member of a trained workdir.

  ``state`` is that member's un-stacked :class:`TrainState` at checkpoint
  ``step`` (default: the latest), ``row`` its line of the member table, and
  ``model`` the Flax module (``model.apply(state.params, x, key)``).
  """
  config = load_config(workdir)
  with open(os.path.join(workdir, MEMBERS_FILE)) as f:
    member_rows = json.load(f)
  try:
    chunk, row = sweep.locate(member, len(member_rows), config.chunk_size)
  except IndexError as e:
    raise config_lib.ConfigError(f'--member: {e}') from None
  dataset = data.get(config.dataset, config.dataset_path,
                 config.get('dataset_split', 'train'))
  spec = StepSpec.from_config(config)
  model = models.get(config.model, config.latent_size, dataset.observation_shape,
                     config.get('init', 'lecun'))
  ids = sweep.chunks(len(member_rows), config.chunk_size)[chunk]
  states, _ = load_chunk(workdir, chunk, ids, member_rows, model, dataset, spec, step)
  state = jax.tree.map(lambda a: a[row], states)
  return config, model, state, member_rows[member]


def extract_member(workdir: str, member: int, out: str, step: int | None = None) -> str:
  """Writes member ``member`` of ``workdir`` as a stand-alone one-member run.

  ``out`` gets a config (the member's hyperparameters, no sweep), a member
  table of one row and a checkpoint at the same step, so it can be evaluated
  or trained further like any single run:
  ``python -m capvae.main --config configs/from_workdir.py:OUT --workdir OUT``.
  ``out`` must not exist yet: nothing is ever overwritten.
  """
  config, _, state, row = load_member(workdir, member, step)
  if os.path.exists(out):
    raise config_lib.ConfigError(f'--out {out!r} exists; give a new directory.')
  config.unlock()
  for name in ts.HPARAM_NAMES:
    config[name] = row[name]
  config.sweep = {'product': {}, 'zip': {}}
  config.chunk_size = 0
  saved_step = int(state.step)
  os.makedirs(out)
  workdir_lib.write_json(os.path.join(out, CONFIG_FILE), _config_dict(config))
  workdir_lib.write_json(os.path.join(out, MEMBERS_FILE), [dict(row, member=0)])
  workdir_lib.write_json(os.path.join(out, 'extracted_from.json'),
              {'workdir': os.path.abspath(workdir), 'member': member, 'step': saved_step})
  mngr = _manager(out, 0)
  try:
    mngr.save(saved_step, args=ocp.args.StandardSave(
        jax.tree.map(lambda a: jnp.asarray(a)[None], state)))
    mngr.wait_until_finished()
  finally:
    mngr.close()
  return out
