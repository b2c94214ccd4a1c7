"""Evaluation of trained runs (eval.json) and the report (figures, index.html)."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from capvae import evaluate, metrics, models, report, train
from capvae import workdir as workdir_lib
from conftest import ROOT, load_config

# Under pytest-xdist, on one worker: they share the module's sweep_dir fixture.
pytestmark = pytest.mark.xdist_group('test_report')

SCALE = 0.01  # 1% of disentanglement_lib's sample sizes: seconds, not minutes
# I(x; z) over 2,000 images, not 10,000: each member's own encoding of them is
# recomputed below.
SIZES = dict(beta_vae_batch_size=8, factor_vae_batch_size=8, information_images=2000)


@pytest.fixture(scope='session')  # once per worker: see conftest.py
def sweep_dir(tmp_path_factory):
  """A trained three-member sweep (configs/test_sweep.py), evaluated at SCALE."""
  workdir = str(tmp_path_factory.mktemp('sweep'))
  train.train_and_evaluate(load_config('test_sweep'), workdir)
  evaluate.evaluate(workdir, scale=SCALE, seed=0, sizes=SIZES)
  return workdir


def _apply(run, method):
  """The run's ``model.apply`` of ``method``, compiled once for all its members."""
  return jax.jit(lambda p, v: run.model.apply(p, v, method=method))


def _eval(workdir):
  with open(os.path.join(workdir, evaluate.EVAL_FILE)) as f:
    return json.load(f)


def test_scores_reach_tensorboard_once_per_evaluation(sweep_dir, tmp_path):
  """Each member's TensorBoard run holds its eval.json scores at the evaluated
  step; evaluating again replaces them (one scores file per member)."""
  from test_tracking import tb_runs  # pylint: disable=g-import-not-at-top
  from capvae import tracking  # pylint: disable=g-import-not-at-top
  copy = str(tmp_path / 'copy')
  shutil.copytree(sweep_dir, copy)
  result = _eval(copy)
  tracking.write_scores(copy, result['members'], result['step'])  # a second evaluation
  _, runs = tb_runs(os.path.join(copy, 'tb'))
  for r in result['members']:
    acc = runs[f'member_00{r["member"]}']
    for tag, want in (('eval/mig', r['metrics']['mig']), ('eval/kl', r['kl']),
                      ('eval/rec', r['rec']), ('eval/mi', r['information']['mi'])):
      (event,) = acc.Tensors(tag)
      assert event.step == result['step'] == 8
      assert event.tensor_proto.float_val[0] == np.float32(want), tag


def test_eval_json_has_one_record_per_member_with_its_hyperparameters(sweep_dir):
  result = _eval(sweep_dir)
  with open(os.path.join(sweep_dir, workdir_lib.MEMBERS_FILE)) as f:
    members = json.load(f)
  assert result['step'] == 8
  assert len(result['members']) == len(members) == 3
  assert result['factor_names'] == ['shape', 'scale', 'orientation', 'posX', 'posY']
  for rec, row in zip(result['members'], members):
    for k, v in row.items():
      assert rec[k] == v, k
    assert len(rec['kl_per_latent']) == 4
    assert rec['kl'] == pytest.approx(sum(rec['kl_per_latent']), rel=1e-6)
    assert np.asarray(rec['mutual_information']).shape == (4, 5)
    for name in report.SWEEP_METRICS:
      assert name in rec['metrics'], name
      assert np.isfinite(rec['metrics'][name]), name
    assert rec['active_latents'] == sum(k >= evaluate.ACTIVE_KL for k in rec['kl_per_latent'])
    # latent_factors lists exactly the active latents, by decreasing KL.
    kls = [lf['kl'] for lf in rec['latent_factors']]
    assert kls == sorted(kls, reverse=True) and len(kls) == rec['active_latents']


def test_grid_codes_equal_each_members_own_encoder(sweep_dir):
  """The shared cache gives every member the means its own restored model gives."""
  run = workdir_lib.Members(sweep_dir)
  grid = evaluate.GridCodes(run.model, run.dataset, run.states.params, chunk=64)
  rng = np.random.default_rng(0)
  factors = np.stack([rng.integers(0, s, 150) for s in run.dataset.factor_sizes], 1)
  factors = np.concatenate([factors, factors[:20]])  # repeats are served from the cache
  x = jax.jit(run.dataset.render)(factors)
  encode = _apply(run, models.VAE.encode)
  for m in range(run.num_members):
    _, model, state, _ = workdir_lib.load_member(sweep_dir, m)
    assert model == run.model
    want = np.asarray(encode(state.params, x)[0])
    np.testing.assert_allclose(grid.codes_fn(m)(factors), want, rtol=1e-5, atol=1e-5)
  assert grid.encoded == len(np.unique(run.dataset.flat_index(factors)))


