"""Stochastic weight averaging: the equal-weight mean of the params, kept in the state."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import checks
from optaxderived._core import numerics
from optaxderived._core.state import find_state


class SWAState(NamedTuple):
  """State of :func:`swa`.

  Attributes:
    count: params averaged so far, :math:`n` (int32).
    mean: their mean, shaped like the params, in the params' dtype promoted to at least
      float32 (zeros at ``init``).
    calls: update calls seen, :math:`t` (int32); ``start_step`` and ``every`` count them.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  mean: Any
  calls: jax.Array


def swa(*, start_step: int = 0, every: int = 1) -> optax.GradientTransformationExtraArgs:
  r"""Stochastic weight averaging (SWA): the mean of the params, for evaluation.

  On the update calls :math:`t = 0, 1, \dots` with :math:`t \ge` ``start_step`` and
  :math:`t -` ``start_step`` a multiple of ``every`` it adds the new params
  :math:`\theta = \theta_{\rm old} + u` to an equal-weight running mean; updates pass
  unchanged. After :math:`n` such calls, of params :math:`\theta_1, \dots, \theta_n`:

  .. math::

    \bar\theta_n = \bar\theta_{n-1} + \frac{\theta_n - \bar\theta_{n-1}}{n}
    = \frac{1}{n} \sum_{i=1}^{n} \theta_i .

  Read :math:`\bar\theta_n` with :func:`swa_params` (the params themselves before the first
  average). As in the paper, train with a constant or cyclical learning rate from
  ``start_step`` on and average once per epoch or cycle (``every``); recompute BatchNorm
  statistics with the averaged params before evaluating.

  Put it last in a chain, like :func:`param_ema`: it averages ``params + updates`` for the
  updates it receives. Inside ``od.accumulate`` it counts real updates only. The mean is
  kept in at least float32, so bf16 params get a float32 mean (of the values the params
  hold), each with its param's sharding.

  Differences from ``torch.optim.swa_utils.AveragedModel``: the mean lives in the optimizer
  state and is updated by the step itself, on a schedule of calls, instead of by an
  ``update_parameters`` call in the training loop; it averages parameters only (no
  buffers).

  Args:
    start_step: the first call that is averaged (an integer >= 0); calls before it are not.
    every: average every ``every``-th call from ``start_step`` on (an integer >= 1).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` that returns its updates unchanged;
    ``update`` needs ``params``.

  Example:
    A worked example: SGD with learning rate 0.1 on gradients 1, :math:`\theta_0 = 1`:

    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> tx = optax.chain(optax.sgd(0.1), od.swa())
    >>> params = jnp.array(1.0)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jnp.array(1.0), state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(f"{params:.1f} swa {od.swa_params(state, params):.7f}")
    0.9 swa 0.9000000
    0.8 swa 0.8500000
    0.7 swa 0.8000000

  References:
    Izmailov, Podoprikhin, Garipov, Vetrov, Wilson, "Averaging Weights Leads to Wider Optima
    and Better Generalization", UAI 2018, https://arxiv.org/abs/1803.05407.
    ``torch.optim.swa_utils.AveragedModel``,
    https://pytorch.org/docs/stable/optim.html#weight-averaging-swa-and-ema.
  """
  fn = "od.swa"
  checks.check_int(fn, "start_step", start_step, low=0, schedule=False)
  checks.check_int(fn, "every", every, low=1, schedule=False)

  def init_fn(params):
    return SWAState(
      count=jnp.zeros([], jnp.int32),
      mean=jax.tree.map(
        lambda p: jnp.zeros_like(p, dtype=numerics.wide_dtype(jnp.result_type(p))), params
      ),
      calls=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    checks.require_params(params, fn)
    t = state.calls
    averaged = (t >= start_step) & ((t - start_step) % every == 0)
    count = jnp.where(averaged, optax.safe_increment(state.count), state.count)

    def leaf(m, p):
      theta = numerics.widen_stored(p, m.dtype)
      return jnp.where(averaged, m + (theta - m) / jnp.maximum(count, 1).astype(m.dtype), m)

    try:
      mean = jax.tree.map(leaf, state.mean, optax.apply_updates(params, updates))
    except ValueError as error:
      raise ValueError(
        f"{fn}: the updates, params and mean must have the same tree structure: {error}"
      ) from None
    return updates, SWAState(count=count, mean=mean, calls=optax.safe_increment(t))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def swa_params(state: Any, params: Any, *, index: int = 0) -> Any:
  """The averaged params of :func:`swa`, to evaluate with.

  Args:
    state: an :class:`SWAState` or any optimizer state that holds one (a chain, a wrapper
      such as ``od.accumulate``, ``nnx.as_pure(optimizer.opt_state)``).
    params: the current params; returned as they are before the first average, and giving
      the result its structure and dtypes (an ``nnx.State`` of Variables works too).
    index: which :class:`SWAState` to read when ``state`` holds several: 0 the outermost
      (the first in a chain), 1 the next, in chain order.

  Returns:
    The mean :math:`\\bar\\theta_n`, cast to the params' dtypes.

  Raises:
    ValueError: when ``state`` holds no :class:`SWAState` (or ``index`` or fewer), or when
      ``params`` has a different number of leaves than the mean.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> tx = od.swa(start_step=1)
    >>> params = {"w": jnp.array([2.0])}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([-1.0])}, state, params)  # not averaged
    >>> od.swa_params(state, {"w": jnp.array([1.0])})
    {'w': Array([1.], dtype=float32)}
    >>> _, state = tx.update({"w": jnp.array([-1.0])}, state, {"w": jnp.array([1.0])})
    >>> _, state = tx.update({"w": jnp.array([-1.0])}, state, {"w": jnp.array([0.0])})
    >>> od.swa_params(state, {"w": jnp.array([-1.0])})  # the mean of 0 and -1
    {'w': Array([-0.5], dtype=float32)}
  """
  found = find_state(state, SWAState, accessor="od.swa_params", index=index)
  leaves, treedef = jax.tree.flatten(params)
  means = jax.tree.leaves(found.mean)
  if len(leaves) != len(means):
    raise ValueError(
      f"od.swa_params: params have {len(leaves)} leaves, the mean has {len(means)}"
    )
  # jnp.asarray unwraps the Variables that nnx.Optimizer puts around state leaves.
  started = jnp.asarray(found.count) > 0

  def leaf(m, p):
    p = jnp.asarray(p)
    return jnp.where(started, m, p).astype(p.dtype)

  return jax.tree.unflatten(treedef, [leaf(m, p) for m, p in zip(means, leaves, strict=True)])
