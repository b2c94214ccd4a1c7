"""Disentanglement metrics of disentanglement_lib, with its definitions and defaults.

Two levels:

* :mod:`capvae.metrics.array_metrics` — functions of ``(codes [n, L] float,
  factors [n, K] int)``: :func:`mig`, :func:`dci`, :func:`sap`,
  :func:`modularity_explicitness`, :func:`mutual_information`.
* :mod:`capvae.metrics.sampling` — metrics that draw ground-truth factors
  themselves through ``codes_fn: [n, K] int factor rows -> [n, L] codes``:
  :func:`beta_vae_score`, :func:`factor_vae_score`, and
  :func:`evaluate_all`, the whole suite at disentanglement_lib's sample sizes
  (:func:`default_sizes`).
* :mod:`capvae.metrics.information` — :func:`code_information`, I(x; z) of a
  Gaussian encoder with x uniform over a finite set of images, against ln N.

Example::

  scores, seconds, mi = metrics.evaluate_all(codes_fn, (3, 6, 40, 32, 32), seed=0)
  scores['mig'], scores['dci.disentanglement'], seconds['total']
"""

from capvae.metrics.array_metrics import (
    DCI_ESTIMATORS,
    NUM_BINS,
    dci,
    dci_from_importance,
    discrete_entropy,
    discrete_mutual_info,
    histogram_discretize,
    logistic_regression,
    mig,
    modularity_explicitness,
    modularity_from_mi,
    mutual_information,
    sap,
)
from capvae.metrics.information import code_information
from capvae.metrics.sampling import (
    DEFAULT_SIZES,
    PRUNE_THRESHOLD,
    SuiteResult,
    array_metric_data,
    beta_vae_score,
    check_sizes,
    default_sizes,
    evaluate_all,
    factor_vae_score,
    metric_seeds,
    sample_factors,
)

__all__ = [
    'DCI_ESTIMATORS', 'DEFAULT_SIZES', 'NUM_BINS', 'PRUNE_THRESHOLD', 'SuiteResult',
    'array_metric_data', 'beta_vae_score', 'check_sizes', 'code_information', 'dci',
    'dci_from_importance',
    'default_sizes', 'discrete_entropy', 'discrete_mutual_info', 'evaluate_all',
    'factor_vae_score', 'histogram_discretize', 'logistic_regression', 'metric_seeds', 'mig',
    'modularity_explicitness', 'modularity_from_mi', 'mutual_information', 'sample_factors',
    'sap',
]
