"""Dynamic loss scaling for float16 training: unscale, skip on overflow, adapt the scale."""

from __future__ import annotations

import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxderived._core import checks
from optaxderived._core import numerics
from optaxderived._core.state import find_state


class LossScaleState(NamedTuple):
  """State of :func:`dynamic_loss_scale`.

  Attributes:
    scale: the current loss scale (a float32 scalar): multiply the loss by it before taking
      the gradient (read it with :func:`loss_scale`).
    good_steps: finite calls since the scale last changed (int32; 0 after a growth and
      after a non-finite call).
    num_skipped: calls skipped for a non-finite gradient so far (int32).
    inner_state: the state of the wrapped transformation (it advances on finite calls only:
      a skipped call leaves it bit for bit as it was).
  """

  scale: jax.Array
  good_steps: jax.Array
  num_skipped: jax.Array
  inner_state: Any


def _check_scale(fn: str, name: str, value: Any) -> None:
  if callable(value):
    checks.check_range(fn, name, value, schedule=False)  # "must be a number, not a schedule"
  checks.check_positive(fn, name, value, finite=True)


def _unscale(g: jax.Array, scale: jax.Array) -> jax.Array:
  """``g / scale`` computed in float32 or wider, in ``g``'s dtype; non-float leaves pass.

  It multiplies by the reciprocal (one scalar division): exactly the quotient for the powers
  of two the defaults keep, within an ulp otherwise. A division would not be duplicated
  into each consumer by XLA, so the unscaled gradients would be written out once more.
  """
  if not jnp.issubdtype(g.dtype, jnp.inexact):
    return g
  wide = numerics.wide(g)
  return (wide * (1 / scale.astype(wide.real.dtype))).astype(g.dtype)


def _all_finite(tree: Any) -> jax.Array:
  """Whether every float leaf of ``tree`` is finite (a bool scalar).

  A sum is NaN or infinite when one of its terms is, so a finite sum proves every leaf
  finite; summing is the fastest reduction XLA has (one read of each leaf). Only a
  non-finite sum, which an overflow of the sum alone can also give, runs the exact check.
  """
  leaves = [g for g in jax.tree.leaves(tree) if jnp.issubdtype(g.dtype, jnp.inexact)]
  if not leaves:
    return jnp.ones([], jnp.bool_)
  total = sum(
    (jnp.sum(g, dtype=numerics.wide_dtype(g.dtype)) for g in leaves), jnp.zeros([], jnp.float32)
  )

  def exact():
    finite = jnp.ones([], jnp.bool_)
    for g in leaves:
      finite &= jnp.all(jnp.isfinite(g))
    return finite

  return jax.lax.cond(jnp.isfinite(total), lambda: jnp.ones([], jnp.bool_), exact)


