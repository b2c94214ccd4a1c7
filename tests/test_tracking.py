"""TensorBoard, W&B and MLflow: what each tracker holds is what the run logged."""

import io
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from capvae import tracking, train, models
from capvae import train_state as ts
from capvae import workdir as workdir_lib
from capvae.errors import ConfigError
from conftest import load_config

# Under pytest-xdist, on one worker: they share the module's runs.
pytestmark = pytest.mark.xdist_group('test_tracking')


def tb_runs(root):
  """TensorBoard's own loading of a log directory (as ``tensorboard --logdir``):
  ``{run: accumulator}``."""
  from tensorboard.backend.event_processing import plugin_event_multiplexer as pem
  mux = pem.EventMultiplexer()
  mux.AddRunsFromDirectory(root)
  mux.Reload()
  return mux, {run: mux.GetAccumulator(run) for run in mux.Runs()}


def tb_scalars(acc):
  """``{tag: [(step, value)]}`` of a run's scalars, read back by TensorBoard."""
  out = {}
  for tag in acc.Tags()['tensors']:
    if not tag.startswith(tracking.TRAIN):
      continue
    out[tag] = [(e.step, float(np.asarray(e.tensor_proto.float_val[0])))
                for e in acc.Tensors(tag)]
  return out


def tb_images(acc):
  """``{tag: [(step, pixels)]}`` of a run's images, decoded from their PNGs."""
  from PIL import Image
  out = {}
  for tag in acc.Tags()['tensors']:
    if tag.startswith(tracking.IMAGES):
      out[tag] = [(e.step, np.asarray(Image.open(io.BytesIO(e.tensor_proto.string_val[2]))))
                  for e in acc.Tensors(tag)]
  return out


def tb_hparams(mux, run):
  from tensorboard.plugins.hparams import plugin_data_pb2
  content = mux.PluginRunToTagToContent('hparams')[run]['_hparams_/session_start_info']
  data = plugin_data_pb2.HParamsPluginData.FromString(content)
  return {k: (v.number_value if v.HasField('number_value') else
              v.bool_value if v.HasField('bool_value') else v.string_value)
          for k, v in data.session_start_info.hparams.items()}


def _same(a, b):
  """Equal as float32 (TensorBoard keeps float32), NaN (None in the log) included."""
  a = np.float32(np.nan if a is None else a)
  b = np.float32(np.nan if b is None else b)
  return (np.isnan(a) and np.isnan(b)) or a == b


