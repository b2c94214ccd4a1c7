"""A workdir: everything that reads or writes a run's files.

A workdir holds ``config.json`` and ``members.json`` (written whole, then
renamed into place), ``metrics.jsonl`` (one JSON row per member and logged
step, appended), ``checkpoints/chunk_NNN/STEP`` (orbax; a chunk's members
stacked on a leading axis) and, after evaluation, ``eval.json`` and
``report/``.

Training checks a workdir (:func:`check_workdir`), restores the newest
checkpoint that reads (:func:`restore_newest_readable`, moving torn ones
aside) and truncates the log to it (:func:`truncate_metrics`). Everything
that reads a trained run back goes through one loader: :class:`Run` (config,
member table, dataset, model) and :class:`Members` (all members' states at
one step), which evaluation, the report and :func:`extract_member` share.

A crash can still tear the last line of ``metrics.jsonl`` (a kill or a full
disk mid-write). Readers here drop such a line with a warning, and name the
file and line of anything else that is not a JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from capvae import config_lib, data, parallel, sweep
from capvae import train_state as ts
from capvae.errors import ConfigError

METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'
MEMBERS_FILE = 'members.json'
CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'corrupt'  # under CHECKPOINT_DIR: checkpoints that could not be read


def write_json(path: str, obj) -> None:
  """Writes ``obj`` to ``path`` atomically (a temporary file, then a rename)."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def _parse(path: str) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
  """``([(line, row)], torn)`` of a JSON-lines log; ``torn``: its last line was
  cut short (not JSON) and is left out."""
  with open(path) as f:
    lines = f.readlines()
  out, torn = [], False
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        torn = True
        break
      raise ConfigError(
          f'{path}, line {i + 1}: not valid JSON ({e.msg}, column {e.colno}); only the last'
          ' line can be torn by a crash. Repair or remove that line.') from None
    if not isinstance(row, dict):
      raise ConfigError(f'{path}, line {i + 1}: a metrics row must be a JSON object;'
                        f' got {type(row).__name__}.')
    out.append((line if line.endswith('\n') else line + '\n', row))
  return out, torn


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The rows of a ``metrics.jsonl``; a torn last line is skipped with a warning."""
  rows, torn = _parse(path)
  if torn:
    logging.warning('%s: its last line is torn (a crash mid-write?); skipped.', path)
  return [row for _, row in rows]


def truncate_metrics(path: str, member_ids: Iterable[int], restored_step: int) -> None:
  """Drops these members' rows of steps at or after their restored checkpoint,
  and a torn last line (with a warning), so that the resumed run appends to a
  log that an uninterrupted run would have written."""
  if not os.path.exists(path):
    return
  member_ids = set(member_ids)
  rows, torn = _parse(path)
  if torn:
    logging.warning('%s: dropping its torn last line (a crash mid-write?) before resuming.',
                    path)
  kept = [line for line, r in rows
          if r.get('member') not in member_ids or r.get('step', -1) < restored_step]
  with open(path, 'rb') as f:
    f.seek(0, os.SEEK_END)
    unterminated = f.tell() > 0 and (f.seek(-1, os.SEEK_END) or f.read(1)) != b'\n'
  if torn or unterminated or len(kept) != len(rows):
    with open(path + '.tmp', 'w') as f:
      f.writelines(kept)
    os.replace(path + '.tmp', path)


# --------------------------------------------------------------------------
# The config and the member table.
# --------------------------------------------------------------------------


def config_dict(config) -> dict[str, Any]:
  """A config as the plain JSON dict ``config.json`` holds."""
  return json.loads(config.to_json())


def check_workdir(workdir: str, config) -> dict[str, Any] | None:
  """Refuses a workdir that holds another run; returns its saved config if any.

  Nothing in the workdir is written or removed here.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    diffs = config_lib.differences(saved, config_dict(config))
    if diffs:
      raise ConfigError(
          f'workdir {workdir!r} holds a run with a different config; its'
          ' checkpoints are left untouched. Use another --workdir, or the saved'
          ' config. Differences (saved -> new):\n  ' + '\n  '.join(diffs))
    return saved
  if os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    raise ConfigError(
        f'workdir {workdir!r} has checkpoints but no {CONFIG_FILE}; refusing to'
        ' guess which run they belong to. Use another --workdir.')
  return None


def load_config(workdir: str):
  """The config a workdir was trained with (its ``config.json``), normalised
  (:func:`capvae.config_lib.normalize`)."""
  import ml_collections
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ConfigError(f'{path} does not exist: not a capvae workdir.')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  return config_lib.normalize(config)


def load_members(workdir: str) -> list[dict[str, Any]]:
  """The member table of a workdir (its ``members.json``)."""
  path = os.path.join(workdir, MEMBERS_FILE)
  if not os.path.exists(path):
    raise ConfigError(f'{path} does not exist: not a capvae workdir.')
  with open(path) as f:
    return json.load(f)


