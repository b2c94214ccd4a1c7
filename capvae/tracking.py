"""Where a run reports besides ``metrics.jsonl``: TensorBoard, W&B, MLflow.

``config.trackers`` names them (default ``('tensorboard',)``). Each member is
its own run in every tracker, named by the workdir and the member
(``tb/member_003/`` in TensorBoard), so a sweep can be filtered and sorted by
its hyperparameters, and ``tensorboard --logdir runs/`` shows every member of
every workdir under ``runs/``. Each tracker gets the same things:

* every logged step's scalars (``train/loss``, ``train/rec``, ``train/kl``,
  ``train/c``, ``train/kl_minus_c``, the objective's terms, gradient and
  parameter norms, ``train/steps_per_sec``; the per-latent KL as
  ``train/kl_per_latent/zI``, drawn together in one multiline chart in
  TensorBoard's Custom Scalars: select a member's run to see its latents),
  with exactly the values of ``metrics.jsonl``;
* images at each checkpoint of the ``checkpoint_every`` grid and at the last
  step (not at one saved by a preemption) (``images/reconstructions``: fixed inputs above their reconstructions
  from the posterior means; ``images/traversals``: latent ``zI`` of the first
  input's code set to each of ``TRAVERSAL_VALUES``, one row per latent);
* the member's hyperparameters (TensorBoard's hparams plugin; W&B's config;
  MLflow's params).

``capvae evaluate`` adds each member's scores to its TensorBoard run
(``eval/mig``, ``eval/kl``, …, at the evaluated step; a new evaluation
replaces them), so that the hparams table sorts a sweep by them.

Only the process that writes the log writes these, and flushes them at every
log step and checkpoint. A resumed run first cuts each member's TensorBoard
events back to its restored checkpoint (scalars of steps at or after it;
anything after it), as ``metrics.jsonl`` is, and writes what the log holds
before it that TensorBoard lacks (a run saved before TensorBoard was on), so
after a stop, a crash or a preemption its curves are those of an
uninterrupted run, point for point. W&B resumes the member's run by id: it
ignores steps it already holds, which the resumed run recomputes bit for bit.
MLflow starts a new run for the resumed member (its history keeps every point
it was given).

TensorBoard is written by ``tensorboardX`` (no TensorFlow). W&B (offline by
default: ``wandb sync`` uploads later) and MLflow (a file store in the workdir
by default) are optional: ``pip install 'capvae[trackers]'``.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import struct
import time
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import numpy as np

from capvae.errors import ConfigError

TB_DIR = 'tb'
TRACKERS = ('tensorboard', 'wandb', 'mlflow')
# The package each tracker imports, and the extra that installs it.
_PACKAGES = {'tensorboard': ('tensorboardX', None), 'wandb': ('wandb', 'trackers'),
             'mlflow': ('mlflow', 'trackers')}
WANDB_MODES = ('offline', 'online', 'disabled')

# Record fields that are not scalars of the step (the hyperparameters are
# written once, as hyperparameters).
_NOT_SCALARS = frozenset({'step', 'member', 'frozen_step'})
TRAIN = 'train/'
EVAL = 'eval/'
IMAGES = 'images/'


def member_run(member: int) -> str:
  """The member's run name (its TensorBoard folder under ``tb/``)."""
  return f'member_{member:03d}'


def split_names(names) -> tuple[str, ...]:
  """Tracker names as a tuple: the command line's ``--config.trackers=a,b``
  arrives as ``('a,b',)``, and config.json holds a list."""
  return tuple(p.strip() for n in names for p in str(n).split(',') if p.strip())


