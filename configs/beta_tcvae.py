r"""beta-TCVAE (Chen et al. 2018) on dSprites: disentanglement_lib's grid, shortened.

  capvae train --config configs/beta_tcvae.py --workdir runs/beta_tcvae
  capvae report --workdir runs/beta_tcvae
  # the study's 300,000 steps and 3 seeds (a GPU): configs/beta_tcvae.py:study,seeds=3

The loss is disentanglement_lib's, rec + KL + (beta − 1)·TC, with the total
correlation estimated on each batch by minibatch-weighted sampling
(``config.tc_estimator = 'mss'`` for Chen et al.'s stratified estimator, over
the dataset's 737,280 images). The study's model and optimizer
(``configs/locatello_grid.py``), beta in {1, 2, 4, 6, 8, 10}, one seed, 1,000
steps: 6 members in one program. Every logged row has the batch's ``mi``,
``tc`` and ``dwkl`` (Chen et al.'s split of the KL); ``eval.json`` has them on
held-out images.

What to expect at this length (measured, ``docs/objectives.md``): the held-out
TC falls from 14.7 to 1.8 nats as beta goes from 1 to 10 and the
reconstruction rises from 80 to 125 nats; the BetaVAE and FactorVAE scores
rise from beta 1 to 4–6 (0.61 → 0.78, 0.36 → 0.67). About 11 minutes of
training on 2 CPU cores, 7 of evaluation at ``--eval_scale=0.1``.
"""

from capvae import config_lib

grid = config_lib.sibling(__file__, 'locatello_grid')


def get_config(arg: str = ''):
  return grid.shortened('beta_tcvae', arg, num_steps=1000)
