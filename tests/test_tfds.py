"""TFDS datasets in capvae's interface, offline: tiny builders prepared in tmp_path, and mocks.

The builders are not registered with TFDS (``skip_registration``): they are
found in ``data_dir`` from their files, as a dataset built elsewhere with
``tfds build`` and copied over would be. Images are given to TFDS as PIL
images, which TFDS encodes with PIL (a numpy array would need TensorFlow's PNG
encoder).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
# Imported by name: tfds loads this submodule lazily, so whether the attribute
# path below exists otherwise depends on which tests ran first on the worker.
from tensorflow_datasets.core.data_sources import base as tfds_source_base

from capvae.data import base
from capvae.data import dsprites
from capvae.data import shapes3d
from capvae.data import tfds_source
from capvae.errors import ConfigError

# Under pytest-xdist, on one worker: they share the module's data_dir fixture.
pytestmark = pytest.mark.xdist_group('test_tfds')

_NUM_IMAGES = 48
# A reduced dSprites grid: shape, scale, orientation, posX, posY.
_SPRITE_SIZES = (2, 2, 3, 2, 2)


def _noise(i):
  """The 28×28 grayscale image with id ``i`` (any value 0…255)."""
  return np.random.default_rng(i).integers(0, 256, (28, 28), dtype=np.uint8)


def _sprite(flat):
  """A binary 16×16 image (0/1, as TFDS dsprites stores) spelling ``flat`` in its first row."""
  img = np.zeros((16, 16), np.uint8)
  img[0, :8] = np.unpackbits(np.uint8(flat))
  img[8:, 8:] = 1
  return img


class CapvaeTestImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """48 noise images with their id, and a class label."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(28, 28, 1)),
        'id': tfds.features.Tensor(shape=(), dtype=np.int64),
        'label': tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(_NUM_IMAGES):
      yield i, {'image': PIL.Image.fromarray(_noise(i)), 'id': i, 'label': i % 10}


class CapvaeTestSprites(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A complete reduced grid with TFDS dsprites' label features and binary images."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    labels = ('label_shape', 'label_scale', 'label_orientation', 'label_x_position',
              'label_y_position')
    features = {k: tfds.features.ClassLabel(num_classes=s)
                for k, s in zip(labels, _SPRITE_SIZES)}
    features['image'] = tfds.features.Image(shape=(16, 16, 1))
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for flat, f in enumerate(itertools.product(*map(range, _SPRITE_SIZES))):
      yield flat, {'image': PIL.Image.fromarray(_sprite(flat)), 'label_shape': f[0],
                   'label_scale': f[1], 'label_orientation': f[2], 'label_x_position': f[3],
                   'label_y_position': f[4]}


