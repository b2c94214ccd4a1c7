r"""A config that trains in seconds, for tests and smoke runs.

  capvae train --config configs/test.py --workdir /tmp/capvae_test

Burgess architecture with 4 latents, batch 8, 12 steps; C reaches 2 nats at
step 8. Nothing is learned: this checks that every part of a run works.
"""

from capvae import config_lib

default = config_lib.sibling(__file__, 'default')


def get_config():
  config = default.get_config()
  # The default's 1e-4 learns too little in 12 steps for the smoke tests to
  # see the reconstruction move; these tiny runs were measured at 5e-4.
  config.learning_rate = 5e-4
  config.latent_size = 4
  config.batch_size = 8
  config.num_steps = 12
  config.c_max = 2.0
  config.c_anneal_steps = 8
  config.log_every = 2
  config.checkpoint_every = 4
  config.keep_checkpoints = 2
  return config
