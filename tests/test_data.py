"""Procedural dSprites: the properties a disentanglement study relies on."""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capvae import data
from capvae.data import dsprites
from capvae.errors import ConfigError

DS = dsprites.ProceduralDSprites()
render = jax.jit(DS.render)


def _grid(**fixed):
  """All factor rows with the given factors fixed (names -> index or list)."""
  axes = []
  for name, size in zip(DS.factor_names, DS.factor_sizes):
    v = fixed.get(name, range(size))
    axes.append([v] if isinstance(v, int) else list(v))
  return np.array(list(itertools.product(*axes)), np.int32)


def test_official_grid_and_ordering():
  assert DS.factor_names == ('shape', 'scale', 'orientation', 'posX', 'posY')
  assert DS.factor_sizes == (3, 6, 40, 32, 32)
  assert DS.num_examples == 737_280
  assert DS.observation_shape == (64, 64, 1)
  np.testing.assert_allclose(dsprites.scale_values(), np.linspace(0.5, 1, 6))
  o = dsprites.orientation_values()
  assert o[0] == 0 and o[-1] == pytest.approx(2 * np.pi)
  # posY varies fastest in the flat index, as in the official file.
  assert int(DS.flat_index(jnp.array([[0, 0, 0, 0, 1]]))[0]) == 1
  assert int(DS.flat_index(jnp.array([[0, 0, 0, 1, 0]]))[0]) == 32
  assert int(DS.flat_index(jnp.array([[2, 5, 39, 31, 31]]))[0]) == 737_279


def test_binary_and_every_shape_stays_in_the_frame():
  # Translation is rigid, so the extreme positions bound every other one: all
  # shapes, scales and orientations at the four corners.
  rows = _grid(posX=[0, 31], posY=[0, 31])
  imgs = np.asarray(render(rows))[..., 0]
  assert set(np.unique(imgs)) == {0.0, 1.0}
  border = np.concatenate([imgs[:, 0], imgs[:, -1], imgs[:, :, 0], imgs[:, :, -1]], 1)
  assert border.max() == 0.0, 'a shape touches the frame'
  assert imgs.sum((1, 2)).min() > 10, 'a shape vanished'


def _centroid(imgs):
  ii, jj = np.mgrid[:64, :64]
  m = imgs.sum((1, 2))
  return (imgs * jj).sum((1, 2)) / m, (imgs * ii).sum((1, 2)) / m


@pytest.mark.parametrize('shape', [0, 1, 2])
def test_centroid_moves_monotonically_with_position(shape):
  for scale, orientation in ((0, 0), (5, 7), (3, 23), (5, 31)):
    x_rows = _grid(shape=shape, scale=scale, orientation=orientation, posY=16)
    cx, cy = _centroid(np.asarray(render(x_rows))[..., 0])
    assert np.all(np.diff(cx) > 0), (scale, orientation, cx)
    assert np.ptp(cy) < 0.5  # moving along x leaves y alone (up to rasterisation)
    y_rows = _grid(shape=shape, scale=scale, orientation=orientation, posX=16)
    cx, cy = _centroid(np.asarray(render(y_rows))[..., 0])
    assert np.all(np.diff(cy) > 0), (scale, orientation, cy)
    assert np.ptp(cx) < 0.5


def test_area_grows_with_scale():
  for shape, orientation in itertools.product(range(3), (0, 5, 17, 30)):
    rows = _grid(shape=shape, orientation=orientation, posX=16, posY=16)
    area = np.asarray(render(rows)).sum((1, 2, 3))
    assert np.all(np.diff(area) > 0), (shape, orientation, area)
    # Area goes as scale^2 (0.5 -> 1 is x4), up to rasterisation.
    assert 3.2 < area[-1] / area[0] < 4.8


