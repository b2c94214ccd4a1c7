"""Ground-truth datasets; :func:`get` builds one by name."""

from capvae.data.base import GroundTruthDataset
from capvae.data import dsprites
from capvae.errors import ConfigError

DATASETS = ('dsprites',)


def get(name: str, path: str = '') -> GroundTruthDataset:
  """Builds dataset ``name``.

  Args:
    name: one of ``DATASETS``.
    path: for ``'dsprites'``, an optional official ``.npz``; empty means the
      procedural renderer (offline, the default).
  """
  if name == 'dsprites':
    return dsprites.DSpritesNpz(path) if path else dsprites.ProceduralDSprites()
  raise ConfigError(f'dataset {name!r} is unknown; allowed: {list(DATASETS)}.')
