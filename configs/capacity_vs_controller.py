r"""One capacity schedule, held two ways: gamma·|KL − C| and a PI controller.

  capvae train --config configs/capacity_vs_controller.py:capacity \
      --workdir runs/cvc_capacity
  capvae train --config configs/capacity_vs_controller.py:controller \
      --workdir runs/cvc_controller
  python experiments/capacity_vs_controller.py   # both, evaluated, and the figures

The objective fixes the compiled program, so the two ways are two sweeps on the
same schedule, model, data and seeds:

* ``capacity``: Burgess et al.'s rec + gamma·|KL − C| at gamma 100 and 1000;
* ``controller``: rec + beta(t)·KL, beta(t) set every step by ControlVAE's PI
  law so the batch KL follows C(t) (``capvae.losses.pi_controller``), three ways:
  ControlVAE's own gains and floor (kp 0.01, ki 0.001, beta ≥ 1); a floor of 0
  and an integral gain 100 times larger (ki 0.1), for a schedule 100 times
  steeper than ControlVAE's (0.15 nats every 5,000 steps); and a floor of −100,
  which lets the controller reward KL below C as gamma = 100 does.

Schedule: C raised linearly from 0 to 10 nats over 2,000 steps, then held to
step 2,500; the default model (Burgess et al.'s conv encoder and decoder), 10
latents, batch 64, Adam 1e-4. What the two ways give
(``experiments/capacity_vs_controller.md``, measured): gamma 100 holds the KL
within 0.26 nats of C on average and gamma 1000 within 0.45, but at gamma 1000
the reconstruction ends at 224 nats against 115; the controller at ki 0.1 and
floor 0 holds it within 0.28 from step 1,000 and ends at 96 nats, yet cannot
raise the KL below C while the decoder still ignores z (the first ~750
steps). About 12 minutes of training per way on 2 CPU cores.
"""

from capvae import config_lib

default = config_lib.sibling(__file__, 'default')

WAYS = {
    'capacity': dict(objective='capacity', sweep=dict(gamma=[100.0, 1000.0])),
    'controller': dict(objective='controlled_capacity',
                       sweep=dict(ki=[0.001, 0.1, 0.1], beta_min=[1.0, 0.0, -100.0])),
}


def get_config(arg: str = 'capacity'):
  if arg not in WAYS:
    raise ValueError(f'configs/capacity_vs_controller.py:{arg!r}: the way must be one of'
                     f' {", ".join(WAYS)} (e.g. capacity_vs_controller.py:controller).')
  config = default.get_config()
  config.objective = WAYS[arg]['objective']
  config.learning_rate = 1e-4
  config.schedule = 'linear'
  config.c_max = 10.0
  config.c_anneal_steps = 2000
  config.num_steps = 2500
  config.capacity_penalty = 'abs'
  config.kp = 0.01
  config.beta_min = 1.0
  config.beta_max = 1000.0
  if arg == 'controller':
    config.sweep.zip = dict(WAYS[arg]['sweep'])
  else:
    config.sweep.product = dict(WAYS[arg]['sweep'])
  config.log_every = 25
  config.checkpoint_every = 500
  return config