def test_the_three_shapes_differ():
  for scale, orientation in itertools.product((0, 5), (0, 10)):
    rows = _grid(scale=scale, orientation=orientation, posX=16, posY=16)
    imgs = np.asarray(render(rows))
    for a, b in itertools.combinations(range(3), 2):
      assert np.abs(imgs[a] - imgs[b]).sum() >= 10, (scale, orientation, a, b)


def test_rotation_changes_an_asymmetric_shape_and_is_periodic():
  rows = _grid(shape=2, scale=5, posX=16, posY=16)  # hearts at 40 angles
  imgs = np.asarray(render(rows))
  np.testing.assert_array_equal(imgs[0], imgs[-1])  # 0 and 2 pi
  assert np.abs(imgs[0] - imgs[20]).sum() > 50  # upside-down heart


def test_sample_factors_in_range_and_uniform():
  f = np.asarray(DS.sample_factors(jax.random.key(0), 20_000))
  assert f.shape == (20_000, 5) and f.dtype == np.int32
  for k, size in enumerate(DS.factor_sizes):
    counts = np.bincount(f[:, k], minlength=size)
    assert len(counts) == size and counts.min() > 0
    expected = 20_000 / size
    assert np.abs(counts - expected).max() < 6 * np.sqrt(expected)


def _write_npz(path, imgs_dtype=np.uint8, sizes=(1, 3, 2, 2, 4, 4), **override):
  classes = np.array(list(itertools.product(*[range(s) for s in sizes])), np.int64)
  rows = np.stack([classes[:, 1], classes[:, 2] * 5, classes[:, 3] * 13,
                   classes[:, 4] * 8, classes[:, 5] * 8], 1)
  imgs = np.asarray(render(rows))[..., 0].astype(imgs_dtype)
  values = classes.astype(np.float64)
  contents = dict(imgs=imgs, latents_classes=classes, latents_values=values)
  contents.update(override)
  contents = {k: v for k, v in contents.items() if v is not None}
  np.savez(path, **contents)
  return imgs, classes


def test_npz_loader_reads_the_official_format(tmp_path):
  path = str(tmp_path / dsprites.OFFICIAL_FILENAME)
  imgs, classes = _write_npz(path)
  ds = data.get('dsprites', path)
  assert ds.factor_sizes == (3, 2, 2, 4, 4)
  assert ds.observation_shape == (64, 64, 1)
  factors = jnp.asarray(classes[::7, 1:], jnp.int32)
  got = np.asarray(jax.jit(ds.render)(factors))[..., 0]
  np.testing.assert_array_equal(got, imgs[::7])
  f = np.asarray(ds.sample_factors(jax.random.key(1), 500))
  assert (f.max(0) < np.array(ds.factor_sizes)).all()


def test_npz_loader_refuses_bad_files(tmp_path):
  with pytest.raises(ConfigError, match='no dSprites file'):
    data.get('dsprites', str(tmp_path / 'missing.npz'))
  p = str(tmp_path / 'nokey.npz')
  _write_npz(p, latents_classes=None)
  with pytest.raises(ConfigError, match='latents_classes'):
    data.get('dsprites', p)
  p = str(tmp_path / 'shape.npz')
  _write_npz(p, imgs=np.zeros((5, 64, 64), np.uint8))
  with pytest.raises(ConfigError, match='latents_classes must have shape'):
    data.get('dsprites', p)
  p = str(tmp_path / 'nan.npz')
  imgs, _ = _write_npz(p, imgs_dtype=np.float32)
  imgs[3, 10, 10] = np.nan
  _write_npz(p, imgs_dtype=np.float32, imgs=imgs)
  with pytest.raises(ConfigError, match='NaN'):
    data.get('dsprites', p)
  p = str(tmp_path / 'order.npz')
  imgs, classes = _write_npz(p)
  _write_npz(p, latents_classes=classes[::-1].copy())
  with pytest.raises(ConfigError, match='order'):
    data.get('dsprites', p)
  with pytest.raises(ConfigError, match='allowed'):
    data.get('mnist')
  assert not os.path.exists(str(tmp_path / 'missing.npz'))
