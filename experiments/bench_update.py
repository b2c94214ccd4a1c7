r"""Times the member update's three ways of refusing a non-finite update.

  python experiments/bench_update.py --model mlp

The train step refuses an update whose loss, gradients or new parameters are
not all finite (``capvae.train.make_member_step``). This times Adam's update of
one member's state (the model's own parameter shapes, a fixed gradient, the
state donated as in the training program), alone, with:

* ``select``: the update made, then each array chosen elementwise between the
  new and the old value with the finiteness flag;
* ``cond``: a pass that checks the new parameters without keeping them, then
  the update made in place under a ``lax.cond``;
* ``step``: ``train.update_or_keep``, what the train step does (``select``
  for arrays below ``train.IN_PLACE_SIZE`` elements, ``cond`` for the others);
* ``none``: the update with no check, for reference.

On the 2-core CPU this was written on: mlp (14 M parameters) select 72 ms,
cond 20, step 19, none 8; locatello (0.7 M) 1.0, 0.67, 0.91 and 0.37 ms. Alone,
the cond is the faster for small states too, but in locatello's whole step it
measured 5 ms slower than the select, which is why ``step`` keeps the select
below ``IN_PLACE_SIZE`` (measured in the git history of experiments/results_train_step.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

from capvae import data, models, sweep, train
from capvae import backend
from capvae import train_state as ts
from bench_train_step import default_config


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='mlp', choices=list(models.MODELS))
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=20)
  args = parser.parse_args(argv)
  backend.keep_freed_memory()
  config = default_config(args.model, 64)
  spec = train.StepSpec.from_config(config)
  dataset = data.get(config.dataset)
  model = models.get(config.model, config.latent_size, dataset.observation_shape)
  states = train.init_states(model, sweep.stack(sweep.members(config)),
                             dataset.observation_shape, spec)
  state = jax.tree.map(lambda a: a[0], states)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)
  tx = ts.make_optimizer(config.learning_rate)

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(l)) for l in jax.tree.leaves(tree)]))

  # The gradients are an argument (not donated): closed over, they would be
  # a constant of the program, which XLA folds into the arithmetic.
  def select(params, opt_state, grads):
    new = update(params, opt_state, grads)
    ok = finite(new[0])
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, (params, opt_state))

  def cond(params, opt_state, grads):
    ok = finite(update(params, opt_state, grads)[0])
    return jax.lax.cond(ok, lambda p, o: update(p, o, grads), lambda p, o: (p, o), params,
                        opt_state)

  def step(params, opt_state, grads):
    ok = finite(update(params, opt_state, grads)[0])
    return train.update_or_keep(lambda p, o: update(p, o, grads), (params, opt_state), ok)

  def none(params, opt_state, grads):
    return update(params, opt_state, grads)

  fresh = lambda: (jax.tree.map(jnp.copy, state.params), jax.tree.map(jnp.copy, state.opt_state))
  programs = {f.__name__: jax.jit(f, donate_argnums=(0, 1)).lower(*fresh(), grads).compile()
              for f in (select, cond, step, none)}
  times = {name: [] for name in programs}
  for _ in range(args.rounds):
    for name, compiled in programs.items():
      s = fresh()
      for _ in range(3):
        s = compiled(*s, grads)
      jax.block_until_ready(s)
      t0 = time.perf_counter()
      for _ in range(args.steps):
        s = compiled(*s, grads)
      jax.block_until_ready(s)
      times[name].append((time.perf_counter() - t0) / args.steps)
  count = sum(l.size for l in jax.tree.leaves(state.params))
  print(f'# bench_update: {args.model}, {count:,} parameters, Adam, state donated;'
        f' median of {args.rounds} rounds of {args.steps} updates (interleaved)')
  for name, seconds in times.items():
    print(f'{name:>8} {1e3 * statistics.median(seconds):8.2f} ms   rounds'
          f' {" ".join(f"{1e3 * s:.2f}" for s in seconds)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
