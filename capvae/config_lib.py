"""Checking a run's config before anything is compiled or written.

Every rule names the field and what is allowed, so a typo fails in a second
with a readable message instead of minutes later inside XLA.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Mapping

from capvae import backend, data, losses, models, schedules, train_state
from capvae.errors import ConfigError

OPTIMIZERS = ('adam',)
MEMBER_LOOPS = backend.MEMBER_LOOPS  # how a device runs its members
CONV_IMPLS = backend.CONV_IMPLS  # how the layers compute

# Fields that do not change the training trajectory: where a run stops and how
# it reports. A workdir may be rerun with new values of these (e.g. a larger
# num_steps to continue training); any other difference is refused.
# num_devices is here too: where members run does not change their numbers.
BOOKKEEPING_FIELDS = frozenset(
    {'num_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints', 'num_devices',
     'trackers', 'tracker_project', 'wandb_mode', 'mlflow_uri', 'log_images'})


def _get(config, name):
  """``config[name]``; for a field of :data:`LATER_FIELDS` that a config saved
  before it existed lacks, the value such runs used."""
  try:
    return config[name]
  except (KeyError, AttributeError):
    if name in LATER_FIELDS:
      return LATER_FIELDS[name]
    raise ConfigError(f'config.{name} is missing.') from None


def _check_number(label, v, *, lo=None, lo_open=False, hi_open=None, integer=False):
  kind = 'an integer' if integer else 'a number'
  if isinstance(v, bool) or not isinstance(v, numbers.Real) or (
      integer and not isinstance(v, numbers.Integral)):
    raise ConfigError(f'{label} = {v!r}: must be {kind}.')
  if not math.isfinite(v):
    raise ConfigError(f'{label} = {v!r}: must be finite.')
  if lo is not None and (v <= lo if lo_open else v < lo):
    raise ConfigError(f'{label} = {v!r}: must be {">" if lo_open else ">="} {lo}.')
  if hi_open is not None and not v < hi_open:
    raise ConfigError(f'{label} = {v!r}: must be < {hi_open}.')


def _number(config, name, **rule):
  _check_number(f'config.{name}', _get(config, name), **rule)


def _choice(config, name, allowed):
  v = _get(config, name)
  if v not in allowed:
    raise ConfigError(
        f'config.{name} = {v!r} is unknown; allowed: {", ".join(map(repr, allowed))}.')


# The range of every numeric field; sweep values obey the same rules.
NUMBER_RULES = {
    'beta': dict(lo=0.0),
    'gamma': dict(lo=0.0),
    'c_max': dict(lo=0.0),
    'learning_rate': dict(lo=0.0, lo_open=True),
    'gaussian_variance': dict(lo=0.0, lo_open=True),
    'adam_b1': dict(lo=0.0, hi_open=1),
    'adam_b2': dict(lo=0.0, hi_open=1),
    'adam_eps': dict(lo=0.0, lo_open=True),
    'c_anneal_steps': dict(lo=0, lo_open=True, integer=True),
    'c_stair_steps': dict(lo=0, lo_open=True, integer=True),
    'latent_size': dict(lo=0, lo_open=True, integer=True),
    'batch_size': dict(lo=0, lo_open=True, integer=True),
    'num_steps': dict(lo=0, lo_open=True, integer=True),
    'log_every': dict(lo=0, lo_open=True, integer=True),
    'checkpoint_every': dict(lo=0, lo_open=True, integer=True),
    'keep_checkpoints': dict(lo=0, lo_open=True, integer=True),
    'chunk_size': dict(lo=0, integer=True),
    'num_devices': dict(lo=0, integer=True),
    'seed': dict(lo=0, hi_open=2**31, integer=True),
    'lambda_od': dict(lo=0.0),
    'lambda_d_factor': dict(lo=0.0),
    'disc_learning_rate': dict(lo=0.0, lo_open=True),
    'kp': dict(lo=0.0),
    'ki': dict(lo=0.0),
    'beta_min': dict(),  # negative: the controller may reward KL below C
    'beta_max': dict(),
    'discriminator_layers': dict(lo=0, lo_open=True, integer=True),
    'discriminator_units': dict(lo=0, lo_open=True, integer=True),
    'data_seed': dict(lo=0, hi_open=2**31, integer=True),
}

SWEEP_KINDS = ('product', 'zip')


def validate(config) -> None:
  """Raises :class:`ConfigError` on the first invalid field of ``config``."""
  if str(_get(config, 'dataset')).startswith('tfds:'):
    from capvae.data import tfds_source  # pylint: disable=g-import-not-at-top
    tfds_source.parse_name(config.dataset)
  else:
    _choice(config, 'dataset', data.DATASETS + ('tfds:<name>[/<config>][:<version>]',))
  split = _get(config, 'dataset_split')
  if not isinstance(split, str) or not split:
    raise ConfigError(f'config.dataset_split = {split!r}: must be a non-empty split name'
                      " such as 'train' or 'train[:90%]'.")
  _choice(config, 'model', models.MODELS)
  _choice(config, 'init', models.INITS)
  _choice(config, 'objective', losses.OBJECTIVES)
  _choice(config, 'reconstruction', tuple(losses.RECONSTRUCTIONS))
  _choice(config, 'capacity_penalty', tuple(losses.CAPACITY_PENALTIES))
  _choice(config, 'schedule', tuple(schedules.SCHEDULES))
  _choice(config, 'tc_estimator', losses.TC_ESTIMATORS)
  _choice(config, 'dip_type', losses.DIP_TYPES)
  _choice(config, 'optimizer', OPTIMIZERS)
  _choice(config, 'member_loop', MEMBER_LOOPS)
  _choice(config, 'conv_impl', CONV_IMPLS)
  if not isinstance(_get(config, 'dataset_path'), str):
    raise ConfigError('config.dataset_path must be a string (empty: procedural; for tfds:'
                      ' datasets, the TFDS data_dir).')
  if not isinstance(_get(config, 'beta_norm'), bool):
    raise ConfigError('config.beta_norm must be True or False.')
  if not isinstance(_get(config, 'log_images'), bool):
    raise ConfigError('config.log_images must be True or False.')
  for name in ('tracker_project', 'mlflow_uri'):
    if not isinstance(_get(config, name), str):
      raise ConfigError(f'config.{name} = {_get(config, name)!r}: must be a string.')
  from capvae import tracking  # pylint: disable=g-import-not-at-top
  tracking.check(config)
  for name, rule in NUMBER_RULES.items():
    _number(config, name, **rule)
  shards = _get(config, 'data_shards')
  _check_number('config.data_shards', shards, lo=0, lo_open=True, integer=True)
  if config.batch_size % shards:
    raise ConfigError(f'config.data_shards = {shards}: must divide config.batch_size ='
                      f' {config.batch_size} (each device takes an equal share).')
  for name, (default, why) in REMOVED_FIELDS.items():
    if name in config and config[name] != default:
      raise ConfigError(f'config.{name} = {config[name]!r}: this field was removed; {why}')
  validate_sweep(config)
  if config.objective == 'controlled_capacity':
    from capvae import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
    for row in sweep_lib.members(config):
      if row['beta_min'] > row['beta_max']:
        raise ConfigError(
            f'member {row["member"]}: config.beta_min = {row["beta_min"]} is above'
            f' config.beta_max = {row["beta_max"]}; the controller\'s beta must lie in'
            ' [beta_min, beta_max].')
  if config.objective == 'beta_tcvae' and config.tc_estimator == 'mss' and (
      config.batch_size < 2):
    raise ConfigError(f'config.batch_size = {config.batch_size}: the mss estimator'
                      ' (config.tc_estimator) needs a batch of at least 2.')


def validate_sweep(config) -> None:
  """Checks ``config.sweep``: which fields vary, and over which values."""
  sweep = _get(config, 'sweep')
  if not hasattr(sweep, 'keys'):
    raise ConfigError('config.sweep must be a ConfigDict with optional fields'
                      ' "product" and "zip".')
  unknown = sorted(set(sweep.keys()) - set(SWEEP_KINDS))
  if unknown:
    raise ConfigError(f'config.sweep.{unknown[0]} is unknown; allowed:'
                      f' {", ".join(SWEEP_KINDS)}.')
  seen = {}
  for kind in SWEEP_KINDS:
    block = sweep.get(kind) or {}
    if not hasattr(block, 'items'):
      raise ConfigError(f'config.sweep.{kind} must map field names to lists of values.')
    lengths = {}
    for name, values in block.items():
      label = f'config.sweep.{kind}.{name}'
      if name not in train_state.HPARAM_NAMES:
        if name in dict(config):
          raise ConfigError(
              f'{label}: {name!r} changes the compiled program (shapes, the'
              ' objective or the data), so it cannot vary inside one sweep;'
              f' run one sweep per value. Fields that can vary:'
              f' {", ".join(train_state.HPARAM_NAMES)}.')
        raise ConfigError(f'{label}: no such field; fields that can vary:'
                          f' {", ".join(train_state.HPARAM_NAMES)}.')
      if name in seen:
        raise ConfigError(f'{label}: {name!r} is already swept in'
                          f' config.sweep.{seen[name]}.')
      seen[name] = kind
      if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise ConfigError(f'{label} = {values!r}: must be a list of values.')
      if not values:
        raise ConfigError(f'{label} is empty: give at least one value.')
      for i, v in enumerate(values):
        _check_number(f'{label}[{i}]', v, **NUMBER_RULES[name])
      lengths[name] = len(values)
    if kind == 'zip' and len(set(lengths.values())) > 1:
      raise ConfigError('config.sweep.zip lists must have equal lengths; got '
                        + ', '.join(f'{k}: {n}' for k, n in lengths.items()) + '.')


def check_devices(config, num_devices: int, num_processes: int) -> None:
  """``config.num_devices`` against the devices this run can see."""
  n = config.num_devices
  if n > num_devices:
    raise ConfigError(f'config.num_devices = {n}: only {num_devices} device(s) are'
                      ' visible; use 0 (all) or fewer.')
  if n and num_processes > 1 and n != num_devices:
    raise ConfigError(f'config.num_devices = {n}: a multi-process run uses all'
                      f' {num_devices} devices; use 0.')
  shards = _get(config, 'data_shards')
  if (n or num_devices) % shards:
    raise ConfigError(f'config.data_shards = {shards}: must divide the {n or num_devices}'
                      ' device(s) the run uses (on CPU, JAX_NUM_CPU_DEVICES=N makes N'
                      ' devices of the cores).')


def check_against_dataset(config, dataset) -> None:
  """Rules that need the dataset: batch size and image shape."""
  if config.batch_size > dataset.num_examples:
    raise ConfigError(
        f'config.batch_size = {config.batch_size}: larger than the dataset'
        f' ({dataset.num_examples} images).')
  problem = models.shape_problem(config.model, dataset.observation_shape)
  if problem:
    raise ConfigError(f'config.model = {config.model!r} {problem} (config.dataset ='
                      f' {config.dataset!r}).')


# Fields added after runs were saved without them, and the value such runs used.
LATER_FIELDS = {'dataset_split': 'train', 'data_shards': 1, 'init': 'lecun',
                'conv_impl': 'auto', 'tc_estimator': 'mws', 'dip_type': 'i',
                'discriminator_layers': 6, 'discriminator_units': 1000,
                'trackers': ('tensorboard',), 'tracker_project': 'capvae',
                'wandb_mode': 'offline', 'mlflow_uri': '', 'log_images': True,
                **train_state.LATER_HPARAMS}
# Fields that runs were saved with and capvae no longer has: the value under
# which a saved run is the same run without them, and what became of them.
REMOVED_FIELDS = {
    'microbatch_size': (0, 'each step takes the gradient of the whole batch (micro-batches'
                           ' were at most a few percent faster on the CPUs measured, and'
                           ' slower on others). Delete it from the config; a run saved with'
                           ' micro-batches resumes on whole batches (the same gradient up'
                           ' to float rounding).'),
}


def normalize(config):
  """Gives ``config`` (in place; returned) the fields of :data:`LATER_FIELDS`
  that it lacks, with the values runs saved before them used, and drops those
  of :data:`REMOVED_FIELDS`. Every loader of a saved config and the training
  entry point call it, so the rest of capvae reads every field directly."""
  missing = {k: v for k, v in LATER_FIELDS.items() if k not in config}
  removed = [k for k in REMOVED_FIELDS if k in config]
  # config.json holds trackers as a list, which would refuse the command
  # line's --config.trackers=a,b; and that arrives as ('a,b',).
  from capvae import tracking  # pylint: disable=g-import-not-at-top
  trackers = config.get('trackers')
  resplit = (isinstance(trackers, (list, tuple)) and
             tracking.split_names(trackers) != trackers)
  if missing or removed or resplit:
    unlocked = getattr(config, 'unlocked', None)
    with unlocked() if unlocked else contextlib.nullcontext():
      for k, v in missing.items():
        config[k] = v
      for k in removed:
        del config[k]
      if resplit:
        del config['trackers']
        config['trackers'] = tracking.split_names(trackers)
  return config


def model(config, observation_shape):
  """The Flax VAE ``config`` names, for images of ``observation_shape``, its
  layers computed as ``config.conv_impl`` resolves on this platform."""
  return models.get(config.model, config.latent_size, observation_shape, config.init,
                    backend.resolve_layers(config.conv_impl))


def objective(config, num_examples: int = 0) -> losses.Objective:
  """The :class:`capvae.losses.Objective` that ``config``'s static kinds name;
  ``num_examples`` is the size of the dataset (the 'mss' estimator's N)."""
  return losses.Objective(
      objective=config.objective, reconstruction=config.reconstruction,
      capacity_penalty=config.capacity_penalty, schedule=config.schedule,
      beta_norm=bool(config.beta_norm), tc_estimator=config.tc_estimator,
      dataset_size=int(num_examples) if config.tc_estimator == 'mss' else 0,
      dip_type=config.dip_type, discriminator_layers=int(config.discriminator_layers),
      discriminator_units=int(config.discriminator_units),
      impl=backend.resolve_layers(config.conv_impl))


def identity(config: Mapping[str, Any]) -> dict[str, Any]:
  """The fields that define a run's trajectory (all but bookkeeping and removed
  fields)."""
  out = {k: v for k, v in dict(config).items()
         if k not in BOOKKEEPING_FIELDS and k not in REMOVED_FIELDS}
  for k, v in LATER_FIELDS.items():
    out.setdefault(k, v)
  return out


def differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Human-readable differences between two configs' identities."""
  a, b = identity(saved), identity(new)
  out = []
  for k in sorted(set(a) | set(b)):
    if a.get(k, '<absent>') != b.get(k, '<absent>'):
      out.append(f'{k}: {a.get(k, "<absent>")!r} -> {b.get(k, "<absent>")!r}')
  return out


def sibling(config_file: str, name: str):
  """Imports config module ``name`` from the folder of ``config_file``.

  Variant configs start from ``default.get_config()`` (as flax's
  ``imagenet/configs/tpu.py`` does) whatever the working directory:
  ``default = config_lib.sibling(__file__, 'default')``.
  """
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name + '.py')
  spec = importlib.util.spec_from_file_location(f'capvae_configs.{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
