"""The ``capvae`` command, and every command the README shows, run as written.

The README's commands run in a scratch folder (``configs/`` and
``experiments/`` linked in), in the README's order, shortened: each
``train`` stops after 2 steps and each evaluation runs at 0.2% of the sample
sizes. Make targets that run for many minutes (``sweep``, ``answer``, the
benchmarks) are checked to exist and print their commands (``make -n``); what
they run is tested elsewhere.
"""

import csv
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from capvae import cli
from capvae import workdir as workdir_lib
from conftest import ROOT

pytestmark = pytest.mark.xdist_group('test_cli')

BIN = os.path.dirname(sys.executable)
CAPVAE = os.path.join(BIN, 'capvae')
SHORT_TRAIN = ['--config.num_steps=2', '--config.checkpoint_every=2', '--config.log_every=1']
SHORT_EVAL = ['--eval_scale=0.002', '--eval_sizes=information_images=500']
LONG_MAKE_TARGETS = {'sweep', 'answer', 'bench', 'bench-step', 'bench-device', 'test'}


def _env(**more):
  env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get('PATH', ''))
  env.update(more)
  return env


def _run(args, cwd=ROOT, **env):
  return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600,
                        env=_env(**env))


@pytest.fixture(scope='session')
def capvae_script():
  if not os.path.exists(CAPVAE):
    pytest.skip(f'{CAPVAE} is not installed (pip install -e . makes it)')
  return CAPVAE


def test_help_of_the_command_and_every_subcommand(capvae_script):
  top = _run([capvae_script, '--help'])
  assert top.returncode == 0, top.stderr
  for sub in cli.SUBCOMMANDS:
    assert re.search(rf'^  {sub}\s+\S', top.stdout, re.M), sub
  for sub, (_, _, _, names) in cli.SUBCOMMANDS.items():
    out = _run([capvae_script, sub, '--help'])
    assert out.returncode == 0, (sub, out.stderr)
    assert out.stdout.startswith(f'usage: capvae {sub} ')
    for name in names:
      assert f'--{name}' in out.stdout, (sub, name)
  assert '--out' in _run([capvae_script, 'compare', '--help']).stdout
  bare = _run([capvae_script])
  assert bare.returncode == 2 and 'subcommands:' in bare.stderr
  typo = _run([capvae_script, 'trian'])
  assert typo.returncode == 2 and "did you mean 'train'" in typo.stderr
  no_workdir = _run([capvae_script, 'evaluate'])
  assert no_workdir.returncode == 2 and 'workdir' in no_workdir.stderr
  mode = _run([capvae_script, 'train', '--mode=evaluate'])
  assert mode.returncode == 2 and '--mode is the subcommand' in mode.stderr
  missing = _run([capvae_script, 'compare', '/nonexistent/run'])
  assert missing.returncode == 2 and '/nonexistent/run: no such file' in missing.stderr


def readme_commands(path=os.path.join(ROOT, 'README.md')):
  """The shell command lines of the README's ``sh`` blocks, each a list of the
  commands its ``&&`` chains: continuation lines joined, comments dropped."""
  with open(path) as f:
    text = f.read()
  out = []
  for block in re.findall(r'```sh\n(.*?)```', text, re.S):
    block = block.replace('\\\n', ' ')
    for line in block.splitlines():
      line = line.split('#', 1)[0].strip()
      if line:
        out.append([part.strip() for part in line.split('&&') if part.strip()])
  return out


def _shortened(words, cwd):
  """A README command as the test runs it (fewer steps, smaller samples)."""
  env = {}
  while words and re.match(r'^[A-Z_]+=', words[0]):
    k, v = words.pop(0).split('=', 1)
    env[k] = v
  if words[0] == 'capvae' and words[1] == 'train':
    words = words + SHORT_TRAIN
  elif words[0] == 'capvae' and words[1] in ('evaluate', 'report'):
    words = words + SHORT_EVAL
  elif words[0] == 'make' and words[1] in ('train', 'report'):
    # Run in the repository (where `make install` can rebuild .venv if it must),
    # on the scratch folder's runs.
    workdir = next((w.split('=', 1)[1] for w in words if w.startswith('WORKDIR=')),
                   'runs/default')
    words = [w for w in words if not w.startswith(('EVAL_FLAGS=', 'TRAIN_FLAGS=', 'WORKDIR='))]
    words += [f'TRAIN_FLAGS={" ".join(SHORT_TRAIN)}', f'EVAL_FLAGS={" ".join(SHORT_EVAL)}',
              f'WORKDIR={os.path.join(cwd, workdir)}', '-C', ROOT]
  return env, words


def test_every_readme_command_runs(capvae_script, tmp_path):
  """Every command of the README's ``sh`` blocks, in order; then the runs they
  made are checked against their own files and ``capvae compare``'s table."""
  lines = readme_commands()
  assert any(c.startswith('capvae compare') for line in lines for c in line)
  assert any(c.startswith('tensorboard --logdir') for line in lines for c in line)
  for name in ('configs', 'experiments'):
    os.symlink(os.path.join(ROOT, name), tmp_path / name)
  ran = []
  for line in lines:
    chain = [shlex.split(c) for c in line]
    if any(w[0] == 'make' and w[1] in LONG_MAKE_TARGETS for w in chain):
      for words in chain:  # a long target, and what follows it in the chain
        dry = _run(['make', '-n', '-f', os.path.join(ROOT, 'Makefile'), *words[1:]], cwd=ROOT)
        assert dry.returncode == 0, (line, dry.stderr)
        ran.append(('make -n', ' '.join(words)))
      continue
    for words in chain:
      _run_readme_command(words, tmp_path, ran)
  print('\n'.join(f'{how}: {c}' for how, c in ran))
  runs = tmp_path / 'runs'

  assert {'default', 'burgess', 'test_sweep', 'member1', 'split'} <= set(os.listdir(runs))

  # `capvae compare runs/ --out runs/compare` found every workdir, one row per member.
  out = runs / 'compare'
  with open(out / 'results.csv') as f:
    table = list(csv.DictReader(f))
  workdirs = sorted(d for d in os.listdir(runs) if (runs / d / 'config.json').exists())
  want_rows = sum(len(workdir_lib.load_members(str(runs / d))) for d in workdirs)
  assert len(table) == want_rows
  assert sorted({r['run'] for r in table}) == workdirs
  _check_rows_against_workdirs(table, runs)
  _check_page_renders(out / 'results.html', len(table),
                      sum(r['train_kl'] != '' for r in table))