def check(config) -> tuple[str, ...]:
  """``config.trackers`` as a tuple; refuses an unknown or uninstalled one
  (naming the extra that installs it) before anything is compiled."""
  names = config.get('trackers', ('tensorboard',))
  if isinstance(names, str):
    names = (names,)
  if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
    raise ConfigError(f'config.trackers = {names!r}: must be a list of names from'
                      f' {", ".join(map(repr, TRACKERS))} (on the command line:'
                      ' --config.trackers=tensorboard,wandb).')
  names = split_names(names)
  for n in names:
    if n not in TRACKERS:
      raise ConfigError(f'config.trackers: {n!r} is unknown; allowed:'
                        f' {", ".join(map(repr, TRACKERS))}.')
    package, extra = _PACKAGES[n]
    if importlib.util.find_spec(package) is None:
      raise ConfigError(
          f'config.trackers: {n!r} needs the package {package!r}, which is not installed;'
          + (f" pip install 'capvae[{extra}]'." if extra else f' pip install {package}.'))
  if len(set(names)) != len(names):
    raise ConfigError(f'config.trackers = {names!r}: names a tracker twice.')
  mode = config.get('wandb_mode', 'offline')
  if 'wandb' in names and mode not in WANDB_MODES:
    raise ConfigError(f'config.wandb_mode = {mode!r} is unknown; allowed:'
                      f' {", ".join(map(repr, WANDB_MODES))}.')
  return tuple(names)


def scalars(record: Mapping[str, Any], hparam_names: Iterable[str]) -> dict[str, float]:
  """The tagged scalars of one ``metrics.jsonl`` record (``None``, a value
  that was not finite, becomes NaN; vectors become one tag per entry)."""
  skip = _NOT_SCALARS | set(hparam_names)
  out = {}
  for k, v in record.items():
    if k in skip:
      continue
    if isinstance(v, (list, tuple)):
      for i, e in enumerate(v):
        out[f'{TRAIN}{k}/z{i}'] = float('nan') if e is None else float(e)
    elif isinstance(v, (bool, int, float)) or v is None:
      out[TRAIN + k] = float('nan') if v is None else float(v)
  return out


def _hparams_of(row: Mapping[str, Any], static: Mapping[str, Any]) -> dict[str, Any]:
  out = {k: v for k, v in row.items() if k != 'member'}
  out.update(static)
  return out


# --------------------------------------------------------------------------
# TensorBoard event files: reading records, cutting them back on resume.
# --------------------------------------------------------------------------


def event_files(run_dir: str) -> list[str]:
  return sorted(glob.glob(os.path.join(run_dir, 'events.out.tfevents.*')))


def _raw_records(path: str):
  """The raw TFRecords of an event file (header, payload and checksums), and
  their payloads; a record torn by a crash ends the file."""
  with open(path, 'rb') as f:
    data = f.read()
  pos = 0
  while pos + 12 <= len(data):
    (length,) = struct.unpack('<Q', data[pos:pos + 8])
    end = pos + 12 + length + 4
    if end > len(data):
      break
    yield data[pos:end], data[pos + 12:pos + 12 + length]
    pos = end


def _keep(event, restored_step: int) -> bool:
  """Whether an event written before a stop belongs to the run restored at
  ``restored_step``: training scalars of steps before it, and everything else
  (images, hyperparameters, scores) of steps up to it."""
  if not event.HasField('summary') or not event.summary.value:
    return True  # file version and similar bookkeeping
  if event.step < restored_step:
    return True
  if event.step > restored_step:
    return False
  return not any(v.tag.startswith(TRAIN) for v in event.summary.value)


def _surviving(run_dir: str) -> tuple[bool, set[int]]:
  """Whether a member's events hold its hyperparameters, and the steps of its
  ``train/loss`` curve."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  hparams, steps = False, set()
  for path in event_files(run_dir):
    for _, payload in _raw_records(path):
      event = event_pb2.Event.FromString(payload)
      for v in event.summary.value:
        hparams |= v.tag == '_hparams_/session_start_info'
        if v.tag == f'{TRAIN}loss':
          steps.add(event.step)
  return hparams, steps


def truncate_events(run_dir: str, restored_step: int) -> None:
  """Cuts a member's TensorBoard events back to its checkpoint at ``restored_step``
  (see :func:`_keep`); files are rewritten only if something goes, by rename."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  for path in event_files(run_dir):
    kept, dropped = [], 0
    for raw, payload in _raw_records(path):
      event = event_pb2.Event.FromString(payload)
      if _keep(event, restored_step):
        kept.append(raw)
      else:
        dropped += 1
    size = os.path.getsize(path)
    if dropped or sum(map(len, kept)) != size:
      with open(path + '.tmp', 'wb') as f:
        f.writelines(kept)
      os.replace(path + '.tmp', path)