def test_heldout_kl_matches_a_direct_computation(sweep_dir):
  run = workdir_lib.Members(sweep_dir)
  kl, rec, rec_mean, parts, terms = evaluate.heldout_stats(run, num_images=40, seed=3, batch=20)
  base = jax.random.fold_in(jax.random.key(3), 1)
  images = jax.jit(lambda key: run.dataset.render(run.dataset.sample_factors(key, 20)))
  encode = _apply(run, models.VAE.encode)
  for m in range(run.num_members):
    _, model, state, _ = workdir_lib.load_member(sweep_dir, m)
    assert model == run.model
    per_batch, means = [], []
    for b in range(2):
      fkey, _ = jax.random.split(jax.random.fold_in(base, b))
      mean, logvar = encode(state.params, images(fkey))
      per_batch.append(0.5 * (np.exp(logvar) + np.square(mean) - 1 - logvar))
      means.append(np.asarray(mean, np.float64))
    want = np.concatenate(per_batch).mean(axis=0)
    np.testing.assert_allclose(kl[m], want, rtol=1e-4, atol=1e-6)
    # The split of the same KL: the offset and spread of the 40 means.
    means = np.concatenate(means)
    np.testing.assert_allclose(parts['offset'][m], 0.5 * means.mean(0)**2, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(parts['spread'][m], 0.5 * means.var(0), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(sum(parts.values())[m], kl[m], rtol=1e-4, atol=1e-6)
    assert rec[m] > 0 and rec_mean[m] > 0
    # The objective's terms on the same batches: its C at the run's step, and
    # the tracking error of the same KL.
    c = run.objective.capacity(jax.tree.map(lambda a: a[m], run.states.hparams), run.step)
    np.testing.assert_allclose(terms['c'][m], c, rtol=1e-6)
    np.testing.assert_allclose(terms['kl_minus_c'][m], kl[m].sum() - c, rtol=1e-4, atol=1e-5)


def test_information_is_that_of_each_members_own_posteriors(sweep_dir):
  result = _eval(sweep_dir)
  run = workdir_lib.Members(sweep_dir)
  flat = evaluate.information_images(run.dataset.num_examples, SCALE, seed=0,
                                     size=SIZES['information_images'])
  assert flat.size == result['settings']['information_images'] == 2000 == len(np.unique(flat))
  # Without the override: 10,000 images at this scale, the first 2,000 not a prefix.
  default = evaluate.information_images(run.dataset.num_examples, SCALE, seed=0)
  assert default.size == evaluate.INFO_MIN_IMAGES and not np.isin(default, flat).all()
  factors = np.stack(np.unravel_index(flat, run.dataset.factor_sizes), 1).astype(np.int32)
  render = jax.jit(run.dataset.render)
  encode = _apply(run, models.VAE.encode)
  for m, rec in enumerate(result['members']):
    info = rec['information']
    assert info['num_images'] == flat.size and info['bound'] == pytest.approx(np.log(flat.size))
    _, _, state, _ = workdir_lib.load_member(sweep_dir, m)
    means, logvars = zip(*[encode(state.params, render(factors[i:i + 2000]))
                           for i in range(0, flat.size, 2000)])
    want = metrics.code_information(np.concatenate(means), np.concatenate(logvars),
                                    jax.random.fold_in(jax.random.key(0), m),
                                    num_queries=info['num_queries'])
    assert info['mi'] == pytest.approx(want['mi'], abs=1e-3)
    np.testing.assert_allclose(info['per_latent'], want['per_latent'], atol=1e-3)
    # The information costs at least as much KL: I(x; z) <= E KL(q(z|x) || p).
    assert -4 * info['mi_stderr'] <= info['mi'] <= rec['kl'] + 4 * info['mi_stderr'] + 0.05


def test_traversals_decode_the_first_code_with_one_latent_set(sweep_dir):
  run = workdir_lib.Members(sweep_dir)
  order = [2, 0, 3]
  pics, x, recon = report.model_images(run, 1, order, seed=4, num_recons=3)
  assert pics.shape == (3, len(report.TRAVERSAL_VALUES), *x.shape[1:]) and recon.shape == x.shape
  params = jax.tree.map(lambda a: a[1], run.states.params)
  decode = _apply(run, models.VAE.decode)
  mean = np.asarray(_apply(run, models.VAE.encode)(params, x)[0])
  sigmoid = lambda v: 1 / (1 + np.exp(-np.asarray(v, np.float64)))  # bernoulli logits
  np.testing.assert_allclose(recon, sigmoid(decode(params, mean)), atol=1e-5)
  for row, j in enumerate(order):
    for col, v in enumerate(report.TRAVERSAL_VALUES):
      code = mean[:1].copy()
      code[0, j] = v
      np.testing.assert_allclose(pics[row, col], sigmoid(decode(params, code))[0],
                                 atol=1e-5)
  assert not np.allclose(pics[0, 0], pics[0, -1], atol=1e-3)  # the traversal moves the image


def test_latent_factors_picks_the_factor_of_largest_mi():
  mi = np.array([[0.1, 2.0, 0.0], [1.0, 0.2, 0.1], [0.01, 0.0, 0.02]])
  out = evaluate.latent_factors(np.array([0.5, 3.0, 0.01]), mi, (2, 10, 4),
                                ('a', 'b', 'c'))
  assert [o['latent'] for o in out] == [1, 0]  # z2 is inactive
  assert [o['factor'] for o in out] == ['a', 'b']
  assert out[0]['normalized_mi'] == pytest.approx(1.0 / np.log(2))
  assert out[1]['normalized_mi'] == pytest.approx(2.0 / np.log(10))


def test_gap_steps_marks_logs_more_than_a_nat_from_c():
  rows = [{'step': s, 'c': c, 'kl_minus_c': g} for s, c, g in
          [(0, 0.0, 0.0), (10, 1.0, 1.5), (20, 2.0, -0.99), (30, 3.0, -2.0), (40, 3.0, None)]]
  assert report.gap_steps(rows) == [10, 30]


@pytest.fixture(scope='session')  # once per worker: see conftest.py
def sweep_report(sweep_dir):
  """The report of sweep_dir, written over an eval.json made stale (step 4 of 8),
  which the report must evaluate again first."""
  stale = dict(_eval(sweep_dir), step=4, stale=True)
  with open(os.path.join(sweep_dir, evaluate.EVAL_FILE), 'w') as f:
    json.dump(stale, f)
  return report.write_report(sweep_dir, eval_scale=SCALE, sizes=SIZES)


def test_report_writes_every_figure(sweep_report, sweep_dir):
  out = os.path.dirname(sweep_report)
  names = set(os.listdir(out))
  expected = {'index.html', 'kl_minus_c.png', 'sweep_metrics.png'}
  for m in range(3):
    expected |= {f'kl_latents_m{m:03d}.png', f'traversals_m{m:03d}.png',
                 f'reconstructions_m{m:03d}.png'}
  assert expected <= names
  page = open(sweep_report).read()
  # Self-contained: every image is embedded, nothing is fetched.
  srcs = re.findall(r'<img[^>]*src="([^"]*)"', page)
  assert len(srcs) == 3 * 3 + 2
  assert all(s.startswith('data:image/png;base64,') for s in srcs)
  assert 'http://' not in page and 'https://' not in page


def test_report_re_evaluates_when_eval_json_is_stale(sweep_report, sweep_dir):
  result = _eval(sweep_dir)
  assert result['step'] == 8 and 'stale' not in result


def test_report_evaluates_again_only_for_settings_other_than_eval_jsons(
    sweep_report, sweep_dir, tmp_path):
  """eval.json serves the report when the settings asked for are those it was
  made with (settings not asked for: any); on the command line, a flag not
  given is not asked for."""
  result, run = _eval(sweep_dir), workdir_lib.Members(sweep_dir)
  why = lambda wanted, r=result: report._why_evaluate(r, run, wanted)  # pylint: disable=protected-access
  assert why({}) is None and why({'scale': SCALE, 'seed': 0, **SIZES}) is None
  assert why({'dci_estimator': 'gbt'}) == "eval.json was made with dci_estimator='fast', not 'gbt'"
  assert 'information_images=2000, not 1000' in why({'information_images': 1000})
  assert 'scale=0.01, not 1.0' in why({'scale': 1.0})
  assert 'of step 4' in why({}, dict(result, step=4))
  assert why({}, None) == 'no eval.json yet'
  # The command line: --eval_seed and --dci_estimator as made, --eval_scale not
  # given (its default, 1, is not what eval.json was made with): reused.
  copy = str(tmp_path / 'copy')
  shutil.copytree(sweep_dir, copy)
  with open(os.path.join(copy, evaluate.EVAL_FILE), 'rb') as f:
    before = f.read()
  proc = _cli('--mode=report', f'--workdir={copy}', '--eval_seed=0', '--dci_estimator=fast')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'Evaluating first' not in proc.stderr
  with open(os.path.join(copy, evaluate.EVAL_FILE), 'rb') as f:
    assert f.read() == before
  assert os.path.getmtime(os.path.join(copy, 'report', 'index.html')) > os.path.getmtime(
      sweep_report)
  # More of I(x; z)'s images than the grid has: the whole grid, which is what
  # eval.json records; an evaluation over the whole grid serves that request.
  whole = dict(result, settings=dict(result['settings'],
                                     information_images=run.dataset.num_examples))
  with open(os.path.join(copy, evaluate.EVAL_FILE), 'w') as f:
    json.dump(whole, f)
  with open(os.path.join(copy, evaluate.EVAL_FILE), 'rb') as f:
    before = f.read()
  report.write_report(copy, sizes={'information_images': 10**7})
  with open(os.path.join(copy, evaluate.EVAL_FILE), 'rb') as f:
    assert f.read() == before


def _chromium():
  for name in ('chromium', 'chromium-browser', 'google-chrome'):
    if shutil.which(name):
      return shutil.which(name)
  return None


@pytest.mark.skipif(_chromium() is None,
                    reason='needs a headless Chromium (Debian: apt-get install chromium;'
                    ' .ci/run installs it)')
def test_report_renders_in_headless_chromium_with_every_image(sweep_report, tmp_path):
  flags = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync',
           f'--user-data-dir={tmp_path / "profile"}', '--virtual-time-budget=10000']
  url = 'file://' + os.path.abspath(sweep_report)
  dom = subprocess.run([_chromium(), *flags, '--dump-dom', url], capture_output=True,
                       text=True, timeout=180)
  loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
  assert loaded, dom.stderr[-2000:]
  assert loaded.group(1) == loaded.group(2) == str(3 * 3 + 2)
  shot = tmp_path / 'page.png'
  subprocess.run([_chromium(), *flags, f'--screenshot={shot}', '--window-size=1200,2400',
                  url], capture_output=True, timeout=180, check=True)
  import matplotlib.image as mpimg
  pixels = mpimg.imread(str(shot))
  assert pixels.shape[:2] == (2400, 1200)
  assert pixels[..., :3].std() > 0.05  # text, tables and figures, not a blank page


def _cli(*args, cwd=ROOT):
  return subprocess.run([sys.executable, '-m', 'capvae.main', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=600)


def test_cli_refuses_bad_evaluation_input_before_writing(sweep_dir, tmp_path):
  missing = str(tmp_path / 'nothing')
  proc = _cli('--mode=evaluate', f'--workdir={missing}')
  assert proc.returncode == 2 and 'not a capvae workdir' in proc.stderr
  assert not os.path.exists(missing)
  before = {n: os.stat(os.path.join(sweep_dir, n)).st_mtime_ns for n in os.listdir(sweep_dir)}
  for flag, message in [('--eval_scale=0', '--eval_scale=0.0: must be in (0, 1]'),
                        ('--dci_estimator=svm', "--dci_estimator='svm' is unknown"),
                        ('--eval_sizes=num_trian=5', "unknown sample size(s) ['num_trian']"),
                        ('--eval_sizes=information_images=1', 'information_images=1 must be'),
                        ('--eval_sizes=num_train=0', "sizes['num_train']"),
                        ('--eval_sizes=num_train', "'num_train' is not KEY=N")]:
    proc = _cli('--mode=report', f'--workdir={sweep_dir}', flag)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1000:]
  after = {n: os.stat(os.path.join(sweep_dir, n)).st_mtime_ns for n in os.listdir(sweep_dir)}
  assert after == before
  proc = _cli('--mode=train', f'--workdir={missing}')
  assert proc.returncode == 2 and '--config is required' in proc.stderr
