r"""The AnnealedVAE grid (gamma × C_max × seeds), shortened to run on a CPU.

  make sweep
  # or: capvae train --config configs/capacity_sweep.py \
  #         --workdir runs/capacity_sweep

disentanglement_lib's AnnealedVAE study trains gamma = 1000 with C_max in
{5, 10, 25, 50, 75, 100} nats, C raised over 100k steps of 300k, batch 64,
Adam 1e-4, 50 seeds. Here: gamma in {100, 1000} × C_max in {5, 10, 25} × 2
seeds = 12 members, trained together in one program on the procedural dSprites
for 600 steps with C raised over the first 400 (about 7 minutes of training
on 2 AVX-512 CPU cores, ~0.055 s a member-step; about 15 on 2 AVX2 cores). Nothing here is converged; what it shows is the capacity mechanism at
work across the grid: each member's KL tracks its own C, the larger gamma the
closer, and reconstruction improves with C_max. Lengthen ``num_steps`` and
``c_anneal_steps`` (and add seeds) on a GPU.
"""

from capvae import config_lib

default = config_lib.sibling(__file__, 'default')


def get_config():
  config = default.get_config()
  # The rate these short schedules were measured at (the default is now 1e-4,
  # which the long capacity schedules need: docs/reproduction.md).
  config.learning_rate = 5e-4
  config.num_steps = 600
  config.c_anneal_steps = 400
  config.sweep.product = dict(gamma=[100.0, 1000.0], c_max=[5.0, 10.0, 25.0],
                              seed=[0, 1])
  config.log_every = 25
  config.checkpoint_every = 200
  return config
