r"""FactorVAE (Kim & Mnih 2018) on dSprites: disentanglement_lib's grid, shortened.

  capvae train --config configs/factor_vae.py --workdir runs/factor_vae
  capvae report --workdir runs/factor_vae
  # the study's 300,000 steps and 3 seeds (a GPU): configs/factor_vae.py:study,seeds=3

The loss is rec + KL + gamma·TC, the total correlation estimated by a
discriminator's log-odds between the batch's codes and codes whose dimensions
were permuted across the batch. The discriminator is disentanglement_lib's:
6 × 1000 leaky-ReLU units, Adam 1e-4 (b1 0.5, b2 0.9), one step on the same
batch as the VAE's. Its parameters and optimizer state are part of every
member's train state (checkpointed, resumed, extracted with it). gamma in
{10, 20, 30, 40, 50, 100}, one seed, 1,000 steps: 6 members in one program.
Every logged row has ``tc``, ``disc_loss`` and ``disc_accuracy`` (0.5: the
discriminator cannot tell joint from permuted codes).

What to expect at this length (measured, ``docs/objectives.md``): the larger
gamma, the less the discriminator tells codes from their permutations
(held-out accuracy 0.82 → 0.63, TC estimate 1.95 → 0.14 nats from gamma 10
to 100), and the reconstruction rises from 98 to 139 nats; the scores do not
follow gamma yet. About 19 minutes of training on 2 CPU cores (the
discriminator costs as much as the VAE), 4 of evaluation at ``--eval_scale=0.1``.
"""

from capvae import config_lib

grid = config_lib.sibling(__file__, 'locatello_grid')


def get_config(arg: str = ''):
  return grid.shortened('factor_vae', arg, num_steps=1000)
