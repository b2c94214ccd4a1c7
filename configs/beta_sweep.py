r"""beta-VAE over beta in {1, 2, 4, 6, 8, 16} × 3 seeds: 18 members in one program.

  capvae train --config configs/beta_sweep.py --workdir runs/beta_sweep

Higgins et al. 2017 compare beta-VAEs on dSprites over such a grid (their
Figure 7 uses beta up to 16 with the normalised form). Here the objective is
the plain sum rec + beta·KL (set ``config.beta_norm = True`` for the
normalised one). 18 members × 1,500 steps take about 25 minutes on 2 AVX-512
CPU cores (~0.055 s a member-step; ~0.13 s, about an hour, on 2 AVX2 cores) and
a few minutes on one GPU.
"""

from capvae import config_lib

default = config_lib.sibling(__file__, 'default')


def get_config():
  config = default.get_config()
  # The rate these short schedules were measured at (the default is now 1e-4,
  # which the long capacity schedules need: docs/reproduction.md).
  config.learning_rate = 5e-4
  config.objective = 'beta'
  config.num_steps = 1500
  config.sweep.product = dict(beta=[1.0, 2.0, 4.0, 6.0, 8.0, 16.0], seed=[0, 1, 2])
  config.log_every = 50
  config.checkpoint_every = 500
  return config
