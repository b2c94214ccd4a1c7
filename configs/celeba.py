r"""Burgess et al. 2018 on CelebA: C raised to 50 nats, read through TFDS.

  capvae train --config configs/celeba.py --workdir runs/celeba \
      --config.dataset_path=/path/to/tensorflow_datasets

CelebA cannot be downloaded here: prepare it where it can be, in the
array_record format, and copy the directory over:

  tfds build celeb_a --data_dir=DIR --file_format=array_record

Images (218×178 RGB) are centre-cropped to a square and area-resized to 64×64
when loaded (``capvae/data/tfds_source.py``); the train split at 64×64 is
1.9 GB of uint8, kept on the device. CelebA has no ground-truth factors, so
the evaluation reports per-latent KL, reconstructions and traversals, not
disentanglement metrics.

The paper's setting: gamma 1000, C 0 → 50 nats (Burgess et al. 2018, Fig. 7)
with the conv encoder/decoder of the dSprites experiments and 32 latents; the
Bernoulli decoder on colours in [0, 1], as in the common open implementations.
"""

from capvae import config_lib

burgess = config_lib.sibling(__file__, 'burgess_dsprites')


def get_config():
  """``configs/burgess_dsprites.py`` on CelebA, with 32 latents and C_max = 50."""
  config = burgess.get_config()
  config.dataset = 'tfds:celeb_a'
  config.dataset_path = ''  # the TFDS data_dir; empty: ~/tensorflow_datasets
  config.dataset_split = 'train'
  config.model = 'burgess'
  config.latent_size = 32
  config.reconstruction = 'bernoulli'
  config.c_max = 50.0
  return config