# --------------------------------------------------------------------------
# Checkpoints.
# --------------------------------------------------------------------------


def checkpoint_manager(workdir: str, chunk: int, keep: int | None = None, create=True):
  """The orbax manager of chunk ``chunk``'s checkpoints."""
  path = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR, f'chunk_{chunk:03d}'))
  return ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create),
      item_handlers=ocp.StandardCheckpointHandler())


def saved_slots(mngr, step: int) -> int:
  """The length of the member axis (members and padding) in a saved checkpoint."""
  meta = mngr.item_metadata(step)
  return int(getattr(meta, 'tree', meta)['step'].shape[0])


def restore(mngr, step: int, target):
  """``mngr.restore`` into ``target`` (a :class:`~capvae.train_state.TrainState`).

  Checkpoints saved by earlier versions read too: a hyperparameter of
  :data:`capvae.train_state.LATER_HPARAMS` that one lacks gets the value such
  runs used, so does a field of :data:`capvae.train_state.LATER_FIELDS`, and a
  field of :data:`capvae.train_state.REMOVED_FIELDS` that one holds is read and
  dropped.
  """
  meta = mngr.item_metadata(step)
  saved = getattr(meta, 'tree', meta)
  missing = [k for k in ts.LATER_HPARAMS if k not in saved['hparams']]
  removed = [k for k in ts.REMOVED_FIELDS if k in saved]
  # Runs saved before objectives kept a state had none to keep (``{}``).
  later = [k for k in ts.LATER_FIELDS if k not in saved]
  if not missing and not removed and not later:
    return mngr.restore(step, args=ocp.args.StandardRestore(target))
  # The checkpoint's own structure, as a dict of the state's fields.
  fields = {f.name: getattr(target, f.name) for f in dataclasses.fields(target)
            if f.name not in later}
  fields['hparams'] = {k: getattr(target.hparams, k) for k in ts.HPARAM_NAMES
                       if k not in missing}
  like = target.step  # one value per slot, as every removed field held
  for k in removed:
    fields[k] = jax.ShapeDtypeStruct(like.shape, ts.REMOVED_FIELDS[k], sharding=like.sharding)
  states = mngr.restore(step, args=ocp.args.StandardRestore(fields))
  hparams = dict(states['hparams'])
  for k in missing:
    a = getattr(target.hparams, k)
    hparams[k] = jax.device_put(np.full(a.shape, ts.LATER_HPARAMS[k], a.dtype), a.sharding)
  states = {k: v for k, v in states.items() if k not in removed}
  for k in later:
    if jax.tree.leaves(getattr(target, k)):
      raise ValueError(f'checkpoint {step} has no {k!r}, which this run needs; it was'
                       ' saved by a run of another objective.')
    states[k] = ts.LATER_FIELDS[k]
  return ts.TrainState(**dict(states, hparams=ts.Hparams(**hparams)))


def _with_sharding(abstract, slots: int, sharding):
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((slots, *a.shape[1:]), a.dtype, sharding=sharding),
      abstract)


def restore_states(mngr, step: int, abstract, num_real: int, mesh):
  """Restores a chunk saved on any device count into this mesh's layout."""
  member = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('member'))
  slots = jax.tree.leaves(abstract)[0].shape[0]
  saved = saved_slots(mngr, step)
  if saved == slots:
    return restore(mngr, step, _with_sharding(abstract, slots, member))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  states = restore(mngr, step, _with_sharding(abstract, saved, replicated))
  return jax.jit(lambda s: parallel.relayout(s, num_real, slots), out_shardings=member)(states)


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
  mngr = checkpoint_manager(workdir, chunk, keep)
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
      parallel.barrier(f'capvae:corrupt:{chunk}')
      mngr = checkpoint_manager(workdir, chunk, keep)
    return mngr, states, step
  if failed:
    mngr.close()
    raise ConfigError(
        f'{os.path.join(workdir, CHECKPOINT_DIR, f"chunk_{chunk:03d}")}: no checkpoint'
        f' could be read (steps {", ".join(str(s) for s, _ in failed)}; the newest failed'
        f' with {failed[0][1][:300]}). Nothing was moved or deleted. Check the files (a'
        ' full disk? a partial copy?), or train in a new --workdir.')
  return mngr, None, 0


# --------------------------------------------------------------------------
# A trained run, read back.
# --------------------------------------------------------------------------


