r"""DIP-VAE I or II (Kumar et al. 2018) on dSprites: disentanglement_lib's grid, shortened.

  capvae train --config configs/dip_vae.py --workdir runs/dip_vae_i
  capvae train --config configs/dip_vae.py:ii --workdir runs/dip_vae_ii
  capvae report --workdir runs/dip_vae_i
  # the study's 300,000 steps and 3 seeds (a GPU): configs/dip_vae.py:i,study,seeds=3

The loss is rec + KL + lambda_od·Σ_{i≠j} Cov_ij² + lambda_d·Σ_i (Cov_ii − 1)²,
Cov the batch covariance of the encoder means (I) or of the aggregate
posterior (II: plus E[diag σ²]); lambda_d = 10·lambda_od (I) or lambda_od
(II), disentanglement_lib's factors. lambda_od in {1, 2, 5, 10, 20, 50}, one
seed, 1,000 steps: 6 members in one program. Every logged row has ``dip``
(the penalty), ``cov_offdiag`` and ``cov_diag_err``.

What to expect at this length (measured for I, ``docs/objectives.md``): the
summed squared off-diagonal covariance of the means falls from 3.1 to 0.40 as
lambda_od goes from 1 to 50, and the reconstruction rises from 78 to 113
nats; the scores hardly move (MIG ≤ 0.02). About 18 minutes of training on 2
CPU cores (shared), 6 of evaluation at ``--eval_scale=0.1``.
"""

from capvae import config_lib

grid = config_lib.sibling(__file__, 'locatello_grid')


def get_config(arg: str = 'i'):
  kind, *rest = [p.strip() for p in arg.split(',')] if arg else ['i']
  if kind not in ('i', 'ii'):
    raise ValueError(f'configs/dip_vae.py:{arg!r}: the first part must be i or ii'
                     ' (e.g. dip_vae.py:ii,seeds=3).')
  return grid.shortened(f'dip_vae_{kind}', ','.join(rest), num_steps=1000)
