r"""A three-member sweep that trains in seconds, for tests and smoke runs.

  capvae train --config configs/test_sweep.py --workdir /tmp/capvae_sweep

``configs/test.py`` with gamma, C_max, the learning rate and the seed zipped
over three members.
"""

from capvae import config_lib

test = config_lib.sibling(__file__, 'test')


def get_config():
  config = test.get_config()
  config.num_steps = 8
  config.checkpoint_every = 4
  config.sweep.zip = dict(gamma=[1000.0, 10.0, 300.0], c_max=[2.0, 5.0, 1.0],
                          learning_rate=[5e-4, 1e-3, 2e-4], seed=[0, 1, 2])
  return config
