"""Procedural Shapes3D: the grid, and each factor changing its own part of the image."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capvae.data import shapes3d
from capvae.data.shapes3d import FLOOR, OBJECT, WALL

DS = shapes3d.ProceduralShapes3D()
_render_parts = jax.jit(DS.render_parts)
_BATCH = 64  # every call pads to a multiple of this, so few programs compile


def render_parts(rows):
  """``(images, labels)`` as numpy for factor rows ``[n, 6]``."""
  rows = np.asarray(rows, np.int32)
  n = len(rows)
  padded = np.concatenate([rows, np.zeros((-n % _BATCH, 6), np.int32)])
  images, labels = _render_parts(padded)
  return np.asarray(images)[:n], np.asarray(labels)[:n]


def _random_rows(seed, n=_BATCH):
  rng = np.random.default_rng(seed)
  return np.stack([rng.integers(0, s, n) for s in DS.factor_sizes], 1).astype(np.int32)


def _change(rows, k, seed):
  """``rows`` with factor ``k`` moved to a different random value in every row."""
  rng = np.random.default_rng(seed)
  out = rows.copy()
  out[:, k] = (out[:, k] + rng.integers(1, DS.factor_sizes[k], len(rows))) % DS.factor_sizes[k]
  return out


def _hue_distance(a, b):
  d = np.abs(np.asarray(a) - np.asarray(b)) % 1.0
  return np.minimum(d, 1.0 - d)


def test_official_grid_and_ordering():
  assert DS.factor_names == ('floor_hue', 'wall_hue', 'object_hue', 'scale', 'shape',
                             'orientation')
  assert DS.factor_sizes == (10, 10, 10, 8, 4, 15)
  assert DS.num_examples == 480_000
  assert DS.observation_shape == (64, 64, 3)
  assert DS.input_size == 64 * 64 * 3
  np.testing.assert_allclose(shapes3d.hue_values(), np.arange(10) / 10, atol=1e-12)
  np.testing.assert_allclose(shapes3d.scale_values(), np.linspace(0.75, 1.25, 8))
  np.testing.assert_allclose(shapes3d.orientation_values(), np.linspace(-30, 30, 15))
  assert shapes3d.SHAPES == ('cube', 'cylinder', 'sphere', 'capsule')
  # Orientation varies fastest in the flat index, as in the official file.
  assert int(DS.flat_index(jnp.array([[0, 0, 0, 0, 0, 1]]))[0]) == 1
  assert int(DS.flat_index(jnp.array([[0, 0, 0, 0, 1, 0]]))[0]) == 15
  assert int(DS.flat_index(jnp.array([[9, 9, 9, 7, 3, 14]]))[0]) == 479_999


def test_hsv_to_rgb_matches_colorsys():
  h, s, v = np.meshgrid(np.linspace(0, 0.99, 23), [0.0, 0.3, 0.75, 1.0], [0.2, 1.0])
  got = np.asarray(shapes3d.hsv_to_rgb(h, s, v))
  want = np.vectorize(colorsys.hsv_to_rgb, otypes=[float] * 3)(h, s, v)
  np.testing.assert_allclose(got, np.stack(want, -1), atol=1e-6)


def test_output_shape_dtype_range_and_labels():
  rows = np.asarray(DS.sample_factors(jax.random.PRNGKey(0), 48))
  images, labels = _render_parts(rows)
  assert images.shape == (48, 64, 64, 3) and images.dtype == jnp.float32
  assert labels.shape == (48, 64, 64) and labels.dtype == jnp.int32
  images, labels = np.asarray(images), np.asarray(labels)
  assert np.all(np.isfinite(images)) and images.min() >= 0.0 and images.max() <= 1.0
  assert set(np.unique(labels)) == {FLOOR, WALL, OBJECT}
  for c in (FLOOR, WALL, OBJECT):  # every image shows floor, wall and object
    assert (labels == c).sum((1, 2)).min() > 100
  # render is render_parts' images (eager here, so equal up to float rounding).
  np.testing.assert_allclose(np.asarray(DS.render(rows)), images, atol=2e-3)


def test_every_object_stays_in_the_frame():
  # The largest of each shape at every orientation, and the smallest.
  rows = np.array([[0, 0, 0, sc, sh, o] for sc in (0, 7) for sh in range(4) for o in range(15)],
                  np.int32)
  _, labels = render_parts(rows)
  obj = labels == OBJECT
  border = np.concatenate([obj[:, 0], obj[:, -1], obj[:, :, 0], obj[:, :, -1]], 1)
  assert not border.any(), 'an object touches the frame'
  # The floor is the lower part of the image, the wall the upper part.
  assert np.all(labels[:, -1] == FLOOR) and np.all(labels[:, 0] == WALL)


def test_deterministic_jittable_and_a_pytree():
  rows = _random_rows(1, 8)
  a, la = DS.render_parts(rows)  # eager
  b, lb = _render_parts(rows)
  c, lc = _render_parts(rows)
  np.testing.assert_array_equal(np.asarray(b), np.asarray(c))
  np.testing.assert_array_equal(np.asarray(lb), np.asarray(lc))
  np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-3)
  # The dataset passes through jit as an argument, and sampling works inside.
  f, x = jax.jit(lambda ds, key: ds.sample(key, 8))(DS, jax.random.PRNGKey(2))
  assert f.shape == (8, 6) and x.shape == (8, 64, 64, 3)
  np.testing.assert_array_equal(np.asarray(x), np.asarray(_render_parts(f)[0]))


# Least mean |pixel change| when a factor moves to another value (measured
# minima over 200 random rows: 0.035, 0.050, 0.0057, 0.0034, 0.012, 0.0048).
_MIN_CHANGE = {'floor_hue': 0.02, 'wall_hue': 0.02, 'object_hue': 0.003, 'scale': 0.002,
               'shape': 0.005, 'orientation': 0.002}


@pytest.mark.parametrize('k', range(6), ids=lambda k: DS.factor_names[k])
def test_every_factor_changes_every_image(k):
  rows = _random_rows(10 + k)
  base, _ = render_parts(rows)
  changed, _ = render_parts(_change(rows, k, 20 + k))
  diff = np.abs(changed - base).mean((1, 2, 3))
  assert diff.min() > _MIN_CHANGE[DS.factor_names[k]], diff.min()


@pytest.mark.parametrize('k,part', [(0, FLOOR), (1, WALL), (2, OBJECT)],
                         ids=['floor_hue', 'wall_hue', 'object_hue'])
def test_a_hue_changes_its_part_only(k, part):
  rows = _random_rows(30 + k)
  base, base_labels = render_parts(rows)
  changed, labels = render_parts(_change(rows, k, 40 + k))
  # Geometry (hence the object mask) is unchanged.
  np.testing.assert_array_equal(labels, base_labels)
  inside = labels == part
  # Every pixel outside the part is unchanged, bit for bit ...
  np.testing.assert_array_equal(changed[~inside], base[~inside])
  # ... and every pixel of it changes.
  assert np.abs(changed - base).max(-1)[inside].min() > 0.02


@pytest.mark.parametrize('shape', range(4), ids=shapes3d.SHAPES)
def test_object_area_grows_with_scale(shape):
  rng = np.random.default_rng(50 + shape)
  rows = []
  for _ in range(4):  # random hues and orientation; all 8 scales
    f = [*rng.integers(0, 10, 3), 0, shape, rng.integers(0, 15)]
    rows += [f[:3] + [sc] + f[4:] for sc in range(8)]
  _, labels = render_parts(rows)
  area = (labels == OBJECT).sum((1, 2)).reshape(4, 8)
  assert np.all(np.diff(area, axis=1) > 0), area
  # Roughly the square of the scale (perspective makes it a little more or less).
  ratio = area[:, -1] / area[:, 0]
  assert np.all((ratio > 1.9) & (ratio < 3.8)), ratio


def test_shape_changes_the_object_mask():
  rows = _random_rows(60, 16)
  all_shapes = np.repeat(rows, 4, axis=0)
  all_shapes[:, 4] = np.tile(np.arange(4), 16)
  _, labels = render_parts(all_shapes)
  masks = (labels == OBJECT).reshape(16, 4, 64, 64)
  for i in range(4):
    for j in range(i):
      differ = (masks[:, i] != masks[:, j]).sum((1, 2))
      assert differ.min() >= 10, (shapes3d.SHAPES[i], shapes3d.SHAPES[j], differ)


def test_orientation_turns_the_cube_not_the_round_shapes():
  rng = np.random.default_rng(70)
  rows = []
  for shape in range(4):
    for _ in range(2):
      f = [*rng.integers(0, 10, 3), rng.integers(0, 8), shape]
      rows += [f + [o] for o in range(15)]
  images, labels = render_parts(rows)
  images, labels = images.reshape(4, 2, 15, 64, 64, 3), labels.reshape(4, 2, 15, 64, 64)
  masks = labels == OBJECT
  # The cube's silhouette changes at every step of orientation.
  assert (masks[0, :, 1:] != masks[0, :, :-1]).sum((-1, -2)).min() >= 5
  # Cylinder, sphere and capsule are symmetric about the vertical axis: their
  # silhouettes are the same at every orientation, and so are their pixels
  # (the light turns with the camera) ...
  for shape in (1, 2, 3):
    first = masks[shape, :, :1]
    np.testing.assert_array_equal(masks[shape], np.broadcast_to(first, masks[shape].shape))
    obj = masks[shape][..., None]
    np.testing.assert_allclose(np.where(obj, images[shape], 0),
                               np.where(obj, images[shape, :, :1], 0), atol=1e-2)
  # ... but the room turns around them, so orientation still shows in every image.
  room = labels[:, :, :, None] != labels[:, :, None, :]  # [shape, row, o1, o2, H, W]
  pairs = room.sum((-1, -2))[:, :, ~np.eye(15, dtype=bool)]
  assert pairs.min() >= 3


def test_objects_are_shaded_and_keep_their_hue():
  rows = np.array([[f, w, o, 7, s, 7] for s in range(4) for f, w, o in
                   [(0, 3, 6), (5, 9, 1), (2, 2, 2), (8, 4, 0), (1, 7, 9)]], np.int32)
  images, labels = render_parts(rows)
  hues = shapes3d.hue_values()
  for img, lab, row in zip(images, labels, rows):
    for part, k in ((FLOOR, 0), (WALL, 1), (OBJECT, 2)):
      px = img[lab == part]
      h, s, _ = colorsys.rgb_to_hsv(*px.mean(0))
      assert _hue_distance(h, hues[row[k]]) < 1e-3, (row, part, h)
      assert s == pytest.approx(shapes3d.SATURATION, abs=1e-3)
    # Lambert shading: the object is lit unevenly, so it reads as a solid.
    value = img[lab == OBJECT].max(-1)
    assert value.max() - value.min() > 0.15, row


def test_trains_through_the_cli_and_the_metrics_run_on_it(tmp_path):
  """configs/shapes3d.py's dataset, a few steps of configs/test.py's size, then the metrics."""
  import os
  import subprocess
  import sys
  from capvae import evaluate
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = str(tmp_path / 'run')
  proc = subprocess.run(
      [sys.executable, '-m', 'capvae.main', '--config', os.path.join(root, 'configs/test.py'),
       f'--workdir={workdir}', '--config.dataset=shapes3d_procedural', '--config.num_steps=4'],
      cwd=root, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = evaluate.evaluate(workdir, scale=0.002, seed=0,
                             sizes=dict(beta_vae_batch_size=4, factor_vae_batch_size=4,
                                        information_images=1000))
  assert result['factor_names'] == list(shapes3d.FACTOR_NAMES)
  assert result['factor_sizes'] == [10, 10, 10, 8, 4, 15]
  rec = result['members'][0]
  assert set(rec['metrics']) == set(evaluate.HEADLINE)
  assert all(np.isfinite(v) for v in rec['metrics'].values())
  assert np.asarray(rec['mutual_information']).shape == (4, 6)
