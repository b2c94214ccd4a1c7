r"""A capacity-annealed VAE on MNIST read through TFDS (resized to 64×64).

  capvae train --config configs/mnist.py --workdir runs/mnist \
      --config.dataset_path=/path/to/tensorflow_datasets

Prepare MNIST where it can be downloaded (``tfds build mnist --data_dir=DIR
--file_format=array_record``) and copy DIR over. 28×28 digits are resized to
64×64 for the conv models; ``--config.model=mlp`` trains on them too.
MNIST has no factor grid: evaluation gives KL, reconstructions and traversals.
"""

from capvae import config_lib

default = config_lib.sibling(__file__, 'default')


def get_config():
  config = default.get_config()
  config.dataset = 'tfds:mnist'
  config.dataset_path = ''
  config.dataset_split = 'train'
  config.c_max = 20.0
  config.c_anneal_steps = 20_000
  config.num_steps = 30_000
  config.log_every = 200
  config.checkpoint_every = 2000
  return config
