"""Checking a run's config before anything is compiled or written.

Every rule names the field and what is allowed, so a typo fails in a second
with a readable message instead of minutes later inside XLA.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

from capvae import data, losses, models, schedules
from capvae.errors import ConfigError

OPTIMIZERS = ('adam',)

# Fields that do not change the training trajectory: where a run stops and how
# it reports. A workdir may be rerun with new values of these (e.g. a larger
# num_steps to continue training); any other difference is refused.
BOOKKEEPING_FIELDS = frozenset(
    {'num_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints'})


def _get(config, name):
  try:
    return config[name]
  except (KeyError, AttributeError):
    raise ConfigError(f'config.{name} is missing.') from None


def _number(config, name, *, lo=None, lo_open=False, integer=False):
  v = _get(config, name)
  kind = 'an integer' if integer else 'a number'
  if isinstance(v, bool) or not isinstance(v, numbers.Real) or (
      integer and not isinstance(v, numbers.Integral)):
    raise ConfigError(f'config.{name} = {v!r}: must be {kind}.')
  if not math.isfinite(v):
    raise ConfigError(f'config.{name} = {v!r}: must be finite.')
  if lo is not None and (v <= lo if lo_open else v < lo):
    raise ConfigError(
        f'config.{name} = {v!r}: must be {">" if lo_open else ">="} {lo}.')


def _choice(config, name, allowed):
  v = _get(config, name)
  if v not in allowed:
    raise ConfigError(
        f'config.{name} = {v!r} is unknown; allowed: {", ".join(map(repr, allowed))}.')


def validate(config) -> None:
  """Raises :class:`ConfigError` on the first invalid field of ``config``."""
  _choice(config, 'dataset', data.DATASETS)
  _choice(config, 'model', models.MODELS)
  _choice(config, 'objective', losses.OBJECTIVES)
  _choice(config, 'reconstruction', tuple(losses.RECONSTRUCTIONS))
  _choice(config, 'capacity_penalty', tuple(losses.CAPACITY_PENALTIES))
  _choice(config, 'schedule', tuple(schedules.SCHEDULES))
  _choice(config, 'optimizer', OPTIMIZERS)
  if not isinstance(_get(config, 'dataset_path'), str):
    raise ConfigError('config.dataset_path must be a string (empty: procedural).')
  if not isinstance(_get(config, 'beta_norm'), bool):
    raise ConfigError('config.beta_norm must be True or False.')
  for name in ('beta', 'gamma', 'c_max'):
    _number(config, name, lo=0.0)
  for name in ('learning_rate', 'gaussian_variance'):
    _number(config, name, lo=0.0, lo_open=True)
  for name in ('adam_b1', 'adam_b2'):
    _number(config, name, lo=0.0)
    if not _get(config, name) < 1:
      raise ConfigError(f'config.{name} = {config[name]!r}: must be in [0, 1).')
  _number(config, 'adam_eps', lo=0.0, lo_open=True)
  for name in ('c_anneal_steps', 'latent_size', 'batch_size', 'num_steps',
               'log_every', 'checkpoint_every', 'keep_checkpoints'):
    _number(config, name, lo=0, lo_open=True, integer=True)
  for name in ('seed', 'data_seed'):
    _number(config, name, lo=0, integer=True)
    if _get(config, name) >= 2**31:
      raise ConfigError(f'config.{name} = {config[name]!r}: must be < 2**31.')


def check_against_dataset(config, dataset) -> None:
  """Rules that need the dataset: batch size and image shape."""
  if config.batch_size > dataset.num_examples:
    raise ConfigError(
        f'config.batch_size = {config.batch_size}: larger than the dataset'
        f' ({dataset.num_examples} images).')
  h, w, _ = dataset.observation_shape
  if config.model != 'mlp' and (h % 16 or w % 16):
    raise ConfigError(
        f'config.model = {config.model!r} needs image sides divisible by 16;'
        f' the dataset has {h}×{w}. Use model="mlp".')


def identity(config: Mapping[str, Any]) -> dict[str, Any]:
  """The fields that define a run's trajectory (all but bookkeeping)."""
  return {k: v for k, v in dict(config).items() if k not in BOOKKEEPING_FIELDS}


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
