r"""disentanglement_lib's AnnealedVAE and beta-VAE grids (Locatello et al. 2019).

  python -m capvae.main --config configs/locatello_grid.py:annealed \
      --workdir runs/annealed_grid
  python -m capvae.main --config configs/locatello_grid.py:beta \
      --workdir runs/beta_grid
  # more or fewer seeds: --config configs/locatello_grid.py:annealed,seeds=5

The study's settings (``disentanglement_lib/config/unsupervised_study_v1``):
its conv encoder and decoder (``model = 'locatello'``), 10 latents, Bernoulli
decoder, batch 64, Adam 1e-4 (0.9, 0.999, 1e-8), 300,000 steps.

* ``annealed``: gamma 1000, C_max in {5, 10, 25, 50, 75, 100} nats, C raised
  linearly over the first 100,000 steps (their ``iteration_threshold``).
* ``beta``: beta in {1, 2, 4, 6, 8, 16}, the plain sum rec + beta·KL.

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
  else:
    config.objective = 'beta'
    config.beta_norm = False
  config.sweep.product = dict(**GRIDS[name], seed=list(range(seeds)))
  config.log_every = 500
  config.checkpoint_every = 5000
  return config
