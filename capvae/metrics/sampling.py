"""Metrics that draw their own ground-truth factors, and the whole suite.

Contract, independent of JAX and of images:

* ``factor_sizes``: the grid, e.g. dSprites' ``(3, 6, 40, 32, 32)``; factors
  are drawn uniformly and independently, as disentanglement_lib's
  ``sample_factors``.
* ``codes_fn``: maps factor-index rows ``[n, K]`` (int64) to representations
  ``[n, L]`` (the caller renders the images and runs the encoder mean inside
  it). Metrics gather every row they need and call it on large arrays of at
  most ``max_rows`` rows (disentanglement_lib's defaults draw about 2.9
  million observations in all), never once per training point.
* ``seed``: an int; all randomness comes from ``np.random.default_rng(seed)``,
  so the same seed gives identical results. Every row is drawn before
  ``codes_fn`` is first called, so results do not depend on ``max_rows``.

Sample sizes default to disentanglement_lib's study settings
(``unsupervised_study_v1/metric_configs``): :data:`DEFAULT_SIZES`.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from capvae.metrics import array_metrics as am

CodesFn = Callable[[np.ndarray], np.ndarray]

# disentanglement_lib's study settings. Batch sizes define the metrics and are
# never scaled; the rest are numbers of points.
DEFAULT_SIZES: dict[str, int] = {
    'beta_vae_batch_size': 64,
    'beta_vae_num_train': 10_000,
    'beta_vae_num_eval': 5_000,
    'factor_vae_batch_size': 64,
    'factor_vae_num_train': 10_000,
    'factor_vae_num_eval': 5_000,
    'factor_vae_num_variance_estimate': 10_000,
    # One train/test draw shared by MIG (train only), DCI, SAP and
    # Modularity/Explicitness; disentanglement_lib draws a fresh set of the
    # same sizes for each, which changes nothing in distribution.
    'num_train': 10_000,
    'num_test': 5_000,
}
_BATCH_KEYS = ('beta_vae_batch_size', 'factor_vae_batch_size')
PRUNE_THRESHOLD = 0.05  # FactorVAE: prune_dims.threshold in the study
MAX_ROWS = 1 << 18  # rows per codes_fn call


# ---------------------------------------------------------------------------
# Arguments.


def check_factor_sizes(factor_sizes: Any) -> tuple[int, ...]:
  """Returns the factor sizes as a tuple of ints; raises ValueError unless each is >= 1."""
  if isinstance(factor_sizes, (str, bytes)) or not isinstance(factor_sizes, Sequence):
    raise ValueError(f'factor_sizes must be a sequence of positive ints, got {factor_sizes!r}.')
  if not factor_sizes:
    raise ValueError('factor_sizes must name at least one factor, got an empty sequence.')
  out = []
  for k, s in enumerate(factor_sizes):
    if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) or s < 1:
      raise ValueError(f'factor_sizes[{k}] must be a positive int, got {s!r}.')
    out.append(int(s))
  return tuple(out)


def _check_seed(seed: Any) -> int:
  if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be an int >= 0, got {seed!r}.')
  return int(seed)


def _check_codes_fn(codes_fn: Any) -> None:
  if not callable(codes_fn):
    raise ValueError(f'codes_fn must be callable ([n, K] int factors -> [n, L] codes), got '
                     f'{type(codes_fn).__name__}.')


def default_sizes(scale: float = 1.0) -> dict[str, int]:
  """disentanglement_lib's sample sizes, numbers of points times ``scale``.

  Args:
    scale: positive factor applied to every number of points (rounded, at
      least 2); batch sizes (which define the BetaVAE and FactorVAE
      statistics) are kept. 1 = disentanglement_lib.

  Returns:
    A copy of :data:`DEFAULT_SIZES`, scaled.
  """
  if (isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating))
      or not math.isfinite(scale) or scale <= 0):
    raise ValueError(f'scale must be a finite number > 0, got {scale!r}.')
  return {k: v if k in _BATCH_KEYS else max(2, int(round(v * scale)))
          for k, v in DEFAULT_SIZES.items()}


def check_sizes(sizes: Mapping[str, Any] | None) -> dict[str, int]:
  """Fills ``sizes`` from :data:`DEFAULT_SIZES` and validates it.

  Raises:
    ValueError: for an unknown key, or a value that is not a positive int
      (batch sizes >= 2, as FactorVAE needs a variance within a batch).
  """
  out = dict(DEFAULT_SIZES)
  if sizes is None:
    return out
  if not isinstance(sizes, Mapping):
    raise ValueError(f'sizes must be a mapping of {sorted(DEFAULT_SIZES)} to ints, got '
                     f'{type(sizes).__name__}.')
  unknown = sorted(set(sizes) - set(DEFAULT_SIZES))
  if unknown:
    raise ValueError(f'sizes has unknown keys {unknown}; allowed: {sorted(DEFAULT_SIZES)}.')
  for k, v in sizes.items():
    out[k] = am.check_positive_int(f'sizes[{k!r}]', v)
  for k in _BATCH_KEYS:
    if out[k] < 2:
      raise ValueError(f'sizes[{k!r}] must be >= 2, got {out[k]}.')
  return out


# ---------------------------------------------------------------------------
# Drawing factors and computing codes.


def sample_factors(rng: np.random.Generator, factor_sizes: Sequence[int], n: int) -> np.ndarray:
  """``n`` rows of factor indices drawn uniformly from the grid.

  Args:
    rng: the generator to draw from.
    factor_sizes: number of values of each factor.
    n: number of rows (>= 0).

  Returns:
    ``[n, K]`` int64, column k uniform on ``0..factor_sizes[k] - 1``.
  """
  sizes = np.asarray(check_factor_sizes(factor_sizes), np.int64)
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f'n must be an int >= 0, got {n!r}.')
  return rng.integers(0, sizes, size=(int(n), sizes.size), dtype=np.int64)


class _Codes:
  """Calls ``codes_fn`` in chunks of at most ``max_rows`` rows and checks what it returns."""

  def __init__(self, codes_fn: CodesFn, max_rows: int):
    _check_codes_fn(codes_fn)
    self.fn = codes_fn
    self.max_rows = am.check_positive_int('max_rows', max_rows)
    self.num_dims: int | None = None

  def __call__(self, rows: np.ndarray) -> np.ndarray:
    parts = []
    for start in range(0, rows.shape[0], self.max_rows):
      part = rows[start:start + self.max_rows]
      out = am.check_codes('codes_fn(factors)', self.fn(part), num_points=part.shape[0],
                           num_dims=self.num_dims)
      self.num_dims = out.shape[1]
      parts.append(out)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

  def points_per_call(self, rows_per_point: int) -> int:
    return max(1, self.max_rows // rows_per_point)


def array_metric_data(codes_fn: CodesFn, factor_sizes: Sequence[int], seed: int,
                      num_train: int = DEFAULT_SIZES['num_train'],
                      num_test: int = DEFAULT_SIZES['num_test'],
                      max_rows: int = MAX_ROWS
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Draws the train and test sets of the array metrics (MIG, DCI, SAP, Modularity).

  Args:
    codes_fn: ``[n, K]`` factor rows → ``[n, L]`` codes.
    factor_sizes: the grid.
    seed: int >= 0.
    num_train: training points (disentanglement_lib: 10,000).
    num_test: test points (disentanglement_lib: 5,000).
    max_rows: most rows per ``codes_fn`` call.

  Returns:
    ``(codes_train [num_train, L] float64, factors_train [num_train, K] int64,
    codes_test, factors_test)``.
  """
  sizes = check_factor_sizes(factor_sizes)
  rng = np.random.default_rng(_check_seed(seed))
  num_train = am.check_positive_int('num_train', num_train)
  num_test = am.check_positive_int('num_test', num_test)
  codes = _Codes(codes_fn, max_rows)
  factors = sample_factors(rng, sizes, num_train + num_test)
  z = codes(factors)
  return z[:num_train], factors[:num_train], z[num_train:], factors[num_train:]