class CapvaeTestTable(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """No image at all."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'x': tfds.features.Tensor(shape=(3,), dtype=np.float32),
        'label': tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(4):
      yield i, {'x': np.full(3, i, np.float32), 'label': i % 2}


@pytest.fixture(scope='session')  # once per worker: see conftest.py
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  config = tfds.download.DownloadConfig(manual_dir=str(root / 'manual'))
  for cls in (CapvaeTestImages, CapvaeTestSprites, CapvaeTestTable):
    cls(data_dir=str(root), file_format='array_record').download_and_prepare(
        download_config=config)
  return str(root)


@jax.jit
def _sample(ds, key):
  return ds.sample(key, 64)


def test_parse_name():
  assert tfds_source.parse_name('tfds:mnist') == ('mnist', None, None)
  assert tfds_source.parse_name('tfds:celeb_a:2.1.0') == ('celeb_a', None, '2.1.0')
  parsed = tfds_source.parse_name('tfds:cifar10_corrupted/brightness_1:1.0.0')
  assert parsed == ('cifar10_corrupted', 'brightness_1', '1.0.0')
  assert parsed.spec == 'cifar10_corrupted/brightness_1:1.0.0'
  for bad in ('mnist', 'tfds:', 'tfds:MNIST', 'tfds:mnist/', 'tfds:a//b', 'tfds:mnist:1.0',
              'tfds:mnist:v1', 'tfds: mnist', 'tfds:mnist/a/b'):
    with pytest.raises(ConfigError, match='tfds:<name>'):
      tfds_source.parse_name(bad)


def test_unlabelled_images_round_trip(data_dir):
  ds = tfds_source.load('tfds:capvae_test_images', data_dir, 'train', image_size=None)
  assert isinstance(ds, tfds_source.TfdsImages) and isinstance(ds, base.GroundTruthDataset)
  assert not ds.has_factors
  assert ds.factor_names == ('index',) and ds.factor_sizes == (_NUM_IMAGES,)
  assert ds.observation_shape == (28, 28, 1) and ds._storage == 'uint8'
  # Record i of the split (TFDS's stored order, not the generation order) is index i.
  ids = [int(ex['id']) for ex in tfds.data_source('capvae_test_images', split='train',
                                                   data_dir=data_dir)]
  assert sorted(ids) == list(range(_NUM_IMAGES)) and ids != sorted(ids)
  images = np.asarray(jax.jit(ds.render)(jnp.arange(_NUM_IMAGES)[:, None]))
  assert images.dtype == np.float32 and images.shape == (_NUM_IMAGES, 28, 28, 1)
  want = np.stack([_noise(i) for i in ids])[..., None] / 255.0
  np.testing.assert_allclose(images, want, rtol=0, atol=1e-6)

  factors, batch = _sample(ds, jax.random.key(0))
  assert factors.shape == (64, 1) and factors.dtype == jnp.int32
  assert 0 <= int(factors.min()) and int(factors.max()) < _NUM_IMAGES
  np.testing.assert_allclose(np.asarray(batch), want[np.asarray(factors[:, 0])], atol=1e-6)
  # The dataset is a pytree whose only leaf is the uint8 image array.
  leaves = jax.tree_util.tree_leaves(ds)
  assert len(leaves) == 1 and leaves[0].dtype == jnp.uint8


def test_images_resized_to_64(data_dir):
  ds = tfds_source.load('capvae_test_images', data_dir, 'train[:8]')
  assert ds.observation_shape == (64, 64, 1) and ds.factor_sizes == (8,)
  images = np.asarray(ds.render(jnp.arange(8)[:, None]))
  assert images.shape == (8, 64, 64, 1) and 0 <= images.min() and images.max() <= 1
  assert images.std() > 0.05  # noise, not a blank image


def test_fit_crops_the_centre_then_resizes():
  img = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
  np.testing.assert_array_equal(tfds_source._fit(img, 30), img[5:35])
  big = np.random.default_rng(1).integers(0, 256, (128, 128, 1), dtype=np.uint8)
  blocks = big.reshape(64, 2, 64, 2, 1).astype(np.float64).mean((1, 3))
  # Shrinking averages areas (to within PIL's 8-bit rounding).
  assert np.abs(tfds_source._fit(big, 64).astype(np.float64) - blocks).max() <= 1
  assert tfds_source._fit(big[:16, :16], 64).shape == (64, 64, 1)


def test_ground_truth_grid_from_labels(data_dir):
  ds = tfds_source.load('tfds:capvae_test_sprites', data_dir, 'train', image_size=None)
  assert isinstance(ds, tfds_source.TfdsGroundTruth) and ds.has_factors and ds.complete_grid
  assert ds.factor_names == dsprites.FACTOR_NAMES and ds.factor_sizes == _SPRITE_SIZES
  assert ds.observation_shape == (16, 16, 1) and ds._storage == 'binary'
  assert ds._images.shape == (48, 16, 2, 1)  # 16 pixels a row packed into 2 bytes
  grid = np.array(list(itertools.product(*map(range, _SPRITE_SIZES))), np.int32)
  images = np.asarray(ds.render(grid))
  np.testing.assert_array_equal(images[..., 0], np.stack([_sprite(i) for i in range(48)]))
  factors, batch = _sample(ds, jax.random.key(1))
  flat = np.asarray(ds.flat_index(factors))
  np.testing.assert_array_equal(np.asarray(batch), images[flat])


def test_partial_grid_is_refused_or_used(data_dir):
  with pytest.raises(ConfigError, match='covers 40 of the 48 points.*partial_grid=True'):
    tfds_source.load('tfds:capvae_test_sprites', data_dir, 'train[:40]', image_size=None)
  ds = tfds_source.load('tfds:capvae_test_sprites', data_dir, 'train[:40]', image_size=None,
                        partial_grid=True)
  assert not ds.complete_grid and ds.num_present == 40
  factors, batch = _sample(ds, jax.random.key(2))
  assert bool(ds.is_present(factors).all())
  flat = np.asarray(ds.flat_index(factors))
  np.testing.assert_array_equal(np.asarray(batch)[..., 0], np.stack([_sprite(i) for i in flat]))
  grid = np.array(list(itertools.product(*map(range, _SPRITE_SIZES))), np.int32)
  absent = grid[~np.asarray(ds.is_present(grid))]
  assert len(absent) == 8 and float(jnp.abs(ds.render(absent)).max()) == 0.0


def test_errors(data_dir, tmp_path):
  with pytest.raises(ConfigError, match=f"(?s)not prepared in data_dir '{tmp_path}'.*"
                     'tfds build mnist --data_dir=<dir> --file_format=array_record'):
    tfds_source.load('tfds:mnist', str(tmp_path), 'train')
  with pytest.raises(ConfigError, match=f"not prepared in data_dir '{tmp_path}'"):
    tfds_source.load('tfds:capvae_test_images', str(tmp_path), 'train')
  assert list(tmp_path.iterdir()) == []  # nothing downloaded or prepared
  with pytest.raises(ConfigError, match="cannot read split 'test'.*Unknown split"):
    tfds_source.load('tfds:capvae_test_images', data_dir, 'test')
  with pytest.raises(ConfigError, match='no image feature.*label: ClassLabel, x: Tensor'):
    tfds_source.load('tfds:capvae_test_table', data_dir, 'train')
  # A factor grid is gathered on the device, so it must fit (image datasets stream).
  with pytest.raises(ConfigError, match='over the 0.00 GiB limit.*ground-truth dataset must fit'):
    tfds_source.load('tfds:capvae_test_sprites', data_dir, 'train', max_bytes=1000)
  with pytest.raises(ConfigError, match='tfds:<name>'):
    tfds_source.load('tfds:Mnist', data_dir, 'train')


class _FakeSource:
  """A stand-in data source of 8×8×1 images (TFDS needs TensorFlow to encode float ones)."""

  def __init__(self, images):
    self.images = images
    features = tfds.features.FeaturesDict(
        {'image': tfds.features.Image(shape=(8, 8, 1), dtype=images.dtype)})
    self.dataset_info = type('Info', (), {'features': features})()

  def __len__(self):
    return len(self.images)

  def __getitems__(self, keys):
    return [{'image': self.images[k]} for k in keys]


def test_float_images(monkeypatch):
  images = np.random.default_rng(0).random((5, 8, 8, 1), np.float32)
  monkeypatch.setattr(tfds_source, '_open', lambda *a: _FakeSource(images))
  ds = tfds_source.load('tfds:floats', '', 'train', image_size=None)
  assert ds._storage == 'float32'
  np.testing.assert_array_equal(np.asarray(ds.render(jnp.arange(5)[:, None])), images)
  images[3, 2, 1, 0] = np.nan
  with pytest.raises(ConfigError, match='record 3 image holds 1 NaN'):
    tfds_source.load('tfds:floats', '', 'train', image_size=None)
  images[3, 2, 1, 0] = 1.5
  with pytest.raises(ConfigError, match=r'record 3 float image lies in \[.*, 1.5\], not \[0, 1\]'):
    tfds_source.load('tfds:floats', '', 'train', image_size=None)


def test_binary_storage_is_decided_over_all_chunks(monkeypatch):
  monkeypatch.setattr(tfds_source, 'READ_CHUNK', 4)
  images = 255 * (np.random.default_rng(0).random((10, 8, 8, 1)) < 0.5).astype(np.uint8)
  monkeypatch.setattr(tfds_source, '_open', lambda *a: _FakeSource(images))
  ds = tfds_source.load('tfds:bits', '', 'train', image_size=None)  # 0/255: binary
  assert ds._storage == 'binary' and ds._images.shape == (10, 8, 1, 1)
  want = images / 255.0
  np.testing.assert_array_equal(np.asarray(ds.render(jnp.arange(10)[:, None])), want)
  images[9, 0, 0, 0] = 7  # the last chunk is not binary: everything is read again as uint8
  ds = tfds_source.load('tfds:bits', '', 'train', image_size=None)
  assert ds._storage == 'uint8'
  want[9, 0, 0, 0] = 7 / 255
  np.testing.assert_allclose(np.asarray(ds.render(jnp.arange(10)[:, None])), want, atol=1e-6)


@pytest.mark.parametrize('name, module, shape', [
    ('dsprites', dsprites, (64, 64, 1)), ('shapes3d', shapes3d, (64, 64, 3))])
def test_mock_official_datasets(name, module, shape, tmp_path, monkeypatch):
  # TFDS 4.9's mock sets the data source's __getitems__ as an unbound function
  # (it is called without `self` and fails); read the records one at a time.
  monkeypatch.setattr(tfds_source_base.BaseDataSource, '__getitems__',
                      lambda self, keys: [self[k] for k in keys])
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ConfigError, match=f'covers .* of the {np.prod(module.FACTOR_SIZES)}'):
      tfds_source.load(f'tfds:{name}', str(tmp_path), 'train')
    ds = tfds_source.load(f'tfds:{name}', str(tmp_path), 'train', partial_grid=True)
    source = tfds.data_source(name, split='train', data_dir=str(tmp_path))
    examples = [source[i] for i in range(24)]
  assert isinstance(ds, tfds_source.TfdsGroundTruth) and ds.has_factors
  assert ds.factor_names == module.FACTOR_NAMES and ds.factor_sizes == module.FACTOR_SIZES
  assert ds.observation_shape == shape and ds._storage == 'uint8'  # mock pixels are 0…255
  labels = [label for _, label in tfds_source.GROUND_TRUTH[name]]
  rows = np.array([[ex[k] for k in labels] for ex in examples], np.int32)
  images = np.asarray(ds.render(rows))
  first = {}
  for i, flat in enumerate(np.asarray(ds.flat_index(rows))):
    first.setdefault(flat, i)  # the first record of a repeated grid point is used
    np.testing.assert_allclose(images[i], examples[first[flat]]['image'] / 255.0, atol=1e-6)
  factors, batch = _sample(ds, jax.random.key(3))
  assert factors.shape == (64, len(module.FACTOR_NAMES))
  assert np.all((0 <= np.asarray(factors)) & (np.asarray(factors) < np.array(ds.factor_sizes)))
  assert set(np.asarray(ds.flat_index(factors)).tolist()) <= set(first)
  assert batch.shape == (64, *shape) and 0 <= float(batch.min()) and float(batch.max()) <= 1



def _train_cli(workdir, dataset, data_dir):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
      [sys.executable, '-m', 'capvae.main', '--config', os.path.join(root, 'configs/test.py'),
       f'--workdir={workdir}', f'--config.dataset={dataset}',
       f'--config.dataset_path={data_dir}', '--config.num_steps=6'],
      cwd=root, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize('dataset, has_factors', [('tfds:capvae_test_images', False),
                                                  ('tfds:capvae_test_sprites', True)])
def test_cli_trains_and_evaluates_on_a_prepared_tfds_dataset(data_dir, tmp_path, dataset,
                                                             has_factors):
  import json
  import os
  from capvae import evaluate
  workdir = str(tmp_path / 'run')
  proc = _train_cli(workdir, dataset, data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == [0, 2, 4, 5]
  assert all(np.isfinite(r['loss']) for r in rows)
  result = evaluate.evaluate(workdir, scale=0.01, seed=0)
  rec = result['members'][0]
  assert result['has_factors'] is has_factors
  assert bool(rec['metrics']) is has_factors
  assert len(rec['kl_per_latent']) == 4 and rec['rec'] > 0
  if has_factors:
    assert result['factor_names'] == list(dsprites.FACTOR_NAMES)
    assert result['factor_sizes'] == list(_SPRITE_SIZES)
    # A 48-image grid: every draw is served from at most 48 encoded images.
    assert result['encoded_images_per_member'] <= 48


def test_cli_names_the_searched_data_dir_when_a_dataset_is_missing(tmp_path):
  import os
  workdir = str(tmp_path / 'run')
  proc = _train_cli(workdir, 'tfds:capvae_not_there', str(tmp_path / 'empty'))
  assert proc.returncode == 2
  assert str(tmp_path / 'empty') in proc.stderr and 'tfds build' in proc.stderr
  assert not os.path.exists(workdir)


def test_a_dataset_over_the_device_limit_is_streamed_step_by_step(data_dir, monkeypatch):
  whole = tfds_source.load('tfds:capvae_test_images', data_dir)
  # 48 images of 64×64×1 take 196,608 bytes as uint8: a smaller limit streams them.
  monkeypatch.setenv('CAPVAE_MAX_DEVICE_BYTES', '100000')
  stream = tfds_source.load('tfds:capvae_test_images', data_dir)
  assert isinstance(stream, tfds_source.TfdsStream) and stream.streamed
  assert stream.num_examples == 48 and stream.observation_shape == (64, 64, 1)
  records = stream.records_at(3, 7, 16)
  np.testing.assert_array_equal(records, stream.records_at(3, 7, 16))  # a function of the step
  assert not np.array_equal(records, stream.records_at(3, 8, 16))
  batch = stream.batch(3, 7, 16)
  got = jax.jit(lambda ds: ds.render(ds.sample_factors(jax.random.key(0), 16)))(batch)
  want = whole.render(jnp.asarray(records)[:, None])
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_streamed_training_resumes_exactly(data_dir, tmp_path, monkeypatch):
  import json
  import os
  import sys
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from conftest import load_config
  from capvae import evaluate, train
  monkeypatch.setenv('CAPVAE_MAX_DEVICE_BYTES', '100000')

  def run(workdir, *stops):
    for stop in stops:
      config = load_config('test')
      config.dataset = 'tfds:capvae_test_images'
      config.dataset_path = data_dir
      config.num_steps = stop
      train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return [{k: v for k, v in json.loads(line).items() if k != 'steps_per_sec'} for line in f]

  one_go = run(str(tmp_path / 'a'), 6)
  resumed = run(str(tmp_path / 'b'), 4, 6)
  assert [r['step'] for r in one_go] == [0, 2, 4, 5]
  # The resumed run also logged step 3, the last step of its first leg.
  by_step = {r['step']: r for r in resumed}
  assert sorted(by_step) == [0, 2, 3, 4, 5]
  assert [by_step[r['step']] for r in one_go] == one_go
  result = evaluate.evaluate(str(tmp_path / 'a'), scale=0.01)
  assert result['has_factors'] is False and result['members'][0]['rec'] > 0
