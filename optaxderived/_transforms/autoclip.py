"""AutoClip: clipping the global norm at a percentile of its recent history."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import checks
from optaxderived._core import numerics


class AutoClipState(NamedTuple):
  """State of :func:`autoclip`, for logging (``optax.tree.get(state, "norm")``) and resuming.

  Attributes:
    history: a ring buffer of the last ``window`` finite global norms (float32, shape
      ``(window,)``): the ``i``-th recorded norm is at ``i % window``; slots not yet written
      hold 0 and are ignored.
    count: the number of finite norms recorded so far (int32): a non-finite norm is not
      recorded and does not count.
    norm: the global L2 norm of the last incoming updates, before clipping (float32; NaN or
      inf for non-finite updates).
    clipped: whether the last call scaled the updates down (bool).
  """

  history: jax.Array
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  norm: jax.Array
  clipped: jax.Array


def _percentile(history: jax.Array, size: jax.Array, q: jax.Array | float) -> jax.Array:
  """The ``q``-th percentile of ``history[:size]`` (``1 <= size <= len(history)``), with the
  linear interpolation of ``numpy.percentile``.

  Sorts the (small) buffer with the unwritten slots set to +inf, so the recorded values are
  its first ``size`` entries, and interpolates between the two at the virtual index
  ``(size - 1) q / 100`` with NumPy's two-sided lerp (exact at both ends).
  """
  values = jnp.sort(jnp.where(jnp.arange(history.shape[0]) < size, history, jnp.inf))
  # The index from (size - 1) q, exact for a whole (or half, ...) q: an index that lands on
  # a rank lands on it exactly, not one ulp below it.
  scaled = (size - 1).astype(history.dtype) * jnp.asarray(q, history.dtype)
  low = jnp.floor(scaled / 100)
  t = (scaled - 100 * low) / 100
  i = low.astype(jnp.int32)
  a, b = values[i], values[jnp.minimum(i + 1, size - 1)]
  diff = b - a
  return jnp.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


def autoclip(
  percentile: float = 10.0, *, window: int = 1000
) -> optax.GradientTransformationExtraArgs:
  r"""AutoClip: clips the global norm to a percentile of the norms seen recently.

  With :math:`n_t` the global L2 norm of the incoming updates and :math:`H_t` the last
  ``window`` finite norms up to and including :math:`n_t`, the clipping threshold is their
  ``percentile``-th percentile :math:`p` (linear interpolation between the two closest
  ranks, as ``numpy.percentile``) and the updates are clipped hard to it:

  .. math::

    \eta_t = \operatorname{P}_p(H_t), \qquad
    g_t \leftarrow g_t \min\Big(1, \frac{\eta_t}{n_t}\Big).

  The threshold adapts to the scale of the gradients as training goes, so no clipping
  norm has to be tuned; with the default :math:`p = 10`, about nine steps in ten are
  clipped, to a norm typical of the recent past. The first call is never clipped (its norm
  is its own percentile). The original keeps the whole history; ``window`` bounds it (and
  the state) and lets the threshold follow the trend of the norm.

  The norm is accumulated in float32 (or wider) whatever the updates' dtype, and the updates
  keep their dtype; finite updates whose sum of squares overflows float32 still get their
  exact norm (as in :func:`optaxderived.clip_norm`). The percentile sorts the ``window``
  recorded norms, not the updates: its cost does not grow with the model. An update with a
  non-finite norm (a NaN or an Inf entry) passes unchanged and is not recorded, so
  ``optax.apply_if_finite`` around it (or around the chain) skips the step. Place it first in
  a chain, on the raw gradients; inside :func:`optaxderived.accumulate` it sees the window
  means, i.e. records real updates.

  Args:
    percentile: :math:`p \in [0, 100]`, the percentile of the history to clip at.
    window: the number of recent norms (an int >= 1) kept in the history.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an :class:`AutoClipState`.

  Raises:
    ValueError: for a ``percentile`` outside :math:`[0, 100]` or a ``window`` that is not
      an integer >= 1.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> tx = od.autoclip(50.0)  # the median of the history
    >>> state = tx.init(jnp.zeros(2))
    >>> for g in [1.0, 2.0, 3.0, 4.0, 10.0]:
    ...   updates, state = tx.update(jnp.array([g, 0.0]), state)
    ...   print(f"{state.norm:.1f} {optax.tree.norm(updates):.1f} {bool(state.clipped)}")
    1.0 1.0 False
    2.0 1.5 True
    3.0 2.0 True
    4.0 2.5 True
    10.0 3.0 True
    >>> state.history[:6], state.count
    (Array([ 1.,  2.,  3.,  4., 10.,  0.], dtype=float32), Array(5, dtype=int32))

  References:
    Seetharaman, Wichern, Pardo, Le Roux, `AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks <https://arxiv.org/abs/2007.14469>`_, MLSP 2020.
  """
  fn = "od.autoclip"
  checks.check_range(fn, "percentile", percentile, low=0.0, high=100.0, schedule=False)
  checks.check_int(fn, "window", window, low=1, schedule=False)

  def init_fn(params):
    del params
    return AutoClipState(
      history=jnp.zeros([int(window)], jnp.float32),
      count=jnp.zeros([], jnp.int32),
      norm=jnp.zeros([], jnp.float32),
      clipped=jnp.zeros([], jnp.bool_),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    leaves, treedef = jax.tree.flatten(updates)
    if not leaves:  # nothing to clip and no norm to record
      return updates, state._replace(
        norm=jnp.zeros([], jnp.float32), clipped=jnp.zeros([], jnp.bool_)
      )
    n = numerics.global_norm(leaves)  # float32, or wider for float64 updates
    recorded = n.astype(jnp.float32)
    finite = jnp.isfinite(recorded)
    size = state.history.shape[0]  # the window (static, also under inject_hyperparams)
    slot = state.count % size
    history = state.history.at[slot].set(jnp.where(finite, recorded, state.history[slot]))
    count = jnp.where(finite, optax.safe_increment(state.count), state.count)
    threshold = _percentile(history, jnp.clip(count, 1, size), percentile)
    over = finite & (recorded > threshold)
    # The threshold is below the norm when clipping; the inner where never divides by a
    # norm that is not clipped (0, or a NaN).
    factor = jnp.where(over, threshold.astype(n.dtype) / jnp.where(over, n, 1), 1)
    new_leaves = [(numerics.wide(x) * factor).astype(x.dtype) for x in leaves]
    new_state = AutoClipState(history=history, count=count, norm=recorded, clipped=over)
    return jax.tree.unflatten(treedef, new_leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
