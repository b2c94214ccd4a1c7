"""Shapes3D: a room corner with one object, ray cast procedurally in JAX.

The grid and ordering follow deepmind/3d-shapes: floor hue, wall hue and
object hue (10 each, ``linspace(0, 0.9, 10)``), scale ``linspace(0.75, 1.25,
8)``, shape (cube, cylinder, sphere, capsule) 4 and orientation
``linspace(-30, 30, 15)`` degrees, orientation varying fastest; 480,000 RGB
images of 64×64.

The procedural renderer is not a pixel copy of DeepMind's images; it keeps the
same factor grid and the same kind of scene. A floor (``y = 0``), a back wall
and a wall on the left meet in a room corner; the object stands on the floor
at the centre of the room. Orientation turns the room and the object together
about the object's vertical axis, in front of a fixed camera (as the camera
orbits the object in the original): the cube turns and the walls' corner moves
across the image, so orientation shows for every shape, while the silhouettes
of the sphere, cylinder and capsule, symmetric about that axis, stay the same.

Every pixel casts one ray through its centre (no anti-aliasing, so each pixel
is exactly floor, wall or object; see :meth:`ProceduralShapes3D.render_parts`)
and is shaded Lambertian by a point light fixed to the camera, with an ambient
term and the object's cast shadow. Shading scales a surface's colour
``hsv(hue, 0.75, 1)`` by one number, so it changes value but never hue.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from capvae.data import base

FACTOR_NAMES = ('floor_hue', 'wall_hue', 'object_hue', 'scale', 'shape', 'orientation')
FACTOR_SIZES = (10, 10, 10, 8, 4, 15)
SHAPES = ('cube', 'cylinder', 'sphere', 'capsule')
IMAGE_SIZE = 64
# Labels of render_parts' per-pixel map.
FLOOR, WALL, OBJECT = 0, 1, 2

SATURATION = 0.75
VALUE = 1.0
AMBIENT = 0.35

# Scene (units: the object's radius at scale 1 is _RADIUS). The camera looks
# along +z at _TARGET; the room's walls are the planes z = _BACK and x = _SIDE.
_CAMERA = (0.0, 2.1, -5.0)
_TARGET = (0.0, 0.8, 0.0)
_FOV_DEGREES = 34.0
_BACK = 2.5
_SIDE = -1.9
_LIGHT = (-1.0, 5.0, -3.5)  # camera frame: high, to the left, in front of the object
_RADIUS = 0.6
# Capsule: radius and total height relative to the object radius.
_CAPSULE_RADIUS = 0.62
_CAPSULE_HEIGHT = 2.6

_FAR = 1e9  # "no hit"
_EPS = 1e-4


def hue_values():
  return np.linspace(0.0, 0.9, FACTOR_SIZES[0])


def scale_values():
  return np.linspace(0.75, 1.25, FACTOR_SIZES[3])


def orientation_values():
  """Orientation in degrees, as in the official file."""
  return np.linspace(-30.0, 30.0, FACTOR_SIZES[5])


def hsv_to_rgb(h, s, v):
  """RGB ``[..., 3]`` of hue ``h`` in [0, 1), saturation ``s`` and value ``v``."""
  h, s, v = (jnp.asarray(a, jnp.float32)[..., None] for a in (h, s, v))
  k = jnp.mod(jnp.asarray([5.0, 3.0, 1.0], jnp.float32) + 6.0 * h, 6.0)
  return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def _unit(v):
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v)


def _camera_rays():
  """Unit ray directions ``[3, H, W]`` through the pixel centres, camera frame."""
  forward = _unit(np.subtract(_TARGET, _CAMERA))
  right = _unit(np.cross([0.0, 1.0, 0.0], forward))
  up = np.cross(forward, right)
  half = math.tan(math.radians(_FOV_DEGREES) / 2)
  c = (np.arange(IMAGE_SIZE) + 0.5) / IMAGE_SIZE * 2 - 1  # -1 … 1
  u = half * c[None, :]  # columns, to the right
  v = -half * c[:, None]  # rows, pointing up
  d = forward[:, None, None] + u[None] * right[:, None, None] + v[None] * up[:, None, None]
  return (d / np.linalg.norm(d, axis=0)).astype(np.float32)


def _safe(d):
  return jnp.where(jnp.abs(d) < 1e-7, 1e-7, d)


def _nearest(*hits):
  """The nearest of several ``(t, nx, ny, nz)`` hits."""
  t, nx, ny, nz = hits[0]
  for t2, nx2, ny2, nz2 in hits[1:]:
    closer = t2 < t
    t = jnp.where(closer, t2, t)
    nx, ny, nz = (jnp.where(closer, b, a) for a, b in ((nx, nx2), (ny, ny2), (nz, nz2)))
  return t, nx, ny, nz


def _box(o, d, a):
  """Cube of half-side ``a`` standing on the floor, centred on the y axis."""
  (ox, oy, oz), (dx, dy, dz) = o, d
  ix, iy, iz = 1 / _safe(dx), 1 / _safe(dy), 1 / _safe(dz)
  x0, x1 = (-a - ox) * ix, (a - ox) * ix
  y0, y1 = -oy * iy, (2 * a - oy) * iy
  z0, z1 = (-a - oz) * iz, (a - oz) * iz
  nx0, ny0, nz0 = jnp.minimum(x0, x1), jnp.minimum(y0, y1), jnp.minimum(z0, z1)
  near = jnp.maximum(jnp.maximum(nx0, ny0), nz0)
  far = jnp.minimum(jnp.minimum(jnp.maximum(x0, x1), jnp.maximum(y0, y1)), jnp.maximum(z0, z1))
  hit = (near <= far) & (near > _EPS)
  on_x = nx0 >= jnp.maximum(ny0, nz0)
  on_y = ~on_x & (ny0 >= nz0)
  on_z = ~on_x & ~on_y
  zero = jnp.zeros_like(near)
  return (jnp.where(hit, near, _FAR), jnp.where(on_x, -jnp.sign(dx), zero),
          jnp.where(on_y, -jnp.sign(dy), zero), jnp.where(on_z, -jnp.sign(dz), zero))


def _sphere(o, d, r, cy):
  """Sphere of radius ``r`` centred at ``(0, cy, 0)``."""
  (ox, oy, oz), (dx, dy, dz) = o, d
  py = oy - cy
  b = ox * dx + py * dy + oz * dz
  disc = b * b - (ox * ox + py * py + oz * oz - r * r)
  t = -b - jnp.sqrt(jnp.maximum(disc, 0.0))
  hit = (disc > 0) & (t > _EPS)
  return (jnp.where(hit, t, _FAR), (ox + t * dx) / r, (py + t * dy) / r, (oz + t * dz) / r)


def _tube(o, d, r, y0, y1):
  """Side of the vertical cylinder of radius ``r`` about the y axis, y0 ≤ y ≤ y1."""
  (ox, oy, oz), (dx, dy, dz) = o, d
  a = jnp.maximum(dx * dx + dz * dz, 1e-12)
  b = ox * dx + oz * dz
  disc = b * b - a * (ox * ox + oz * oz - r * r)
  t = (-b - jnp.sqrt(jnp.maximum(disc, 0.0))) / a
  y = oy + t * dy
  hit = (disc > 0) & (t > _EPS) & (y >= y0) & (y <= y1)
  return (jnp.where(hit, t, _FAR), (ox + t * dx) / r, jnp.zeros_like(t), (oz + t * dz) / r)


def _disc(o, d, r, y):
  """Horizontal disc of radius ``r`` at height ``y`` about the y axis, facing up."""
  (ox, oy, oz), (dx, dy, dz) = o, d
  t = (y - oy) / _safe(dy)
  px, pz = ox + t * dx, oz + t * dz
  hit = (t > _EPS) & (px * px + pz * pz <= r * r)
  one = jnp.ones_like(t)
  return jnp.where(hit, t, _FAR), 0 * one, one, 0 * one


def _object(o, d, shape, r):
  """Nearest hit ``(t, nx, ny, nz)`` of the object ``shape`` of radius ``r``."""
  rc = _CAPSULE_RADIUS * r
  hc = _CAPSULE_HEIGHT * r
  cube = _box(o, d, r)
  cylinder = _nearest(_tube(o, d, r, 0.0, 2 * r), _disc(o, d, r, 2 * r))
  sphere = _sphere(o, d, r, r)
  capsule = _nearest(_tube(o, d, rc, rc, hc - rc), _sphere(o, d, rc, rc),
                     _sphere(o, d, rc, hc - rc))
  out = capsule
  for k, hit in ((2, sphere), (1, cylinder), (0, cube)):
    out = tuple(jnp.where(shape == k, a, b) for a, b in zip(hit, out))
  return out


def _room(o, d):
  """Nearest hit ``(t, label)`` of the floor and walls, seen from inside."""
  (ox, oy, oz), (dx, dy, dz) = o, d
  floor = jnp.where(dy < 0, -oy / _safe(dy), _FAR)
  back = jnp.where(dz > 0, (_BACK - oz) / _safe(dz), _FAR)
  side = jnp.where(dx < 0, (_SIDE - ox) / _safe(dx), _FAR)
  t = jnp.minimum(jnp.minimum(floor, back), side)
  on_floor = floor <= t
  on_back = ~on_floor & (back <= t)
  return t, on_floor, on_back


def _rotate_y(x, z, cos, sin):
  return cos * x + sin * z, -sin * x + cos * z


@base.register
class ProceduralShapes3D(base.GroundTruthDataset):
  """Shapes3D rendered from factor indices by a pure JAX ray caster."""

  factor_names = FACTOR_NAMES
  factor_sizes = FACTOR_SIZES
  observation_shape = (IMAGE_SIZE, IMAGE_SIZE, 3)

  def render(self, factors):
    return self.render_parts(factors)[0]

  def render_parts(self, factors):
    """Images and what each pixel shows.

    Args:
      factors: ``[n, 6]`` factor indices.

    Returns:
      ``(images, labels)``: images ``[n, 64, 64, 3]`` float32 in [0, 1] and
      labels ``[n, 64, 64]`` int32, ``FLOOR`` (0), ``WALL`` (1, back or side)
      or ``OBJECT`` (2).
    """
    factors = jnp.asarray(factors, jnp.int32)
    hues = jnp.asarray(hue_values(), jnp.float32)
    col = lambda k: factors[:, k, None, None]
    r = _RADIUS * jnp.asarray(scale_values(), jnp.float32)[col(3)]
    shape = col(4)
    # Scene frame = camera frame turned by -orientation about the object's axis.
    angle = jnp.asarray(np.radians(orientation_values()), jnp.float32)[col(5)]
    cos, sin = jnp.cos(-angle), jnp.sin(-angle)

    rays = jnp.asarray(_camera_rays())[:, None]  # [3, 1, H, W]
    dx, dz = _rotate_y(rays[0], rays[2], cos, sin)
    d = (dx, jnp.broadcast_to(rays[1], dx.shape), dz)
    ox, oz = _rotate_y(_CAMERA[0], _CAMERA[2], cos, sin)
    o = (ox, jnp.full_like(ox, _CAMERA[1]), oz)

    t_obj, nx, ny, nz = _object(o, d, shape, r)
    t_room, on_floor, on_back = _room(o, d)
    is_obj = t_obj < t_room
    t = jnp.minimum(t_obj, t_room)
    p = tuple(oi + t * di for oi, di in zip(o, d))
    # Room normals: floor +y, back wall -z, side wall +x.
    zero, one = jnp.zeros_like(t), jnp.ones_like(t)
    room_n = (jnp.where(on_floor | on_back, zero, one), jnp.where(on_floor, one, zero),
              jnp.where(on_back, -one, zero))
    n = tuple(jnp.where(is_obj, a, b) for a, b in zip((nx, ny, nz), room_n))

    lx, lz = _rotate_y(_LIGHT[0], _LIGHT[2], cos, sin)
    to_light = (lx - p[0], _LIGHT[1] - p[1], lz - p[2])
    dist = jnp.sqrt(sum(c * c for c in to_light))
    ldir = tuple(c / dist for c in to_light)
    lambert = jnp.maximum(sum(a * b for a, b in zip(n, ldir)), 0.0)
    # The object's shadow on the room (the convex object shades itself by lambert).
    t_shadow = _object(p, ldir, shape, r)[0]
    lit = is_obj | (t_shadow >= dist)
    shade = AMBIENT + (1 - AMBIENT) * lambert * lit

    labels = jnp.where(is_obj, OBJECT, jnp.where(on_floor, FLOOR, WALL)).astype(jnp.int32)
    hue = jnp.where(is_obj, hues[col(2)], jnp.where(on_floor, hues[col(0)], hues[col(1)]))
    images = hsv_to_rgb(hue, SATURATION, VALUE) * shade[..., None]
    return jnp.clip(images, 0.0, 1.0), labels
