"""Datasets from TensorFlow Datasets (TFDS), read by random access, without TensorFlow.

A dataset is named ``'tfds:<name>[/<config>][:<version>]'`` (see :func:`parse_name`) and
read with :func:`load` from a TFDS ``data_dir`` where it was prepared in the
``array_record`` file format, through ``tfds.data_source`` (random access; no
``tf.data``, no TensorFlow). capvae never downloads or prepares a dataset: on a
machine with internet run::

  tfds build <name>[/<config>] --data_dir=<dir> --file_format=array_record

and copy ``<dir>/<name>`` into the ``data_dir`` given to :func:`load`.

Every example of the split is read once, on the host, when the dataset is
loaded; the images then stay on the device as an array field of the (pytree)
dataset, as :class:`capvae.data.dsprites.DSpritesNpz` does, and ``render`` is a
gather on the device inside the jitted step.

Images:

* decoded by TFDS (PIL) to ``[H, W, C]``; the channel count is kept (grayscale
  stays ``C = 1``);
* brought to ``image_size`` × ``image_size`` (64 by default) when they differ:
  a centre crop to a square (the shorter side), then a resize of each channel
  with PIL, ``BOX`` (area averaging) when shrinking and ``BILINEAR`` when
  enlarging. ``image_size=None`` keeps the stored size (all images must then
  share one shape);
* stored on the device as ``uint8``, or bit-packed along the width when every
  pixel of the split is 0 or one "on" value (1, as in TFDS ``dsprites``, or
  255): ``render`` then gives exactly 0 and 1. Other ``uint8`` images render as
  ``value / 255``; ``uint16`` images are rounded to ``uint8`` first. ``float32``
  images (single channel in TFDS) must be finite and lie in [0, 1]; they are
  stored and rendered as they are;
* refused when the stored array would exceed ``max_bytes``
  (:data:`MAX_DEVICE_BYTES`, 8 GiB): streaming from the host is not implemented.

Factors:

* ``dsprites`` and ``shapes3d`` (or any dataset with their ``label_*``
  features) are ground-truth datasets (:class:`TfdsGroundTruth`,
  ``has_factors = True``) with the factor names and order of capvae's own
  versions (:data:`capvae.data.dsprites.FACTOR_NAMES`,
  :data:`capvae.data.shapes3d.FACTOR_NAMES`) and sizes from the features
  (``(3, 6, 40, 32, 32)`` and ``(10, 10, 10, 8, 4, 15)`` for the official
  data). TFDS stores records in its own (shuffled) order; an index array maps a
  grid point's flat index to its record, so ``render(factors)`` gathers the
  right image. A split must hold every grid point exactly once (the full
  official ``train`` split does) unless ``partial_grid=True`` is passed: then
  only the grid points present are used (the first record of each);
  ``sample_factors`` draws uniformly from them, ``complete_grid`` is ``False``,
  and ``render`` of a grid point that is absent gives an all-zero image (the
  disentanglement metrics, which draw from the whole grid, are not meaningful
  on a partial grid).
* Any other image dataset (``mnist``, ``celeb_a``, …) is unlabelled
  (:class:`TfdsImages`, ``has_factors = False``): one pseudo-factor ``index``
  of size N, the record's position in the split (TFDS's stored order), so
  ``sample_factors`` draws examples uniformly.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from capvae.data import base
from capvae.data import dsprites
from capvae.data import shapes3d
from capvae.errors import ConfigError

PREFIX = 'tfds:'
#: Side of the square images :func:`load` makes by default.
IMAGE_SIZE = 64
#: Largest image array :func:`load` puts on the device (bytes, after bit-packing). The
#: official shapes3d (480,000 RGB 64×64 images) takes 5.5 GiB, dsprites (bit-packed) 0.35 GiB,
#: the celeb_a train split at 64×64 1.9 GiB.
MAX_DEVICE_BYTES = 8 * 1024**3
#: Records read from the data source per ``__getitems__`` call.
READ_CHUNK = 1024

#: Ground-truth datasets: TFDS name -> ((capvae factor name, TFDS label feature), …),
#: in capvae's factor order.
GROUND_TRUTH = {
    'dsprites': tuple(zip(dsprites.FACTOR_NAMES, (
        'label_shape', 'label_scale', 'label_orientation', 'label_x_position',
        'label_y_position'))),
    'shapes3d': tuple(zip(shapes3d.FACTOR_NAMES, (
        'label_floor_hue', 'label_wall_hue', 'label_object_hue', 'label_scale', 'label_shape',
        'label_orientation'))),
}

_NAME_RE = re.compile(
    r'(?P<name>[a-z][a-z0-9_]*)'
    r'(?:/(?P<config>[A-Za-z0-9][A-Za-z0-9_.\-]*))?'
    r'(?::(?P<version>\d+\.\d+\.\d+))?')

_log = logging.getLogger(__name__)


class TfdsName(NamedTuple):
  """A parsed ``'tfds:<name>[/<config>][:<version>]'``."""

  name: str
  config: str | None = None
  version: str | None = None

  @property
  def spec(self) -> str:
    """The name as TFDS takes it: ``name[/config][:version]``."""
    out = self.name
    if self.config:
      out += f'/{self.config}'
    if self.version:
      out += f':{self.version}'
    return out


def parse_name(name: str) -> TfdsName:
  """Parses ``'tfds:<name>[/<config>][:<version>]'``.

  Args:
    name: e.g. ``'tfds:mnist'``, ``'tfds:celeb_a:2.1.0'``,
      ``'tfds:cifar10_corrupted/brightness_1'``. The name is TFDS's snake_case
      dataset name, the config a TFDS builder config, the version ``X.Y.Z``.

  Returns:
    ``TfdsName(name, config, version)`` (a named tuple; config and version are
    ``None`` when not given).

  Raises:
    ConfigError: when ``name`` does not have that form.
  """
  if not isinstance(name, str) or not name.startswith(PREFIX):
    raise ConfigError(
        f'dataset {name!r}: a TFDS dataset is named'
        f" '{PREFIX}<name>[/<config>][:<version>]', e.g. '{PREFIX}mnist'.")
  m = _NAME_RE.fullmatch(name[len(PREFIX):])
  if not m:
    raise ConfigError(
        f'dataset {name!r}: expected {PREFIX}<name>[/<config>][:<version>] with a'
        ' snake_case name (a-z, 0-9, _), a config of letters, digits, _ . -, and a version'
        f" X.Y.Z, e.g. '{PREFIX}mnist', '{PREFIX}celeb_a:2.1.0'.")
  return TfdsName(m['name'], m['config'], m['version'])


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


# ---------------------------------------------------------------------------- the datasets


def _decode(rows: jax.Array, storage: str, width: int) -> jax.Array:
  """Stored rows ``[n, H, W', C]`` -> float32 images in [0, 1]."""
  if storage == 'binary':
    return jnp.unpackbits(rows, axis=2, count=width).astype(jnp.float32)
  if storage == 'uint8':
    return rows.astype(jnp.float32) * (1.0 / 255.0)
  return rows.astype(jnp.float32)


class _TfdsImageStore(base.GroundTruthDataset):
  """What both TFDS datasets share: the images on the device, and where they came from."""

  #: ``'binary'`` (bit-packed along the width), ``'uint8'`` or ``'float32'``.
  _storage: str
  #: ``'tfds:<name>…'``, the split and the data_dir, for messages.
  source: str

  @property
  def num_records(self) -> int:
    """Records (images) held, ``len`` of the split."""
    return int(self._images.shape[0])

  @property
  def device_bytes(self) -> int:
    """Bytes of the device arrays."""
    return sum(int(getattr(self, f).nbytes) for f in self._array_fields)

  def _rows(self, records: jax.Array) -> jax.Array:
    return _decode(self._images[records], self._storage, self.observation_shape[1])

  def __repr__(self) -> str:
    factors = dict(zip(self.factor_names, self.factor_sizes))
    return (f'{type(self).__name__}({self.source}, factors={factors},'
            f' observation_shape={self.observation_shape}, storage={self._storage})')


@base.register
class TfdsImages(_TfdsImageStore):
  """An image dataset without factors: one pseudo-factor ``index`` of size N.

  ``render([[i]])`` is the image of record ``i`` of the split (TFDS's stored
  order).
  """

  has_factors = False
  _array_fields = ('_images',)

  def __init__(self, images: np.ndarray, storage: str, observation_shape: tuple[int, int, int],
               source: str):
    """Wraps host images already read and checked; see :func:`load`."""
    self.factor_names = ('index',)
    self.factor_sizes = (int(images.shape[0]),)
    self.observation_shape = tuple(int(s) for s in observation_shape)
    self._storage = storage
    self.source = source
    self._images = jnp.asarray(images)

  def render(self, factors):
    factors = jnp.asarray(factors, jnp.int32)
    return self._rows(factors[:, 0])


@base.register
class TfdsGroundTruth(_TfdsImageStore):
  """A factor grid from TFDS labels: ``render`` gathers the record of each grid point.

  ``_index[flat_index(factors)]`` is the record holding that grid point (``-1``
  when the split lacks it, only with ``complete_grid = False``); ``_present``
  lists the flat indices present (empty for a complete grid, where
  ``sample_factors`` is the base class's uniform draw).
  """

  has_factors = True
  _array_fields = ('_images', '_index', '_present')

  def __init__(self, images: np.ndarray, storage: str, observation_shape: tuple[int, int, int],
               source: str, factor_names: Sequence[str], factor_sizes: Sequence[int],
               labels: np.ndarray, partial_grid: bool = False):
    """Wraps host images and their ``[N, K]`` factor labels; see :func:`load`."""
    self.factor_names = tuple(factor_names)
    self.factor_sizes = tuple(int(s) for s in factor_sizes)
    self.observation_shape = tuple(int(s) for s in observation_shape)
    self._storage = storage
    self.source = source
    grid = math.prod(self.factor_sizes)
    strides = base.strides(self.factor_sizes)
    flat = labels.astype(np.int64) @ np.asarray(strides, np.int64)
    present, first = np.unique(flat, return_index=True)
    self.complete_grid = len(present) == grid
    if not self.complete_grid or len(flat) != grid:
      summary = (f'{source}: the split covers {len(present)} of the {grid} points of the grid'
                 f' {dict(zip(self.factor_names, self.factor_sizes))} with {len(flat)} records'
                 f' ({len(flat) - len(present)} repeat a grid point)')
      if not partial_grid:
        raise ConfigError(
            f'{summary}; a ground-truth dataset needs every grid point exactly once (load the'
            ' whole official split, e.g. train), or pass partial_grid=True to use only the'
            ' points present.')
      _log.warning('%s; using the points present (the first record of each).', summary)
    index = np.full(grid, -1, np.int32)
    index[present] = first
    self._images = jnp.asarray(images)
    self._index = jnp.asarray(index)
    self._present = jnp.asarray(
        present if not self.complete_grid else np.zeros(0, np.int64), jnp.int32)

  @property
  def num_present(self) -> int:
    """Grid points the split holds (``num_examples`` for a complete grid)."""
    return self.num_examples if self.complete_grid else int(self._present.shape[0])

  def sample_factors(self, key: jax.Array, n: int) -> jax.Array:
    """``n`` factor rows ``[n, K]`` int32, uniform over the grid points present."""
    if self.complete_grid:
      return super().sample_factors(key, n)
    flat = self._present[jax.random.randint(key, (n,), 0, self._present.shape[0], jnp.int32)]
    strides = base.strides(self.factor_sizes)
    sizes = jnp.asarray(self.factor_sizes, jnp.int32)
    return (flat[:, None] // jnp.asarray(strides, jnp.int32)) % sizes

  def is_present(self, factors: jax.Array) -> jax.Array:
    """``[n]`` bool: does the split hold each grid point (always true when complete)?"""
    return self._index[self.flat_index(factors)] >= 0

  def render(self, factors):
    records = self._index[self.flat_index(factors)]
    if self.complete_grid:
      return self._rows(records)
    images = self._rows(jnp.maximum(records, 0))
    return images * (records >= 0).astype(jnp.float32)[:, None, None, None]


@base.register
class StreamedBatch(base.GroundTruthDataset):
  """One step's batch of a :class:`TfdsStream`, as the dataset the jitted step sees.

  The step draws ``n`` rows and renders them; here the rows are simply slots
  ``0…B-1`` of the batch the host read for this step (the random choice of
  records was made on the host, from ``(data_seed, step)``).
  """

  has_factors = False
  _array_fields = ('_images',)

  def __init__(self, images: np.ndarray, observation_shape: tuple[int, int, int]):
    self.factor_names = ('slot',)
    self.factor_sizes = (int(images.shape[0]),)
    self.observation_shape = tuple(int(s) for s in observation_shape)
    self._images = images

  def sample_factors(self, key: jax.Array, n: int) -> jax.Array:
    del key
    return (jnp.arange(n, dtype=jnp.int32) % self.factor_sizes[0])[:, None]

  def render(self, factors):
    return jnp.asarray(self._images)[jnp.asarray(factors, jnp.int32)[:, 0]].astype(
        jnp.float32) * (1.0 / 255.0)


class TfdsStream:
  """An image dataset too large for the device, read from the host step by step.

  The records of step ``s`` are ``records_at(data_seed, s, batch)``, a pure
  function of the step, so a resumed run reads exactly the batches it would
  have. :meth:`batch` reads and decodes them (``tfds.data_source``, random
  access) into a :class:`StreamedBatch`; the train loop keeps a few steps
  ahead on a background thread (:class:`capvae.data.prefetch.Prefetcher`).
  """

  has_factors = False
  streamed = True

  def __init__(self, source, n: int, image_key: str, image_feature, image_size, hwc, desc):
    self._source = source
    self._image_key = image_key
    self._dtype = np.dtype(image_feature.np_dtype)
    self._image_size = image_size
    self.factor_names = ('index',)
    self.factor_sizes = (int(n),)
    self.observation_shape = tuple(int(s) for s in hwc)
    self.source = desc

  @property
  def num_examples(self) -> int:
    return self.factor_sizes[0]

  @property
  def input_size(self) -> int:
    return math.prod(self.observation_shape)

  def records_at(self, data_seed: int, step: int, batch: int) -> np.ndarray:
    """The records of step ``step``: ``batch`` uniform draws, a pure function of the step."""
    rng = np.random.default_rng([int(data_seed), int(step), 0x5EED])
    return rng.integers(0, self.num_examples, batch)

  def host_images(self, records: Sequence[int]) -> np.ndarray:
    """uint8 images ``[n, H, W, C]`` of ``records``."""
    examples = self._source.__getitems__([int(r) for r in records])
    out = np.stack([_image(ex[self._image_key], int(r), self._dtype, self._image_size,
                           self.source) for r, ex in zip(records, examples)])
    if out.shape[1:] != self.observation_shape:
      raise ConfigError(f'{self.source}: records {list(records)[:4]}… have shape'
                        f' {out.shape[1:]}, not {self.observation_shape}.')
    if out.dtype != np.uint8:
      out = np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out

  def batch(self, data_seed: int, step: int, batch: int) -> StreamedBatch:
    """Step ``step``'s batch on the host, as a :class:`StreamedBatch`."""
    return StreamedBatch(self.host_images(self.records_at(data_seed, step, batch)),
                         self.observation_shape)

  def __repr__(self) -> str:
    return f'TfdsStream({self.source}, {self.num_examples} records, {self.observation_shape})'


# ---------------------------------------------------------------------------- loading


def load(name: str, data_dir: str | None, split: str = 'train', *,
         image_size: int | None = IMAGE_SIZE, partial_grid: bool = False,
         max_bytes: int | None = None) -> TfdsGroundTruth | TfdsImages | TfdsStream:
  """Reads a prepared TFDS dataset into a device-resident capvae dataset.

  Args:
    name: ``'tfds:<name>[/<config>][:<version>]'`` (the prefix may be left out).
    data_dir: the TFDS data directory holding ``<name>/[<config>/]<version>/``,
      prepared with ``--file_format=array_record``; empty or ``None`` means
      TFDS's default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    split: a TFDS split, slices included (``'train'``, ``'test[:1000]'``, …).
    image_size: side of the square images made (see the module docstring), or
      ``None`` to keep the stored size.
    partial_grid: for ground-truth datasets, accept a split that lacks grid
      points (or repeats them) and use the points present.
    max_bytes: the largest image array put on the device (default:
      ``$CAPVAE_MAX_DEVICE_BYTES``, else :data:`MAX_DEVICE_BYTES`).

  Returns:
    :class:`TfdsGroundTruth` for dsprites/shapes3d-like datasets, otherwise
    :class:`TfdsImages`, or, when those images would take more than
    ``max_bytes`` (as uint8), a :class:`TfdsStream` read from the host each
    step.

  Raises:
    ConfigError: for a bad name, a dataset or split missing from ``data_dir``,
      a dataset without images, images that are not finite or in range, or an
      array over ``max_bytes``.
  """
  if isinstance(name, str) and not name.startswith(PREFIX):
    name = PREFIX + name
  parsed = parse_name(name)
  if max_bytes is None:
    max_bytes = int(os.environ.get('CAPVAE_MAX_DEVICE_BYTES', MAX_DEVICE_BYTES))
  if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
    raise ConfigError(f'image_size must be a positive int or None, got {image_size!r}.')
  source_desc = f'{PREFIX}{parsed.spec} split {split!r} in data_dir {data_dir or "(default)"!r}'
  source = _open(parsed, data_dir, split)
  features = source.dataset_info.features
  image_key, image_feature = _image_feature(parsed, features)
  factors = _factor_features(parsed, features)
  n = len(source)
  if n == 0:
    raise ConfigError(f'{source_desc}: the split is empty.')

  start = time.perf_counter()
  if factors is None:
    # Chosen by size: an image dataset that does not fit is streamed from the host.
    first = _read_chunk(source, 0, 1, image_key, np.dtype(image_feature.np_dtype), None,
                        image_size, source_desc)[0]
    if n * math.prod(first.shape[1:]) > max_bytes:  # as uint8
      _log.info('%s: %d images do not fit in %.2f GiB; streaming them from the host.',
                source_desc, n, max_bytes / 2**30)
      return TfdsStream(source, n, image_key, image_feature, image_size, first.shape[1:],
                        source_desc)
  images, hwc, storage, labels = _read(source, n, image_key, image_feature, factors, image_size,
                                       max_bytes, source_desc)
  seconds = time.perf_counter() - start
  _log.info('%s: read %d records in %.1f s (%.2f s per 1000), %s storage %.1f MB',
            source_desc, n, seconds, 1000 * seconds / n, storage, images.nbytes / 1e6)
  if factors is None:
    return TfdsImages(images, storage, hwc, source_desc)
  return TfdsGroundTruth(images, storage, hwc, source_desc, [f for f, _, _ in factors],
                         [s for _, _, s in factors], labels, partial_grid=partial_grid)


def _data_dirs(data_dir: str | None) -> list[str]:
  if data_dir:
    return [str(data_dir)]
  from tensorflow_datasets.core.utils import file_utils  # pylint: disable=g-import-not-at-top
  return [str(d) for d in file_utils.list_data_dirs()]


def _missing(parsed: TfdsName, data_dir: str | None, split: str, detail: str) -> ConfigError:
  dirs = _data_dirs(data_dir)
  where = dirs[0] if len(dirs) == 1 else dirs
  target = data_dir or '<data_dir>'
  return ConfigError(
      f'dataset {PREFIX}{parsed.spec} (split {split!r}) is not prepared in data_dir {where!r}'
      f' ({detail}). capvae reads prepared TFDS datasets and never downloads: on a machine'
      f' with internet run\n  tfds build {parsed.spec} --data_dir=<dir>'
      f' --file_format=array_record\nthen copy <dir>/{parsed.name} to {target}/{parsed.name}'
      ' (and pass that directory as the data_dir).')


def _open(parsed: TfdsName, data_dir: str | None, split: str):
  """``tfds.data_source`` of the split, never downloading; clear errors when it fails."""
  tfds = _tfds()
  try:
    return tfds.data_source(parsed.spec, split=split, data_dir=data_dir or None, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise _missing(parsed, data_dir, split,
                   f'no {parsed.spec} there, and TFDS has no code for {parsed.name!r}') from None
  except Exception as e:  # pylint: disable=broad-exception-caught
    error = e
  # The data source failed: say whether the dataset is absent or why it cannot be read.
  message = str(error).split('\n', 1)[0]
  try:
    builder = tfds.builder(parsed.spec, data_dir=data_dir or None)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _missing(parsed, data_dir, split,
                   f'TFDS: {type(e).__name__}: {str(e).splitlines()[0]}') from error
  path = str(builder.data_path)
  if not builder.is_prepared():
    raise _missing(parsed, data_dir, split, f'no prepared dataset at {path}') from None
  if isinstance(error, NotImplementedError):
    raise ConfigError(
        f'dataset {PREFIX}{parsed.spec} at {path} is not in a random-access file format'
        f' ({message}). Prepare it again with --file_format=array_record (tfds build'
        f' {parsed.spec} --data_dir=<dir> --file_format=array_record).') from error
  raise ConfigError(
      f'dataset {PREFIX}{parsed.spec} at {path}: cannot read split {split!r}:'
      f' {type(error).__name__}: {message}') from error


def _feature_summary(features) -> str:
  return ', '.join(f'{k}: {type(f).__name__}' for k, f in sorted(features.items()))


def _image_feature(parsed: TfdsName, features) -> tuple[str, Any]:
  """The key and feature of the image: ``'image'`` or the only top-level Image feature."""
  image_cls = _tfds().features.Image
  images = {k: f for k, f in features.items() if isinstance(f, image_cls)}
  if not images:
    raise ConfigError(
        f'dataset {PREFIX}{parsed.spec} has no image feature (a top-level tfds.features.Image);'
        f' its features are: {_feature_summary(features)}.')
  if 'image' in images:
    return 'image', images['image']
  if len(images) > 1:
    raise ConfigError(
        f'dataset {PREFIX}{parsed.spec} has several image features {sorted(images)} and none'
        " is called 'image'; capvae cannot tell which to use.")
  return next(iter(images.items()))


def _factor_features(parsed: TfdsName, features) -> tuple[tuple[str, str, int], ...] | None:
  """``((capvae factor, TFDS label feature, size), …)`` for a ground-truth dataset, else None."""
  class_label = _tfds().features.ClassLabel
  for gt_name, pairs in GROUND_TRUTH.items():
    if all(label in features.keys() and isinstance(features[label], class_label)
           for _, label in pairs):
      return tuple((factor, label, int(features[label].num_classes)) for factor, label in pairs)
    if parsed.name == gt_name:
      missing = [label for _, label in pairs if label not in features.keys()]
      raise ConfigError(
          f'dataset {PREFIX}{parsed.spec}: expected the ClassLabel features'
          f' {[label for _, label in pairs]} of TFDS {gt_name} (missing: {missing}); its'
          f' features are: {_feature_summary(features)}.')
  return None


class _NotBinary(Exception):
  """A chunk showed that the split's images are not binary after all."""


class _TooLarge(ConfigError):
  """The images would take more than ``max_bytes`` on the device."""


def _read(source, n: int, image_key: str, image_feature, factors, image_size: int | None,
          max_bytes: int, desc: str):
  """Reads every record: ``(images as stored, (H, W, C), storage, labels [N, K] or None)``.

  The first chunk decides whether the images are binary; if so they are packed
  chunk by chunk (the whole uint8 array is never held), and should a later
  chunk not be binary the split is read again unpacked.
  """
  dtype = np.dtype(image_feature.np_dtype)
  if dtype not in (np.uint8, np.uint16, np.float32):
    raise ConfigError(f'{desc}: image dtype {dtype} is not supported (uint8, uint16, float32).')
  read = lambda start, stop: _read_chunk(source, start, stop, image_key, dtype, factors,
                                         image_size, desc)
  first = read(0, min(n, READ_CHUNK))
  if dtype != np.float32 and _on_value(first[0]) is not None:
    try:
      return _read_all(read, n, first, 'binary', max_bytes, desc)
    except _NotBinary:
      _log.info('%s: the images are not binary after all; reading them again as uint8.', desc)
  return _read_all(read, n, first, 'float32' if dtype == np.float32 else 'uint8', max_bytes,
                   desc)


def _read_all(read, n: int, first, storage: str, max_bytes: int, desc: str):
  """Reads all chunks into one array stored as ``storage`` (see :func:`_read`)."""
  hwc = first[0].shape[1:]
  h, w, c = hwc
  shape = (n, h, -(-w // 8), c) if storage == 'binary' else (n, h, w, c)
  out_dtype = np.dtype(np.float32 if storage == 'float32' else np.uint8)
  nbytes = math.prod(shape) * out_dtype.itemsize
  if nbytes > max_bytes:
    raise _TooLarge(
        f'{desc}: {n} images of {hwc} as {storage} take {nbytes / 2**30:.2f} GiB, over the'
        f' {max_bytes / 2**30:.2f} GiB limit of images kept on the device'
        ' (capvae.data.tfds_source.MAX_DEVICE_BYTES). A ground-truth dataset must fit (its'
        ' grid is gathered on the device): use a smaller image_size, or raise max_bytes if'
        ' the device has room.')
  images = np.empty(shape, out_dtype)
  labels = np.empty((n, first[1].shape[1]), np.int64) if first[1] is not None else None
  on = 0
  for start in range(0, n, READ_CHUNK):
    stop = min(n, start + READ_CHUNK)
    chunk, chunk_labels = first if start == 0 else read(start, stop)
    if chunk.shape[1:] != hwc:
      raise ConfigError(
          f'{desc}: images {start}…{stop - 1} have shape {chunk.shape[1:]}, record 0 has {hwc};'
          ' pass an image_size to bring them to one size.')
    if storage == 'binary':
      chunk_on = _on_value(chunk)  # 0 when the chunk is all 0: compatible with any "on"
      if chunk_on is None or (on and chunk_on and chunk_on != on):
        raise _NotBinary
      on = on or chunk_on
      images[start:stop] = np.packbits(chunk != 0, axis=2)
    else:
      images[start:stop] = chunk
    if labels is not None:
      labels[start:stop] = chunk_labels
  return images, hwc, storage, labels


def _read_chunk(source, start: int, stop: int, image_key: str, dtype, factors, image_size,
                desc):
  """``(images [n, H, W, C], labels [n, K] or None)`` of records ``start…stop-1``.

  Images are checked and brought to ``image_size``; labels checked against the
  factor sizes.
  """
  examples = source.__getitems__(list(range(start, stop)))
  images = [_image(ex[image_key], start + i, dtype, image_size, desc)
            for i, ex in enumerate(examples)]
  shapes = sorted({im.shape for im in images})
  if len(shapes) > 1:
    raise ConfigError(f'{desc}: images {start}…{stop - 1} have several shapes {shapes};'
                      ' pass an image_size to bring them to one size.')
  images = np.stack(images)
  if not factors:
    return images, None
  labels = np.asarray([[ex[label] for _, label, _ in factors] for ex in examples], np.int64)
  sizes = np.asarray([s for _, _, s in factors])
  bad = (labels < 0) | (labels >= sizes)
  if bad.any():
    i, k = np.argwhere(bad)[0]
    raise ConfigError(f'{desc}: record {start + i} has {factors[k][1]} = {labels[i, k]},'
                      f' outside 0…{sizes[k] - 1}.')
  return images, labels


def _image(img, record: int, dtype, image_size: int | None, desc: str) -> np.ndarray:
  """One decoded image as ``[H, W, C]``, checked, converted and brought to ``image_size``."""
  img = np.asarray(img)
  if img.ndim == 2:
    img = img[..., None]
  if img.ndim != 3:
    raise ConfigError(f'{desc}: record {record} image has shape {img.shape}, not [H, W, C].')
  if dtype == np.float32:
    finite = np.isfinite(img)
    if not finite.all():
      raise ConfigError(f'{desc}: record {record} image holds {int(np.sum(~finite))} NaN or'
                        ' infinite values.')
    if img.size and (img.min() < 0 or img.max() > 1):
      raise ConfigError(f'{desc}: record {record} float image lies in [{img.min()},'
                        f' {img.max()}], not [0, 1].')
    img = img.astype(np.float32)
  elif dtype == np.uint16:
    img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
  return _fit(img, image_size)


def _fit(img: np.ndarray, size: int | None) -> np.ndarray:
  """Centre crop to a square, then resize to ``size`` (BOX shrinking, BILINEAR enlarging)."""
  h, w = img.shape[:2]
  if size is None or (h == size and w == size):
    return img
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  img = img[top:top + s, left:left + s]
  if s == size:
    return np.ascontiguousarray(img)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  resample = Image.Resampling.BOX if s > size else Image.Resampling.BILINEAR
  if img.dtype == np.uint8 and img.shape[2] == 3:
    return np.asarray(Image.fromarray(img).resize((size, size), resample))
  chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c])).resize((size, size),
                                                                                resample))
           for c in range(img.shape[2])]
  out = np.stack(chans, axis=-1)
  return np.clip(out, 0.0, 1.0) if out.dtype == np.float32 else out


def _on_value(chunk: np.ndarray) -> int | None:
  """The "on" value when every pixel of a uint8 chunk is 0 or one value (0 if all are 0)."""
  hist = np.bincount(chunk.reshape(-1), minlength=256)
  used = np.flatnonzero(hist)
  if len(used) == 1 and used[0] == 0:
    return 0
  if len(used) == 1 and used[0] in (1, 255):
    return int(used[0])
  if len(used) == 2 and used[0] == 0 and used[1] in (1, 255):
    return int(used[1])
  return None