# --------------------------------------------------------------------------
# The trackers.
# --------------------------------------------------------------------------


class TensorBoard:
  """One ``tensorboardX`` writer per member, in ``WORKDIR/tb/member_NNN``."""

  def __init__(self, workdir: str, rows: Sequence[Mapping[str, Any]], restored_step: int,
               static: Mapping[str, Any], history: Sequence[Mapping[str, Any]] = ()):
    """``history``: the ``metrics.jsonl`` records kept for the restored run;
    those TensorBoard lacks (a run saved before it logged there, or points lost
    to a kill) are written first, so the curves are whole."""
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    from capvae import train_state as ts  # pylint: disable=g-import-not-at-top
    self._writers = {}
    for row in rows:
      run_dir = os.path.join(workdir, TB_DIR, member_run(row['member']))
      if restored_step == 0:  # nothing of an earlier start survives it
        for path in event_files(run_dir):
          os.remove(path)
      else:
        truncate_events(run_dir, restored_step)
      has_hparams, steps = _surviving(run_dir)
      # The suffix keeps a resumed writer from reopening (and overwriting) a
      # file made in the same second.
      w = SummaryWriter(run_dir, flush_secs=30, max_queue=1000,
                        filename_suffix=f'.{time.time_ns()}')
      missing = [r for r in history if r.get('member') == row['member']
                 and r.get('step', restored_step) < restored_step and r['step'] not in steps]
      for r in missing:
        for tag, v in scalars(r, ts.HPARAM_NAMES).items():
          w.add_scalar(tag, v, r['step'])
      if not has_hparams:
        _, start, end = summary.hparams(_hparams_of(row, static), {})
        w._get_file_writer().add_summary(start)  # pylint: disable=protected-access
        w._get_file_writer().add_summary(end)  # pylint: disable=protected-access
        # One multiline chart (the same in every member's run, so TensorBoard
        # shows it once): each selected member's latents, a line each.
        w.add_custom_scalars({'capvae': {'KL per latent': [
            'Multiline', [rf'^{TRAIN}kl_per_latent/z\d+$']]}})
      w.flush()
      self._writers[row['member']] = w

  def log_scalars(self, member: int, step: int, values: Mapping[str, float]):
    w = self._writers[member]
    for tag, v in values.items():
      w.add_scalar(tag, v, step)

  def log_images(self, member: int, step: int, images: Mapping[str, np.ndarray]):
    w = self._writers[member]
    for tag, img in images.items():
      w.add_image(tag, img, step, dataformats='HWC')

  def flush(self):
    """On disk now: what a kill after this leaves is what the log holds."""
    for w in self._writers.values():
      w.flush()

  def close(self):
    for w in self._writers.values():
      w.close()


def _run_id(workdir: str, member: int) -> str:
  """A stable id for the member's run: the same workdir resumes the same run."""
  import hashlib  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:10]
  return f'{digest}-{member_run(member)}'


class WandB:
  """One W&B run per member (offline unless ``config.wandb_mode`` says otherwise),
  in ``WORKDIR/wandb``; resumed by a stable id."""

  def __init__(self, workdir: str, rows, restored_step: int, static, project: str,
               mode: str):
    os.environ.setdefault('WANDB_SILENT', 'true')
    import wandb  # pylint: disable=g-import-not-at-top
    self._wandb = wandb
    self._runs = {}
    name = os.path.basename(os.path.abspath(workdir))
    os.makedirs(os.path.join(workdir, 'wandb'), exist_ok=True)
    for row in rows:
      self._runs[row['member']] = wandb.init(
          project=project, dir=workdir, mode=mode, id=_run_id(workdir, row['member']),
          name=f'{name}/{member_run(row["member"])}', group=name,
          config=_hparams_of(row, static), resume='allow', reinit='create_new')
    del restored_step

  def log_scalars(self, member, step, values):
    self._runs[member].log(dict(values), step=step)

  def log_images(self, member, step, images):
    self._runs[member].log({t: self._wandb.Image(i) for t, i in images.items()}, step=step)

  def flush(self):
    pass

  def close(self):
    for r in self._runs.values():
      r.finish()


