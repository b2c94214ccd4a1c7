"""capvae: beta-VAEs and capacity-annealed beta-VAEs in JAX/Flax.

``capvae.load_results(paths)``: every member of every workdir as a pandas
DataFrame (:mod:`capvae.compare`). The command line is ``capvae``
(:mod:`capvae.cli`).
"""

__version__ = '0.1.0'


def __getattr__(name):
  # Lazily, so that `import capvae` stays light (no JAX until it is needed).
  if name == 'load_results':
    from capvae.compare import load_results  # pylint: disable=g-import-not-at-top
    return load_results
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
