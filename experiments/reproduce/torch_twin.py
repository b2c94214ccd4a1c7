r"""The stall in a second framework: the PyTorch twin of capvae's Burgess model.

  pip install torch==2.13.0     # the CPU build (or: pip install -e '.[bench]')
  python experiments/reproduce/torch_twin.py --learning_rates 5e-4,1e-4

Trains ``experiments/bench_train_step.torch_model('burgess')`` (the same
layers, widths and parameter count; PyTorch's own initialisation, or
``--init kaiming`` with zero biases as in common PyTorch beta-VAE code) on
capvae's procedural dSprites batches (the same images, step for step) with
the plain PyTorch loss: Bernoulli reconstruction summed over pixels, KL summed
over latents, both averaged over the batch, ``+ gamma·|KL − C|``, C raised
linearly to ``c_max`` over ``--anneal`` steps, ``torch.optim.Adam``. Every
``--every`` steps it splits the KL of 2,000 held-out images into spread,
offset and variance as :func:`capvae.losses.kl_decomposition` does, and
prints it. ``--out`` writes the rows as JSON. About 3 minutes per learning rate
for 3,000 steps on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # experiments/, for bench_train_step

from capvae import data, losses, train  # pylint: disable=g-import-not-at-top


def run(lr: float, args) -> list[dict]:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  import bench_train_step  # pylint: disable=g-import-not-at-top

  torch.manual_seed(args.seed)
  dataset = data.get('dsprites', '', 'train')
  net = bench_train_step.torch_model('burgess', 10, dataset.observation_shape)
  if args.init == 'kaiming':
    for mod in net.modules():
      if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
        torch.nn.init.kaiming_normal_(mod.weight)
        mod.bias.data.zero_()
  opt = torch.optim.Adam(net.parameters(), lr=lr)

  class Spec:  # what train.batch_at reads
    batch_size = 64
    data_seed = 0

  render = jax.jit(lambda ds, step: train.batch_at(ds, step, Spec))
  to_torch = lambda x: torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()
  held = to_torch(dataset.render(dataset.sample_factors(jax.random.key(123), 2000)))
  rows, t0 = [], time.perf_counter()
  for step in range(args.steps):
    x = to_torch(render(dataset, jnp.int32(step)))
    logits, mean, logvar = net(x)
    rec = F.binary_cross_entropy_with_logits(logits, x, reduction='sum') / x.shape[0]
    kl = (0.5 * (logvar.exp() + mean**2 - 1 - logvar)).sum(1).mean()
    c = min(args.c_max, args.c_max * step / args.anneal)
    loss = rec + args.gamma * (kl - c).abs()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if (step + 1) % args.every == 0:
      with torch.no_grad():
        m, lv = (t.double().numpy() for t in net.encoder(held))
      parts = losses.kl_decomposition(m.sum(0), (m**2).sum(0), np.exp(lv).sum(0),
                                      lv.sum(0), m.shape[0])
      row = {'learning_rate': lr, 'step': step + 1, 'c': c, 'batch_kl': kl.item(),
             'batch_rec': rec.item(), 'seconds': time.perf_counter() - t0,
             **{k: float(np.sum(v)) for k, v in parts.items()}}
      rows.append(row)
      print(f"lr {lr:g} step {row['step']:5d}  C {c:5.2f}  batch KL {row['batch_kl']:5.2f}"
            f"  rec {row['batch_rec']:6.1f}  held-out KL split: spread {row['spread']:.2f}"
            f" offset {row['offset']:.2f} variance {row['variance']:.2f}", flush=True)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--learning_rates', default='5e-4,1e-4')
  p.add_argument('--steps', type=int, default=3000)
  p.add_argument('--every', type=int, default=500)
  p.add_argument('--anneal', type=int, default=25_000)
  p.add_argument('--c_max', type=float, default=25.0)
  p.add_argument('--gamma', type=float, default=1000.0)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--init', choices=('torch', 'kaiming'), default='torch')
  p.add_argument('--out', default='')
  args = p.parse_args()
  rows = [r for lr in args.learning_rates.split(',') for r in run(float(lr), args)]
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'command': ' '.join(sys.argv), 'args': vars(args), 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