class MLflow:
  """One MLflow run per member, in experiment ``config.tracker_project``; the
  store is ``config.mlflow_uri`` (default: a file store in ``WORKDIR/mlruns``)."""

  def __init__(self, workdir: str, rows, restored_step: int, static, project: str,
               uri: str):
    if not uri:
      uri = 'file:' + os.path.abspath(os.path.join(workdir, 'mlruns'))
      # MLflow 3 keeps its file store for existing users behind this switch.
      os.environ.setdefault('MLFLOW_ALLOW_FILE_STORE', 'true')
    from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
    from mlflow import entities  # pylint: disable=g-import-not-at-top
    self._entities = entities
    self._client = MlflowClient(tracking_uri=uri)
    exp = self._client.get_experiment_by_name(project)
    exp_id = exp.experiment_id if exp else self._client.create_experiment(project)
    name = os.path.basename(os.path.abspath(workdir))
    self._runs = {}
    for row in rows:
      run = self._client.create_run(
          exp_id, run_name=f'{name}/{member_run(row["member"])}',
          tags={'capvae.workdir': os.path.abspath(workdir),
                'capvae.member': str(row['member']),
                'capvae.resumed_at': str(restored_step)})
      params = [entities.Param(k, str(v)) for k, v in _hparams_of(row, static).items()]
      self._client.log_batch(run.info.run_id, params=params)
      self._runs[row['member']] = run.info.run_id

  def log_scalars(self, member, step, values):
    now = int(time.time() * 1000)
    metrics = [self._entities.Metric(_mlflow_key(k), v, now, step) for k, v in values.items()]
    self._client.log_batch(self._runs[member], metrics=metrics)

  def log_images(self, member, step, images):
    for tag, img in images.items():
      self._client.log_image(self._runs[member], img, key=_mlflow_key(tag), step=step)

  def flush(self):
    pass

  def close(self):
    for run_id in self._runs.values():
      self._client.set_terminated(run_id)


def _mlflow_key(tag: str) -> str:
  return re.sub(r'[^\w\-. /]', '_', tag)


class Trackers:
  """The trackers of a run's chunk; every call is a no-op off the writing process."""

  def __init__(self, trackers: Sequence[Any], hparam_names: Iterable[str]):
    self._trackers = list(trackers)
    self._hparam_names = tuple(hparam_names)

  def __bool__(self):
    return bool(self._trackers)

  def log_records(self, records: Iterable[Mapping[str, Any]]):
    """The scalars of ``metrics.jsonl`` records, at their steps."""
    for r in records:
      values = scalars(r, self._hparam_names)
      for t in self._trackers:
        t.log_scalars(r['member'], r['step'], values)
    for t in self._trackers:
      t.flush()

  def log_images(self, step: int, images: Mapping[int, Mapping[str, np.ndarray]]):
    for member, imgs in images.items():
      for t in self._trackers:
        t.log_images(member, step, imgs)
    for t in self._trackers:
      t.flush()

  def close(self):
    for t in self._trackers:
      try:
        t.close()
      except Exception as e:  # pylint: disable=broad-except  # never lose the run for it
        logging.warning('Closing tracker %s failed: %s', type(t).__name__, e)


