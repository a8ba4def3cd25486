"""Flax ``TrainState`` support: an ``apply_gradients`` that forwards ``grad_fn=``."""

from __future__ import annotations

from typing import Any

import optax


def apply_gradients(train_state: Any, *, grads: Any, **extra_args: Any) -> Any:
  """``TrainState.apply_gradients`` that forwards extra arguments to ``tx.update``.

  Flax's ``TrainState.apply_gradients(grads=..., **kwargs)`` treats ``kwargs`` as fields to
  replace, so a transformation that needs ``grad_fn=`` (:func:`as_transformation`, optax's
  line searches) cannot get it there. This helper does the same update (``tx.update``,
  ``optax.apply_updates``, ``step + 1``) and passes ``**extra_args`` to ``tx.update``.

  Args:
    train_state: a ``flax.training.train_state.TrainState`` (or anything with ``step``,
      ``params``, ``tx``, ``opt_state`` and ``replace``).
    grads: the gradient at ``train_state.params``.
    **extra_args: passed to ``tx.update`` (e.g. ``grad_fn=``).

  Returns:
    The new train state.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> from flax.training import train_state
    >>> loss_fn = lambda p: 0.5 * jnp.sum(p["w"] ** 2)
    >>> state = train_state.TrainState.create(
    ...     apply_fn=None, params={"w": jnp.ones(2)},
    ...     tx=od.ode.as_transformation(od.ode.rk4(0.1)))
    >>> state = od.ode.apply_gradients(state, grads=jax.grad(loss_fn)(state.params),
    ...                                grad_fn=jax.grad(loss_fn))
    >>> state.params["w"], state.step
    (Array([0.9048375, 0.9048375], dtype=float32), 1)
  """
  updates, opt_state = train_state.tx.update(
    grads, train_state.opt_state, train_state.params, **extra_args
  )
  params = optax.apply_updates(train_state.params, updates)
  return train_state.replace(step=train_state.step + 1, params=params, opt_state=opt_state)
