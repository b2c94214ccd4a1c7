r"""The AnnealedVAE's C_max grid held by a PI controller instead of gamma·|KL − C|.

  capvae train --config configs/controlled_capacity.py \
      --workdir runs/controlled_capacity
  capvae report --workdir runs/controlled_capacity
  # the AnnealedVAE's schedule (C over 100,000 of 300,000 steps; a GPU):
  #   configs/controlled_capacity.py:study,seeds=3

rec + beta(t)·KL, beta(t) set every step by ControlVAE's PI law (Shao et al.
2020; ``capvae.losses.pi_controller``) so that the batch KL follows C(t):
beta rises while KL is above C and falls while it is below, within
[beta_min, beta_max]. C_max in {5, 10, 25, 50, 75, 100} (disentanglement_lib's
AnnealedVAE grid), the study's model and optimizer, one seed. On a CPU: 1,000
steps, C raised over the first 333 (the study's proportions), and an integral
gain 100 times ControlVAE's (ki 0.1; ControlVAE's 0.001 was tuned for C raised
by 0.15 nats every 5,000 steps). beta_min is 0 rather than ControlVAE's 1, so
the controller can stop penalising the KL entirely when KL is below C; it
cannot push the KL up the way |KL − C| does below C (that would take a
negative beta; ``beta_min`` may be set below 0).

Every logged row has ``beta_t``, ``kl_minus_c`` (the tracking error) and
``controller_integral``; the report draws them. What the controller does
against the absolute penalty: ``experiments/capacity_vs_controller.md``.

What to expect (measured, ``docs/objectives.md``): at C_max 5 and 10 the KL
stays within about half a nat of C from step 500 on, beta settling near 19
and 6.5; from C_max 25 up beta falls to its floor of 0 and the KL is whatever
an unpenalised autoencoder drifts to (5–12 nats from C on average). About 6
minutes of training on 2 CPU cores, 4 of evaluation at ``--eval_scale=0.1``.
"""

from capvae import config_lib

grid = config_lib.sibling(__file__, 'locatello_grid')


def get_config(arg: str = ''):
  config = grid.shortened('controlled', arg, num_steps=1000)
  if 'study' not in [p.strip() for p in (arg or '').split(',')]:
    config.c_anneal_steps = 333
    config.ki = 0.1
  return config