@pytest.fixture(scope='session')  # once per worker: see conftest.py
def tracked(tmp_path_factory):
  """The three-member test sweep trained in one go, and again with a crash after
  its step-4 checkpoint (the log and TensorBoard had reached step 7) and a
  resume; member 1 of the crashed run had lost its TensorBoard files
  altogether (as a run trained before TensorBoard was on has none)."""
  root = tmp_path_factory.mktemp('tracked')
  config = load_config('test_sweep')
  config.keep_checkpoints = 3
  config.log_every = 1
  one_go, resumed = str(root / 'one_go'), str(root / 'resumed')
  # The one-go run also reports to W&B (offline) and MLflow (its file store),
  # with no network: nothing listens at WANDB_BASE_URL.
  saved = {k: os.environ.pop(k, None) for k in ('WANDB_API_KEY', 'WANDB_MODE',
                                               'MLFLOW_TRACKING_URI', 'WANDB_BASE_URL')}
  os.environ['WANDB_BASE_URL'] = 'http://127.0.0.1:9'
  try:
    config.trackers = ('tensorboard',) + tuple(
        t for t in ('wandb', 'mlflow') if tracking.importlib.util.find_spec(t))
    config.tracker_project = 'capvae-test'
    train.train_and_evaluate(config, one_go)
  finally:
    for k, v in saved.items():
      os.environ.pop(k, None)
      if v is not None:
        os.environ[k] = v
  config.trackers = ('tensorboard',)
  train.train_and_evaluate(config, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', 'chunk_000', '8'))
  before = {m: tb_scalars(acc) for m, acc in tb_runs(os.path.join(resumed, 'tb'))[1].items()}
  shutil.rmtree(os.path.join(resumed, 'tb', 'member_001'))
  train.train_and_evaluate(config, resumed)
  return str(root), one_go, resumed, before


def test_tensorboard_scalars_are_the_logs_values(tracked):
  _, one_go, _, _ = tracked
  rows = workdir_lib.read_metrics(os.path.join(one_go, workdir_lib.METRICS_FILE))
  _, runs = tb_runs(os.path.join(one_go, 'tb'))
  assert sorted(runs) == [f'member_00{m}' for m in range(3)]
  for m in range(3):
    got = tb_scalars(runs[f'member_00{m}'])
    mine = [r for r in rows if r['member'] == m]
    assert [s for s, _ in got['train/loss']] == [r['step'] for r in mine] == list(range(8))
    for r in mine:
      for k, v in r.items():
        if k == 'kl_per_latent':
          for i, e in enumerate(v):
            assert _same(dict(got[f'train/kl_per_latent/z{i}'])[r['step']], e)
        elif k in tracking._NOT_SCALARS or k in ts.HPARAM_NAMES:
          assert f'train/{k}' not in got  # hyperparameters are hparams, not curves
        else:
          assert _same(dict(got[f'train/{k}'])[r['step']], v), (m, k, r['step'])
    assert 'train/kl_minus_c' in got and 'train/c' in got and 'train/grad_norm' in got


def test_tensorboard_loads_every_tag_of_every_member_under_runs(tracked):
  """``tensorboard --logdir ROOT`` sees every member of both workdirs as a run,
  with the scalars, both images, the hparams and the per-latent chart."""
  root, one_go, _, _ = tracked
  mux, runs = tb_runs(root)
  expected = {f'{w}/tb/member_00{m}' for w in ('one_go', 'resumed') for m in range(3)}
  assert set(runs) == expected
  rows = workdir_lib.read_metrics(os.path.join(one_go, workdir_lib.METRICS_FILE))
  hparams = workdir_lib.load_members(one_go)
  for run, acc in runs.items():
    tags = set(acc.Tags()['tensors'])
    scalar_tags = set(tracking.scalars(rows[0], hparams[0]))
    assert scalar_tags <= tags
    assert {'images/reconstructions', 'images/traversals', '_hparams_/session_start_info',
            'custom_scalars__config__'} <= tags
    member = int(run[-3:])
    got = tb_hparams(mux, run)
    for k, v in hparams[member].items():
      if k != 'member':
        assert got[k] == pytest.approx(v), (run, k)
    assert got['objective'] == 'capacity' and got['model'] == 'burgess'
  layout = mux.PluginRunToTagToContent('custom_scalars')
  assert all('custom_scalars__config__' in layout[r] for r in runs)


def test_checkpoint_images_are_the_models_decodings(tracked):
  """The last checkpoint's images are the member's reconstructions and
  traversals, recomputed here one member at a time from the checkpoint."""
  _, one_go, _, _ = tracked
  _, runs = tb_runs(os.path.join(one_go, 'tb'))
  run = workdir_lib.Members(one_go)
  from capvae import evaluate
  x = evaluate.draw_images(run.dataset, jax.random.key(1), 8)
  order = jax.numpy.arange(run.config.latent_size)
  for m in (0, 2):
    images = tb_images(runs[f'member_00{m}'])
    assert [s for s, _ in images['images/traversals']] == [4, 8]
    params = jax.tree.map(lambda a: a[m], run.states.params)
    pics, recon = jax.jit(lambda p: models.decoded_images(
        run.model, p, x, order, run.config.reconstruction))(params)
    pics = np.asarray(pics).reshape(run.config.latent_size, -1, *pics.shape[1:])
    want = tracking.checkpoint_images(pics, np.asarray(x), np.asarray(recon))
    for tag, (step, got) in ((t, v[-1]) for t, v in images.items()):
      assert step == 8
      assert got.shape == want[tag].shape == (
          (2 if tag.endswith('reconstructions') else 4) * 65 + 1,
          (8 if tag.endswith('reconstructions') else 11) * 65 + 1, 3)
      np.testing.assert_array_equal(got, want[tag])  # PNG is lossless


def test_a_resumed_sweep_has_the_uninterrupted_curves_point_for_point(tracked):
  _, one_go, resumed, before = tracked
  # Before the resume, the crashed run had logged past its restored checkpoint.
  assert [s for s, _ in before['member_000']['train/loss']] == list(range(8))
  _, a = tb_runs(os.path.join(one_go, 'tb'))
  _, b = tb_runs(os.path.join(resumed, 'tb'))
  assert set(a) == set(b)
  for run in a:
    sa, sb = tb_scalars(a[run]), tb_scalars(b[run])
    assert set(sa) == set(sb)
    for tag in sa:
      steps = [s for s, _ in sb[tag]]
      assert steps == sorted(set(steps)) == list(range(8)), (run, tag)  # no duplicates
      if tag != 'train/steps_per_sec':  # the wall clock's
        assert [(s, np.float32(v)) for s, v in sa[tag]] == [
            (s, np.float32(v)) for s, v in sb[tag]] or all(
                _same(x, y) for (_, x), (_, y) in zip(sa[tag], sb[tag])), (run, tag)
    ia, ib = tb_images(a[run]), tb_images(b[run])
    assert set(ia) == set(ib)
    for tag in ia:
      # Member 1 lost its step-4 images with its files: the log has no images.
      want = [8] if run == 'member_001' else [4, 8]
      assert [s for s, _ in ib[tag]] == want and [s for s, _ in ia[tag]] == [4, 8]
      for (s, x), (_, y) in zip(ia[tag][-len(want):], ib[tag]):
        np.testing.assert_array_equal(x, y)
  # Two files per member (before and after the resume); member 1's lost steps
  # 0-3 came back from metrics.jsonl into the new file. No duplicate hparams.
  for m in range(3):
    run_dir = os.path.join(resumed, 'tb', f'member_00{m}')
    assert len(tracking.event_files(run_dir)) == (1 if m == 1 else 2)
  mux, _ = tb_runs(os.path.join(resumed, 'tb'))
  for m in range(3):
    acc = mux.GetAccumulator(f'member_00{m}')
    assert len(acc.Tensors('_hparams_/session_start_info')) == 1
  assert mux.GetAccumulator('member_001').Tensors('images/traversals')[0].step == 8


def test_truncation_keeps_the_restored_steps_images_and_drops_later_scalars(tmp_path):
  from tensorboardX import SummaryWriter
  w = SummaryWriter(str(tmp_path), filename_suffix='.a')
  for s in range(6):
    w.add_scalar('train/loss', float(s), s)
  w.add_image('images/traversals', np.zeros((4, 4, 3)), 4, dataformats='HWC')
  w.add_image('images/traversals', np.ones((4, 4, 3)), 6, dataformats='HWC')
  w.close()
  (path,) = tracking.event_files(str(tmp_path))
  with open(path, 'ab') as f:  # a crash tore the last record
    f.write(b'\x10\x00\x00\x00\x00\x00\x00\x00torn')
  tracking.truncate_events(str(tmp_path), 4)
  _, runs = tb_runs(str(tmp_path))
  acc = runs['.']
  assert [e.step for e in acc.Tensors('train/loss')] == [0, 1, 2, 3]
  assert [e.step for e in acc.Tensors('images/traversals')] == [4]


@pytest.mark.parametrize('trackers, message', [
    (('tensorboard', 'neptune'), "'neptune' is unknown; allowed: 'tensorboard', 'wandb',"),
    (('wandb',), "pip install 'capvae[trackers]'"),
    (('tensorboard', 'tensorboard'), 'names a tracker twice'),
])
def test_a_bad_or_missing_tracker_is_refused_before_anything_is_written(
    tmp_path, monkeypatch, trackers, message):
  real = tracking.importlib.util.find_spec
  monkeypatch.setattr(tracking.importlib.util, 'find_spec',
                      lambda n, *a: None if n == 'wandb' else real(n, *a))
  config = load_config('test')
  config.trackers = trackers
  workdir = str(tmp_path / 'run')
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(
      ')', r'\)').replace('[', r'\[').replace(']', r'\]')):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)


