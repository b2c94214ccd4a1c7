"""The experiments behind docs/question.md (experiments/question/), in quick mode.

Each script trains a few steps of a small batch and must write its figures and
numbers; the numbers checked here are the ones that hold at any length (the
reductions' identities, the pairs of losses that are one loss, the staircase's
schedule), so a script that computes them wrongly fails here.
"""

import importlib
import json
import os
import sys

from absl import flags
import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'experiments', 'question'))
_before = set(flags.FLAGS)
answer = importlib.import_module('answer')
for _flag in set(flags.FLAGS) - _before:  # only the scripts' main() reads them
  delattr(flags.FLAGS, _flag)
EXPERIMENTS = answer.EXPERIMENTS


@pytest.mark.xdist_group('test_question')  # long: scheduled first (conftest.py)
def test_every_experiment_in_quick_mode(tmp_path):
  """One test, so the runs happen once: pytest tears a module fixture down
  whenever xdist hands its worker a test of another module in between."""
  out = str(tmp_path / 'out')
  numbers = {name: m.run(str(tmp_path / name), out, quick=True)
             for name, m in EXPERIMENTS.items()}
  _check_files(out, numbers)
  _check_penalties(numbers['penalties'])
  _check_reductions(numbers['reductions'])
  _check_rescaling(numbers['rescaling'])
  _check_staircase_capacity_chatter(numbers)


def _check_files(out, numbers):
  pngs = {'penalties': ['penalties_kl_minus_c', 'penalties_example_kl'],
          'rescaling': ['rescaling'], 'gamma': ['gamma'], 'capacity_limit': ['capacity_limit'],
          'staircase': ['staircase'], 'chatter': ['chatter'], 'reductions': []}
  assert set(pngs) == set(EXPERIMENTS)
  for name, stems in pngs.items():
    with open(os.path.join(out, f'{name}.json')) as f:
      assert json.load(f) == json.loads(json.dumps(numbers[name], default=float))
    for stem in stems:
      with open(os.path.join(out, f'{stem}.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def _check_penalties(p):
  assert {(m['penalty'], m['gamma'], m['seed']) for m in p['members']} == {
      (q, g, s) for q in ('abs', 'abs_per_example', 'squared')
      for g in EXPERIMENTS['penalties'].GAMMAS for s in EXPERIMENTS['penalties'].SEEDS}
  for m in p['members']:
    assert m['heldout_kl_p10'] <= m['heldout_kl_median'] <= m['heldout_kl_p90']


def _check_reductions(r):
  assert r['reduction_a'] == pytest.approx(r['reduction_b'], rel=1e-12)
  assert r['capvae_batch_kl_float32'] == pytest.approx(r['reduction_a'], rel=1e-5)
  for form in r['forms']:
    assert form['loss_over_summed'] == pytest.approx(form['expected_ratio'], rel=1e-9)
  assert r['beta_norm_of_beta_4'] == pytest.approx(4 * r['latents'] / r['pixels'])
  below, median, _, above = r['penalties']
  assert below['abs_batch'] == pytest.approx(below['abs_per_example'])  # all on one side
  assert above['abs_batch'] == pytest.approx(above['abs_per_example'])
  assert median['abs_per_example_pushes_up'] == median['abs_per_example_pushes_down']
  assert median['abs_per_example'] > median['abs_batch'] - 1e-12


def _check_rescaling(r):
  pairs = {(p['a'], p['b']): p for p in r['pairs']}
  # raw_dim·mse and a Gaussian of variance 1/2 differ by a constant only.
  same = pairs[('raw_dim·mse, beta 1', 'Gaussian sigma² 0.5, beta 1')]
  assert same['max_abs_kl_difference'] < 1e-4
  assert len(pairs) == 3


def _check_staircase_capacity_chatter(numbers):
  s = numbers['staircase']
  assert [m['c_stair_steps'] for m in s['members']][0] == 1
  stairs = [m for m in s['members'] if m['c_stair_steps'] > 1]
  assert stairs and all(m['jumps'] is not None for m in stairs)
  for m in numbers['capacity_limit']['capacity']:
    assert m['information'] <= m['bound'] + 4 * m['information_stderr'] + 1e-6
    assert m['kl'] == pytest.approx(m['spread'] + m['offset'] + m['variance'], rel=1e-4,
                                    abs=1e-6)
  ch = numbers['chatter']
  assert {(m['penalty'], m['learning_rate']) for m in ch['members']} == {
      (p, lr) for p in ('abs', 'squared') for lr in EXPERIMENTS['chatter'].LEARNING_RATES}
  assert all(np.isfinite(m['kl_minus_c_sd']) for m in ch['members'])
