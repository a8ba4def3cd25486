r"""The step-size controller of adaptive steppers: I and PI control of :math:`h`.

From the scaled error :math:`\varepsilon` of a step (accepted when :math:`\varepsilon \le 1`)
the controller picks the next step size, then clamps it to ``[min_step_size,
max_step_size]``. It knows nothing of tableaus beyond the order of their error.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from optaxderived._core import checks

ControllerName = Literal["pi", "i"]
CONTROLLERS: tuple[ControllerName, ...] = ("pi", "i")

# The PI controller's memory term (Hairer & Wanner's DOPRI5 code): beta, the exponent of the
# previous error, and the floor of the stored previous error.
PI_BETA = 0.04
PI_MIN_PREV_ERROR = 1e-4


@dataclasses.dataclass(frozen=True)
class Controller:
  """The I or PI step-size controller; its fields are arguments of ``runge_kutta``.

  ``error_order`` is ``q + 1`` of the tableau (its error is O(h^(q+1))).
  """

  controller: ControllerName
  error_order: int
  safety: float
  factor_min: float
  factor_max: float
  min_step_size: float
  max_step_size: float | None

  def check(self, fn: str) -> None:
    """Raises ``ValueError`` naming ``fn`` (the public function) for a bad argument."""
    checks.check_choice(fn, "controller", self.controller, CONTROLLERS)
    checks.check_range(fn, "safety", self.safety, low=0.0, high=1.0, low_open=True)
    checks.check_range(fn, "factor_min", self.factor_min, low=0.0, high=1.0, low_open=True)
    checks.check_range(fn, "factor_max", self.factor_max, low=1.0)
    checks.check_range(fn, "min_step_size", self.min_step_size, low=0.0)
    if self.max_step_size is not None:
      checks.check_positive(fn, "max_step_size", self.max_step_size)
      low = checks.concrete_scalar(self.min_step_size)
      high = checks.concrete_scalar(self.max_step_size)
      if low is not None and high is not None and high < low:
        raise ValueError(
          f"{fn}: max_step_size must be >= min_step_size = {self.min_step_size}, "
          f"got {self.max_step_size!r}"
        )

  def clamp(self, h: jax.Array) -> jax.Array:
    """``h`` clipped to ``[min_step_size, max_step_size]``, and never 0."""
    h = jnp.maximum(h, jnp.asarray(self.min_step_size, h.dtype))
    h = jnp.where(h > 0, h, jnp.finfo(h.dtype).tiny)  # repeated rejections never reach h = 0
    if self.max_step_size is not None:
      h = jnp.minimum(h, jnp.asarray(self.max_step_size, h.dtype))
    return h

  def adapt(
    self,
    h: jax.Array,
    error: jax.Array,
    accepted: jax.Array,
    last_accepted: jax.Array,
    prev_error: jax.Array,
  ) -> tuple[jax.Array, jax.Array]:
    """The next step size and PI memory after a step of size ``h`` and scaled ``error``.

    ``accepted``: whether this step was accepted; ``last_accepted``: whether the one before
    was (after a rejection the next accepted step may not grow); ``prev_error``: the PI
    memory, ``max(error, 1e-4)`` of the last accepted step.
    """
    dtype = h.dtype
    q1 = self.error_order
    error = error.astype(dtype)
    shrink = self.safety * error ** (-1.0 / q1)
    if self.controller == "pi":
      alpha = 1.0 / q1 - 0.75 * PI_BETA
      grow = self.safety * error ** (-alpha) * prev_error**PI_BETA
    else:
      grow = shrink
    factor_max = jnp.where(last_accepted, jnp.asarray(self.factor_max, dtype), 1.0)
    factor = jnp.where(
      accepted,
      jnp.clip(grow, self.factor_min, factor_max),
      jnp.maximum(self.factor_min, jnp.minimum(shrink, self.safety)),
    )
    step_size = self.clamp((h * factor).astype(dtype))
    prev_error = jnp.where(
      accepted, jnp.maximum(error, PI_MIN_PREV_ERROR).astype(dtype), prev_error
    )
    return step_size, prev_error
