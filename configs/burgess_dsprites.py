r"""Burgess et al. 2018 on dSprites: gamma 1000, C 0 → 25 nats over 100k steps.

  python -m capvae.main --config configs/burgess_dsprites.py \
      --workdir runs/burgess_dsprites

Adam 5e-4, batch 64, the paper's conv encoder/decoder and Bernoulli decoder,
C raised linearly to 25 nats over 100,000 steps. Expect roughly 1.5–2 hours on
a 2-core AVX-512 CPU (~0.055 s a step; ~0.13 s, about 3.5 hours, on 2 AVX2
cores), minutes on a GPU. The batch KL tracks C within
about a nat throughout; per-latent KL shows position encoded first, then
scale, then shape and orientation (Burgess et al. Fig. 3). Add
``--config.dataset_path=/path/to/dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz``
to train on the official images.
"""

from capvae import config_lib

default = config_lib.sibling(__file__, 'default')


def get_config():
  config = default.get_config()
  config.gamma = 1000.0
  config.c_max = 25.0
  config.c_anneal_steps = 100_000
  config.learning_rate = 5e-4
  config.batch_size = 64
  config.num_steps = 100_000
  config.log_every = 500
  config.checkpoint_every = 5000
  config.keep_checkpoints = 3
  return config
