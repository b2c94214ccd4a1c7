r"""Higgins et al. 2017 beta-VAE on dSprites: beta = 4, MLP 1200-1200.

  capvae train --config configs/higgins_dsprites.py \
      --workdir runs/higgins_dsprites
  # the paper's comparison, beta 4 against a plain VAE (beta 1), × N seeds:
  capvae train --config configs/higgins_dsprites.py:compare,seeds=2 \
      --workdir runs/higgins_compare

The MLP encoder (1200-1200 ReLU) and decoder (1200-1200-1200 tanh, Bernoulli
logits), 10 latents, beta = 4 on the summed KL against the summed
reconstruction (beta_norm = 4·10/4096 ≈ 0.0098 in the paper's normalised
units). Adam 1e-4, batch 64, 300,000 steps (disentanglement_lib's length):
about 7.5 hours on a 2-core AVX-512 CPU (~0.09 s a step; ~0.21 s, about
17 hours, on 2 AVX2 cores). Expect a total KL of roughly
15–25 nats with a few latents active and the rest near zero.
"""

from capvae import config_lib

default = config_lib.sibling(__file__, 'default')


def get_config(arg: str = ''):
  parts = [p.strip() for p in arg.split(',')] if arg else []
  seeds = None
  if parts:
    extra = [p for p in parts[1:] if not (p.startswith('seeds=') and p[6:].isdigit()
                                         and int(p[6:]) >= 1)]
    if parts[0] != 'compare' or extra:
      raise ValueError(f'configs/higgins_dsprites.py:{arg!r}: allowed are no argument'
                       ' (one beta = 4 run) or compare[,seeds=N] (beta 1 and 4 × N seeds).')
    seeds = int(parts[1][6:]) if len(parts) > 1 else 1
  config = default.get_config()
  config.model = 'mlp'
  config.objective = 'beta'
  config.beta = 4.0
  config.learning_rate = 1e-4
  config.batch_size = 64
  config.num_steps = 300_000
  config.log_every = 1000
  config.checkpoint_every = 10_000
  config.keep_checkpoints = 3
  if seeds is not None:
    config.sweep.product = dict(beta=[1.0, 4.0], seed=list(range(seeds)))
  return config
