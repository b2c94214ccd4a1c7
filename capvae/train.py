"""The member step and the training loop.

``make_member_step`` is one member's update on a batch: the objective's
gradient (of the whole batch, or assembled from the devices' shares of it),
Adam, and the guarded update that freezes a member whose update is not
finite. ``make_train_step`` runs it over a stack of members on
a device mesh (:func:`capvae.parallel.over_members`); it is jitted once, with
hyperparameter values traced.

``train_and_evaluate(config, workdir)`` validates the config, restores or
creates the stacked state of each chunk of members (:mod:`capvae.workdir`),
trains, logs ``metrics.jsonl`` and checkpoints with orbax, resuming exactly
after a stop or a preemption signal, on one process or many
(``jax.distributed``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from capvae import config_lib, data, losses, models, parallel, sweep, tracking
from capvae import backend, progress
from capvae import train_state as ts
from capvae import workdir as workdir_lib
from capvae.data.prefetch import Prefetcher
from capvae.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The static (shape- or program-changing) part of a run's config."""
  objective: losses.Objective
  batch_size: int
  data_seed: int
  optimizer_kwargs: tuple[tuple[str, float], ...]

  @classmethod
  def from_config(cls, config, num_examples: int = 0) -> 'StepSpec':
    """``num_examples``: the dataset's size (the 'mss' estimator's N)."""
    return cls(
        objective=config_lib.objective(config, num_examples),
        batch_size=int(config.batch_size),
        data_seed=int(config.data_seed),
        optimizer_kwargs=tuple(ts.optimizer_kwargs(config).items()),
    )


def batch_stats(params, model, hparams: ts.Hparams, x, eps, spec: StepSpec) -> losses.Stats:
  """The per-example statistics of images ``x`` with reparameterisation noise ``eps``."""
  out, mean, logvar = model.apply(params, x, eps, method='with_noise')
  return losses.Stats(rec=spec.objective.reconstruction_loss(out, x, hparams), mean=mean,
                      logvar=logvar, z=models.reparameterize(mean, logvar, eps))


def member_loss(params, model, hparams: ts.Hparams, step, x, key, spec: StepSpec,
                objective_state=None):
  """One member's ``(loss, aux)`` on batch ``x`` at optimizer step ``step``;
  ``aux['stats']`` holds the batch's :class:`~capvae.losses.Stats`."""
  stats = batch_stats(params, model, hparams, x,
                      models.noise(key, x.shape[0], model.encoder.latent_size), spec)
  loss, aux = spec.objective(hparams, step, stats, int(np.prod(x.shape[1:])),
                             objective_state)
  return loss, dict(aux, stats=stats)


def data_parallel_grads(params, model, hparams: ts.Hparams, step, x, key, spec: StepSpec,
                        axis: str, objective_state=None):
  """``((loss, aux), grads)`` of the whole batch, from this device's share ``x`` of it.

  The devices along mesh axis ``axis`` each hold an equal, consecutive share of
  the batch (device ``d`` of ``D``: images ``d·n … (d+1)·n − 1``). Each runs the
  network forward on its share and keeps the per-example statistics
  (:class:`~capvae.losses.Stats`: reconstruction, posterior mean and
  log-variance, sample); these are gathered, and every device evaluates the
  objective on the whole batch's statistics, so the loss, C's penalty (which
  can depend on the batch mean KL), the covariances, the total correlation and
  the metrics are the whole batch's. Every objective is a function of
  per-example statistics, so its gradient is ``Σ_b Σ_s ∂s_b·g_s_b``: each
  device takes the backward pass of its own images with their weights ``g``
  and the parameter gradients are summed over ``axis``. Each image gets the
  noise it gets in the whole batch's draw. The result is the whole batch's
  gradient up to float rounding (the sum over images runs in another order).
  ``aux['stats']`` holds the whole batch's statistics.
  """
  n = x.shape[0]
  d = jax.lax.axis_index(axis)
  b = n * jax.lax.axis_size(axis)
  mine = lambda a: jax.lax.dynamic_slice_in_dim(a, d * n, n)
  eps = mine(models.noise(key, b, model.encoder.latent_size))
  stats, stats_vjp = jax.vjp(lambda p: batch_stats(p, model, hparams, x, eps, spec), params)
  gathered = jax.tree.map(lambda a: jax.lax.all_gather(a, axis, tiled=True), stats)
  (loss, aux), weights = jax.value_and_grad(
      lambda st: spec.objective(hparams, step, st, int(np.prod(x.shape[1:])),
                                objective_state),
      has_aux=True)(gathered)
  grads = jax.lax.psum(stats_vjp(jax.tree.map(mine, weights))[0], axis)
  return (loss, dict(aux, stats=gathered)), grads


