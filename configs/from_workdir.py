r"""The config saved in a workdir, to resume or continue it (e.g. an extracted member).

  capvae train --config configs/from_workdir.py:runs/member3 \
      --workdir runs/member3 --config.num_steps=4000
"""

from capvae import workdir as workdir_lib


def get_config(workdir):
  return workdir_lib.load_config(workdir)
