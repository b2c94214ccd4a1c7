"""The train step and the training loop.

``make_train_step`` builds one pure function ``(states, dataset) -> (states,
metrics)`` over a stack of members: it renders one batch from the dataset
(shared by every member: common random numbers), then runs a ``jax.vmap``-ped
per-member update. It is jitted once; hyperparameter values are traced.

``train_and_evaluate(config, workdir)`` validates the config, restores or
creates the stacked state, trains, logs ``metrics.jsonl`` and checkpoints with
orbax, resuming exactly after a stop or a preemption signal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from capvae import config_lib, data, losses, models, schedules, sweep
from capvae import train_state as ts

METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'
MEMBERS_FILE = 'members.json'
CHECKPOINT_DIR = 'checkpoints'


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The static (shape- or program-changing) part of a run's config."""
  objective: str
  reconstruction: str
  gaussian_variance: float
  capacity_penalty: str
  schedule: str
  beta_norm: bool
  batch_size: int
  data_seed: int
  optimizer_kwargs: tuple[tuple[str, float], ...]

  @classmethod
  def from_config(cls, config) -> 'StepSpec':
    return cls(
        objective=config.objective,
        reconstruction=config.reconstruction,
        gaussian_variance=float(config.gaussian_variance),
        capacity_penalty=config.capacity_penalty,
        schedule=config.schedule,
        beta_norm=bool(config.beta_norm),
        batch_size=int(config.batch_size),
        data_seed=int(config.data_seed),
        optimizer_kwargs=(('b1', float(config.adam_b1)),
                          ('b2', float(config.adam_b2)),
                          ('eps', float(config.adam_eps))),
    )


def reconstruction_fn(spec: StepSpec) -> Callable[[jax.Array, jax.Array], jax.Array]:
  if spec.reconstruction == 'gaussian':
    return lambda out, x: losses.gaussian_nll(out, x, spec.gaussian_variance)
  return losses.RECONSTRUCTIONS[spec.reconstruction]


def member_loss(params, model, hparams: ts.Hparams, step, x, key, spec: StepSpec):
  """One member's ``(loss, aux)`` on batch ``x`` at optimizer step ``step``."""
  out, mean, logvar = model.apply(params, x, key)
  rec = reconstruction_fn(spec)(out, x)
  kl = losses.gaussian_kl(mean, logvar)
  if spec.objective == 'beta':
    return losses.beta_objective(rec, kl, hparams.beta, normalized=spec.beta_norm,
                                 input_size=int(np.prod(x.shape[1:])))
  c = schedules.get(spec.schedule, hparams.c_max, hparams.c_anneal_steps)(step)
  return losses.capacity_objective(rec, kl, hparams.gamma, c,
                                   penalty=spec.capacity_penalty)


def batch_at(dataset: data.GroundTruthDataset, step, spec: StepSpec):
  """The batch of images every member sees at ``step`` (a pure function of it)."""
  key = jax.random.fold_in(jax.random.key(spec.data_seed), step)
  return dataset.render(dataset.sample_factors(key, spec.batch_size))


def make_train_step(model, spec: StepSpec):
  """Returns the pure step ``(states, dataset) -> (states, metrics)``.

  ``states`` is a :class:`TrainState` stacked on a leading member axis. The
  step's randomness is a function of ``(data_seed, step)`` for the batch and
  ``(member seed, step)`` for the reparameterisation noise, so resuming from a
  checkpoint replays exactly the same stream.
  """
  opt_kwargs = dict(spec.optimizer_kwargs)

  def member_step(state: ts.TrainState, x):
    _, noise_key = ts.member_keys(state.hparams.seed)
    key = jax.random.fold_in(noise_key, state.step)
    grad_fn = jax.value_and_grad(member_loss, has_aux=True)
    (_, aux), grads = grad_fn(state.params, model, state.hparams, state.step, x,
                              key, spec)
    tx = ts.make_optimizer(state.hparams.learning_rate, **opt_kwargs)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux['grad_norm'] = optax.tree.norm(grads)
    aux['param_norm'] = optax.tree.norm(params)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new, aux

  def train_step(states: ts.TrainState, dataset):
    # Members always advance together, so member 0's step is everyone's.
    x = batch_at(dataset, states.step[0], spec)
    return jax.vmap(member_step, in_axes=(0, None))(states, x)

  return train_step


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