def dynamic_loss_scale(
  inner: optax.GradientTransformation,
  *,
  initial_scale: float = 2.0**15,
  growth_interval: int = 2000,
  growth_factor: float = 2.0,
  backoff_factor: float = 0.5,
  min_scale: float = 1.0,
  max_scale: float = 2.0**24,
) -> optax.GradientTransformationExtraArgs:
  r"""Dynamic loss scaling: ``inner`` on the unscaled gradients, overflowing steps skipped.

  In float16 small gradients underflow to zero. Loss scaling multiplies the loss by a scale
  :math:`s_t` (read it with :func:`loss_scale`) so that its gradients
  :math:`g_t = \nabla(s_t L)` stay representable, and divides them back before the update:

  .. math::

    \hat g_t = \frac{g_t}{s_t}, \qquad
    u_t = \begin{cases}
      \mathrm{inner}(\hat g_t) & \text{if every } \hat g_t \text{ is finite,} \\
      0 & \text{otherwise (the step is skipped),}
    \end{cases}

  and the scale follows the gradients: with :math:`n_t` the finite calls since it last
  changed, :math:`N` = ``growth_interval``, :math:`\gamma` = ``growth_factor`` and
  :math:`\beta` = ``backoff_factor``,

  .. math::

    s_{t+1} = \begin{cases}
      \min(\gamma\, s_t,\ s_{\max}) & \text{finite and } n_t + 1 = N
        \quad (n_{t+1} = 0), \\
      s_t & \text{finite and } n_t + 1 < N \quad (n_{t+1} = n_t + 1), \\
      \max(\beta\, s_t,\ s_{\min}) & \text{otherwise} \quad (n_{t+1} = 0).
    \end{cases}

  A scale too large for the gradients overflows (an Inf or a NaN): the step is dropped and
  the scale halved (by default); after ``growth_interval`` finite steps in a row the scale
  is doubled, so it settles near the largest one the gradients fit under.

  The gradients are divided in float32 or wider and cast back to their dtype (float16 and
  bfloat16 gradients reach ``inner`` in their own dtype); with ``min_scale < 1`` a gradient
  that overflows its dtype once divided counts as non-finite too. A skipped call emits zeros
  in the updates' dtype and the inner update does not run (``lax.cond``; under ``jax.vmap``
  both branches run and one is selected, with the same results): its state comes back bit
  for bit, so Adam's count and moments, schedules and every wrapper inside see finite calls
  only. The finiteness check is one read of the gradients (a sum, which is finite only when
  every term is); the division fuses with the inner update's first pass.

  Put clipping and everything else that reads gradient magnitudes *inside*, so that it sees
  the unscaled gradients: ``dynamic_loss_scale(optax.chain(optax.clip_by_global_norm(1.0),
  optax.adam(1e-3)))``. Inside ``od.accumulate`` it sees the window means (an overflow in
  one micro-batch skips the window); around it, every micro-batch is checked and an
  overflowing one is dropped from its window.

  Differences from the references: Keras ``LossScaleOptimizer`` follows the same rule with
  factors 2 and 1/2 and no bounds; Flax ``DynamicScale`` grows one finite step later (once
  its counter already equals ``growth_interval``) and hands over float32 gradients. Here the
  gradients keep their dtype and the scale lives in the optimizer state, so it is saved,
  restored and sharded with it.

  Args:
    inner: the transformation to run on the unscaled gradients (any optax transformation
      or chain; extra keyword arguments of ``update`` reach it).
    initial_scale: the scale at ``init`` (finite, > 0, in ``[min_scale, max_scale]``).
    growth_interval: finite calls in a row after which the scale grows (an integer >= 1).
    growth_factor: what the scale is multiplied by when it grows (finite, >= 1; 1 keeps it
      from growing).
    backoff_factor: what the scale is multiplied by on a non-finite call (in ``(0, 1]``).
    min_scale: the smallest scale a back-off reaches (finite, > 0).
    max_scale: the largest scale a growth reaches (finite, >= ``min_scale``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the gradients of
    ``loss * loss_scale(state)`` and whose state is a :class:`LossScaleState`.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> tx = od.dynamic_loss_scale(optax.sgd(0.25), initial_scale=4.0, growth_interval=2)
    >>> params = jnp.array([1.0, -2.0], jnp.float16)
    >>> state = tx.init(params)
    >>> loss = lambda p: 0.5 * jnp.sum(p**2)
    >>> for _ in range(2):
    ...   grads = jax.grad(lambda p: loss(p) * od.loss_scale(state))(params)  # float16
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(params, od.loss_scale(state), state.good_steps)
    [ 0.75 -1.5 ] 4.0 1
    [ 0.5625 -1.125 ] 8.0 0

    An overflowing gradient is dropped and the scale backs off:

    >>> grads = jnp.array([jnp.inf, 1.0], jnp.float16)
    >>> updates, state = tx.update(grads, state, params)
    >>> print(updates, od.loss_scale(state), state.num_skipped)
    [0. 0.] 4.0 1

  References:
    Micikevicius et al., "Mixed Precision Training", ICLR 2018,
    https://arxiv.org/abs/1710.03740; Keras ``LossScaleOptimizer``,
    https://keras.io/api/mixed_precision/loss_scale_optimizer/; Flax ``DynamicScale``,
    https://flax.readthedocs.io/en/latest/api_reference/flax.training.html.
  """
  fn = "od.dynamic_loss_scale"
  checks.check_transformation(fn, "inner", inner)
  for name, value in (
    ("initial_scale", initial_scale),
    ("min_scale", min_scale),
    ("max_scale", max_scale),
  ):
    _check_scale(fn, name, value)
  checks.check_int(fn, "growth_interval", growth_interval, low=1, schedule=False)
  checks.check_range(
    fn, "growth_factor", growth_factor, low=1.0, high=math.inf, high_open=True, schedule=False
  )
  checks.check_range(
    fn, "backoff_factor", backoff_factor, low=0.0, high=1.0, low_open=True, schedule=False
  )
  lo, init, hi = (checks.concrete_scalar(v) for v in (min_scale, initial_scale, max_scale))
  if lo is not None and hi is not None and lo > hi:
    raise ValueError(f"{fn}: min_scale must be <= max_scale ({max_scale!r}), got {min_scale!r}")
  if init is not None and ((lo is not None and init < lo) or (hi is not None and init > hi)):
    raise ValueError(
      f"{fn}: initial_scale must be in [min_scale, max_scale] = [{min_scale!r}, "
      f"{max_scale!r}], got {initial_scale!r}"
    )
  if isinstance(growth_interval, int | np.integer):  # (a larger one never comes in int32)
    growth_interval = min(int(growth_interval), int(np.iinfo(np.int32).max))
  scale_at_least_one = lo is not None and lo >= 1
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return LossScaleState(
      scale=jnp.asarray(initial_scale, jnp.float32),
      good_steps=jnp.zeros([], jnp.int32),
      num_skipped=jnp.zeros([], jnp.int32),
      inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is not None:  # before the inner update, whose own error would not name us
      checks.check_same_tree(fn, updates, params, "params")
    scale = jnp.asarray(state.scale, jnp.float32)
    # With a scale >= 1 an unscaled gradient is no larger than the gradient: checking the
    # gradients suffices, and the check reads them as they are (nothing is materialised).
    checked = (
      updates if scale_at_least_one else jax.tree.map(lambda g: _unscale(g, scale), updates)
    )
    finite = _all_finite(checked)

    # The inner update runs on finite calls only (lax.cond; under jax.vmap both branches run
    # and are selected), with the division fused into its first pass; the inner state goes
    # through the cond once, so the skipping branch returns it as it was, bit for bit.
    def run(updates, inner_state, params):
      unscaled = jax.tree.map(lambda g: _unscale(g, scale), updates)
      new_updates, new_inner_state = inner.update(unscaled, inner_state, params, **extra_args)
      new_inner_state = jax.tree.map(
        lambda new, old: jnp.asarray(new, jnp.result_type(old)), new_inner_state, inner_state
      )
      return new_updates, new_inner_state

    def skip(updates, inner_state, params):
      del updates, params
      return optax.tree.zeros_like(zeros_shape), inner_state

    zeros_shape, _ = jax.eval_shape(run, updates, state.inner_state, params)
    new_updates, inner_state = jax.lax.cond(
      finite, run, skip, updates, state.inner_state, params
    )

    good_steps = jnp.asarray(state.good_steps, jnp.int32) + 1
    grow = good_steps >= growth_interval
    grown = jnp.minimum(scale * growth_factor, max_scale)
    backed_off = jnp.maximum(scale * backoff_factor, min_scale)
    new_scale = jnp.where(finite, jnp.where(grow, grown, scale), backed_off)
    num_skipped = jnp.asarray(state.num_skipped, jnp.int32)
    new_state = LossScaleState(
      scale=new_scale.astype(jnp.float32),
      good_steps=jnp.where(finite & ~grow, good_steps, 0).astype(jnp.int32),
      num_skipped=jnp.where(finite, num_skipped, optax.safe_increment(num_skipped)),
      inner_state=inner_state,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def loss_scale(state: Any) -> jax.Array:
  """The current loss scale of a :func:`dynamic_loss_scale` (a float32 scalar).

  Multiply the loss by it before taking the gradient that ``update`` receives.

  Args:
    state: a :class:`LossScaleState` or any optimizer state that holds one (a chain, a
      wrapper such as ``od.accumulate``, ``nnx.Optimizer.opt_state``, a
      ``TrainState.opt_state``); the outermost one is read.

  Returns:
    The scale, a float32 scalar array.

  Raises:
    ValueError: when ``state`` holds no :class:`LossScaleState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> tx = od.accumulate(od.dynamic_loss_scale(optax.adam(1e-3)), 4)
    >>> od.loss_scale(tx.init({"w": jnp.ones(2, jnp.float16)}))
    Array(32768., dtype=float32)
  """
  # jnp.asarray unwraps the Variables that nnx.Optimizer puts around state leaves.
  found = find_state(state, LossScaleState, accessor="od.loss_scale")
  return jnp.asarray(found.scale, jnp.float32)