# ---------------------------------------------------------------------------
# BetaVAE score (Higgins et al. 2017), disentanglement_lib ``beta_vae.py``.


def _beta_vae_points(codes: _Codes, sizes: tuple[int, ...], rng: np.random.Generator,
                     batch_size: int, num_points: int) -> tuple[np.ndarray, np.ndarray]:
  num_factors = len(sizes)
  labels = rng.integers(num_factors, size=num_points)
  first = sample_factors(rng, sizes, num_points * batch_size).reshape(num_points, batch_size, -1)
  second = sample_factors(rng, sizes, num_points * batch_size).reshape(num_points, batch_size, -1)
  p = np.arange(num_points)[:, None]
  b = np.arange(batch_size)[None, :]
  second[p, b, labels[:, None]] = first[p, b, labels[:, None]]
  features = []
  step = codes.points_per_call(2 * batch_size)
  for start in range(0, num_points, step):
    a, c = first[start:start + step], second[start:start + step]
    n = a.shape[0]
    z = codes(np.concatenate([a.reshape(-1, num_factors), c.reshape(-1, num_factors)]))
    z1 = z[:n * batch_size].reshape(n, batch_size, -1)
    z2 = z[n * batch_size:].reshape(n, batch_size, -1)
    features.append(np.mean(np.abs(z1 - z2), axis=1))
  return np.concatenate(features), labels