def test_trackers_of_a_saved_config_take_the_command_line(tracked, tmp_path):
  """config.json holds trackers as a JSON list; configs/from_workdir.py gives it
  back as a tuple, so --config.trackers=a,b overrides it (a finished run: the
  config is checked, then there is nothing to train)."""
  import subprocess
  import sys
  from conftest import ROOT
  _, one_go, _, _ = tracked
  copy = str(tmp_path / 'copy')
  shutil.copytree(one_go, copy)
  proc = subprocess.run(
      [sys.executable, '-m', 'capvae.main', f'--config=configs/from_workdir.py:{copy}',
       f'--workdir={copy}', '--config.trackers=tensorboard,nope'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "config.trackers: 'nope' is unknown" in proc.stderr
  proc = subprocess.run(
      [sys.executable, '-m', 'capvae.main', f'--config=configs/from_workdir.py:{copy}',
       f'--workdir={copy}', '--config.trackers=tensorboard,mlflow'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'nothing to do' in proc.stderr
  assert workdir_lib.load_config(copy).trackers == ('tensorboard', 'mlflow')


def test_the_command_lines_list_of_trackers_is_split():
  config = load_config('test')
  config.trackers = ('tensorboard,mlflow',)
  assert tracking.check(config) == ('tensorboard', 'mlflow')
  config.trackers = ()
  assert tracking.check(config) == ()


def test_wandb_offline_and_mlflow_file_store_hold_the_logged_run(tracked):
  """W&B in offline mode and MLflow's local file store, with no network: each
  member's run holds its hyperparameters, every logged value and the images."""
  pytest.importorskip('wandb')
  pytest.importorskip('mlflow')
  _, workdir, _, _ = tracked
  rows = workdir_lib.read_metrics(os.path.join(workdir, workdir_lib.METRICS_FILE))
  members = workdir_lib.load_members(workdir)

  # MLflow: read back through its client.
  from mlflow.tracking import MlflowClient
  client = MlflowClient(tracking_uri='file:' + os.path.join(workdir, 'mlruns'))
  exp = client.get_experiment_by_name('capvae-test')
  runs = {r.data.tags['capvae.member']: r for r in client.search_runs([exp.experiment_id])}
  assert sorted(runs) == ['0', '1', '2']
  for m in range(3):
    run = runs[str(m)]
    assert run.info.run_name == f'one_go/member_00{m}'
    assert float(run.data.params['gamma']) == members[m]['gamma']
    assert run.data.params['objective'] == 'capacity'
    mine = [r for r in rows if r['member'] == m]
    for key in ('train/loss', 'train/kl', 'train/c', 'train/kl_per_latent/z1'):
      history = sorted((h.step, h.value) for h in client.get_metric_history(run.info.run_id,
                                                                             key))
      name = key.split('/')[1]
      want = [(r['step'], r[name][1] if name == 'kl_per_latent' else r[name]) for r in mine]
      assert [s for s, _ in history] == [s for s, _ in want]
      assert all(math.isclose(v, w, rel_tol=1e-6) for (_, v), (_, w) in zip(history, want))
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, 'images')]
    assert any('reconstructions' in a and 'step+8' in a for a in artifacts), artifacts

  # W&B: one offline run per member, read back from its transaction log.
  offline = sorted(d for d in os.listdir(os.path.join(workdir, 'wandb'))
                   if d.startswith('offline-run-'))
  assert len(offline) == 3
  for d in offline:
    (log,) = [f for f in os.listdir(os.path.join(workdir, 'wandb', d)) if f.endswith('.wandb')]
    run, history = wandb_offline_run(os.path.join(workdir, 'wandb', d, log))
    m = int(run['name'][-3:])
    assert run['name'] == f'one_go/member_00{m}'
    for k, v in members[m].items():
      if k != 'member':
        assert run['config'][k] == pytest.approx(v), k
    assert run['config']['objective'] == 'capacity'
    mine = [r for r in rows if r['member'] == m]
    assert sorted(s for s in history if 'train/loss' in history[s]) == [r['step'] for r in mine]
    for r in mine:
      for k in ('loss', 'kl', 'rec', 'c', 'grad_norm'):
        assert math.isclose(history[r['step']][f'train/{k}'], r[k], rel_tol=1e-6), k
      assert math.isclose(history[r['step']]['train/kl_per_latent/z3'],
                          r['kl_per_latent'][3], rel_tol=1e-6)
    for step in (4, 8):
      for tag in ('images/traversals', 'images/reconstructions'):
        assert history[step][f'{tag}/_type'] == 'image-file'
        assert os.path.isfile(os.path.join(workdir, 'wandb', d, 'files',
                                           history[step][f'{tag}/path']))


def wandb_offline_run(path):
  """``({'name', 'config'}, {step: {key: value}})`` of an offline W&B run's
  ``.wandb`` file: records of wandb's protobuf in LevelDB's log framing
  (32 KiB blocks; a 7-byte header per fragment: CRC, length, kind)."""
  import struct
  from wandb.proto import wandb_internal_pb2 as pb
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:4] == b':W&B'
  payloads, pos, buf = [], 7, b''
  while pos + 7 <= len(data):
    space = 32768 - pos % 32768
    if space < 7:
      pos += space
      continue
    _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
    chunk = data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind == 1:
      payloads.append(chunk)
    elif kind == 2:
      buf = chunk
    elif kind == 3:
      buf += chunk
    elif kind == 4:
      payloads.append(buf + chunk)
  run, history = {}, {}
  for payload in payloads:
    record = pb.Record.FromString(payload)
    kind = record.WhichOneof('record_type')
    if kind == 'run':
      run = {'name': record.run.display_name,
             'config': {i.key: json.loads(i.value_json) for i in record.run.config.update}}
    elif kind == 'history':
      items = {i.key or '/'.join(i.nested_key): json.loads(i.value_json)
               for i in record.history.item}
      history.setdefault(int(items['_step']), {}).update(items)
  return run, history


def test_tensorboard_serves_the_scalars_images_and_hparams(tracked):
  """``tensorboard --logdir ROOT`` (the server itself) serves every member's
  scalars, images and hyperparameters through its data API."""
  import sys
  from conftest import ROOT
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  import tensorboard_screenshot as tbs  # pylint: disable=g-import-not-at-top
  root, one_go, _, _ = tracked
  port = tbs.free_port()
  proc = tbs.serve(root, port)
  try:
    base = f'http://127.0.0.1:{port}'
    tbs.wait_for_runs(base)
    data = tbs.served(base)
  finally:
    proc.terminate()
    proc.wait(timeout=30)
  runs = {f'{w}/tb/member_00{m}' for w in ('one_go', 'resumed') for m in range(3)}
  assert set(data['runs']) == runs
  rows = workdir_lib.read_metrics(os.path.join(one_go, workdir_lib.METRICS_FILE))
  want = set(tracking.scalars(rows[0], ts.HPARAM_NAMES))
  for run in runs:
    assert set(data['scalars'][run]) == want
    assert set(data['images'][run]) == {'images/reconstructions', 'images/traversals'}
  hparams = {h['name'] for h in data['hparams']['hparamInfos']}
  assert set(ts.HPARAM_NAMES) | {'objective', 'model', 'dataset'} <= hparams
  assert {'train/kl', 'train/rec'} <= {m['name']['tag'] for m in data['hparams']['metricInfos']}


def test_progress_bar_on_a_terminal_and_log_lines_elsewhere(monkeypatch):
  from capvae import progress

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  monkeypatch.delenv(progress.ENV, raising=False)
  term = Terminal()
  assert list(progress.iterate(range(40), 40, 'evaluate', 'member', stream=term)) == list(
      range(40))
  out = term.getvalue()
  assert 'evaluate: 100%' in out and '40/40' in out and 'member/s' in out
  assert progress.bar(10, 'x', stream=io.StringIO()) is None  # not a terminal: no bar
  monkeypatch.setenv(progress.ENV, '1')
  assert progress.enabled(io.StringIO())
  monkeypatch.setenv(progress.ENV, '0')
  assert not progress.enabled(term)
  logged = []
  monkeypatch.setattr(progress.logging, 'info', lambda fmt, *a: logged.append(fmt % a))
  assert list(progress.iterate(range(5), 5, 'encoding', 'chunk', log_seconds=0)) == list(
      range(5))
  assert logged[0].startswith('encoding: 1/5 chunk,') and 'left' in logged[0]
  assert len(logged) == 4  # the last item needs no line
  assert progress.format_duration(3725) == '1h02m05s'


def test_load_results_of_a_sweep_without_eval_json(tracked):
  import capvae
  _, one_go, resumed, _ = tracked
  df = capvae.load_results([one_go, os.path.join(os.path.dirname(one_go), 'res*')])
  assert list(df['run']) == ['one_go'] * 3 + ['resumed'] * 3
  assert list(df['member']) == [0, 1, 2] * 2
  rows = workdir_lib.read_metrics(os.path.join(one_go, workdir_lib.METRICS_FILE))
  members = workdir_lib.load_members(one_go)
  for m in range(3):
    last = [r for r in rows if r['member'] == m][-1]
    got = df.iloc[m]
    assert got['step'] == last['step'] == 7
    assert got['train_kl'] == last['kl'] and got['train_c'] == last['c']
    assert got['gamma'] == members[m]['gamma'] and got['seed'] == members[m]['seed']
  assert 'mig' not in df and df['eval_kl'].isna().all()
  assert df.iloc[3:]['train_kl'].tolist() == df.iloc[:3]['train_kl'].tolist()  # resumed
  with pytest.raises(ConfigError, match='holds no capvae workdir'):
    capvae.load_results(os.path.join(one_go, 'tb'))
  with pytest.raises(ConfigError, match='no such file or directory'):
    capvae.load_results([one_go, '/nonexistent/*'])
