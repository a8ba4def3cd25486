"""Decoupled weight decay with path exclusions."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import checks
from optaxderived._core import numerics
from optaxderived._core import paths


class WeightDecayState(NamedTuple):
  """State of :func:`weight_decay`.

  Attributes:
    count: the number of update calls seen (the step at which a ``rate`` schedule is
      evaluated), int32.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def weight_decay(
  rate: optax.ScalarOrSchedule = 0.01, *, exclude: paths.Patterns = (), strict: bool = False
) -> optax.GradientTransformationExtraArgs:
  r"""Decoupled weight decay: adds ``rate * params`` to the updates.

  .. math::

    u_t \leftarrow u_t + \lambda_t \, \theta_t

  where :math:`\lambda_t` is ``rate`` (a schedule is evaluated at the number of update calls
  seen). Place it after the base optimizer and before the learning-rate scaling, as AdamW does,
  so the decay is multiplied by the learning rate but not divided by Adam's
  :math:`\sqrt{v}`: with ``optax.chain(optax.scale_by_adam(), od.weight_decay(λ),
  optax.scale_by_learning_rate(η))`` the step is :math:`-\eta(\hat m/(\sqrt{\hat v}+\epsilon) +
  \lambda\theta)`. Leaves whose path matches ``exclude`` (e.g. ``["bias", "Norm"]``) are not
  decayed.

  Unlike ``optax.add_decayed_weights``, a scheduled rate keeps bf16 updates bf16.

  Args:
    rate: the decay rate :math:`\lambda \ge 0`, or a schedule of it.
    exclude: patterns of leaves not to decay: regexes searched in the leaf paths, or a
      predicate ``(path, leaf) -> bool`` (``lambda path, p: p.ndim < 2``: every vector,
      i.e. biases and norm scales, whatever the model names them).
    strict: raise ``ValueError`` at ``init`` instead of warning when a pattern of
      ``exclude`` matches no leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> params = {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([1.0])}
    >>> tx = optax.chain(od.weight_decay(0.1, exclude="bias"), optax.sgd(0.1))
    >>> grads = {"kernel": jnp.array([0.5, -1.0]), "bias": jnp.array([0.5])}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)
    {'bias': Array([0.95], dtype=float32), 'kernel': Array([ 0.94, -1.88], dtype=float32)}

  References:
    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  checks.check_range("od.weight_decay", "rate", rate, low=0.0)
  checks.check_bool("od.weight_decay", "strict", strict)
  excluded = paths.selector(exclude, argname="od.weight_decay: exclude", strict=strict)

  def init_fn(params):
    excluded.check_used(params)
    return WeightDecayState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    checks.require_params(params, "od.weight_decay")
    checks.check_same_tree("od.weight_decay", updates, params, "params")
    r = numerics.value_at(rate, state.count)
    updates = jax.tree.map(
      lambda u, p, skip: u if skip else (u + r * p).astype(u.dtype),
      updates,
      params,
      excluded.mask(updates),
    )
    return updates, WeightDecayState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
