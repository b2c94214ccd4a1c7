"""The train state of one member; a run holds a stack of them.

``TrainState`` keeps params, optax state, the step and the member's traced
hyperparameters. It holds no optimizer object: the optax transformation is
rebuilt inside the step from the member's (traced) learning rate, so the
learning rate has a single home, ``hparams``, and is checkpointed with it.
The capacity C is not stored either; it is ``schedule(state.step)``
(:meth:`capvae.losses.Objective.capacity`), so it resumes exactly with the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct as struct
import jax
import jax.numpy as jnp
import optax

INT_HPARAMS = frozenset({'c_anneal_steps', 'seed', 'c_stair_steps'})
# Hyperparameters added after runs were saved without them, and the value those
# runs used: their member tables and checkpoints get it on load.
LATER_HPARAMS = {'c_stair_steps': 1, 'lambda_od': 1.0, 'lambda_d_factor': 10.0,
                 'disc_learning_rate': 1e-4, 'kp': 0.01, 'ki': 0.001, 'beta_min': 1.0,
                 'beta_max': 1000.0}


class Hparams(struct.PyTreeNode):
  """One member's traced hyperparameters (scalars, or ``[M]`` when stacked)."""
  beta: jax.Array
  gamma: jax.Array
  c_max: jax.Array
  c_anneal_steps: jax.Array
  learning_rate: jax.Array
  gaussian_variance: jax.Array
  seed: jax.Array
  c_stair_steps: jax.Array
  # dip_vae: the off-diagonal weight, and the diagonal's as a multiple of it.
  lambda_od: jax.Array
  lambda_d_factor: jax.Array
  # factor_vae: the discriminator's Adam learning rate.
  disc_learning_rate: jax.Array
  # controlled_capacity: the PI controller's gains and the bounds of its beta.
  kp: jax.Array
  ki: jax.Array
  beta_min: jax.Array
  beta_max: jax.Array


# Scalars that may differ between members of one program (traced): Hparams' fields.
HPARAM_NAMES = tuple(f.name for f in dataclasses.fields(Hparams))


class TrainState(struct.PyTreeNode):
  """One member's state.

  ``frozen_step`` is the step of the first update that would have made the
  loss, a gradient or a parameter non-finite (-1: none). From then on the
  member is :attr:`frozen`: its params, optimizer state and objective state
  are left as they were (its step still advances with everyone else's).

  ``objective_state`` is what the objective carries from step to step
  (:meth:`capvae.losses.Objective.init_state`: FactorVAE's discriminator and
  its optimizer, the controller's integral; ``{}`` for the others). It is
  stacked, split, checkpointed, frozen and extracted with the member like its
  parameters.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  hparams: Hparams
  frozen_step: jax.Array
  objective_state: Any = struct.field(default_factory=dict)

  @property
  def frozen(self) -> jax.Array:
    """Whether an update of this member has been refused."""
    return self.frozen_step >= 0


# Fields that checkpoints saved by earlier versions hold and the state no
# longer has, with the dtype they were saved in (one value per member):
# read and dropped on restore. ``frozen`` is derived from ``frozen_step``.
REMOVED_FIELDS = {'frozen': jnp.bool_}
# Fields that checkpoints saved by earlier versions lack, and the value they
# had in those runs.
LATER_FIELDS = {'objective_state': {}}


def make_optimizer(learning_rate, *, b1=0.9, b2=0.999, eps=1e-8):
  """Adam with a (possibly traced) learning rate.

  Adam's state does not depend on the learning rate, so one state serves a
  transformation rebuilt at every step with the member's value.
  """
  return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)


def member_keys(seed):
  """``(init_key, noise_key)`` derived from a member's integer seed."""
  key = jax.random.key(seed)
  return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def objective_key(seed):
  """The key of a member's objective state (a discriminator's initialisation)."""
  return jax.random.fold_in(jax.random.key(seed), 2)


def create(model, hparams: Hparams, example_input, optimizer_kwargs,
           objective=None) -> TrainState:
  """A fresh train state for one member (vmap it over a stacked ``Hparams``);
  ``objective`` (a :class:`capvae.losses.Objective`) gives its objective state."""
  init_key, noise_key = member_keys(hparams.seed)
  params = model.init(init_key, example_input, noise_key)
  tx = make_optimizer(hparams.learning_rate, **optimizer_kwargs)
  ostate = ({} if objective is None else
            objective.init_state(objective_key(hparams.seed), model.encoder.latent_size,
                                 hparams))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), hparams=hparams,
                    frozen_step=jnp.full((), -1, jnp.int32), objective_state=ostate)


def create_stack(model, hparams: Hparams, observation_shape, optimizer_kwargs,
                 objective=None) -> TrainState:
  """Fresh states for a stacked member table ``hparams`` (``[M]`` arrays), stacked."""
  example = jnp.zeros((1, *observation_shape), jnp.float32)
  return jax.vmap(lambda h: create(model, h, example, optimizer_kwargs, objective))(hparams)


def optimizer_kwargs(config) -> dict[str, float]:
  """Adam's static settings (``b1``, ``b2``, ``eps``) of a run's config."""
  return dict(b1=float(config.adam_b1), b2=float(config.adam_b2), eps=float(config.adam_eps))
