"""The learning-rate step of :func:`optaxderived.derive`, which keeps the rate it applied."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import numerics
from optaxderived._core.state import find_state


class LearningRateState(NamedTuple):
  """State of the learning-rate step of :func:`optaxderived.derive`.

  Attributes:
    count: the number of real updates so far (int32); a schedule is evaluated at it.
    learning_rate: the rate of the last update (float32), the base rate times the schedule's
      multiplier; before the first update, the rate the first one will use. Read it with
      :func:`learning_rate`.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  learning_rate: jax.Array


def scale_by_learning_rate(
  learning_rate: optax.ScalarOrSchedule,
) -> optax.GradientTransformation:
  """``optax.scale_by_learning_rate`` (the same arithmetic, bit for bit) that also keeps the
  rate it applied in its state, for logging. Written here because optax's keeps only the
  count (and nothing at all for a constant rate)."""

  def rate_at(count):
    return jnp.asarray(numerics.value_at(learning_rate, count), jnp.float32)

  def init_fn(params):
    del params
    count = jnp.zeros([], jnp.int32)
    return LearningRateState(count=count, learning_rate=rate_at(count))

  def update_fn(updates, state, params=None):
    del params
    if callable(learning_rate):  # as optax.scale_by_schedule
      rate = learning_rate(state.count)
      updates = jax.tree.map(lambda g: jnp.array(-rate, dtype=g.dtype) * g, updates)
    else:  # as optax.scale
      rate = learning_rate
      updates = jax.tree.map(lambda g: -learning_rate * g, updates)
    new_state = LearningRateState(
      count=optax.safe_increment(state.count), learning_rate=jnp.asarray(rate, jnp.float32)
    )
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def learning_rate(state: Any) -> jax.Array:
  """The learning rate of the last update of :func:`optaxderived.derive`, for logging.

  It is the base rate times the schedule's multiplier at the number of *real* updates
  (micro-batches inside accumulation do not count); before the first update, the rate the
  first update will use. Under ``optax.inject_hyperparams(od.derive)`` it includes the
  injected rate.

  Args:
    state: the state of :func:`optaxderived.derive`, or any optimizer state that holds it.

  Returns:
    A float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> tx = od.derive(1e-3, lr_schedule={10: 1.0})  # warmup over 10 updates
    >>> params = {"w": jnp.ones(2)}
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   _, state = tx.update({"w": jnp.ones(2)}, state, params)
    >>> print(f"{float(od.learning_rate(state)):.1e}")  # the third update: 1e-3 * 2/10
    2.0e-04
  """
  # jnp.asarray unwraps the Variables that nnx.Optimizer puts around state leaves.
  return jnp.asarray(
    find_state(state, LearningRateState, accessor="od.learning_rate").learning_rate
  )