class Run:
  """A trained workdir's config, member table, dataset and model (no arrays yet).

  Attributes:
    workdir: the directory.
    config: the run's config (:func:`load_config`).
    rows: the member table, one dict of hyperparameters per member.
    dataset: the ground-truth dataset it trained on.
    model: the Flax VAE (``model.apply(state.params, x, key)``).
    objective: its :class:`capvae.losses.Objective`.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.config = config = load_config(workdir)
    self.rows = load_members(workdir)
    self.dataset = data.get(config.dataset, config.dataset_path, config.dataset_split)
    self.model = config_lib.model(config, self.dataset.observation_shape)
    self.objective = config_lib.objective(config, self.dataset.num_examples)

  @property
  def num_members(self) -> int:
    return len(self.rows)

  def chunks(self) -> list[range]:
    """Member ids of each checkpoint chunk."""
    return sweep.chunks(len(self.rows), int(self.config.chunk_size))

  def load_chunk(self, chunk: int, step: int | None = None):
    """``(states, step)``: chunk ``chunk``'s saved stack (every saved slot, padding
    included) at ``step`` (default: the latest), restored on one device."""
    ids = self.chunks()[chunk]
    mngr = checkpoint_manager(self.workdir, chunk, create=False)
    try:
      step = mngr.latest_step() if step is None else step
      if step is None or step not in mngr.all_steps():
        raise ConfigError(
            f'{self.workdir}: no checkpoint {"" if step is None else step} for chunk'
            f' {chunk} (members {ids[0]}..{ids[-1]}); saved steps:'
            f' {list(mngr.all_steps())}.')
      hparams = sweep.stack([self.rows[i] for i in ids])
      abstract = jax.eval_shape(
          lambda h: ts.create_stack(self.model, h, self.dataset.observation_shape,
                                    ts.optimizer_kwargs(self.config), self.objective),
          hparams)
      one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      try:
        states = restore(mngr, step, _with_sharding(abstract, saved_slots(mngr, step), one))
      except Exception as e:  # pylint: disable=broad-except  # orbax, tensorstore, json
        raise ConfigError(
            f'{self.workdir}: checkpoint {step} of chunk {chunk} could not be read'
            f' ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}).'
            ' Rerun training in this workdir to move it aside and resume from an older'
            ' one.') from None
    finally:
      mngr.close()
    return states, step

  def load_member(self, member: int, step: int | None = None):
    """``(state, row)``: member ``member``'s un-stacked
    :class:`~capvae.train_state.TrainState` at checkpoint ``step`` (default:
    the latest) and its line of the member table."""
    try:
      chunk, slot = sweep.locate(member, len(self.rows), int(self.config.chunk_size))
    except IndexError as e:
      raise ConfigError(f'--member: {e}') from None
    states, _ = self.load_chunk(chunk, step)
    return jax.tree.map(lambda a: a[slot], states), self.rows[member]


class Members(Run):
  """A :class:`Run` with every member's state at one checkpoint step.

  Attributes (besides :class:`Run`'s):
    states: stacked :class:`~capvae.train_state.TrainState` of the real members
      (padding slots dropped) on one device, leading axis = member.
    step: the checkpoint step.
  """

  def __init__(self, workdir: str, step: int | None = None):
    super().__init__(workdir)
    parts, steps = [], set()
    for chunk, ids in enumerate(self.chunks()):
      states, saved = self.load_chunk(chunk, step)
      steps.add(saved)
      parts.append(jax.tree.map(lambda a, n=len(ids): a[:n], states))
    if len(steps) != 1:
      raise ConfigError(f'{workdir}: chunks were saved at different steps {sorted(steps)};'
                        ' finish training (or pass --step) first.')
    self.step = steps.pop()
    self.states = jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


def load_member(workdir: str, member: int, step: int | None = None):
  """``(config, model, state, row)`` of one member of a trained workdir
  (:meth:`Run.load_member`)."""
  run = Run(workdir)
  state, row = run.load_member(member, step)
  return run.config, run.model, state, row


def extract_member(workdir: str, member: int, out: str, step: int | None = None) -> str:
  """Writes member ``member`` of ``workdir`` as a stand-alone one-member run.

  ``out`` gets a config (the member's hyperparameters, no sweep), a member
  table of one row and a checkpoint at the same step, so it can be evaluated
  or trained further like any single run:
  ``capvae train --config configs/from_workdir.py:OUT --workdir OUT``.
  ``out`` must not exist yet: nothing is ever overwritten.
  """
  config, _, state, row = load_member(workdir, member, step)
  if os.path.exists(out):
    raise ConfigError(f'--out {out!r} exists; give a new directory.')
  config.unlock()
  for name in ts.HPARAM_NAMES:  # a table saved before a field existed lacks it
    config[name] = row.get(name, ts.LATER_HPARAMS.get(name))
  config.sweep = {'product': {}, 'zip': {}}
  config.chunk_size = 0
  saved_step = int(state.step)
  os.makedirs(out)
  write_json(os.path.join(out, CONFIG_FILE), config_dict(config))
  write_json(os.path.join(out, MEMBERS_FILE), [dict(row, member=0)])
  write_json(os.path.join(out, 'extracted_from.json'),
             {'workdir': os.path.abspath(workdir), 'member': member, 'step': saved_step})
  mngr = checkpoint_manager(out, 0)
  try:
    mngr.save(saved_step, args=ocp.args.StandardSave(
        jax.tree.map(lambda a: jnp.asarray(a)[None], state)))
    mngr.wait_until_finished()
  finally:
    mngr.close()
  return out
