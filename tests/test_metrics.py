"""Disentanglement metrics: closed forms, synthetic representations with known answers.

Synthetic representations over dSprites' factor sizes (3, 6, 40, 32, 32):
"copied" codes hold each factor, standardised, in one of 10 dimensions (the
other 5 are N(0, 1) noise); a random rotation of them mixes every factor into
every dimension; "noise" codes carry no factor at all.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from capvae import metrics
from capvae.metrics import array_metrics, sampling

SIZES = (3, 6, 40, 32, 32)
_S = np.asarray(SIZES)
K = len(SIZES)
SMALL = {  # sample sizes for the sampling-level tests (disentanglement_lib's / 10 or so)
    'beta_vae_batch_size': 64, 'beta_vae_num_train': 1000, 'beta_vae_num_eval': 500,
    'factor_vae_batch_size': 64, 'factor_vae_num_train': 1000, 'factor_vae_num_eval': 500,
    'factor_vae_num_variance_estimate': 2000, 'num_train': 1000, 'num_test': 500,
}


def _standardise(f: np.ndarray) -> np.ndarray:
  """Factor indices → values with mean 0 and variance 1 under the uniform prior."""
  return ((f + 0.5) / _S - 0.5) * math.sqrt(12.0)


def _copied(f: np.ndarray, rng: np.random.Generator, jitter: float = 0.01) -> np.ndarray:
  z = _standardise(f) + jitter * rng.standard_normal(f.shape)
  return np.concatenate([z, rng.standard_normal((f.shape[0], 5))], axis=1)


def _draw(n: int, seed: int) -> np.ndarray:
  return metrics.sample_factors(np.random.default_rng(seed), SIZES, n)


ROTATION = np.linalg.qr(np.random.default_rng(7).standard_normal((10, 10)))[0]


@functools.lru_cache(maxsize=None)
def _grid_noise() -> np.ndarray:
  """Fixed N(0, 1) noise for every grid point, so codes_fn is a function of the point
  (as an encoder mean is of its image)."""
  return np.random.default_rng(123).standard_normal((int(np.prod(_S)), 5)).astype(np.float32)


_STRIDES = np.asarray([int(np.prod(_S[k + 1:])) for k in range(K)])


def copy_fn(f: np.ndarray) -> np.ndarray:
  return np.concatenate([_standardise(f), _grid_noise()[f @ _STRIDES]], axis=1)


def noise_fn(f: np.ndarray) -> np.ndarray:
  flat = f @ _STRIDES
  table = _grid_noise()
  return np.concatenate([table[flat], table[(flat * 7 + 1) % table.shape[0]]], axis=1)


@pytest.fixture(scope='module')
def big():
  """10,000 copied codes (MIG at disentanglement_lib's size) and their factors."""
  f = _draw(10_000, 0)
  return _copied(f, np.random.default_rng(1)), f


@pytest.fixture(scope='module')
def split():
  """3,000 train / 1,500 test copied codes and factors."""
  ftr, fte = _draw(3000, 2), _draw(1500, 3)
  return (_copied(ftr, np.random.default_rng(4)), ftr,
          _copied(fte, np.random.default_rng(5)), fte)


# ---------------------------------------------------------------------------
# Closed forms.


def test_mutual_info_by_hand():
  a = np.array([[0], [0], [0], [1]])
  b = np.array([[0], [0], [1], [1]])
  # p(0,0) = 1/2, p(0,1) = 1/4, p(1,1) = 1/4; p_a = (3/4, 1/4), p_b = (1/2, 1/2).
  expected = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
  np.testing.assert_allclose(metrics.discrete_mutual_info(a, b), [[expected]], rtol=1e-12)
  np.testing.assert_allclose(metrics.discrete_mutual_info(b, b), [[math.log(2)]], rtol=1e-12)
  independent = np.array([[0], [1], [0], [1]])
  np.testing.assert_allclose(metrics.discrete_mutual_info(independent, b), [[0.0]], atol=1e-15)
  np.testing.assert_allclose(metrics.discrete_entropy(np.array([[0, 5], [1, 5], [2, 5], [3, 5]])),
                             [math.log(4), 0.0], atol=1e-15)


def test_mutual_info_matches_sklearn():
  rng = np.random.default_rng(0)
  f = _draw(500, 9)
  binned = metrics.histogram_discretize(_copied(f, rng))
  expected = [[mutual_info_score(f[:, k], binned[:, j]) for k in range(K)] for j in range(10)]
  np.testing.assert_allclose(metrics.discrete_mutual_info(binned, f), expected, atol=1e-12)


def test_histogram_discretize_is_disentanglement_libs():
  x = np.array([[0.0, 3.0], [0.5, 3.0], [1.0, 3.0], [0.25, 3.0]])
  got = metrics.histogram_discretize(x, 2)
  # Edges of 2 bins over [0, 1]: 0, 0.5, 1; digitize against the first two.
  np.testing.assert_array_equal(got[:, 0], [1, 2, 2, 1])
  # A constant column: np.histogram spans [3 - 0.5, 3 + 0.5]; 3 sits on the middle edge.
  np.testing.assert_array_equal(got[:, 1], [2, 2, 2, 2])
  y = np.random.default_rng(0).standard_normal((1000, 3))
  got = metrics.histogram_discretize(y, 20)
  assert got.min() == 1 and got.max() == 20


def test_mig_by_hand():
  factors = np.array([[0], [0], [1], [1]])
  codes = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
  second = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
  out = metrics.mig(codes, factors)
  assert out['mig'] == pytest.approx((math.log(2) - second) / math.log(2), rel=1e-12)
  np.testing.assert_allclose(out['mutual_information'], [[math.log(2)], [second]], rtol=1e-12)


def test_dci_from_importance_by_hand():
  r = np.array([[0.5, 0.5], [1.0, 0.0]])
  out = metrics.dci_from_importance(r)
  # Code 0 splits evenly (D 0), code 1 is pure (D 1); equal weights 1.5/3 each.
  assert out['disentanglement'] == pytest.approx(0.5, abs=1e-9)
  # Factor 0: (1/3, 2/3) over the codes; factor 1: pure; weights 3/4 and 1/4.
  h = -(1 / 3 * math.log2(1 / 3) + 2 / 3 * math.log2(2 / 3))
  assert out['completeness'] == pytest.approx(0.75 * (1 - h) + 0.25, abs=1e-9)
  eye = metrics.dci_from_importance(np.eye(4))
  assert eye['disentanglement'] == pytest.approx(1.0) and eye['completeness'] == pytest.approx(1.0)
  flat = metrics.dci_from_importance(np.ones((4, 3)))
  assert flat['disentanglement'] == pytest.approx(0.0, abs=1e-9)
  assert flat['completeness'] == pytest.approx(0.0, abs=1e-9)
  zero = metrics.dci_from_importance(np.zeros((3, 2)))  # uniform weights, as the reference
  assert zero['disentanglement'] == pytest.approx(0.0, abs=1e-9)


def test_modularity_by_hand():
  mi = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 1.0, 0.0]])
  # Code 3: squares (4, 1, 0), theta 4 → 1 - 1 / (4 * 2) = 7/8; code 2 carries nothing → 0.
  out = metrics.modularity_from_mi(mi)
  np.testing.assert_allclose(out['per_code'], [1.0, 0.5, 0.0, 7 / 8])
  assert out['modularity'] == pytest.approx((1 + 0.5 + 0 + 7 / 8) / 4)