def beta_vae_score(codes_fn: CodesFn, factor_sizes: Sequence[int], seed: int,
                   batch_size: int = 64, num_train: int = 10_000, num_eval: int = 5_000,
                   max_rows: int = MAX_ROWS) -> dict[str, float]:
  """BetaVAE disentanglement score (disentanglement_lib's ``beta_vae_sklearn``).

  Each point picks a factor k uniformly and draws ``batch_size`` pairs of
  factor rows that agree on factor k only (everything else independent); its
  feature is the mean over pairs of ``|z1 - z2|`` ``[L]``, its label k. A
  logistic regression (:func:`capvae.metrics.array_metrics.logistic_regression`:
  one-vs-rest liblinear, C=1, the study's scikit-learn default) learns label
  from feature on ``num_train`` points; the score is its accuracy on ``num_eval`` fresh
  points. Chance is ``1 / K``; a code in which factor k alone sets one
  coordinate scores 1.

  Args:
    codes_fn: ``[n, K]`` factor rows → ``[n, L]`` codes.
    factor_sizes: the grid, K >= 2.
    seed: int >= 0.
    batch_size: pairs per point (disentanglement_lib: 64).
    num_train: training points (10,000).
    num_eval: evaluation points (5,000).
    max_rows: most rows per ``codes_fn`` call.

  Returns:
    ``{'train_accuracy', 'eval_accuracy'}``.
  """
  sizes = check_factor_sizes(factor_sizes)
  if len(sizes) < 2:
    raise ValueError(f'factor_sizes needs at least 2 factors to classify, got {sizes}.')
  seed = _check_seed(seed)
  batch_size = am.check_positive_int('batch_size', batch_size)
  num_train = am.check_positive_int('num_train', num_train)
  num_eval = am.check_positive_int('num_eval', num_eval)
  codes = _Codes(codes_fn, max_rows)
  rng = np.random.default_rng(seed)
  x_train, y_train = _beta_vae_points(codes, sizes, rng, batch_size, num_train)
  x_eval, y_eval = _beta_vae_points(codes, sizes, rng, batch_size, num_eval)
  if np.unique(y_train).size < 2:
    # Too few points to see two factors: predict the one seen.
    return {'train_accuracy': 1.0, 'eval_accuracy': float(np.mean(y_eval == y_train[0]))}
  from sklearn import exceptions as sk_exceptions  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', sk_exceptions.ConvergenceWarning)
    model = am.logistic_regression(seed).fit(x_train, y_train)
  return {'train_accuracy': float(np.mean(model.predict(x_train) == y_train)),
          'eval_accuracy': float(np.mean(model.predict(x_eval) == y_eval))}


