"""The derived family: decoupled weight decay, layer adaptation, piecewise-linear schedules.

Their composition around a base optimizer is `od.derive` (`_derive.py`).
"""

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxderived import _checks
from optaxderived import _clipping
from optaxderived import _paths


class WeightDecayState(NamedTuple):
  """State of :func:`weight_decay`.

  Attributes:
    count: the number of update calls seen (the step at which a ``rate`` schedule is
      evaluated), int32.
  """

  count: jax.Array


def weight_decay(
  rate: optax.ScalarOrSchedule = 0.01, *, exclude: _paths.Patterns = ()
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
    exclude: patterns (regexes searched in the leaf paths) of leaves not to decay.

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
  _checks.check_range("rate", rate, low=0.0)
  compiled = _paths.compile_patterns(exclude, argname="exclude")

  def init_fn(params):
    del params
    return WeightDecayState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _checks.require_params(params, "od.weight_decay")
    _checks.check_same_tree("od.weight_decay", updates, params, "params")
    r = rate(state.count) if callable(rate) else rate
    excluded = _paths.match_tree(compiled, updates, argname="exclude")
    updates = jax.tree.map(
      lambda u, p, skip: u if skip else (u + r * p).astype(u.dtype), updates, params, excluded
    )
    return updates, WeightDecayState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def layer_adaptation(*, exclude: _paths.Patterns = ()) -> optax.GradientTransformationExtraArgs:
  r"""Layer adaptation: rescales each leaf's update to the norm of its parameter.

  Per leaf (a "layer" is one parameter tensor), with Frobenius norms:

  .. math::

    u \leftarrow \frac{\lVert\theta\rVert}{\lVert u\rVert}\, u
    \qquad (\text{ratio } 1 \text{ when } \lVert\theta\rVert = 0 \text{ or } \lVert u\rVert = 0)

  so after the learning-rate scaling each layer moves by :math:`\eta\lVert\theta\rVert`: only
  the direction comes from the base optimizer. This is LAMB's trust ratio without a clamp
  (``optax.scale_by_trust_ratio()``, with the norms in at least float32, each reduced once),
  with what ``optax.lamb`` lacks:
  ``exclude`` patterns for the leaves (LayerNorm scales, biases) that pass unchanged. Place it
  after the base optimizer and weight decay, before the learning rate. As in optax, the
  norms are plain float32 (or wider) sums of squares: a leaf whose squares overflow (entries
  beyond about 1e19) gets a ratio of 0, and one whose squares all underflow a ratio of 1.

  Args:
    exclude: patterns (regexes searched in the leaf paths) of leaves left unchanged.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> params = {"w": jnp.array([3.0, 4.0]), "bias": jnp.array([1.0])}
    >>> tx = optax.chain(od.layer_adaptation(exclude="bias"), optax.sgd(0.01))
    >>> grads = {"w": jnp.array([0.1, -0.2]), "bias": jnp.array([0.5])}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"].round(4)  # moved by 0.01 * ||w|| = 0.05
    Array([2.9776, 4.0447], dtype=float32)

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in 76 minutes
    <https://arxiv.org/abs/1904.00962>`_, 2020.
  """
  compiled = _paths.compile_patterns(exclude, argname="exclude")

  def scale(u, p):
    # Plain norms rather than optax.safe_norm (which scale_by_trust_ratio uses): safe_norm
    # reduces each array twice, through a materialised copy, to keep its *gradient* finite at
    # 0, and nothing differentiates an optimizer step (it made od.derive 3.2x adamw, not 2.3x).
    p_norm = jnp.sqrt(_clipping.sum_of_squares(p))
    u_norm = jnp.sqrt(_clipping.sum_of_squares(u))
    ratio = jnp.where((p_norm == 0) | (u_norm == 0), 1, p_norm / u_norm)
    return (ratio * u).astype(u.dtype)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _checks.require_params(params, "od.layer_adaptation")
    _checks.check_same_tree("od.layer_adaptation", updates, params, "params")
    excluded = _paths.match_tree(compiled, updates, argname="exclude")
    updates = jax.tree.map(
      lambda u, p, skip: u if skip else scale(u, p), updates, params, excluded
    )
    return updates, state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def piecewise_linear(points: Mapping[int, float], scale: float = 1.0) -> optax.Schedule:
  r"""A piecewise-linear schedule of multipliers, ``{step: multiplier}`` (bert4keras style).

  Linear between the given points, constant after the last one, and starting from an implicit
  point ``(0, 0.0)`` when the smallest step is above 0, so ``{1000: 1, 2000: 0.1}`` warms up
  from 0 to 1 over 1000 steps, decays to 0.1 at step 2000 and stays there:

  .. math::

    M(t) = v_i + (v_{i+1} - v_i)\,\frac{t - k_i}{k_{i+1} - k_i}, \quad k_i \le t \le k_{i+1}

  The values are absolute multipliers, unlike ``optax.piecewise_interpolate_schedule``, whose
  cumulative scales cannot warm up from 0. The schedule returns ``scale * M(step)``.

  Args:
    points: a non-empty mapping from integer steps (>= 0) to finite multipliers.
    scale: what the multipliers multiply (e.g. the base learning rate).

  Returns:
    An ``optax.Schedule``: ``step -> scale * M(step)`` (float32).

  Example:
    >>> import optaxderived as od
    >>> schedule = od.piecewise_linear({1000: 1.0, 2000: 0.1})
    >>> [round(float(schedule(t)), 4) for t in (0, 1, 500, 1000, 1500, 2000, 3000)]
    [0.0, 0.001, 0.5, 1.0, 0.55, 0.1, 0.1]
  """
  if not isinstance(points, Mapping) or not points:
    raise ValueError(f"points must be a non-empty {{step: multiplier}} mapping, got {points!r}")
  parsed = {}
  for step, value in points.items():
    try:  # steps are cast with int(), as the reference does: JSON configs give "1000"
      exact = not isinstance(step, bool) and float(step) == int(float(step))
    except (TypeError, ValueError):
      exact = False
    if not exact or int(float(step)) < 0:
      raise ValueError(f"points: steps must be integers >= 0, got {step!r}")
    if int(float(step)) in parsed:
      raise ValueError(f"points: the step {step!r} is given twice")
    value = _checks.concrete_scalar(value)
    if value is None or not math.isfinite(value):
      raise ValueError(f"points: multipliers must be finite numbers, got {points[step]!r}")
    parsed[int(float(step))] = value
  _checks.check_range("scale", scale, schedule=False)
  if not math.isfinite(float(scale)):
    raise ValueError(f"scale must be finite, got {scale!r}")
  steps = sorted(parsed)
  values = [parsed[k] * float(scale) for k in steps]
  if steps[0] > 0:
    steps.insert(0, 0)
    values.insert(0, 0.0)

  def schedule(count):
    # t - k is taken in the count's own (integer) dtype, exact however large the steps, and
    # only the fraction of a segment is rounded to float32; the keys give their values exactly.
    t = jnp.asarray(count)
    if not jnp.issubdtype(t.dtype, jnp.integer):
      t = t.astype(jnp.float32)
    result = jnp.float32(values[-1])
    segments = zip(steps[:-1], steps[1:], values[:-1], values[1:], strict=True)
    for k0, k1, v0, v1 in reversed(list(segments)):
      frac = (t - k0).astype(jnp.float32) / np.float32(k1 - k0)
      result = jnp.where(t < k1, np.float32(v0) + np.float32(v1 - v0) * frac, result)
    return jnp.where(t < steps[0], jnp.float32(values[0]), result)

  return schedule