def _run_readme_command(words, cwd, ran):
  command = ' '.join(words)
  if words[0] in ('.', 'source'):
    return  # activating the venv: the test puts its bin first on PATH
  if words[0] == 'tensorboard':
    # It serves until stopped: test_tracking.py serves a logdir and reads it back.
    assert os.path.isdir(cwd / words[words.index('--logdir') + 1])
    ran.append(('checked', command))
    return
  env, words = _shortened(words, cwd)
  if words[0] == 'python':
    words[0] = sys.executable
  first = words[:2] == ['capvae', 'train'] and not any(c.startswith('capvae train')
                                                         for _, c in ran)
  extra = {'CAPVAE_PROGRESS': '1'} if first else {}
  t0 = time.perf_counter()
  proc = _run(words, cwd=cwd, **env, **extra)
  print(f'{time.perf_counter() - t0:6.1f} s  {command}')
  assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-3000:])
  if first:  # the first training drew its progress bar
    # tqdm's rate: step/s, or s/step below one step a second.
    assert re.search(r'train: 100%\|.*\| 2/2 \[.*(step/s|s/step)', proc.stderr), \
        proc.stderr[-2000:]
    assert 'Compiling the train step' in proc.stderr
  ran.append(('ran', command))


def _num(v):
  return math.nan if v in ('', None) else float(v)


def _check_rows_against_workdirs(table, runs):
  """Each row's values are those of its workdir's own files."""
  import capvae
  frame = capvae.load_results(str(runs))
  assert len(frame) == len(table)
  for row, (_, df_row) in zip(table, frame.iterrows()):
    workdir = str(runs / row['run'])
    member = int(row['member'])
    hp = workdir_lib.load_members(workdir)[member]
    for k, v in hp.items():
      assert _num(row[k]) == pytest.approx(v), (row['run'], k)
      assert df_row[k] == pytest.approx(v)
    log = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(log):
      last = [r for r in workdir_lib.read_metrics(log) if r['member'] == member][-1]
      assert int(row['step']) == last['step'] == df_row['step']
      for k in ('kl', 'c', 'rec', 'loss'):
        assert _num(row[f'train_{k}']) == pytest.approx(last[k], rel=1e-12)
    else:  # an extracted member: no log of its own
      assert row['step'] == '' and math.isnan(df_row['train_kl'])
      assert df_row['step'] is pd.NA
    config = workdir_lib.load_config(workdir)
    assert row['objective'] == config.objective and row['model'] == config.model
    eval_path = os.path.join(workdir, 'eval.json')
    if os.path.exists(eval_path):
      with open(eval_path) as f:
        record = [r for r in json.load(f)['members'] if r['member'] == member][0]
      assert _num(row['eval_kl']) == pytest.approx(record['kl'], rel=1e-12)
      assert _num(row['mi']) == pytest.approx(record['information']['mi'], rel=1e-12)
      for k, v in record['metrics'].items():
        assert _num(row[k]) == pytest.approx(v, rel=1e-12, nan_ok=True), k
      for k, v in record['scores'].items():
        assert df_row[k] == pytest.approx(v, rel=1e-12, nan_ok=True), k
    else:  # no eval.json: training columns only
      assert math.isnan(_num(row['eval_kl'])) and math.isnan(df_row['mig'])
  assert frame['run'].nunique() >= 4


def _check_page_renders(page, num_rows, num_trained):
  """The HTML page in headless Chromium: the script ran and every plot has its points."""
  chromium = shutil.which('chromium') or shutil.which('chromium-browser')
  if chromium is None:
    pytest.skip('no chromium here (.ci/run installs Debian\'s)')
  proc = subprocess.run(
      [chromium, '--headless', '--no-sandbox', '--disable-gpu', '--virtual-time-budget=5000',
       '--dump-dom', f'file://{page}'], capture_output=True, text=True, timeout=120)
  dom = proc.stdout
  assert 'data-ready="yes"' in dom, proc.stderr[-2000:]
  svgs = re.findall(r'<svg [^>]*data-x="([^"]+)" data-y="([^"]+)" data-points="(\d+)"', dom)
  assert int(re.search(r'data-plots="(\d+)"', dom).group(1)) == len(svgs) >= 2
  # Every plot drew a circle per point it counted, and the table has every row.
  drawn = re.findall(r'<svg [^>]*data-points="(\d+)"[^>]*>(.*?)</svg>', dom, re.S)
  for count, body in drawn:
    assert body.count('<circle') == int(count)
  assert any(int(c) == num_trained for c, _ in drawn)  # train_kl: every member trained here
  assert len(re.findall(r'<tr>', dom.split('<tbody>')[1])) == num_rows
  assert not re.search(r'https?://(?!www\.w3\.org)', open(page).read())  # self-contained