def batch_at(dataset: data.GroundTruthDataset, step, spec: StepSpec):
  """The batch of images every member sees at ``step`` (a pure function of it)."""
  key = jax.random.fold_in(jax.random.key(spec.data_seed), step)
  return dataset.render(dataset.sample_factors(key, spec.batch_size))


def _all_finite(*trees) -> jax.Array:
  """Whether every element of every leaf is finite, as one materialised flag.

  The flag is the smallest of the per-leaf flags, taken by a sort: XLA turns
  ``jnp.all`` of a stack of scalars into a chain of ``and``s, one per leaf,
  and fuses a copy of the chain into every elementwise update that reads the
  flag (for burgess, ~60 leaves into ~90 fusions, which nearly doubled the
  member step's compile time). A sort is not fused, so the chain is computed
  once.
  """
  leaves = [l for t in trees for l in jax.tree.leaves(t)]
  flags = jnp.stack([jnp.all(jnp.isfinite(l)) for l in leaves]).astype(jnp.int32)
  return jnp.sort(flags)[0] > 0


# Arrays of the state with at least this many elements are updated in place
# under a cond rather than chosen elementwise: XLA's CPU code for an in-place
# select on a donated buffer this big (out of cache) is several times slower
# than the update itself, a third of mlp's step. Below it, the select costs
# nothing measurable and the cond measured slower. Either way the update is
# the same function (tests/test_train.py).
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

  An update whose loss, gradients, new parameters or new objective state are
  not all finite is not applied: the member is frozen at its last finite parameters (see
  :class:`~capvae.train_state.TrainState`), and the other members are not
  touched by it.
  """
  opt_kwargs = dict(spec.optimizer_kwargs)

  def member_step(state: ts.TrainState, x):
    _, noise_key = ts.member_keys(state.hparams.seed)
    key = jax.random.fold_in(noise_key, state.step)
    grads_fn = (jax.value_and_grad(member_loss, has_aux=True) if data_axis is None else
                functools.partial(data_parallel_grads, axis=data_axis))
    (loss, aux), grads = grads_fn(state.params, model, state.hparams, state.step, x, key,
                                  spec, objective_state=state.objective_state)
    stats = aux.pop('stats')
    tx = ts.make_optimizer(state.hparams.learning_rate, **opt_kwargs)
    objective_key = jax.random.fold_in(ts.objective_key(state.hparams.seed), state.step)

    # The objective's own step (a discriminator's, a controller's) reads the
    # batch's statistics, not the parameters: made once, kept or refused with them.
    new_objective_state, objective_aux = spec.objective.update(
        state.hparams, state.step, stats, state.objective_state, objective_key)

    def update(params, opt_state, objective_state):
      del objective_state
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, new_objective_state

    old = (state.params, state.opt_state, state.objective_state)
    finite = _all_finite(loss, grads, update(*old)[0], new_objective_state)
    live = finite & ~state.frozen
    params, opt_state, objective_state = update_or_keep(update, old, live)
    frozen_step = jnp.where(state.frozen | finite, state.frozen_step, state.step)
    aux.update(objective_aux)
    aux['grad_norm'] = optax.tree.norm(grads)
    aux['param_norm'] = optax.tree.norm(params)
    aux['frozen'] = frozen_step >= 0
    aux['frozen_step'] = frozen_step
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                        frozen_step=frozen_step, objective_state=objective_state)
    return new, aux

  return member_step


def make_train_step(model, spec: StepSpec, member_loop: str = 'map',
                    mesh: jax.sharding.Mesh | None = None):
  """Returns the pure step ``(states, dataset) -> (states, metrics)``.

  ``states`` is a :class:`TrainState` stacked on a leading member axis, split
  over the devices of ``mesh``; every member sees the same batch
  (:func:`batch_at`) and takes :func:`make_member_step`'s update, one after
  another (``'map'``: bit for bit a single run's) or batched (``'vmap'``); see
  :func:`capvae.parallel.over_members`.

  The step's randomness is a function of ``(data_seed, step)`` for the batch and
  ``(member seed, step)`` for the reparameterisation noise, so resuming from a
  checkpoint replays exactly the same stream.
  """
  member_step = make_member_step(model, spec, parallel.data_axis_of(mesh))
  return parallel.over_members(member_step, lambda ds, step: batch_at(ds, step, spec),
                               member_loop, mesh)


def init_states(model, hparams: ts.Hparams, observation_shape, spec: StepSpec):
  """Stacked fresh states for the member table ``hparams`` (``[M]`` arrays)."""
  return ts.create_stack(model, hparams, observation_shape, dict(spec.optimizer_kwargs),
                         spec.objective)


# --------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------


def _to_python(v):
  """A JSON-ready value; non-finite floats become ``None`` (JSON has no NaN)."""
  v = np.asarray(v)
  if v.dtype.kind == 'f':
    clean = lambda e: e if math.isfinite(e) else None
    return [clean(e) for e in v.tolist()] if v.ndim else clean(v.item())
  return v.tolist() if v.ndim else v.item()


def log_records(step: int, member_rows, metrics, steps_per_sec: float):
  """One JSON-ready record per member: its id, hyperparameters and metrics.

  ``metrics`` are host arrays with a leading member axis; slots beyond
  ``len(member_rows)`` (padding) are dropped.
  """
  records = []
  for i, member in enumerate(member_rows):
    row = {'step': step, **member}
    row.update({k: _to_python(v[i]) for k, v in metrics.items()})
    row['steps_per_sec'] = steps_per_sec
    records.append(row)
  return records


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


def build_program(model, spec: StepSpec, dataset, mesh, member_loop: str):
  """``(init, train_step, dataset)`` placed on ``mesh``: what a run executes.

  ``init(hparams)`` gives stacked fresh states split over the member axis;
  ``train_step(states, dataset)`` is the jitted step (states donated);
  ``dataset`` is replicated on every device.
  """
  P = jax.sharding.PartitionSpec
  dataset = jax.device_put(dataset, jax.sharding.NamedSharding(mesh, P()))
  init, train_step = _jitted_program(model, spec, tuple(dataset.observation_shape), mesh,
                                     member_loop)
  return init, train_step, dataset


# The jitted functions of the runs of this process, by the static choices they
# close over (all hashable, compared by value). JAX keeps a jitted function's
# traces and compiled executables, so a later run with the same choices (the
# next run of an experiment's grid, a run resumed in the same process, a
# notebook's second run) starts without tracing or compiling its step again.
# Hyperparameter values are traced, so a sweep's values never enter the key.
PROGRAM_CACHE_SIZE = 8


@functools.lru_cache(maxsize=PROGRAM_CACHE_SIZE)
def _jitted_program(model, spec: StepSpec, observation_shape, mesh, member_loop: str):
  member = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('member'))
  init = jax.jit(lambda h: init_states(model, h, observation_shape, spec),
                 out_shardings=member)
  train_step = jax.jit(make_train_step(model, spec, member_loop, mesh), donate_argnums=0)
  return init, train_step


@functools.lru_cache(maxsize=PROGRAM_CACHE_SIZE)
def _jitted_images(model, reconstruction: str):
  """Every member's decodings of ``x`` (traversals of latents ``order``, and
  reconstructions): :func:`capvae.models.decoded_images` over the member axis."""
  return jax.jit(jax.vmap(
      lambda p, x, order: models.decoded_images(model, p, x, order, reconstruction),
      in_axes=(0, None, None)))


def make_images_fn(model, dataset, reconstruction: str, latent_size: int, num_inputs: int = 8):
  """``images(states, rows) -> {member: {tag: image}}``: each member's
  reconstructions of ``num_inputs`` fixed images and its traversals (every
  latent, in order), for the trackers (:func:`capvae.tracking.checkpoint_images`).
  Every process calls it (the states may span processes)."""
  from capvae import evaluate  # pylint: disable=g-import-not-at-top
  x = evaluate.draw_images(dataset, jax.random.key(1), num_inputs)
  order = jnp.arange(latent_size, dtype=jnp.int32)
  decode = _jitted_images(model, reconstruction)
  inputs = np.asarray(x)

  def images(states, rows):
    pics, recons = parallel.fetch(decode(states.params, x, order))
    values = len(models.TRAVERSAL_VALUES)
    return {row['member']: tracking.checkpoint_images(
        np.asarray(pics[i]).reshape(latent_size, values, *pics.shape[2:]), inputs,
        np.asarray(recons[i])) for i, row in enumerate(rows)}

  return images


def _flag_frozen(records, warned: set[int]) -> None:
  for r in records:
    if r['frozen'] and r['member'] not in warned:
      warned.add(r['member'])
      hp = {k: r[k] for k in ts.HPARAM_NAMES}
      logging.warning(
          'Member %d diverged at step %d (non-finite loss, gradient or parameter):'
          ' frozen at its last finite parameters; the other members train on.'
          ' Hyperparameters: %s', r['member'], r['frozen_step'], hp)


def train_and_evaluate(config, workdir: str) -> ts.TrainState:
  """Trains the members of ``config`` in ``workdir``; resumes if it holds them.

  Chunks of members train one after another (all members at once unless
  ``config.chunk_size`` is set); each chunk's stacked state is split over all
  devices of all processes.

  Returns:
    The final stacked train state of the last chunk trained (members of a
    one-chunk run, plus any padding slots).
  """
  # Everything that can reject the run happens before anything is written.
  config_lib.validate(config)
  config_lib.normalize(config)
  dataset = data.get(config.dataset, config.dataset_path, config.dataset_split)
  config_lib.check_against_dataset(config, dataset)
  resuming = workdir_lib.check_workdir(workdir, config) is not None
  config_lib.check_devices(config, len(jax.devices()), jax.process_count())
  tracker_names = tracking.check(config)
  streamed = getattr(dataset, 'streamed', False)
  if streamed and jax.process_count() > 1:
    raise ConfigError(
        f'config.dataset = {config.dataset!r} is streamed from the host (too large for the'
        ' device); streaming runs in a single process only.')

  spec = StepSpec.from_config(config, dataset.num_examples)
  member_rows = sweep.members(config)
  model = config_lib.model(config, dataset.observation_shape)
  mesh = parallel.make_mesh(jax.devices()[:config.num_devices or None], config.data_shards)
  slots = sweep.padded_size(len(member_rows), config.chunk_size, mesh.shape['member'])
  primary = jax.process_index() == 0

  def write_config():
    if primary:
      os.makedirs(workdir, exist_ok=True)
      workdir_lib.write_json(os.path.join(workdir, workdir_lib.CONFIG_FILE),
                             workdir_lib.config_dict(config))
      workdir_lib.write_json(os.path.join(workdir, workdir_lib.MEMBERS_FILE), member_rows)
    parallel.barrier('capvae:workdir')

  # A new run writes its config first (a workdir with checkpoints but no config
  # is refused); a resumed one rewrites it (new bookkeeping values) only once
  # its first checkpoint has been restored.
  if not resuming:
    write_config()

  images = None
  if tracker_names and config.log_images:
    images = make_images_fn(model, dataset, config.reconstruction, config.latent_size)
  stream = dataset if streamed else None
  if streamed:  # the step sees one batch at a time; compile with step 0's
    dataset = stream.batch(spec.data_seed, 0, spec.batch_size)
  init, train_step, dataset = build_program(model, spec, dataset, mesh,
                                            config.member_loop)
  logging.info('%d member(s) in %d chunk(s) of %d slots over %d device(s) (%d'
               ' process(es)); members run by %s.', len(member_rows),
               len(sweep.chunks(len(member_rows), config.chunk_size)), slots, mesh.size,
               jax.process_count(), backend.resolve_member_loop(config.member_loop))
  metrics_path = os.path.join(workdir, workdir_lib.METRICS_FILE)
  compiled, states = None, None
  for chunk, ids in enumerate(sweep.chunks(len(member_rows), config.chunk_size)):
    chunk_rows = [member_rows[i] for i in ids]
    hparams = sweep.stack(sweep.pad(chunk_rows, slots))
    mngr, states, step = workdir_lib.restore_newest_readable(
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
      parallel.barrier(f'capvae:chunk{chunk}:{step}')
      if step >= config.num_steps:
        logging.info('Chunk %d: nothing to do (step %d >= num_steps %d).', chunk,
                     step, config.num_steps)
        continue
      if compiled is None:
        t0 = time.perf_counter()
        logging.info('Compiling the train step for %d slot(s) (once per run: seconds to a'
                     ' few minutes)...', slots)
        compiled = train_step.lower(states, dataset).compile()
        logging.info('Compiled the train step for %d slot(s) in %.1fs.', slots,
                     time.perf_counter() - t0)
      feed, trackers = None, tracking.Trackers([], ())
      try:
        if streamed:
          feed = Prefetcher(stream, spec.data_seed, spec.batch_size,
                            jax.tree.leaves(dataset)[0].sharding, step, config.num_steps)
        history = ([r for r in workdir_lib.read_metrics(metrics_path) if r.get('member') in ids]
                   if primary and 'tensorboard' in tracker_names
                   and os.path.exists(metrics_path) else [])
        trackers = tracking.open_trackers(config, workdir, chunk_rows, step, primary=primary,
                                          history=history)
        states, stopped = _train_chunk(config, compiled, states, feed or dataset, step,
                                       mngr, chunk_rows, metrics_path if primary else None,
                                       trackers, images)
      finally:
        trackers.close()
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
                 metrics_path, trackers=None, images=None):
  """Trains one chunk from ``step`` to ``config.num_steps``; True if stopped early.

  ``dataset`` is the placed dataset, or a :class:`Prefetcher` giving each step's.
  ``trackers`` get each logged record, and ``images(states, chunk_rows)`` at each
  checkpoint of the ``checkpoint_every`` grid and the last step.
  """
  trackers = trackers or tracking.Trackers([], ())
  num_steps = config.num_steps
  multi = jax.process_count() > 1
  warned: set[int] = set()
  log_file = open(metrics_path, 'a') if metrics_path else contextlib.nullcontext()
  # On a terminal, a bar (the writing process's) replaces the per-log-step lines.
  bar = progress.bar(num_steps, 'train', 'step', initial=step) if metrics_path else None
  with _Preemption() as preemption, log_file as log, bar or contextlib.nullcontext():
    t_start, step_start = time.perf_counter(), step
    t_last, step_last = t_start, step
    while step < num_steps:
      # Metrics are those of the update *at* optimizer step `step` (C, loss,
      # noise and batch all indexed by it); the state then moves to step + 1.
      states, metrics = compiled(states, dataset(step) if callable(dataset) else dataset)
      logged = step
      step += 1
      log_now = logged % config.log_every == 0 or step == num_steps
      if bar is not None:
        bar.update(1)
      stop = mngr.reached_preemption(step)
      if multi:  # a signal reaches one process: agree at log steps
        stop = stop or (log_now and parallel.any_process(preemption.requested))
      else:
        stop = stop or preemption.requested
      if log_now or stop:
        metrics = parallel.fetch(metrics)
        now = time.perf_counter()
        rate = (step - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        records = log_records(logged, chunk_rows, metrics, rate)
        _flag_frozen(records, warned)
        if all(r['frozen'] for r in records):
          raise FloatingPointError(
              f'Every member diverged (member(s) {[r["member"] for r in records]},'
              f' by step {logged}); nothing is saved past the last checkpoint.')
        if log is not None and log_now:  # a stop off the log grid adds no row
          for row in records:
            log.write(json.dumps(row) + '\n')
          log.flush()
          trackers.log_records(records)
        mean_rate = (step - step_start) / max(now - t_start, 1e-9)
        live = [r for r in records if not r['frozen']]
        r0 = live[0]
        if bar is not None:
          bar.set_postfix_str(
              f'member {r0["member"]}: loss {r0["loss"]:.2f} rec {r0["rec"]:.2f} kl'
              f' {r0["kl"]:.2f} C {r0["c"]:.2f} | {len(live)}/{len(records)} live',
              refresh=False)
        else:
          logging.info(
              'step %d/%d  member %d: loss %.2f  rec %.2f  kl %.2f  C %.2f  |'
              '  %d/%d live  %.2f steps/s, %s left', logged, num_steps, r0['member'],
              r0['loss'], r0['rec'], r0['kl'], r0['c'], len(live), len(records), rate,
              progress.format_duration((num_steps - step) / mean_rate))
      on_grid = step % config.checkpoint_every == 0 or step == num_steps
      if on_grid or stop:
        mngr.save(step, args=ocp.args.StandardSave(states))
      if on_grid and images is not None:  # not at a stop: a resumed run has them
        trackers.log_images(step, images(states, chunk_rows))
      if stop:
        logging.warning('Stopped at step %d; rerun the same command to resume.', step)
        return states, True
  return states, False
