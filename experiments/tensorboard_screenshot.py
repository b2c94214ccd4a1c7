r"""Serves a log directory with TensorBoard and photographs its pages headless.

  python experiments/tensorboard_screenshot.py --logdir runs/ \
      --out docs/figures/tensorboard

Starts ``tensorboard --logdir LOGDIR`` on a free local port, waits until it
lists the runs, prints what its data API serves (runs; scalar, image and
hparams tags), and saves Debian's headless Chromium's screenshots of the
scalars, images and hparams dashboards as ``OUT/{scalars,images,hparams}.png``.
Nothing leaves the machine.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

PAGES = {'scalars': 'scalars', 'images': 'images', 'hparams': 'hparams',
         'custom_scalars': 'custom_scalars'}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def get(url: str, data: bytes | None = None):
  req = urllib.request.Request(url, data=data, headers={'Content-Type': 'application/json'}
                               if data else {})
  with urllib.request.urlopen(req, timeout=30) as r:
    return json.loads(r.read())


def serve(logdir: str, port: int) -> subprocess.Popen:
  tensorboard = os.path.join(os.path.dirname(sys.executable), 'tensorboard')
  return subprocess.Popen([tensorboard, '--logdir', logdir, '--port', str(port),
                           '--host', '127.0.0.1', '--load_fast=false', '--reload_interval=0'],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_runs(base: str, timeout: float = 120) -> dict:
  t0 = time.time()
  while time.time() - t0 < timeout:
    try:
      runs = get(f'{base}/data/runs')
      if runs:
        return runs
    except OSError:
      pass
    time.sleep(0.5)
  raise TimeoutError(f'TensorBoard at {base} listed no runs in {timeout} s')


def served(base: str) -> dict:
  """What TensorBoard's data API serves: runs, and each plugin's tags per run."""
  return {
      'runs': get(f'{base}/data/runs'),
      'scalars': get(f'{base}/data/plugin/scalars/tags'),
      'images': get(f'{base}/data/plugin/images/tags'),
      'hparams': get(f'{base}/data/plugin/hparams/experiment',
                     json.dumps({'experimentName': ''}).encode()),
  }


def screenshot(chromium: str, url: str, path: str, size=(1500, 1000)) -> None:
  subprocess.run([chromium, '--headless', '--no-sandbox', '--disable-gpu',
                  '--hide-scrollbars', f'--window-size={size[0]},{size[1]}',
                  '--virtual-time-budget=20000', f'--screenshot={path}', url],
                 check=True, capture_output=True, timeout=180)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--logdir', default='runs/')
  p.add_argument('--out', default='docs/figures/tensorboard')
  args = p.parse_args()
  chromium = shutil.which('chromium') or shutil.which('chromium-browser')
  os.makedirs(args.out, exist_ok=True)
  port = free_port()
  base = f'http://127.0.0.1:{port}'
  proc = serve(args.logdir, port)
  try:
    wait_for_runs(base)
    data = served(base)
    print(f'runs: {len(data["runs"])}: {", ".join(data["runs"][:6])}'
          + (' …' if len(data['runs']) > 6 else ''))
    run = data['runs'][0]
    print(f'scalar tags of {run}: {len(data["scalars"][run])}:'
          f' {", ".join(sorted(data["scalars"][run])[:8])} …')
    print(f'image tags of {run}: {", ".join(sorted(data["images"].get(run, {})))}')
    hp = data['hparams']
    print(f'hparams: {len(hp.get("hparamInfos", []))} hyperparameters,'
          f' {len(hp.get("metricInfos", []))} metrics')
    if chromium is None:
      print('no chromium: no screenshots (apt-get install chromium)')
      return
    for name, fragment in PAGES.items():
      path = os.path.join(args.out, f'{name}.png')
      screenshot(chromium, f'{base}/#{fragment}', path)
      print(f'wrote {path}')
  finally:
    proc.terminate()
    proc.wait(timeout=30)


if __name__ == '__main__':
  main()