def open_trackers(config, workdir: str, rows, restored_step: int, *,
                  primary: bool = True, history=()) -> Trackers:
  """The trackers ``config.trackers`` names for the members ``rows`` of a chunk
  restored at ``restored_step`` (none off the primary process); ``history``:
  the log's records kept for it (:class:`TensorBoard`).

  TensorBoard writes local files: its errors stop the run like the log's. A
  W&B or MLflow run that cannot start (a store that is not reachable, a login
  that is missing) is left out with a warning, and training goes on.
  """
  from capvae import train_state as ts  # pylint: disable=g-import-not-at-top
  if not primary:
    return Trackers([], ts.HPARAM_NAMES)
  static = {'objective': config.objective, 'model': config.model,
            'dataset': config.dataset, 'latent_size': int(config.latent_size)}
  out = []
  for name in check(config):
    if name == 'tensorboard':
      out.append(TensorBoard(workdir, rows, restored_step, static, history))
      continue
    try:
      if name == 'wandb':
        out.append(WandB(workdir, rows, restored_step, static,
                         config.get('tracker_project', 'capvae'),
                         config.get('wandb_mode', 'offline')))
      else:
        out.append(MLflow(workdir, rows, restored_step, static,
                          config.get('tracker_project', 'capvae'),
                          config.get('mlflow_uri', '')))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('config.trackers: %s could not start (%s: %s); training goes on'
                      ' without it.', name, type(e).__name__, e)
  return Trackers(out, ts.HPARAM_NAMES)


# The suffix of the event file that holds a member's scores (one per workdir).
_SCORES_SUFFIX = '.capvae-eval'


def score_scalars(record: Mapping[str, Any]) -> dict[str, float]:
  """``eval/*`` scalars of one ``eval.json`` record: the headline metrics, the
  held-out KL, reconstruction and I(x; z), and the objective's terms."""
  out = {f'{EVAL}{k}': v for k, v in (record.get('metrics') or {}).items()}
  out[f'{EVAL}kl'] = record.get('kl')
  out[f'{EVAL}rec'] = record.get('rec')
  out[f'{EVAL}active_latents'] = record.get('active_latents')
  out[f'{EVAL}mi'] = (record.get('information') or {}).get('mi')
  out.update({f'{EVAL}{k}': v for k, v in (record.get('objective_terms') or {}).items()})
  return {k: float('nan') if v is None else float(v) for k, v in out.items()}


def write_scores(workdir: str, records, step: int) -> None:
  """Writes each evaluated member's scores into its TensorBoard run (replacing
  an earlier evaluation's), so that TensorBoard's hparams table can sort a sweep
  by them. Nothing happens for a workdir without ``tb/``."""
  if not os.path.isdir(os.path.join(workdir, TB_DIR)):
    return
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  for r in records:
    run_dir = os.path.join(workdir, TB_DIR, member_run(r['member']))
    for path in glob.glob(os.path.join(run_dir, f'events.out.tfevents.*{_SCORES_SUFFIX}')):
      os.remove(path)
    w = SummaryWriter(run_dir, filename_suffix=f'.{time.time_ns()}{_SCORES_SUFFIX}')
    for tag, v in score_scalars(r).items():
      w.add_scalar(tag, v, step)
    w.close()


# --------------------------------------------------------------------------
# Images.
# --------------------------------------------------------------------------


def image_grid(images: np.ndarray, pad: int = 1) -> np.ndarray:
  """``[R, C, H, W, ch]`` pixels in [0, 1] as one ``[H', W', 3]`` uint8 image (a
  1-pixel grey border between cells; a pixel that is not finite, from a member
  that diverged, is black)."""
  images = np.asarray(images, np.float32)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  r, c, h, w, ch = images.shape
  out = np.full((r * (h + pad) + pad, c * (w + pad) + pad, ch), 0.5, np.float32)
  for i in range(r):
    for j in range(c):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      out[y:y + h, x:x + w] = images[i, j]
  return np.round(np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)


def checkpoint_images(traversals: np.ndarray, inputs: np.ndarray,
                      recons: np.ndarray) -> dict[str, np.ndarray]:
  """One member's images: ``traversals [L, V, ...]``, ``inputs``/``recons [n, ...]``."""
  return {IMAGES + 'reconstructions': image_grid(np.stack([inputs, recons])),
          IMAGES + 'traversals': image_grid(traversals)}