def test_sap_and_explicitness_by_hand():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, (2000, 2))
  codes = np.stack([y[:, 0] + 0.1 * rng.standard_normal(2000), rng.standard_normal(2000)], 1)
  out = metrics.sap(codes[:1000], y[:1000], codes[1000:], y[1000:])
  # Factor 0: code 0 predicts it perfectly, code 1 at chance → gap ≈ 1/2; factor 1: ≈ 0.
  assert out['score_matrix'][0, 0] == pytest.approx(1.0)
  assert out['per_factor'][0] == pytest.approx(0.5, abs=0.05)
  assert out['per_factor'][1] == pytest.approx(0.0, abs=0.05)
  me = metrics.modularity_explicitness(codes[:1000], y[:1000], codes[1000:], y[1000:])
  assert me['explicitness_test_per_factor'][0] == pytest.approx(1.0, abs=1e-3)
  assert me['explicitness_test_per_factor'][1] == pytest.approx(0.5, abs=0.06)


# ---------------------------------------------------------------------------
# Synthetic representations.


def test_mig_copied_high_rotated_low(big):
  codes, f = big
  copied = metrics.mig(codes, f)['mig']
  rotated = metrics.mig(codes @ ROTATION, f)['mig']
  assert copied >= 0.85
  assert rotated <= copied / 4