def _write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def _truncate_metrics(path: str, restored_step: int) -> None:
  """Drops log rows of steps not in the restored state (after its checkpoint)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip()]
  keep = [r for r in rows if json.loads(r)['step'] < restored_step]
  if len(keep) != len(rows):
    with open(path + '.tmp', 'w') as f:
      f.writelines(keep)
    os.replace(path + '.tmp', path)


def _to_python(v):
  v = np.asarray(v)
  return v.tolist() if v.ndim else v.item()


def metric_rows(step: int, member_rows, metrics, steps_per_sec: float):
  """One JSON-ready row per member: its id, hyperparameters and metrics."""
  metrics = jax.device_get(metrics)
  rows = []
  for i, member in enumerate(member_rows):
    row = {'step': step, **member}
    row.update({k: _to_python(v[i]) for k, v in metrics.items()})
    row['steps_per_sec'] = steps_per_sec
    rows.append(row)
  return rows


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


def train_and_evaluate(config, workdir: str) -> ts.TrainState:
  """Trains the members of ``config`` in ``workdir``; resumes if it holds them.

  Returns:
    The final stacked train state.
  """
  # Everything that can reject the run happens before anything is written.
  config_lib.validate(config)
  dataset = data.get(config.dataset, config.dataset_path)
  config_lib.check_against_dataset(config, dataset)
  check_workdir(workdir, config)

  spec = StepSpec.from_config(config)
  member_rows = sweep.members(config)
  hparams = sweep.stack(member_rows)
  model = models.get(config.model, config.latent_size, dataset.observation_shape)

  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, CONFIG_FILE), _config_dict(config))
  _write_json(os.path.join(workdir, MEMBERS_FILE), member_rows)

  mngr = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.keep_checkpoints, create=True))
  init = jax.jit(lambda h: init_states(model, h, dataset.observation_shape, spec))
  latest = mngr.latest_step()
  if latest is None:
    states = init(hparams)
  else:
    abstract = jax.eval_shape(init, hparams)
    states = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
    logging.info('Resumed from %s at step %d.', workdir, latest)
  step = int(jax.device_get(states.step[0]))
  metrics_path = os.path.join(workdir, METRICS_FILE)
  _truncate_metrics(metrics_path, step)

  train_step = jax.jit(make_train_step(model, spec), donate_argnums=0)
  num_steps = config.num_steps
  if step >= num_steps:
    logging.info('Nothing to do: step %d >= num_steps %d.', step, num_steps)
    mngr.close()
    return states
  t0 = time.perf_counter()
  compiled = train_step.lower(states, dataset).compile()
  logging.info('Compiled the train step for %d member(s) in %.1fs.',
               len(member_rows), time.perf_counter() - t0)

  try:
    with _Preemption() as preemption, open(metrics_path, 'a') as log:
      t_start, step_start = time.perf_counter(), step
      t_last, step_last = t_start, step
      while step < num_steps:
        # Metrics are those of the update *at* optimizer step `step` (C, loss,
        # noise and batch all indexed by it); the state then moves to step + 1.
        states, metrics = compiled(states, dataset)
        logged = step
        step += 1
        stop = preemption.requested or mngr.reached_preemption(step)
        if logged % config.log_every == 0 or step == num_steps or stop:
          now = time.perf_counter()
          rate = (step - step_last) / max(now - t_last, 1e-9)
          t_last, step_last = now, step
          rows = metric_rows(logged, member_rows, metrics, rate)
          bad = [r['member'] for r in rows if not np.isfinite(r['loss'])]
          if bad:
            raise FloatingPointError(
                f'Non-finite loss for member(s) {bad} at step {logged}; the last'
                ' checkpoint is kept.')
          for row in rows:
            log.write(json.dumps(row) + '\n')
          log.flush()
          mean_rate = (step - step_start) / max(now - t_start, 1e-9)
          r0 = rows[0]
          logging.info(
              'step %d/%d  loss %.2f  rec %.2f  kl %.2f  C %.2f  |  %.2f steps/s,'
              ' %s left', logged, num_steps, r0['loss'], r0['rec'], r0['kl'],
              r0['c'], rate, _format_duration((num_steps - step) / mean_rate))
        if step % config.checkpoint_every == 0 or step == num_steps or stop:
          mngr.save(step, args=ocp.args.StandardSave(states))
        if stop:
          logging.warning('Stopped at step %d; rerun the same command to resume.', step)
          break
  finally:
    # Also on an error: let an in-flight save finish so no checkpoint is torn.
    mngr.wait_until_finished()
    mngr.close()
  return states
