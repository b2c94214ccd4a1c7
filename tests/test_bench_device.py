"""experiments/bench_device.py, the device check, kept working on CPU."""

import json
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'experiments'))
import bench_device  # noqa: E402  pylint: disable=g-import-not-at-top


def test_the_grid_and_its_table_from_given_step_times(tmp_path, monkeypatch, capsys):
  """Every (impl, loop) gets every member count at the first batch and one
  member at the others; images per second and the ratio to one member follow
  from the step times."""
  seconds = {}

  def fake(model, impl, loop, m, batch, mesh, min_seconds):
    del model, mesh, min_seconds
    # A sweep whose step costs 1 + M/2 units: more members per second as M grows.
    s = (0.01 if impl == 'matmul' else 0.02) * (1 + m / 2) * batch / 64 * (1 if loop == 'map' else 0.5)
    seconds[impl, loop, m, batch] = s
    return s, 1.0, 3

  monkeypatch.setattr(bench_device, 'time_step', fake)
  out = tmp_path / 'bench.json'
  assert bench_device.main(['--members', '1,4', '--batches', '64,256', '--out', str(out)]) == 0
  rows = json.loads(out.read_text())['rows']
  keys = [(r['conv_impl'], r['member_loop'], r['members'], r['batch']) for r in rows]
  assert keys == [(i, l, m, b) for i in ('matmul', 'xla') for l in ('vmap', 'map')
                  for m, b in ((1, 64), (4, 64), (1, 256))]
  for r in rows:
    s = seconds[r['conv_impl'], r['member_loop'], r['members'], r['batch']]
    assert r['images_per_s_each'] == pytest.approx(r['batch'] / s)
    assert r['images_per_s_all'] == pytest.approx(r['members'] * r['batch'] / s)
    if r['batch'] == 256:
      assert r['ratio_to_one_member'] is None
    else:  # (1 + 1/2) / (1 + M/2) per member-step, times M
      assert r['ratio_to_one_member'] == pytest.approx(r['members'] * 1.5 / (1 + r['members'] / 2))
  table = capsys.readouterr().out
  assert '2.00x' in table and table.count('1.00x') == 4


def test_a_budget_skips_rows_and_says_which(monkeypatch, capsys):
  monkeypatch.setattr(bench_device, 'time_step', lambda *a, **k: (0.01, 0.0, 3))
  bench_device.main(['--members', '1,4', '--batches', '64', '--impls', 'xla', '--loops', 'vmap',
                     '--budget_s', '-1'])
  out = capsys.readouterr().out
  assert 'skipped: xla/vmap/M=1/B=64, xla/vmap/M=4/B=64' in out and '# 0 rows' in out


def test_one_step_timed_for_real_on_this_machine():
  import jax
  from capvae import parallel
  mesh = parallel.make_mesh(jax.devices()[:1])
  seconds, compile_s, n = bench_device.time_step('mlp', 'xla', 'vmap', 2, 8, mesh, 0.0, 2)
  assert n == 2 and seconds > 0 and compile_s > 0


def test_unknown_choices_are_refused_before_compiling():
  with pytest.raises(ValueError, match="conv_impl 'cudnn' is unknown"):
    bench_device.main(['--impls', 'cudnn'])