def test_dci_fast_copied_high_rotated_low(split):
  ctr, ftr, cte, fte = split
  copied = metrics.dci(ctr, ftr, cte, fte, estimator='fast')
  rotated = metrics.dci(ctr @ ROTATION, ftr, cte @ ROTATION, fte, estimator='fast')
  assert copied['disentanglement'] >= 0.95 and copied['completeness'] >= 0.95
  assert copied['informativeness_test'] >= 0.95
  assert rotated['disentanglement'] <= copied['disentanglement'] / 4
  assert rotated['completeness'] <= copied['completeness'] / 4
  # The five factors sit in the five first codes, in order.
  np.testing.assert_array_equal(np.argmax(copied['importance_matrix'], axis=0), np.arange(K))


def test_dci_gbt_copied_high():
  # The reference estimator grows 100 trees per class: 11,300 for SIZES, 40 s on
  # 2 cores; factors of 2 to 8 values (2,500 trees) keep it to seconds. Its
  # rotated-code behaviour is covered by the 'fast' test.
  sizes = (3, 6, 8, 6, 2)
  ftr, fte = (metrics.sample_factors(np.random.default_rng(s), sizes, n)
              for s, n in ((10, 600), (11, 300)))
  out = metrics.dci(_copied(ftr, np.random.default_rng(0)), ftr,
                    _copied(fte, np.random.default_rng(1)), fte, estimator='gbt')
  assert out['disentanglement'] >= 0.95 and out['completeness'] >= 0.95
  assert out['informativeness_test'] >= 0.95
  np.testing.assert_allclose(out['importance_matrix'].sum(axis=0), 1.0, rtol=1e-9)


def test_noise_codes_score_chance(big, split):
  _, f = big
  noise = np.random.default_rng(3).standard_normal((f.shape[0], 10))
  out = metrics.mig(noise, f)
  assert out['mig'] <= 0.02
  assert out['mutual_information'].max() <= 0.1  # binning bias only
  _, ftr, _, fte = split
  rng = np.random.default_rng(4)
  s = metrics.sap(rng.standard_normal((3000, 10)), ftr, rng.standard_normal((1500, 10)), fte)
  assert s['sap'] <= 0.03


def test_factor_spread_over_two_codes(big, split):
  codes, f = big

  def spread(c):  # a 45° rotation of the codes of factors 3 and 4 (posX, posY)
    c = c.copy()
    a, b = c[:, 3].copy(), c[:, 4].copy()
    c[:, 3], c[:, 4] = (a + b) / math.sqrt(2), (a - b) / math.sqrt(2)
    return c

  base = metrics.mig(codes, f)['per_factor']
  mixed = metrics.mig(spread(codes), f)['per_factor']
  # Factors 0-2 keep their codes (only the runner-up of factor 2 may change).
  np.testing.assert_allclose(mixed[:3], base[:3], atol=0.01)
  assert np.all(mixed[3:] < base[3:] / 2)
  # A duplicate of factor 2's code (with noise) halves what stands out for it.
  dup = codes.copy()
  dup[:, 5] = dup[:, 2] + 0.05 * np.random.default_rng(0).standard_normal(dup.shape[0])
  assert metrics.mig(dup, f)['per_factor'][2] < base[2] / 2

  ctr, ftr, cte, fte = split
  base_dci = metrics.dci(ctr, ftr, cte, fte, estimator='fast')
  mixed_dci = metrics.dci(spread(ctr), ftr, spread(cte), fte, estimator='fast')
  assert mixed_dci['completeness'] < base_dci['completeness'] - 0.1
  assert np.all(mixed_dci['completeness_per_factor'][3:] < 0.5)
  assert mixed_dci['disentanglement'] < base_dci['disentanglement'] - 0.1


def test_missing_factor(big, split):
  codes, f = big
  gone = codes.copy()
  gone[:, 0] = np.random.default_rng(5).standard_normal(gone.shape[0])  # shape is not encoded
  out = metrics.mig(gone, f)
  assert out['per_factor'][0] <= 0.02
  assert out['per_factor'][1:].min() >= 0.7
  ctr, ftr, cte, fte = split
  rng = np.random.default_rng(6)
  ctr, cte = ctr.copy(), cte.copy()
  ctr[:, 0], cte[:, 0] = rng.standard_normal(ctr.shape[0]), rng.standard_normal(cte.shape[0])
  d = metrics.dci(ctr, ftr, cte, fte, estimator='fast')
  assert d['informativeness_test_per_factor'][0] == pytest.approx(1 / 3, abs=0.05)
  assert d['informativeness_test_per_factor'][1] >= 0.95
  assert d['completeness_per_factor'][0] <= 0.3


