"""Ground-truth datasets; :func:`get` builds one by name."""

from capvae.data.base import GroundTruthDataset
from capvae.data import dsprites
from capvae.data import shapes3d
from capvae.errors import ConfigError

DATASETS = ('dsprites', 'shapes3d_procedural')


def get(name: str, path: str = '', split: str = 'train') -> GroundTruthDataset:
  """Builds dataset ``name``.

  Args:
    name: one of ``DATASETS``, or ``'tfds:<name>[/<config>][:<version>]'`` for a
      TensorFlow Datasets dataset read from the data_dir ``path`` (empty: TFDS's
      default) through ``tfds.data_source`` (see :mod:`capvae.data.tfds_source`).
    path: for ``'dsprites'``, an optional official ``.npz``; empty means the
      procedural renderer (offline, the default). ``'shapes3d_procedural'``
      is always rendered (offline) and takes no path.
    split: the TFDS split (``tfds:`` datasets only).
  """
  if name.startswith('tfds:'):
    from capvae.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.load(name, path or None, split)
  if name == 'dsprites':
    return dsprites.DSpritesNpz(path) if path else dsprites.ProceduralDSprites()
  if name == 'shapes3d_procedural':
    if path:
      raise ConfigError(f'dataset_path: {name!r} is rendered procedurally and takes no'
                        f' file; got {path!r}. Leave dataset_path empty.')
    return shapes3d.ProceduralShapes3D()
  raise ConfigError(f'dataset {name!r} is unknown; allowed: {list(DATASETS)}.')
