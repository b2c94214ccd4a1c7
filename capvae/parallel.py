"""The member axis on devices and hosts: the mesh, ``shard_map``, the member loop.

A run is a stack of members (:mod:`capvae.sweep`), trained by one step
function of one member (:func:`capvae.train.make_member_step`). This module
lays that stack on a ``('member', 'data')`` device mesh, over every device of
every process (``jax.distributed``), and runs the member step over the stack:

* :func:`over_members` turns ``member_step(state, x)`` into the step of the
  whole stack: every device renders the shared batch itself, takes its share
  of it along ``'data'``, and runs its own members one after another
  (``'map'``) or batched (``'vmap'``);
* :func:`relayout` re-pads a stack saved on another device count;
* :func:`fetch`, :func:`any_process` and :func:`barrier` are the few
  collective operations the training loop needs between processes.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from capvae import backend


def make_mesh(devices=None, data_shards: int = 1) -> jax.sharding.Mesh:
  """A ``('member', 'data')`` mesh over ``devices`` (default: all, every host).

  Members are split over the ``'member'`` axis; each member's batch is split
  over the ``data_shards`` consecutive devices of a ``'data'`` row (1: every
  device trains its members on the whole batch).
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  if data_shards < 1 or devices.size % data_shards:
    raise ValueError(f'data_shards = {data_shards} must divide the {devices.size} device(s).')
  return jax.sharding.Mesh(devices.reshape(-1, data_shards), ('member', 'data'))


def loop_members(member_step, states, x):
  """``lax.map(lambda s: member_step(s, x), states)``, in place, the same program for any count.

  ``member_step(state, x) -> (state, aux)``; ``x`` (the batch) is shared by
  all members. The loop carries the stacked states and writes each member's
  new state over its old row (no copy of the stack: the program's input is
  donated). A member's result must not depend on how many members share its
  device (member i of a sweep ends bit for bit where a single run ends). XLA
  specialises a loop of one trip and a slice of an axis of length one, and
  would then fuse the member's arithmetic with the slicing differently; so the
  trip count is opaque to the compiler and the member's step sits between
  optimisation barriers. The loop body is then the same program for any count.

  ``x`` enters the member's step through the first barrier, with the state.
  Otherwise XLA hoists the member's first use of it out of the loop (the
  whole-batch padding of the first convolution) and fuses the batch's renderer
  into that, so the batch is computed twice.
  """
  num = jax.tree.leaves(states)[0].shape[0]
  trips = num + jnp.minimum(states.step[0], 0)  # == num: steps are never negative
  # Traced once (the loop needs the shapes of its outputs before its body).
  one = lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
  closed, out_shape = jax.make_jaxpr(member_step, return_shape=True)(
      jax.tree.map(one, states), jax.ShapeDtypeStruct(x.shape, x.dtype))
  out_tree, aux_shape = jax.tree.structure(out_shape), out_shape[1]
  traced_step = lambda *args: jax.tree.unflatten(
      out_tree, jax.extend.core.jaxpr_as_fun(closed)(*jax.tree.leaves(args)))
  aux = jax.tree.map(lambda s: jnp.zeros((num, *s.shape), s.dtype), aux_shape)

  def body(i, carry):
    states, aux = carry
    state = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, False), states)
    new, out = jax.lax.optimization_barrier(traced_step(*jax.lax.optimization_barrier((state, x))))
    put = lambda buf, o: jax.lax.dynamic_update_index_in_dim(buf, o, i, 0)
    return jax.tree.map(put, states, new), jax.tree.map(put, aux, out)

  return jax.lax.fori_loop(0, trips, body, (states, aux))


def data_axis_of(mesh: jax.sharding.Mesh | None) -> str | None:
  """``'data'`` if ``mesh`` splits each member's batch over devices, else None."""
  return 'data' if mesh is not None and mesh.shape.get('data', 1) > 1 else None


def over_members(member_step: Callable, batch: Callable, member_loop: str = 'map',
                 mesh: jax.sharding.Mesh | None = None):
  """The step of a stack of members: ``(states, dataset) -> (states, aux)``.

  ``member_step(state, x) -> (state, aux)`` is one member's update on batch
  ``x`` (with a ``'data'`` axis in ``mesh``: on this device's share of it);
  ``batch(dataset, step)`` renders the batch every member sees at ``step``.
  ``states`` carries a leading member axis, split over ``mesh``'s
  ``'member'`` axis (``shard_map``; no communication between members). On
  each device the local members run one after another (``'map'``: each
  computed exactly as a single run computes it, so a member's result does not
  depend on the others, bit for bit) or batched (``'vmap'``: fewer, larger
  kernels, which is what an accelerator wants).
  """
  data_axis = data_axis_of(mesh)
  member_loop = backend.resolve_member_loop(member_loop)

  def local_step(states, dataset):
    # Members always advance together, so the first one's step is everyone's.
    # Rendered once, on its own: fused into the first layer, XLA recomputes it per use.
    x = batch(dataset, states.step[0])
    if data_axis is not None:  # this device's share of the batch
      n = x.shape[0] // mesh.shape[data_axis]
      x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(data_axis) * n, n)
    x = jax.lax.optimization_barrier(x)
    if member_loop == 'vmap':
      return jax.vmap(member_step, in_axes=(0, None))(states, x)
    return loop_members(member_step, states, x)

  if mesh is None:
    return local_step
  member = jax.sharding.PartitionSpec('member')
  return jax.shard_map(local_step, mesh=mesh,
                       in_specs=(member, jax.sharding.PartitionSpec()),
                       out_specs=member, check_vma=False)


def relayout(states, num_real: int, slots: int):
  """The first ``num_real`` members of ``states``, padded to ``slots`` with copies
  of the last one (the layout :func:`capvae.sweep.pad` gives fresh states)."""
  def fix(x):
    x = x[:num_real]
    return jnp.concatenate([x, jnp.repeat(x[-1:], slots - num_real, axis=0)])
  return jax.tree.map(fix, states)


def fetch(tree):
  """Host copies of (possibly multi-host) global arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def any_process(flag: bool) -> bool:
  """Whether ``flag`` is set on any process (every process must call it)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name``."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