def test_modularity_copied_high_rotated_low(split):
  ctr, ftr, cte, fte = split
  n = 1000  # the multinomial logistic regressions of explicitness dominate the cost
  copied = metrics.modularity_explicitness(ctr[:n], ftr[:n], cte[:n], fte[:n])
  rotated = metrics.modularity_explicitness(ctr[:n] @ ROTATION, ftr[:n], cte[:n] @ ROTATION,
                                            fte[:n])
  # Each copied code carries one factor; noise codes score about 0.6 (their binning bias
  # differs between factors), which caps the mean well below 1.
  assert copied['modularity_per_code'][:K].min() >= 0.95
  assert rotated['modularity'] <= copied['modularity'] - 0.1
  # A rotation changes nothing a linear classifier on all codes can see.
  assert copied['explicitness_test'] == pytest.approx(rotated['explicitness_test'], abs=0.02)
  assert copied['explicitness_test'] >= 0.8


# ---------------------------------------------------------------------------
# Sampling-level metrics.


def _calls(fn):
  log = []

  def wrapped(f):
    log.append(f.shape[0])
    return fn(f)

  return wrapped, log


def test_beta_vae_and_factor_vae_copied_near_one():
  wrapped, log = _calls(copy_fn)
  bv = metrics.beta_vae_score(wrapped, SIZES, seed=0, num_train=1000, num_eval=500)
  assert bv['train_accuracy'] >= 0.99 and bv['eval_accuracy'] >= 0.99
  # 1,000 + 500 points of 2 × 64 rows: one call each, not one per point.
  assert log == [128_000, 64_000]
  fv = metrics.factor_vae_score(copy_fn, SIZES, seed=0, num_train=1000, num_eval=500,
                                num_variance_estimate=2000)
  assert fv['train_accuracy'] == 1.0 and fv['eval_accuracy'] == 1.0
  assert fv['num_active_dims'] == 10 and not fv['no_active_dims']


def test_beta_vae_and_factor_vae_noise_near_chance():
  bv = metrics.beta_vae_score(noise_fn, SIZES, seed=0, num_train=1000, num_eval=500)
  assert bv['eval_accuracy'] == pytest.approx(1 / K, abs=0.08)
  fv = metrics.factor_vae_score(noise_fn, SIZES, seed=0, num_train=1000, num_eval=500,
                                num_variance_estimate=2000)
  assert fv['eval_accuracy'] == pytest.approx(1 / K, abs=0.08)


def test_factor_vae_pruning_and_no_active_dims():
  # Codes of factors 0-2 shrunk below the threshold: their factors go unrecognised.
  def shrunk(f):
    z = copy_fn(f)
    z[:, :3] *= 0.01
    return z

  fv = metrics.factor_vae_score(shrunk, SIZES, seed=0, num_train=1000, num_eval=500,
                                num_variance_estimate=2000)
  assert fv['num_active_dims'] == 7
  assert fv['eval_accuracy'] <= 0.6
  const = metrics.factor_vae_score(lambda f: np.zeros((f.shape[0], 4)), SIZES, seed=0,
                                   num_train=10, num_eval=10, num_variance_estimate=10)
  assert const == {'train_accuracy': 0.0, 'eval_accuracy': 0.0, 'num_active_dims': 0,
                   'no_active_dims': True}


def test_evaluate_all_deterministic_and_json_ready():
  first = metrics.evaluate_all(copy_fn, SIZES, seed=3, sizes=SMALL)
  again = metrics.evaluate_all(copy_fn, SIZES, seed=3, sizes=SMALL, max_rows=50_000)
  assert first.scores == again.scores  # bitwise, and independent of the chunking
  np.testing.assert_array_equal(first.mutual_information, again.mutual_information)
  other = metrics.evaluate_all(copy_fn, SIZES, seed=4, sizes=SMALL)
  assert other.scores != first.scores
  json.dumps(first.scores)
  assert all(isinstance(v, float) for v in first.scores.values())
  for key in ('beta_vae.eval_accuracy', 'factor_vae.eval_accuracy', 'mig',
              'dci.disentanglement', 'dci.completeness', 'dci.informativeness_test', 'sap',
              'modularity', 'explicitness_test'):
    assert key in first.scores
  assert set(first.seconds) == {'beta_vae', 'factor_vae', 'data', 'mig', 'dci', 'sap',
                                'modularity_explicitness', 'total'}
  assert first.mutual_information.shape == (10, K)
  assert first.scores['beta_vae.eval_accuracy'] >= 0.99
  assert first.scores['dci.disentanglement'] >= 0.9


