r"""Burgess et al. 2018's capacity objective on procedural Shapes3D.

  capvae train --config configs/shapes3d.py --workdir runs/shapes3d

The setting of ``burgess_dsprites.py`` (the paper's conv encoder/decoder, 10
latents, gamma 1000, C 0 → 25 nats over 100,000 steps, Adam 1e-4, batch 64)
on 64×64 RGB images of a floor, a wall and an object
(``capvae/data/shapes3d.py``): floor, wall and object hue, scale, shape and
orientation, 480,000 combinations, rendered from factors inside the train step.

The decoder is Bernoulli (sigmoid cross-entropy on each colour channel), as
disentanglement_lib trains on Shapes3D: the images are colours in [0, 1], not
binary, so the reconstruction term's minimum is above zero, but it is the
common choice in the literature, and a fixed-variance Gaussian would need its
variance tuned against gamma.
"""

from capvae import config_lib

burgess = config_lib.sibling(__file__, 'burgess_dsprites')


def get_config():
  """``configs/burgess_dsprites.py`` on procedural Shapes3D."""
  config = burgess.get_config()
  # capvae.data.shapes3d.ProceduralShapes3D, rendered offline; dataset_path stays ''.
  config.dataset = 'shapes3d_procedural'
  config.model = 'burgess'
  config.reconstruction = 'bernoulli'
  return config