# ---------------------------------------------------------------------------
# FactorVAE score (Kim & Mnih 2018), disentanglement_lib ``factor_vae.py``.


def _factor_vae_votes(codes: _Codes, sizes: tuple[int, ...], rng: np.random.Generator,
                      batch_size: int, num_points: int, global_variances: np.ndarray,
                      active: np.ndarray) -> np.ndarray:
  num_factors = len(sizes)
  fixed = rng.integers(num_factors, size=num_points)
  rows = sample_factors(rng, sizes, num_points * batch_size).reshape(num_points, batch_size, -1)
  p = np.arange(num_points)
  rows[p[:, None], np.arange(batch_size)[None, :], fixed[:, None]] = rows[p, 0, fixed][:, None]
  active_idx = np.nonzero(active)[0]
  dims = []
  step = codes.points_per_call(batch_size)
  for start in range(0, num_points, step):
    part = rows[start:start + step]
    z = codes(part.reshape(-1, num_factors)).reshape(part.shape[0], batch_size, -1)
    local = np.var(z[:, :, active_idx], axis=1, ddof=1)
    dims.append(active_idx[np.argmin(local / global_variances[active_idx], axis=1)])
  votes = np.zeros((num_factors, global_variances.size), np.int64)
  np.add.at(votes, (fixed, np.concatenate(dims)), 1)
  return votes


def factor_vae_score(codes_fn: CodesFn, factor_sizes: Sequence[int], seed: int,
                     batch_size: int = 64, num_train: int = 10_000, num_eval: int = 5_000,
                     num_variance_estimate: int = 10_000,
                     prune_threshold: float = PRUNE_THRESHOLD,
                     max_rows: int = MAX_ROWS) -> dict[str, Any]:
  """FactorVAE disentanglement score (disentanglement_lib's ``factor_vae_score``).

  Global variances of each code come from ``num_variance_estimate`` random
  points (ddof=1); codes whose standard deviation is below
  ``prune_threshold`` are pruned (collapsed to the prior). Each point fixes
  one factor k (uniform) across a batch of ``batch_size`` otherwise random
  rows and votes for the active code with the smallest
  ``batch variance / global variance``. The classifier maps each code to
  the factor with most training votes; the score is the share of votes it
  gets right, on ``num_train`` and on ``num_eval`` fresh points.

  If no code is active, the result is disentanglement_lib's: accuracies 0,
  ``num_active_dims`` 0, plus ``no_active_dims`` True. (disentanglement_lib
  reports ``num_active_dims`` as the number of all codes by mistake; here it
  is the number of active ones.) Codes of zero global variance are never
  active, whatever the threshold.

  Args:
    codes_fn: ``[n, K]`` factor rows → ``[n, L]`` codes.
    factor_sizes: the grid.
    seed: int >= 0.
    batch_size: rows per point, >= 2 (disentanglement_lib: 64).
    num_train: training points (10,000).
    num_eval: evaluation points (5,000).
    num_variance_estimate: points for the global variances (10,000), >= 2.
    prune_threshold: minimum standard deviation of an active code (0.05).
    max_rows: most rows per ``codes_fn`` call.

  Returns:
    ``{'train_accuracy', 'eval_accuracy', 'num_active_dims', 'no_active_dims'}``.
  """
  sizes = check_factor_sizes(factor_sizes)
  seed = _check_seed(seed)
  batch_size = am.check_positive_int('batch_size', batch_size)
  num_train = am.check_positive_int('num_train', num_train)
  num_eval = am.check_positive_int('num_eval', num_eval)
  num_variance_estimate = am.check_positive_int('num_variance_estimate', num_variance_estimate)
  if batch_size < 2 or num_variance_estimate < 2:
    raise ValueError(f'batch_size and num_variance_estimate must be >= 2 (variances), got '
                     f'{batch_size} and {num_variance_estimate}.')
  if (isinstance(prune_threshold, bool) or not isinstance(prune_threshold, (int, float))
      or not math.isfinite(prune_threshold) or prune_threshold < 0):
    raise ValueError(f'prune_threshold must be a finite number >= 0, got {prune_threshold!r}.')
  codes = _Codes(codes_fn, max_rows)
  rng = np.random.default_rng(seed)
  global_variances = np.var(codes(sample_factors(rng, sizes, num_variance_estimate)), axis=0,
                            ddof=1)
  active = (np.sqrt(global_variances) >= prune_threshold) & (global_variances > 0)
  if not active.any():
    return {'train_accuracy': 0.0, 'eval_accuracy': 0.0, 'num_active_dims': 0,
            'no_active_dims': True}
  train_votes = _factor_vae_votes(codes, sizes, rng, batch_size, num_train, global_variances,
                                  active)
  classifier = np.argmax(train_votes, axis=0)  # code -> factor
  cols = np.arange(train_votes.shape[1])
  eval_votes = _factor_vae_votes(codes, sizes, rng, batch_size, num_eval, global_variances,
                                 active)
  return {'train_accuracy': float(train_votes[classifier, cols].sum() / train_votes.sum()),
          'eval_accuracy': float(eval_votes[classifier, cols].sum() / eval_votes.sum()),
          'num_active_dims': int(active.sum()), 'no_active_dims': False}


