"""The analysis behind docs/reproduction.md (experiments/reproduce/*.py)."""

import importlib.util
import os

from absl import flags
import numpy as np
import pytest
from scipy import stats

from conftest import ROOT


def _script(name):
  """Imports a script's functions; its flags (the scripts share names such as
  --out) are removed again, as only its main() reads them."""
  before = set(flags.FLAGS)
  path = os.path.join(ROOT, 'experiments', 'reproduce', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'reproduce_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for flag in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, flag)
  return module


grids = _script('grids')
capacity_order = _script('capacity_order')


def _grid(rng, effect, noise, seeds=4):
  settings = np.repeat([1.0, 2.0, 4.0, 8.0], seeds)
  values = effect * np.log2(settings) + noise * rng.normal(size=settings.size)
  return settings, values


def test_seed_vs_setting_against_anova():
  settings, values = _grid(np.random.default_rng(0), effect=0.1, noise=0.05)
  s = grids.seed_vs_setting(settings, values)
  groups = [values[settings == v] for v in np.unique(settings)]
  f, _ = stats.f_oneway(*groups)
  k, n = len(groups), values.size
  # eta squared from the F statistic; the pooled variance is ANOVA's MSW.
  assert s['r2'] == pytest.approx(f * (k - 1) / (f * (k - 1) + n - k), rel=1e-9)
  msw = sum(((g - g.mean()) ** 2).sum() for g in groups) / (n - k)
  assert s['seed_sd'] == pytest.approx(np.sqrt(msw), rel=1e-9)
  assert s['setting_sd'] == pytest.approx(np.std([g.mean() for g in groups], ddof=1))
  assert s['chance_r2'] == pytest.approx((k - 1) / (n - 1))
  assert s['spearman'] == pytest.approx(stats.spearmanr(settings, values).statistic)
  assert s['members'] == n


def test_seed_vs_setting_extremes():
  rng = np.random.default_rng(1)
  settings, values = _grid(rng, effect=1.0, noise=0.0)
  s = grids.seed_vs_setting(settings, values)
  assert s['r2'] == pytest.approx(1.0) and s['seed_sd'] == pytest.approx(0.0)
  assert s['spearman'] == pytest.approx(1.0)
  # Pure seed noise: R² averages (k-1)/(n-1) over draws.
  r2 = [grids.seed_vs_setting(*_grid(rng, effect=0.0, noise=1.0))['r2'] for _ in range(400)]
  assert np.mean(r2) == pytest.approx(3 / 15, abs=0.03)
  # A NaN score (a metric undefined for a member) is left out, not propagated.
  values = values.copy()
  values[0] = np.nan
  assert grids.seed_vs_setting(settings, values)['members'] == settings.size - 1


def test_capacity_order():
  steps = np.arange(0, 1000, 100)
  kl = np.zeros((steps.size, 3))
  kl[3:, 2] = 1.0   # z2 switches on at step 300
  kl[6:, 0] = 0.7   # z0 at step 600; z1 never
  rows = [{'step': int(t), 'c': t / 100, 'kl_per_latent': list(k)} for t, k in zip(steps, kl)]
  record = {'latent_factors': [
      {'latent': j, 'factor': f, 'normalized_mi': 0.1 * j, 'kl': 0.0}
      for j, f in enumerate(['scale', 'shape', 'posX'])]}
  order = capacity_order.capacity_order(rows, record, threshold=0.5)
  assert [(o['latent'], o['factor'], o['on_step'], o['on_c']) for o in order] == [
      (2, 'posX', 300, 3.0), (0, 'scale', 600, 6.0), (1, 'shape', None, None)]
