"""ZClip: clipping the global norm at a z-score of its own exponential moving statistics."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import checks
from optaxderived._core import numerics

_STD_EPS = 1e-6  # the z-score's guard against a zero standard deviation, as in the paper


class ZClipState(NamedTuple):
  r"""State of :func:`zclip`, for logging (``optax.tree.get(state, "norm")``) and resuming.

  Attributes:
    mean: :math:`\mu`, the exponential moving average of the global norms after clipping
      (float32). During warmup, the mean of the warmup norms recorded so far.
    var: :math:`\sigma^2`, the exponential moving variance of those norms (float32). During
      warmup, the population variance of the warmup norms recorded so far (Welford's update,
      so no sum of squares loses the variance to cancellation).
    count: the number of finite norms recorded (int32), warmup included: a non-finite norm
      does not count. Clipping starts once it reaches ``warmup_steps``.
    norm: the global L2 norm of the last incoming updates, before clipping (float32; NaN or
      inf for non-finite updates).
    clipped: whether the last call scaled the updates down (bool).
  """

  mean: jax.Array
  var: jax.Array
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  norm: jax.Array
  clipped: jax.Array


def zclip(
  z_threshold: float = 2.5,
  *,
  ema_decay: float = 0.97,
  warmup_steps: int = 25,
  reciprocal: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""ZClip: clips the global norm when it is an outlier of its own recent history.

  With :math:`n_t` the global L2 norm of the incoming updates, the first ``warmup_steps``
  (:math:`W`) finite norms pass unclipped and start the statistics with their mean and
  population variance,

  .. math::

    \mu = \frac1W \sum_{t=1}^{W} n_t, \qquad \sigma^2 = \frac1W \sum_{t=1}^{W} (n_t - \mu)^2 .

  Each later call takes the z-score of the norm against them and, above the threshold
  :math:`z_{\max}` (``z_threshold``), scales the updates down to the norm :math:`n'_t`:

  .. math::

    z_t = \frac{n_t - \mu}{\sigma + 10^{-6}}, \qquad
    n'_t = \begin{cases}
      \mu + z_{\max}\,\sigma & \text{if } z_t > z_{\max}, \\
      n_t & \text{otherwise,}
    \end{cases} \qquad
    g_t \leftarrow g_t \, \frac{n'_t}{n_t},

  (:math:`n'_t = \mu + (z_{\max}^2/z_t)\,\sigma` above the threshold with ``reciprocal``)
  and then updates the statistics with the norm after clipping (:math:`\alpha` is
  ``ema_decay``; the variance uses the new mean):

  .. math::

    \mu \leftarrow \alpha\,\mu + (1 - \alpha)\,n'_t, \qquad
    \sigma^2 \leftarrow \alpha\,\sigma^2 + (1 - \alpha)\,(n'_t - \mu)^2 .

  Feeding the clipped norm back keeps a spike from inflating :math:`\mu` and :math:`\sigma`,
  so the threshold follows the slow trend of the norm and not its outliers. With
  ``reciprocal=True`` (the default of the authors' implementation, its "adaptive scaling")
  the further the norm is out, the harder it is clipped: :math:`z_{\max}^2/z_t < z_{\max}`.

  The norm is accumulated in float32 (or wider) whatever the updates' dtype, and the updates
  keep their dtype; finite updates whose sum of squares overflows float32 still get their
  exact norm (as in :func:`optaxderived.clip_norm`). An update with a non-finite norm (a NaN
  or an Inf entry) passes unchanged and leaves the statistics and ``count`` alone, so
  ``optax.apply_if_finite`` around it (or around the chain) skips the step. Place it first in
  a chain, on the raw gradients; inside :func:`optaxderived.accumulate` it sees the window
  means, i.e. counts real updates.

  Args:
    z_threshold: :math:`z_{\max} > 0`, the z-score above which the updates are clipped.
    ema_decay: :math:`\alpha \in (0, 1)`, the decay of the moving mean and variance.
    warmup_steps: the number of finite norms (an int >= 1) recorded before clipping starts.
    reciprocal: clip to :math:`\mu + (z_{\max}^2/z_t)\,\sigma` instead of
      :math:`\mu + z_{\max}\,\sigma` (a Python bool).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`ZClipState`.

  Raises:
    ValueError: for ``z_threshold <= 0``, ``ema_decay`` outside :math:`(0, 1)`,
      ``warmup_steps`` not an integer >= 1, or a ``reciprocal`` that is not a bool.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> tx = od.zclip(2.5, warmup_steps=3)
    >>> state = tx.init(jnp.zeros(2))
    >>> for g in [1.0, 1.2, 0.8, 1.1, 10.0]:  # three warmup norms, then a spike
    ...   updates, state = tx.update(jnp.array([g, 0.0]), state)
    ...   print(f"{state.norm:.2f} {optax.tree.norm(updates):.3f} {bool(state.clipped)}")
    1.00 1.000 False
    1.20 1.200 False
    0.80 0.800 False
    1.10 1.100 False
    10.00 1.407 True
    >>> print(f"{state.mean:.4f} {state.var:.5f}")
    1.0151 0.02998

  References:
    Kumar, Owen, Chowdhury, Güra, `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025.
  """
  fn = "od.zclip"
  checks.check_range(fn, "z_threshold", z_threshold, low=0.0, low_open=True, schedule=False)
  checks.check_range(
    fn, "ema_decay", ema_decay, low=0.0, high=1.0, low_open=True, high_open=True, schedule=False
  )
  checks.check_int(fn, "warmup_steps", warmup_steps, low=1, schedule=False)
  checks.check_bool(fn, "reciprocal", reciprocal)

  def init_fn(params):
    del params
    # One array per field: a state whose fields share a buffer cannot be donated to a step.
    return ZClipState(
      mean=jnp.zeros([], jnp.float32),
      var=jnp.zeros([], jnp.float32),
      count=jnp.zeros([], jnp.int32),
      norm=jnp.zeros([], jnp.float32),
      clipped=jnp.zeros([], jnp.bool_),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    leaves, treedef = jax.tree.flatten(updates)
    if not leaves:  # nothing to clip and no norm to learn from
      return updates, state._replace(
        norm=jnp.zeros([], jnp.float32), clipped=jnp.zeros([], jnp.bool_)
      )
    n = numerics.global_norm(leaves)  # float32, or wider for float64 updates
    mean, var = state.mean.astype(n.dtype), state.var.astype(n.dtype)
    finite = jnp.isfinite(n)
    warm = state.count < warmup_steps

    # Warmup: Welford's running mean and population variance of the finite norms.
    k = (state.count + 1).astype(n.dtype)
    delta = n - mean
    warm_mean = mean + delta / k
    warm_var = var + (delta * (n - warm_mean) - var) / k

    # After warmup: the z-score, the clipped norm and the moving statistics.
    std = jnp.sqrt(var)
    z = (n - mean) / (std + _STD_EPS)
    over = finite & ~warm & (z > z_threshold)
    if reciprocal:
      target = mean + z_threshold**2 / jnp.where(over, z, 1) * std
    else:
      target = mean + z_threshold * std
    clipped_norm = jnp.where(over, target, n)
    ema_mean = ema_decay * mean + (1 - ema_decay) * clipped_norm
    ema_var = ema_decay * var + (1 - ema_decay) * jnp.square(clipped_norm - ema_mean)

    # The target is below the norm when clipping (n > mu + z_max (sigma + 1e-6) >= target),
    # so the factor is < 1; the inner where never divides by a norm that is not clipped.
    factor = jnp.where(over, target / jnp.where(over, n, 1), 1)
    new_leaves = [(numerics.wide(x) * factor).astype(x.dtype) for x in leaves]
    keep = lambda new, old: jnp.where(finite, new, old).astype(jnp.float32)
    new_state = ZClipState(
      mean=keep(jnp.where(warm, warm_mean, ema_mean), mean),
      var=keep(jnp.where(warm, warm_var, ema_var), var),
      count=jnp.where(finite, optax.safe_increment(state.count), state.count),
      norm=n.astype(jnp.float32),
      clipped=over,
    )
    return jax.tree.unflatten(treedef, new_leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
