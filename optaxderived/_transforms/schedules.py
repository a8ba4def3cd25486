"""Piecewise-linear schedules of absolute multipliers (warmup from 0, then any shape)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
import optax

from optaxderived._core import checks


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
    raise ValueError(
      "od.piecewise_linear: points must be a non-empty {step: multiplier} mapping, "
      f"got {points!r}"
    )
  parsed = {}
  for step, value in points.items():
    try:  # steps are cast with int(), as the reference does: JSON configs give "1000"
      exact = not isinstance(step, bool) and float(step) == int(float(step))
    except (TypeError, ValueError):
      exact = False
    if not exact or int(float(step)) < 0:
      raise ValueError(
        f"od.piecewise_linear: points: steps must be integers >= 0, got {step!r}"
      )
    if int(float(step)) in parsed:
      raise ValueError(f"od.piecewise_linear: points: the step {step!r} is given twice")
    number = checks.concrete_scalar(value)
    if number is None or not math.isfinite(number):
      raise ValueError(
        f"od.piecewise_linear: points: multipliers must be finite numbers, got {points[step]!r}"
      )
    parsed[int(float(step))] = number
  checks.check_finite("od.piecewise_linear", "scale", scale)
  if callable(scale):
    raise ValueError(
      f"od.piecewise_linear: scale must be a number, not a schedule, got {scale!r}"
    )
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