# ---------------------------------------------------------------------------
# The suite.


class SuiteResult(NamedTuple):
  """What :func:`evaluate_all` returns (unpacks as ``scores, seconds, mi``).

  Attributes:
    scores: flat ``{name: float}``, JSON-ready (see :func:`evaluate_all`).
    seconds: wall time of each step, ``{name: float}``, and ``'total'``.
    mutual_information: ``[L, K]`` binned MI (nats) of the training codes,
      the matrix behind MIG; ``argmax`` of row l = the factor latent l encodes.
  """
  scores: dict[str, float]
  seconds: dict[str, float]
  mutual_information: np.ndarray


def metric_seeds(seed: int) -> dict[str, int]:
  """Independent seeds of the suite's three draws, derived from ``seed``."""
  state = np.random.SeedSequence(_check_seed(seed)).generate_state(3)
  return dict(zip(('beta_vae', 'factor_vae', 'arrays'), (int(s) for s in state)))


def evaluate_all(codes_fn: CodesFn, factor_sizes: Sequence[int], seed: int = 0, *,
                 sizes: Mapping[str, int] | None = None, dci_estimator: str = 'fast',
                 num_bins: int = am.NUM_BINS, prune_threshold: float = PRUNE_THRESHOLD,
                 max_rows: int = MAX_ROWS) -> SuiteResult:
  """Runs every metric on one representation.

  BetaVAE and FactorVAE draw their own points (seeds from
  :func:`metric_seeds`); MIG, DCI, SAP and Modularity/Explicitness share one
  train/test draw (:func:`array_metric_data`). The estimators are seeded
  with ``seed``. Same arguments → identical result.

  Args:
    codes_fn: ``[n, K]`` int factor rows → ``[n, L]`` codes.
    factor_sizes: the grid, K >= 2.
    seed: int >= 0.
    sizes: sample sizes, keys of :data:`DEFAULT_SIZES` (missing keys take
      disentanglement_lib's values; :func:`default_sizes` scales them all).
    dci_estimator: ``'fast'`` or ``'gbt'`` (the reference; minutes at full
      size), see :func:`capvae.metrics.array_metrics.dci`.
    num_bins: histogram bins for MIG and Modularity (20).
    prune_threshold: FactorVAE's pruning threshold (0.05).
    max_rows: most rows per ``codes_fn`` call.

  Returns:
    :class:`SuiteResult`. ``scores`` keys: ``beta_vae.train_accuracy``,
    ``beta_vae.eval_accuracy``, ``factor_vae.train_accuracy``,
    ``factor_vae.eval_accuracy``, ``factor_vae.num_active_dims``,
    ``factor_vae.no_active_dims`` (0 or 1), ``mig``, ``mig.factor_<k>``,
    ``dci.disentanglement``, ``dci.completeness``, ``dci.informativeness_train``,
    ``dci.informativeness_test``, ``sap``, ``modularity``,
    ``explicitness_train``, ``explicitness_test``. ``seconds`` keys:
    ``beta_vae``, ``factor_vae``, ``data``, ``mig``, ``dci``, ``sap``,
    ``modularity_explicitness``, ``total`` (time in ``codes_fn`` is inside the
    step that called it).
  """
  t_start = time.perf_counter()
  fsizes = check_factor_sizes(factor_sizes)
  if len(fsizes) < 2:
    raise ValueError(f'factor_sizes needs at least 2 factors, got {fsizes}.')
  seed = _check_seed(seed)
  s = check_sizes(sizes)
  if dci_estimator not in am.DCI_ESTIMATORS:
    raise ValueError(f'dci_estimator must be one of {list(am.DCI_ESTIMATORS)}, got '
                     f'{dci_estimator!r}.')
  num_bins = am.check_positive_int('num_bins', num_bins)
  _check_codes_fn(codes_fn)
  seeds = metric_seeds(seed)
  scores: dict[str, float] = {}
  seconds: dict[str, float] = {}

  def timed(name, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    seconds[name] = time.perf_counter() - t0
    return out

  bv = timed('beta_vae', beta_vae_score, codes_fn, fsizes, seeds['beta_vae'],
             batch_size=s['beta_vae_batch_size'], num_train=s['beta_vae_num_train'],
             num_eval=s['beta_vae_num_eval'], max_rows=max_rows)
  scores['beta_vae.train_accuracy'] = bv['train_accuracy']
  scores['beta_vae.eval_accuracy'] = bv['eval_accuracy']
  fv = timed('factor_vae', factor_vae_score, codes_fn, fsizes, seeds['factor_vae'],
             batch_size=s['factor_vae_batch_size'], num_train=s['factor_vae_num_train'],
             num_eval=s['factor_vae_num_eval'],
             num_variance_estimate=s['factor_vae_num_variance_estimate'],
             prune_threshold=prune_threshold, max_rows=max_rows)
  scores['factor_vae.train_accuracy'] = fv['train_accuracy']
  scores['factor_vae.eval_accuracy'] = fv['eval_accuracy']
  scores['factor_vae.num_active_dims'] = float(fv['num_active_dims'])
  scores['factor_vae.no_active_dims'] = float(fv['no_active_dims'])

  ctr, ftr, cte, fte = timed('data', array_metric_data, codes_fn, fsizes, seeds['arrays'],
                             s['num_train'], s['num_test'], max_rows)
  m = timed('mig', am.mig, ctr, ftr, num_bins)
  scores['mig'] = m['mig']
  for k, gap in enumerate(m['per_factor']):
    scores[f'mig.factor_{k}'] = float(gap)
  d = timed('dci', am.dci, ctr, ftr, cte, fte, estimator=dci_estimator, seed=seed)
  for key in ('disentanglement', 'completeness', 'informativeness_train',
              'informativeness_test'):
    scores[f'dci.{key}'] = d[key]
  scores['sap'] = timed('sap', am.sap, ctr, ftr, cte, fte, seed=seed)['sap']
  me = timed('modularity_explicitness', am.modularity_explicitness, ctr, ftr, cte, fte,
             num_bins=num_bins, seed=seed)
  scores['modularity'] = me['modularity']
  scores['explicitness_train'] = me['explicitness_train']
  scores['explicitness_test'] = me['explicitness_test']
  seconds['total'] = time.perf_counter() - t_start
  return SuiteResult(scores, seconds, m['mutual_information'])
