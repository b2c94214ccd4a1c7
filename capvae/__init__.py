"""capvae: beta-VAEs and capacity-annealed beta-VAEs in JAX/Flax."""

__version__ = '0.1.0'