def test_sample_factors_and_array_metric_data():
  f = metrics.sample_factors(np.random.default_rng(0), SIZES, 20_000)
  assert f.shape == (20_000, K) and f.dtype == np.int64
  np.testing.assert_array_equal(f.max(axis=0), _S - 1)
  assert f.min() == 0
  wrapped, log = _calls(copy_fn)
  ctr, ftr, cte, fte = metrics.array_metric_data(wrapped, SIZES, seed=1, num_train=300,
                                                 num_test=200)
  assert log == [500]
  assert ctr.shape == (300, 10) and cte.shape == (200, 10) and fte.shape == (200, K)
  np.testing.assert_allclose(ctr, copy_fn(ftr))


def test_default_sizes():
  assert metrics.default_sizes() == metrics.DEFAULT_SIZES
  assert metrics.DEFAULT_SIZES['beta_vae_num_train'] == 10_000
  small = metrics.default_sizes(0.1)
  assert small['num_train'] == 1000 and small['beta_vae_batch_size'] == 64


# ---------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize('kwargs, match', [
    ({'factor_sizes': (3, 0)}, r'factor_sizes\[1\] must be a positive int'),
    ({'factor_sizes': (3, 2.5)}, r'factor_sizes\[1\]'),
    ({'factor_sizes': ()}, 'at least one factor'),
    ({'factor_sizes': (3,)}, 'at least 2 factors'),
    ({'seed': -1}, 'seed must be an int >= 0'),
    ({'sizes': {'num_trian': 10}}, r"unknown keys \['num_trian'\]; allowed"),
    ({'sizes': {'num_train': 0}}, r"sizes\['num_train'\] must be a positive int"),
    ({'sizes': {'factor_vae_batch_size': 1}}, r"sizes\['factor_vae_batch_size'\] must be >= 2"),
    ({'dci_estimator': 'xgb'}, r"dci_estimator must be one of \['gbt', 'fast'\]"),
    ({'codes_fn': lambda f: np.full((f.shape[0], 3), np.nan)}, 'codes_fn.* must be finite'),
    ({'codes_fn': lambda f: np.zeros(f.shape[0])}, r'codes_fn\(factors\) must be 2-D'),
    ({'codes_fn': lambda f: np.zeros((3, 2))}, r'codes_fn\(factors\) must have \d+ rows'),
    ({'codes_fn': 'not callable'}, 'codes_fn must be callable'),
])
def test_evaluate_all_rejects(kwargs, match):
  args = {'codes_fn': copy_fn, 'factor_sizes': SIZES, 'seed': 0, 'sizes': SMALL}
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    metrics.evaluate_all(**args)


def test_array_metrics_reject_bad_arrays():
  codes, f = np.zeros((10, 3)), np.zeros((10, 2), np.int64)
  with pytest.raises(ValueError, match='factors must be an integer array'):
    metrics.mig(codes, f.astype(float))
  with pytest.raises(ValueError, match='factors must have 10 rows'):
    metrics.mig(codes, f[:5])
  with pytest.raises(ValueError, match=r'codes must be 2-D \[num_points, num_codes\]'):
    metrics.mig(codes[:, 0], f)
  with pytest.raises(ValueError, match='codes must be finite'):
    metrics.mig(np.full((10, 3), np.inf), f)
  with pytest.raises(ValueError, match='factors must be >= 0'):
    metrics.mig(codes, f - 1)
  with pytest.raises(ValueError, match='num_bins must be a positive int'):
    metrics.mig(codes, f, num_bins=0)
  with pytest.raises(ValueError, match='codes_test must have 3 columns'):
    metrics.dci(codes, f, codes[:, :2], f)
  with pytest.raises(ValueError, match='factors_test must have 2 columns'):
    metrics.sap(codes, f, codes, f[:, :1])
  with pytest.raises(ValueError, match=r"estimator must be one of \['gbt', 'fast'\]"):
    metrics.dci(codes, f, codes, f, estimator='rf')
  with pytest.raises(ValueError, match=r'factors\[:, 1\] must be < factor_sizes\[1\] = 2'):
    array_metrics.check_factors('factors', np.array([[0, 2]]), factor_sizes=(3, 2))
  with pytest.raises(ValueError, match='n must be an int >= 0'):
    metrics.sample_factors(np.random.default_rng(0), SIZES, -1)
  with pytest.raises(ValueError, match='scale must be a finite number > 0'):
    metrics.default_sizes(0)
  with pytest.raises(ValueError, match='prune_threshold must be a finite number >= 0'):
    sampling.factor_vae_score(copy_fn, SIZES, 0, prune_threshold=-1.0)
