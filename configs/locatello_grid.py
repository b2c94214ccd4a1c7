r"""disentanglement_lib's AnnealedVAE and beta-VAE grids (Locatello et al. 2019).

  capvae train --config configs/locatello_grid.py:annealed \
      --workdir runs/annealed_grid
  capvae train --config configs/locatello_grid.py:beta \
      --workdir runs/beta_grid
  # more or fewer seeds: --config configs/locatello_grid.py:annealed,seeds=5

The study's settings (``disentanglement_lib/config/unsupervised_study_v1``):
its conv encoder and decoder (``model = 'locatello'``), 10 latents, Bernoulli
decoder, batch 64, Adam 1e-4 (0.9, 0.999, 1e-8), 300,000 steps.

* ``annealed``: gamma 1000, C_max in {5, 10, 25, 50, 75, 100} nats, C raised
  linearly over the first 100,000 steps (their ``iteration_threshold``).
* ``beta``: beta in {1, 2, 4, 6, 8, 16}, the plain sum rec + beta·KL.
* ``beta_tcvae``: beta (the total correlation's weight) in {1, 2, 4, 6, 8, 10}.
* ``factor_vae``: gamma in {10, 20, 30, 40, 50, 100}; the discriminator 6 × 1000,
  Adam 1e-4 (0.5, 0.9).
* ``dip_vae_i`` / ``dip_vae_ii``: lambda_od in {1, 2, 5, 10, 20, 50},
  lambda_d = 10·lambda_od (I) or lambda_od (II).
* ``controlled`` (not in the study): the AnnealedVAE's C_max grid and schedule,
  held by ControlVAE's PI controller (``objective = 'controlled_capacity'``)
  instead of gamma·|KL − C|.

``configs/beta_tcvae.py``, ``factor_vae.py`` and ``dip_vae.py`` are these grids
shortened to run on a CPU.

Each grid is one sweep: every C_max (or beta) × every seed trains in one
program. The study trained 50 seeds per setting; the default here is 3. At the
study's length a member takes ~4.5 hours on a 2-core CPU, so on a CPU shorten
it and say so, keeping the study's proportions (C reaches C_max a third of the
way through), e.g. ``--config.num_steps=3000 --config.c_anneal_steps=1000``;
``experiments/reproduce/grids.py`` turns the evaluated workdir into the
figures and the seed-against-hyperparameter table of ``docs/reproduction.md``.
"""

from capvae import config_lib

default = config_lib.sibling(__file__, 'default')

GRIDS = {
    'annealed': dict(c_max=[5.0, 10.0, 25.0, 50.0, 75.0, 100.0]),
    'beta': dict(beta=[1.0, 2.0, 4.0, 6.0, 8.0, 16.0]),
    # unsupervised_study_v1/sweep.py's grids of the other methods.
    'beta_tcvae': dict(beta=[1.0, 2.0, 4.0, 6.0, 8.0, 10.0]),
    'factor_vae': dict(gamma=[10.0, 20.0, 30.0, 40.0, 50.0, 100.0]),
    'dip_vae_i': dict(lambda_od=[1.0, 2.0, 5.0, 10.0, 20.0, 50.0]),
    'dip_vae_ii': dict(lambda_od=[1.0, 2.0, 5.0, 10.0, 20.0, 50.0]),
    # Not in the study: the AnnealedVAE's C_max held by a controller.
    'controlled': dict(c_max=[5.0, 10.0, 25.0, 50.0, 75.0, 100.0]),
}


def _parse(arg: str) -> tuple[str, int]:
  name, *rest = [part.strip() for part in arg.split(',')] if arg else ['']
  if name not in GRIDS:
    raise ValueError(f'configs/locatello_grid.py:{arg!r}: the grid must be one of '
                     f'{", ".join(GRIDS)} (e.g. locatello_grid.py:annealed,seeds=3).')
  seeds = 3
  for part in rest:
    key, _, value = part.partition('=')
    if key != 'seeds' or not value.isdigit() or int(value) < 1:
      raise ValueError(f'configs/locatello_grid.py:{arg!r}: {part!r} is not allowed; '
                       'the only option is seeds=N with N >= 1.')
    seeds = int(value)
  return name, seeds


def get_config(arg: str = 'annealed'):
  name, seeds = _parse(arg)
  config = default.get_config()
  config.model = 'locatello'
  config.latent_size = 10
  config.reconstruction = 'bernoulli'
  config.learning_rate = 1e-4
  config.batch_size = 64
  config.num_steps = 300_000
  if name == 'annealed':
    config.objective = 'capacity'
    config.capacity_penalty = 'abs'
    config.schedule = 'linear'
    config.gamma = 1000.0
    config.c_anneal_steps = 100_000
  elif name == 'controlled':
    config.objective = 'controlled_capacity'
    config.schedule = 'linear'
    config.c_anneal_steps = 100_000
    config.kp, config.ki = 0.01, 0.001  # ControlVAE's gains
    config.beta_min, config.beta_max = 0.0, 1000.0
  elif name == 'beta':
    config.objective = 'beta'
    config.beta_norm = False
  elif name == 'beta_tcvae':
    config.objective = 'beta_tcvae'
    config.tc_estimator = 'mws'
  elif name == 'factor_vae':
    config.objective = 'factor_vae'
    config.discriminator_layers = 6
    config.discriminator_units = 1000
    config.disc_learning_rate = 1e-4
  else:
    config.objective = 'dip_vae'
    config.dip_type = name[len('dip_vae_'):]
    config.lambda_d_factor = 10.0 if config.dip_type == 'i' else 1.0
  config.sweep.product = dict(**GRIDS[name], seed=list(range(seeds)))
  config.log_every = 500
  config.checkpoint_every = 5000
  return config


def shortened(name: str, arg: str, *, num_steps: int):
  """Grid ``name`` for a CPU: ``num_steps`` steps and one seed, unless ``arg``
  asks for ``study`` (the study's 300,000 steps) and/or ``seeds=N``."""
  parts = [p.strip() for p in arg.split(',')] if arg else []
  study = 'study' in parts
  rest = [p for p in parts if p != 'study']
  config = get_config(','.join([name, *rest]))
  if not any(p.startswith('seeds=') for p in rest):
    config.sweep.product.seed = [0]
  if not study:
    config.num_steps = num_steps
    config.log_every = 25
    config.checkpoint_every = 250
  return config
