r"""Optimizers as ODE integrators: explicit Runge–Kutta steppers on the gradient flow.

Gradient descent is Euler's method on the gradient flow :math:`\dot\theta = -\nabla L(\theta)`
with step :math:`h` = the learning rate. A Runge–Kutta tableau gives a higher-order step that
evaluates the gradient at several stage points per step, on the same mini-batch; an embedded
error estimate turns :math:`h` into an adaptive learning rate with accept/reject.

Two ways to use a method:

* :meth:`Stepper.step` (``od.ode.heun(0.1).step(loss_fn, params, state, batch)``) owns the
  gradient evaluations: one ``jax.value_and_grad`` per stage, on the same arguments.
* :func:`as_transformation` makes it an ``optax.GradientTransformationExtraArgs`` whose
  ``update(grads, state, params, *, grad_fn)`` takes the first stage from the incoming
  gradient and calls ``grad_fn`` at the other stage points (``nnx.Optimizer`` forwards
  ``grad_fn=``; for a Flax ``TrainState`` use :func:`apply_gradients`).
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxderived._core import checks

_FN = "od.ode"  # TODO(split): name each public function

# The PI controller's memory term (Hairer & Wanner's DOPRI5 code): beta, the exponent of the
# previous error, and the floor of the stored previous error.
PI_BETA = 0.04
PI_MIN_PREV_ERROR = 1e-4
_COEF_TOL = 1e-12  # how exactly the consistency conditions of a tableau must hold


def _floats(name: str, values: Any) -> tuple[float, ...]:
  try:
    out = tuple(float(v) for v in values)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from None
  if not all(math.isfinite(v) for v in out):
    raise ValueError(f"{name} must hold finite numbers, got {values!r}")
  return out


@dataclasses.dataclass(frozen=True)
class ButcherTableau:
  r"""The coefficients of an explicit Runge–Kutta method.

  For :math:`\dot\theta = f(\theta)` with :math:`f = -\nabla L` and step :math:`h`:

  .. math::

    k_i = f\Big(\theta_n + h \sum_{j<i} a_{ij} k_j\Big), \quad
    \theta_{n+1} = \theta_n + h \sum_i b_i k_i, \quad
    e_{n+1} = h \sum_i (b_i - \hat b_i) k_i,

  where :math:`\hat b` are the weights of the embedded solution of lower order.

  Attributes:
    c: the ``s`` nodes, starting with 0 (``c[i]`` is the sum of row ``i`` of ``a``).
    a: the strictly lower rows, ``s - 1`` of them; row ``i`` (from 1) holds ``i``
      coefficients ``a[i][j]`` for stage ``i + 1``.
    b: the ``s`` weights of the solution, of order ``order``.
    order: the order of the solution.
    b_error: the ``s`` weights :math:`b - \hat b` of the embedded error estimate (they sum to
      0), or None when the method has none (then it cannot be adaptive).
    embedded_order: keyword-only; the order of the embedded solution (default
      ``order - 1``). The step-size controller's exponent is
      ``1 / (min(order, embedded_order) + 1)``.

  Coefficients are kept as Python floats (exact in float64). The consistency conditions
  (``c[0] == 0``, rows summing to ``c``, ``b`` summing to 1, ``b_error`` to 0) are checked
  and a violation raises ``ValueError``.

  Example:
    >>> tableau = od.ode.ButcherTableau(c=[0, 1], a=[[1]], b=[0.5, 0.5], order=2,
    ...                             b_error=[-0.5, 0.5])
    >>> tableau == od.ode.HEUN, tableau.num_stages, tableau.fsal
    (True, 2, False)
  """

  c: tuple[float, ...]
  a: tuple[tuple[float, ...], ...]
  b: tuple[float, ...]
  order: int
  b_error: tuple[float, ...] | None = None
  embedded_order: int | None = dataclasses.field(default=None, kw_only=True)

  def __post_init__(self):
    c = _floats("c", self.c)
    s = len(c)
    if s == 0 or c[0] != 0.0:
      raise ValueError(f"c must be a non-empty sequence starting with 0, got {self.c!r}")
    try:
      rows = tuple(_floats(f"a[{i}]", row) for i, row in enumerate(self.a))
    except TypeError:
      raise ValueError(f"a must be a sequence of rows, got {self.a!r}") from None
    if len(rows) != s - 1 or any(len(row) != i + 1 for i, row in enumerate(rows)):
      raise ValueError(
        f"a must hold s - 1 = {s - 1} rows, row i holding i coefficients, got {self.a!r}"
      )
    for i, row in enumerate(rows):
      if abs(sum(row) - c[i + 1]) > _COEF_TOL:
        raise ValueError(f"row {i + 1} of a must sum to c[{i + 1}] = {c[i + 1]}, got {row!r}")
    b = _floats("b", self.b)
    if len(b) != s or abs(sum(b) - 1.0) > _COEF_TOL:
      raise ValueError(f"b must hold s = {s} weights summing to 1, got {self.b!r}")
    checks.check_int(_FN, "order", self.order)
    b_error = None
    if self.b_error is not None:
      b_error = _floats("b_error", self.b_error)
      if len(b_error) != s or abs(sum(b_error)) > _COEF_TOL:
        raise ValueError(
          f"b_error must hold s = {s} weights summing to 0, got {self.b_error!r}"
        )
    if self.embedded_order is not None:
      if b_error is None:
        raise ValueError("embedded_order needs b_error (the embedded error estimate)")
      checks.check_int(_FN, "embedded_order", self.embedded_order)
    object.__setattr__(self, "c", c)
    object.__setattr__(self, "a", rows)
    object.__setattr__(self, "b", b)
    object.__setattr__(self, "b_error", b_error)

  @property
  def num_stages(self) -> int:
    """``s``: the gradient evaluations of one step (without FSAL reuse)."""
    return len(self.c)

  @property
  def fsal(self) -> bool:
    """First same as last: the last stage is evaluated at the step's result.

    Its gradient is then the next step's first stage, when the loss does not change.
    """
    return (
      self.num_stages >= 2
      and self.c[-1] == 1.0
      and self.b[-1] == 0.0
      and self.a[-1] == self.b[:-1]
    )

  @property
  def error_order(self) -> int:
    """``q + 1``, where ``q`` is the lower order of the pair: the error is O(h^(q+1))."""
    embedded = self.order - 1 if self.embedded_order is None else self.embedded_order
    return min(self.order, embedded) + 1


EULER = ButcherTableau(c=(0.0,), a=(), b=(1.0,), order=1)
"""Euler's method (1 stage, order 1): ``sgd``."""

HEUN = ButcherTableau(
  c=(0.0, 1.0), a=((1.0,),), b=(1 / 2, 1 / 2), order=2, b_error=(-1 / 2, 1 / 2)
)
"""Heun's method, the explicit trapezoid (2 stages, order 2, embedded Euler)."""

MIDPOINT = ButcherTableau(
  c=(0.0, 1 / 2), a=((1 / 2,),), b=(0.0, 1.0), order=2, b_error=(-1.0, 1.0)
)
"""The explicit midpoint method (2 stages, order 2, embedded Euler)."""

RALSTON = ButcherTableau(
  c=(0.0, 2 / 3), a=((2 / 3,),), b=(1 / 4, 3 / 4), order=2, b_error=(-3 / 4, 3 / 4)
)
"""Ralston's method (2 stages, order 2, c₂ = 2/3: least truncation error; embedded Euler)."""

RK4 = ButcherTableau(
  c=(0.0, 1 / 2, 1 / 2, 1.0),
  a=((1 / 2,), (0.0, 1 / 2), (0.0, 0.0, 1.0)),
  b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
  order=4,
)
"""The classical Runge–Kutta method (4 stages, order 4, no error estimate)."""

BOSH3 = ButcherTableau(
  c=(0.0, 1 / 2, 3 / 4, 1.0),
  a=((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
  b=(2 / 9, 1 / 3, 4 / 9, 0.0),
  order=3,
  b_error=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
)
"""Bogacki–Shampine, RK23 (4 stages, FSAL: 3 new gradients per step; order 3, embedded 2)."""

_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DOPRI5_B_HAT = (
  5179 / 57600,
  0.0,
  7571 / 16695,
  393 / 640,
  -92097 / 339200,
  187 / 2100,
  1 / 40,
)
DOPRI5 = ButcherTableau(
  c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
  a=(
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    _DOPRI5_B[:-1],
  ),
  b=_DOPRI5_B,
  order=5,
  b_error=tuple(x - y for x, y in zip(_DOPRI5_B, _DOPRI5_B_HAT, strict=True)),
)
"""Dormand–Prince, RK45 (7 stages, FSAL: 6 new gradients per step; order 5, embedded 4).

The embedded solution is Hairer's DOPRI5 and SciPy's RK45 one (b̂ = [5179/57600, ...,
1/40]); diffrax's ``Dopri5`` embeds another one, whose error estimate is 2/3 of this one.
"""


class StepperState(NamedTuple):
  """The state of a :class:`Stepper` (and of :func:`as_transformation`).

  Attributes:
    count: steps taken so far, accepted or rejected (int32); a learning-rate schedule is
      evaluated at it.
    step_size: the ``h`` of the next step (float32, or float64 for float64 params).
    accepted: whether the last step was accepted (True before the first step and for every
      fixed step).
    error: the scaled RMS error of the last step (NaN before the first step and for a
      tableau without ``b_error``).
    prev_error: the PI controller's memory, ``max(error, 1e-4)`` of the last accepted step
      (1e-4 at init).
    num_rejected: rejected steps so far (int32).
    num_grad_evals: gradient evaluations so far, the first stage included (int32).
    fsal_loss: the loss at the current params, from the last stage of the previous step
      (None unless ``fsal=True``).
    fsal_grads: the gradient at the current params (None unless ``fsal=True``).
    fsal_valid: whether ``fsal_loss`` and ``fsal_grads`` hold (False before the first
      step; None unless ``fsal=True``).
  """

  count: jax.Array
  step_size: jax.Array
  accepted: jax.Array
  error: jax.Array
  prev_error: jax.Array
  num_rejected: jax.Array
  num_grad_evals: jax.Array
  fsal_loss: jax.Array | None = None
  fsal_grads: Any = None
  fsal_valid: jax.Array | None = None


class StepInfo(NamedTuple):
  """What :meth:`Stepper.step` reports about one step.

  Attributes:
    loss: the loss at the step's start (the params it was given).
    aux: the auxiliary output at the step's start (None unless ``has_aux=True``).
    grad_evals: gradient evaluations this step made (int32).
    step_size: the ``h`` this step used (the next one is ``state.step_size``).
    accepted: whether the step was accepted (always True for fixed steps).
    error: the scaled RMS norm of the embedded error estimate,
      ``rms(e / (atol + rtol * max(|θ₀|, |θ₁|)))``; the step is accepted when it is ≤ 1.
      NaN for a tableau without ``b_error``.
  """

  loss: jax.Array
  aux: Any
  grad_evals: jax.Array
  step_size: jax.Array
  accepted: jax.Array
  error: jax.Array


def _scalar_dtype(params: Any):
  """float32, or float64 when a leaf is float64 (the dtype of h and of the error)."""
  return jnp.result_type(jnp.float32, *[jnp.result_type(x) for x in jax.tree.leaves(params)])


def _add_saturating(count: jax.Array, n: Any) -> jax.Array:
  top = jnp.iinfo(count.dtype).max
  return jnp.where(count > top - n, top, count + n).astype(count.dtype)


@dataclasses.dataclass(frozen=True)
class Stepper:
  """An explicit Runge–Kutta method as an optimizer; built by :func:`runge_kutta`.

  ``init(params) -> StepperState`` and ``step(loss_fn, params, state, *args, has_aux=False,
  **kwargs) -> (params, state, info)``. Its fields are the arguments of
  :func:`runge_kutta`.
  """

  tableau: ButcherTableau
  learning_rate: optax.ScalarOrSchedule
  adaptive: bool = False
  rtol: float = 1e-3
  atol: float = 1e-6
  controller: str = "pi"
  safety: float = 0.9
  factor_min: float = 0.2
  factor_max: float = 10.0
  min_step_size: float = 0.0
  max_step_size: float | None = None
  fsal: bool = False
  accumulator_dtype: Any = jnp.float32

  def __post_init__(self):
    if not isinstance(self.tableau, ButcherTableau):
      raise ValueError(f"tableau must be an od.ode.ButcherTableau, got {self.tableau!r}")
    checks.check_positive(_FN, "learning_rate", self.learning_rate)
    checks.check_range(_FN, "rtol", self.rtol, low=0.0)
    checks.check_range(_FN, "atol", self.atol, low=0.0)
    if checks.concrete_scalar(self.rtol) == 0.0 and checks.concrete_scalar(self.atol) == 0.0:
      raise ValueError(
        f"rtol and atol cannot both be 0, got rtol={self.rtol}, atol={self.atol}"
      )
    checks.check_choice(_FN, "controller", self.controller, ("pi", "i"))
    checks.check_range(_FN, "safety", self.safety, low=0.0, high=1.0, low_open=True)
    checks.check_range(_FN, "factor_min", self.factor_min, low=0.0, high=1.0, low_open=True)
    checks.check_range(_FN, "factor_max", self.factor_max, low=1.0)
    checks.check_range(_FN, "min_step_size", self.min_step_size, low=0.0)
    if self.max_step_size is not None:
      checks.check_positive(_FN, "max_step_size", self.max_step_size)
      low, high = (
        checks.concrete_scalar(self.min_step_size),
        checks.concrete_scalar(self.max_step_size),
      )
      if low is not None and high is not None and high < low:
        raise ValueError(
          f"max_step_size must be >= min_step_size = {self.min_step_size}, "
          f"got {self.max_step_size!r}"
        )
    if self.adaptive:
      if self.tableau.b_error is None:
        raise ValueError(
          "adaptive=True needs a tableau with an embedded error estimate (b_error); "
          f"got a tableau of order {self.tableau.order} without one"
        )
      if callable(self.learning_rate):
        raise ValueError(
          "learning_rate must be a number when adaptive=True (it is the initial step "
          f"size; the controller picks the next ones), got {self.learning_rate!r}"
        )
    elif not (checks.concrete_scalar(self.min_step_size) == 0.0 and self.max_step_size is None):
      raise ValueError(
        "min_step_size and max_step_size bound adaptive steps: pass adaptive=True, got "
        f"min_step_size={self.min_step_size!r}, max_step_size={self.max_step_size!r}"
      )
    if self.fsal and not self.tableau.fsal:
      raise ValueError(
        "fsal=True needs a tableau whose last stage is evaluated at the step's result "
        "(od.ode.BOSH3, od.ode.DOPRI5)"
      )

  # ---------------------------------------------------------------------------------------
  # init

  def init(self, params: Any) -> StepperState:
    """The initial state for ``params``."""
    return self._init(params, fsal=self.fsal)

  def _init(self, params: Any, *, fsal: bool) -> StepperState:
    dtype = _scalar_dtype(params)
    if self.adaptive:
      step_size = self._clamp(jnp.asarray(self.learning_rate, dtype))
    else:
      step_size = jnp.asarray(self._fixed_h(jnp.zeros([], jnp.int32)), dtype)
    state = StepperState(
      count=jnp.zeros([], jnp.int32),
      step_size=step_size,
      accepted=jnp.ones([], bool),
      error=jnp.full([], jnp.nan, dtype),
      prev_error=jnp.full([], PI_MIN_PREV_ERROR, dtype),
      num_rejected=jnp.zeros([], jnp.int32),
      num_grad_evals=jnp.zeros([], jnp.int32),
    )
    if fsal:
      state = state._replace(
        fsal_loss=jnp.zeros([], dtype),
        fsal_grads=optax.tree.zeros_like(params),
        fsal_valid=jnp.zeros([], bool),
      )
    return state

  # ---------------------------------------------------------------------------------------
  # step

  def step(
    self,
    loss_fn: Callable[..., Any],
    params: Any,
    state: StepperState,
    *args: Any,
    has_aux: bool = False,
    **kwargs: Any,
  ) -> tuple[Any, StepperState, StepInfo]:
    """One step of the method on the gradient flow of ``loss_fn``.

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs) -> loss`` (``-> (loss, aux)`` with
        ``has_aux=True``), evaluated on the same arguments at every stage.
      params: the current params (any pytree of float arrays).
      state: the state from :meth:`init` or the previous step.
      *args: passed to ``loss_fn`` (the mini-batch).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      **kwargs: passed to ``loss_fn``.

    Returns:
      ``(params, state, info)``: the new params (unchanged after a rejected step), the new
      state and a :class:`StepInfo` (loss and aux at the step's start, gradient
      evaluations, the step size used, acceptance and error).
    """
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def evaluate(p):
      out, grads = value_and_grad(p, *args, **kwargs)
      loss, aux = out if has_aux else (out, None)
      return loss, aux, grads

    if state.fsal_valid is None:  # no first-same-as-last reuse
      loss, aux, grads = evaluate(params)
      first_evals = 1
    else:
      if has_aux:
        raise ValueError(
          "fsal=True keeps the last stage's loss and gradient in the state but cannot keep "
          "aux: use has_aux=False, or fsal=False"
        )
      dtype = state.fsal_loss.dtype

      def fresh(_):
        loss, _, grads = evaluate(params)
        return jnp.asarray(loss, dtype), grads

      def reuse(_):
        return state.fsal_loss, state.fsal_grads

      loss, grads = jax.lax.cond(state.fsal_valid, reuse, fresh, None)
      aux = None
      first_evals = jnp.where(state.fsal_valid, 0, 1)

    def stage(p):
      stage_loss, _, stage_grads = evaluate(p)
      return stage_grads, stage_loss

    params, _, state, (evals, h, accepted, error) = self._advance(
      grads, state, params, stage, loss, first_evals
    )
    return params, state, StepInfo(loss, aux, evals, h, accepted, error)

  @property
  def num_stages(self) -> int:
    return self.tableau.num_stages

  # ---------------------------------------------------------------------------------------
  # the method

  def _fixed_h(self, count: jax.Array):
    return self.learning_rate(count) if callable(self.learning_rate) else self.learning_rate

  def _clamp(self, h: jax.Array) -> jax.Array:
    h = jnp.maximum(h, jnp.asarray(self.min_step_size, h.dtype))
    h = jnp.where(h > 0, h, jnp.finfo(h.dtype).tiny)  # repeated rejections never reach h = 0
    if self.max_step_size is not None:
      h = jnp.minimum(h, jnp.asarray(self.max_step_size, h.dtype))
    return h

  def _acc_dtype(self, x: jax.Array):
    dtype = jnp.result_type(x)
    if self.accumulator_dtype is None:
      return dtype
    return jnp.promote_types(self.accumulator_dtype, dtype)

  def _increment(self, params: Any, h: jax.Array, coefs: tuple[float, ...], grads: list) -> Any:
    """``−h Σ_j coefs[j] g_j`` per leaf, in the accumulation dtype (zero terms skipped)."""
    used = [(c, g) for c, g in zip(coefs, grads, strict=False) if c != 0.0]

    def leaf(p, *gs):
      dtype = self._acc_dtype(p)
      total = None
      for (c, _), g in zip(used, gs, strict=True):
        term = jnp.asarray(g, dtype) if c == 1.0 else c * jnp.asarray(g, dtype)
        total = term if total is None else total + term
      if total is None:
        return jnp.zeros(jnp.shape(p), dtype)
      return -(h.astype(dtype) * total)

    return jax.tree.map(leaf, params, *[g for _, g in used])

  def _advance(self, grads0, state: StepperState, params, stage_fn, loss0, first_evals=1):
    """One step from the first stage's gradient ``grads0``.

    ``stage_fn(p) -> (grads, loss)`` evaluates the other stages (``loss`` may be None);
    ``first_evals`` is what the first stage cost (0 when reused, 1 otherwise). Returns
    ``(params, delta, state, (grad_evals, h, accepted, error))``, where ``delta`` is the
    parameter change in the accumulation dtype (zeros after a rejected step).
    """
    tableau = self.tableau
    dtype = state.step_size.dtype
    if self.adaptive:
      h = state.step_size
    else:
      h = jnp.asarray(self._fixed_h(state.count), dtype)

    def point(increment, cast):
      def leaf(p, d):
        x = jnp.asarray(p, d.dtype) + d
        return x.astype(jnp.result_type(p)) if cast else x

      return jax.tree.map(leaf, params, increment)

    grads = [grads0]
    increment = last_loss = None
    for row in tableau.a:
      increment = self._increment(params, h, row, grads)
      stage_grads, last_loss = stage_fn(point(increment, cast=True))
      grads.append(stage_grads)
    if not tableau.fsal:  # else the last stage point is the solution, computed the same way
      increment = self._increment(params, h, tableau.b, grads)
    candidate = point(increment, cast=False)

    error = jnp.full([], jnp.nan, dtype)
    if tableau.b_error is not None:
      error = self._scaled_error(params, candidate, h, grads).astype(dtype)

    new_params = point(increment, cast=True)
    count = optax.safe_increment(state.count)
    if self.adaptive:
      finite = jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(candidate)])
      )
      error = jnp.where(finite & ~jnp.isnan(error), error, jnp.inf)
      # a non-finite step is never accepted, not even at min_step_size
      accepted = jnp.isfinite(error) & ((error <= 1.0) | (h <= self.min_step_size))
      step_size, prev_error = self._control(h, error, accepted, state)
      new_params = jax.tree.map(lambda x, p: jnp.where(accepted, x, p), new_params, params)
      increment = jax.tree.map(lambda d: jnp.where(accepted, d, jnp.zeros_like(d)), increment)
      num_rejected = jnp.where(
        accepted, state.num_rejected, optax.safe_increment(state.num_rejected)
      )
    else:
      accepted = jnp.ones([], bool)
      step_size = jnp.asarray(self._fixed_h(count), dtype)
      prev_error, num_rejected = state.prev_error, state.num_rejected

    evals = jnp.asarray(first_evals + tableau.num_stages - 1, jnp.int32)
    new_state = state._replace(
      count=count,
      step_size=step_size,
      accepted=accepted,
      error=error,
      prev_error=prev_error,
      num_rejected=num_rejected,
      num_grad_evals=_add_saturating(state.num_grad_evals, evals),
    )
    if state.fsal_valid is not None:
      # After an accepted step the last stage was evaluated at the new params; after a
      # rejected one the params did not move and the first stage still holds.
      fsal_loss = jnp.where(accepted, last_loss, loss0).astype(dtype)
      fsal_grads = jax.tree.map(
        lambda g_last, g0: jnp.where(accepted, g_last, g0), grads[-1], grads0
      )
      new_state = new_state._replace(
        fsal_loss=fsal_loss, fsal_grads=fsal_grads, fsal_valid=jnp.ones([], bool)
      )
    return new_params, increment, new_state, (evals, h, accepted, error)

  def _scaled_error(self, params, candidate, h, grads) -> jax.Array:
    """``rms(e / (atol + rtol max(|θ₀|, |θ₁|)))`` over every element of every leaf."""
    b_error = self.tableau.b_error
    used = [(c, g) for c, g in zip(b_error, grads, strict=True) if c != 0.0]
    leaves = jax.tree.leaves(params)
    size = sum(np.size(p) for p in leaves)
    if size == 0:
      return jnp.zeros([], h.dtype)

    def leaf(p, x, *gs):
      dtype = x.dtype
      e = h.astype(dtype) * sum(
        c * jnp.asarray(g, dtype) for (c, _), g in zip(used, gs, strict=True)
      )
      scale = self.atol + self.rtol * jnp.maximum(jnp.abs(jnp.asarray(p, dtype)), jnp.abs(x))
      ratio = jnp.where(e == 0, jnp.zeros([], dtype), e / scale)
      return jnp.sum(jnp.square(ratio.astype(jnp.promote_types(dtype, jnp.float32))))

    squares = jax.tree.leaves(jax.tree.map(leaf, params, candidate, *[g for _, g in used]))
    return jnp.sqrt(sum(squares) / size)

  def _control(self, h, error, accepted, state):
    """The next step size and the PI memory (standard I and PI controllers)."""
    dtype = h.dtype
    q1 = self.tableau.error_order
    error = error.astype(dtype)
    shrink = self.safety * error ** (-1.0 / q1)
    if self.controller == "pi":
      alpha = 1.0 / q1 - 0.75 * PI_BETA
      grow = self.safety * error ** (-alpha) * state.prev_error**PI_BETA
    else:
      grow = shrink
    # After a rejection the next accepted step may not grow (factor_max = 1).
    factor_max = jnp.where(state.accepted, jnp.asarray(self.factor_max, dtype), 1.0)
    factor = jnp.where(
      accepted,
      jnp.clip(grow, self.factor_min, factor_max),
      jnp.maximum(self.factor_min, jnp.minimum(shrink, self.safety)),
    )
    step_size = self._clamp((h * factor).astype(dtype))
    prev_error = jnp.where(
      accepted, jnp.maximum(error, PI_MIN_PREV_ERROR).astype(dtype), state.prev_error
    )
    return step_size, prev_error


def runge_kutta(
  tableau: ButcherTableau,
  learning_rate: optax.ScalarOrSchedule,
  *,
  adaptive: bool = False,
  rtol: float = 1e-3,
  atol: float = 1e-6,
  controller: str = "pi",
  safety: float = 0.9,
  factor_min: float = 0.2,
  factor_max: float = 10.0,
  min_step_size: float = 0.0,
  max_step_size: float | None = None,
  fsal: bool = False,
  accumulator_dtype: Any = jnp.float32,
) -> Stepper:
  r"""An explicit Runge–Kutta method on the gradient flow, as an optimizer.

  With :math:`f(\theta) = -\nabla L(\theta)`, step size :math:`h` (the learning rate) and the
  tableau :math:`(c, a, b, b - \hat b)`, one step from :math:`\theta_n` is

  .. math::

    \begin{align*}
      k_i &= f\Big(\theta_n + h \textstyle\sum_{j<i} a_{ij} k_j\Big), \quad i = 1..s \\
      \theta_{n+1} &= \theta_n + h \textstyle\sum_i b_i k_i \\
      e_{n+1} &= h \textstyle\sum_i (b_i - \hat b_i) k_i, \quad
      \varepsilon = \operatorname{rms}\Big(\frac{e_{n+1}}
        {\mathrm{atol} + \mathrm{rtol} \max(|\theta_n|, |\theta_{n+1}|)}\Big)
    \end{align*}

  Euler (:math:`s = 1`) is SGD. Every stage is one ``jax.value_and_grad`` of the loss on the
  same arguments (the same mini-batch). With ``adaptive=True`` a step is accepted when
  :math:`\varepsilon \le 1` (or :math:`h` is at ``min_step_size``); a rejected step leaves
  the params unchanged. With :math:`q + 1` = ``tableau.error_order``, the next step size is
  :math:`h \cdot \text{factor}` with

  .. math::

    \text{factor} = \begin{cases}
      \operatorname{clip}\big(\sigma\, \varepsilon^{-\alpha} \varepsilon_{\rm prev}^{\beta},
        f_{\min}, f_{\max}\big) & \text{accepted, PI} \;
        (\alpha = \tfrac{1}{q+1} - 0.75\beta,\ \beta = 0.04) \\
      \operatorname{clip}\big(\sigma\, \varepsilon^{-1/(q+1)}, f_{\min}, f_{\max}\big)
        & \text{accepted, I} \\
      \max\big(f_{\min}, \sigma\, \varepsilon^{-1/(q+1)}\big) & \text{rejected}
    \end{cases}

  (:math:`\sigma` = ``safety``, :math:`\varepsilon_{\rm prev} = \max(\varepsilon, 10^{-4})`
  of the last accepted step, :math:`f_{\max} = 1` right after a rejection), then clipped to
  ``[min_step_size, max_step_size]``. A step whose error or result is not finite is
  rejected and :math:`h` shrinks by ``factor_min``.

  On mini-batches, each step integrates the flow of one batch's loss (every stage sees the
  same batch), so the error estimate knows nothing of the noise between batches. Where a
  batch's loss is nearly linear in the params (ReLU networks, saturated softmax) the estimate
  is tiny and :math:`h` grows without bound (with ``rtol > 0``, along with
  :math:`|\theta|`): bound it with ``max_step_size``.

  Mixed precision: stage points and the result are summed in ``accumulator_dtype``
  promoted with each param's dtype (float32 by default, so bf16 params are stepped in
  float32 and rounded once to bf16; ``None``: in the params' own dtype); the gradient is
  evaluated at the stage point rounded to the params' dtype. ``h`` and the error are
  float32 (float64 for float64 params).

  Args:
    tableau: the method, e.g. ``od.ode.HEUN``, ``od.ode.RK4``, ``od.ode.BOSH3``, ``od.ode.DOPRI5``.
    learning_rate: the step size ``h`` (> 0); a schedule of the step count for fixed
      steps; the initial ``h`` when ``adaptive``.
    adaptive: control ``h`` with the embedded error estimate (needs ``tableau.b_error``).
    rtol: relative tolerance of the error estimate (≥ 0).
    atol: absolute tolerance of the error estimate (≥ 0; not both 0).
    controller: ``"pi"`` (Gustafsson / Hairer–Wanner) or ``"i"`` (elementary).
    safety: the safety factor σ in (0, 1].
    factor_min: the smallest factor of ``h`` per step, in (0, 1].
    factor_max: the largest factor of ``h`` per step, ≥ 1.
    min_step_size: adaptive only; ``h`` never goes below it and a step taken at it is
      accepted whatever its (finite) error.
    max_step_size: adaptive only; ``h`` never goes above it (None: no bound).
    fsal: keep the last stage's loss and gradient for the next step's first stage
      ("first same as last", ``od.ode.BOSH3`` and ``od.ode.DOPRI5``): one evaluation fewer per
      step. Only valid when the loss is the same at every step (full batch, no dropout)
      and nothing else changes the params between steps. Without it, fixed steps of such a
      tableau evaluate the last stage for the error estimate alone; to skip it, drop the
      stage: ``od.ode.ButcherTableau(c=t.c[:-1], a=t.a[:-1], b=t.b[:-1], order=t.order)``.
    accumulator_dtype: dtype the stages are summed in (see above).

  Returns:
    A :class:`Stepper`: ``init(params)`` and ``step(loss_fn, params, state, *args,
    has_aux=False, **kwargs) -> (params, state, info)``.

  Example:
    >>> loss_fn = lambda p, x: 0.5 * jnp.sum((p["w"] - x) ** 2)
    >>> stepper = od.ode.runge_kutta(od.ode.HEUN, 0.1)
    >>> params = {"w": jnp.ones(2)}
    >>> state = stepper.init(params)
    >>> params, state, info = jax.jit(stepper.step, static_argnums=0)(
    ...     loss_fn, params, state, jnp.zeros(2))
    >>> params["w"], info.loss, info.grad_evals   # exp(-0.1) = 0.904837...
    (Array([0.905, 0.905], dtype=float32), Array(1., dtype=float32), Array(2, dtype=int32))

  References:
    Hairer, Nørsett & Wanner, *Solving Ordinary Differential Equations I*, 2nd ed.,
    Springer 1993 (II.1–II.5: tableaus, embedded pairs, step-size control);
    Gustafsson, *Control-theoretic techniques for stepsize selection in explicit
    Runge-Kutta methods*, ACM TOMS 17(4), 1991; Su Jianlin, *Custom optimizers in Keras:
    soft batch and Heun's method*, https://kexue.fm/archives/5879.

  Unlike diffrax's ``PIDController``, an accepted step may shrink ``h`` (as in SciPy and
  Hairer's codes); unlike the reference Keras ``HeunOptimizer``, the stages are taken in
  one call on the same arguments, and any tableau works.
  """
  return Stepper(
    tableau=tableau,
    learning_rate=learning_rate,
    adaptive=adaptive,
    rtol=rtol,
    atol=atol,
    controller=controller,
    safety=safety,
    factor_min=factor_min,
    factor_max=factor_max,
    min_step_size=min_step_size,
    max_step_size=max_step_size,
    fsal=fsal,
    accumulator_dtype=accumulator_dtype,
  )


def euler(lr: optax.ScalarOrSchedule, **kwargs: Any) -> Stepper:
  """Euler's method (``od.ode.EULER``): SGD, one gradient per step. See :func:`runge_kutta`.

  Example:
    >>> stepper = od.ode.euler(0.1)
    >>> theta, _, _ = stepper.step(lambda p: 0.5 * p**2, jnp.ones([]),
    ...                            stepper.init(jnp.ones([])))
    >>> theta  # θ − h θ
    Array(0.9, dtype=float32)
  """
  return runge_kutta(EULER, lr, **kwargs)


def heun(lr: optax.ScalarOrSchedule, **kwargs: Any) -> Stepper:
  """Heun's method (``od.ode.HEUN``): order 2, two gradients per step.

  As in the post: a plain gradient step, then a correction by half the difference of the
  two gradients, ``θ₁ = θ₀ − h g₀``, ``θ ← θ₁ − (h/2)(g(θ₁) − g₀)``. See
  :func:`runge_kutta` for the arguments.

  Example:
    >>> stepper = od.ode.heun(0.1)
    >>> params, state, info = stepper.step(lambda p: 0.5 * p**2, jnp.ones([]),
    ...                                    stepper.init(jnp.ones([])))
    >>> params
    Array(0.905, dtype=float32)
  """
  return runge_kutta(HEUN, lr, **kwargs)


def midpoint(lr: optax.ScalarOrSchedule, **kwargs: Any) -> Stepper:
  """The explicit midpoint method (``od.ode.MIDPOINT``): order 2, two gradients per step.

  Example:
    >>> stepper = od.ode.midpoint(0.1)
    >>> theta, _, _ = stepper.step(lambda p: 0.5 * p**2, jnp.ones([]),
    ...                            stepper.init(jnp.ones([])))
    >>> theta  # θ − h (θ − (h/2) θ)
    Array(0.905, dtype=float32)
  """
  return runge_kutta(MIDPOINT, lr, **kwargs)


def ralston(lr: optax.ScalarOrSchedule, **kwargs: Any) -> Stepper:
  """Ralston's method (``od.ode.RALSTON``): order 2, two gradients per step.

  Example:
    >>> stepper = od.ode.ralston(0.1)
    >>> theta, _, _ = stepper.step(lambda p: 0.5 * p**2, jnp.ones([]),
    ...                            stepper.init(jnp.ones([])))
    >>> theta  # on a linear flow every 2-stage order-2 method gives 1 − h + h²/2
    Array(0.905, dtype=float32)
  """
  return runge_kutta(RALSTON, lr, **kwargs)


def rk4(lr: optax.ScalarOrSchedule, **kwargs: Any) -> Stepper:
  """The classical Runge–Kutta method (``od.ode.RK4``): order 4, four gradients per step.

  Example:
    >>> stepper = od.ode.rk4(0.1)
    >>> theta, _, info = stepper.step(lambda p: 0.5 * p**2, jnp.ones([]),
    ...                               stepper.init(jnp.ones([])))
    >>> theta, info.grad_evals  # exp(-0.1) = 0.90483742
    (Array(0.9048375, dtype=float32), Array(4, dtype=int32))
  """
  return runge_kutta(RK4, lr, **kwargs)


def rk23(lr: float, *, adaptive: bool = True, **kwargs: Any) -> Stepper:
  """Bogacki–Shampine RK23 (``od.ode.BOSH3``), adaptive by default: 4 gradients per step (3 with
  ``fsal=True``). See :func:`runge_kutta`.

  Example:
    >>> stepper = od.ode.rk23(0.1, rtol=1e-4, atol=1e-4, controller="i")
    >>> _, state, info = stepper.step(lambda p: 0.5 * p**2, jnp.ones([]),
    ...                               stepper.init(jnp.ones([])))
    >>> info.accepted, info.error, state.step_size  # the spec's worked example
    (Array(True, dtype=bool), Array(0.09375, dtype=float32), Array(0.1981, dtype=float32))
  """
  return runge_kutta(BOSH3, lr, adaptive=adaptive, **kwargs)


def rk45(lr: float, *, adaptive: bool = True, **kwargs: Any) -> Stepper:
  """Dormand–Prince RK45 (``od.ode.DOPRI5``), adaptive by default: 7 gradients per step (6 with
  ``fsal=True``). See :func:`runge_kutta`.

  Example:
    >>> stepper = od.ode.rk45(0.1, fsal=True)  # a full-batch loss: reuse the last stage
    >>> theta, state = jnp.ones([]), stepper.init(jnp.ones([]))
    >>> for _ in range(3):
    ...   theta, state, info = stepper.step(lambda p: 0.5 * p**2, theta, state)
    >>> info.grad_evals, state.num_grad_evals, bool(state.step_size > 0.1)
    (Array(6, dtype=int32), Array(19, dtype=int32), True)
  """
  return runge_kutta(DOPRI5, lr, adaptive=adaptive, **kwargs)


def as_transformation(stepper: Stepper) -> optax.GradientTransformationExtraArgs:
  r"""The same method as an optax transformation, for chains and ``nnx.Optimizer``.

  ``update(grads, state, params, *, grad_fn)``: ``grads`` must be :math:`\nabla L` at
  ``params`` and is the first stage; ``grad_fn(p) -> grads`` is called at the other
  ``s - 1`` stage points (it must compute the gradient of the same loss on the same
  mini-batch). The update is :math:`\theta_{n+1} - \theta_n` in the gradients' dtype, or
  zeros after a rejected adaptive step; the state is a :class:`StepperState` (read the step
  size, acceptance and error from it, e.g. ``optax.tree.get(state, "step_size")``).

  The learning rate is inside: do not scale the updates again. Transformations chained
  before it change the first stage only (not ``grad_fn``'s stages), so put gradient
  processing inside ``grad_fn`` and the loss instead; transformations after it (e.g. an
  EMA of params) see the parameter change. A stepper with ``fsal=True`` is refused: the
  first stage is the incoming gradient. With a Flax ``TrainState``, whose
  ``apply_gradients`` does not forward ``grad_fn``, use :func:`apply_gradients`.

  Args:
    stepper: a :class:`Stepper` (``od.ode.heun(0.1)``, ``od.ode.rk23(0.1)``, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> loss_fn = lambda p: 0.5 * jnp.sum(p["w"] ** 2)
    >>> tx = od.ode.as_transformation(od.ode.heun(0.1))
    >>> params = {"w": jnp.ones(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss_fn)(params), state, params,
    ...                            grad_fn=jax.grad(loss_fn))
    >>> optax.apply_updates(params, updates)["w"]
    Array([0.905, 0.905], dtype=float32)
  """
  if not isinstance(stepper, Stepper):
    raise ValueError(
      f"stepper must be an od.ode.Stepper (od.ode.heun(0.1), ...), got {stepper!r}"
    )
  if stepper.fsal:
    raise ValueError(
      "as_transformation cannot reuse the last stage (its first stage is the incoming "
      "gradient): build the stepper with fsal=False"
    )

  def init_fn(params):
    return stepper.init(params)

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    del extra_args
    checks.require_params(params, "as_transformation")
    checks.check_same_tree("as_transformation", updates, params, "params")
    if grad_fn is None and stepper.num_stages > 1:
      raise ValueError(
        "as_transformation needs grad_fn=: update(grads, state, params, grad_fn=g) "
        "where g(params) returns the gradient of the same loss on the same batch"
      )

    def stage(p):
      return grad_fn(p), None

    _, delta, state, _ = stepper._advance(updates, state, params, stage, None)
    return jax.tree.map(lambda d, g: jnp.asarray(d, jnp.result_type(g)), delta, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def apply_gradients(train_state: Any, *, grads: Any, **extra_args: Any) -> Any:
  """``TrainState.apply_gradients`` that forwards extra arguments to ``tx.update``.

  Flax's ``TrainState.apply_gradients(grads=..., **kwargs)`` treats ``kwargs`` as fields to
  replace, so a transformation that needs ``grad_fn=`` (``od.ode.as_transformation``, optax's
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
    >>> from flax.training import train_state
    >>> loss_fn = lambda p: 0.5 * jnp.sum(p["w"] ** 2)
    >>> state = train_state.TrainState.create(
    ...     apply_fn=None, params={"w": jnp.ones(2)}, tx=od.ode.as_transformation(od.ode.rk4(0.1)))
    >>> state = od.ode.apply_gradients(state, grads=jax.grad(loss_fn)(state.params),
    ...                            grad_fn=jax.grad(loss_fn))
    >>> state.params["w"], state.step
    (Array([0.9048375, 0.9048375], dtype=float32), 1)
  """
  updates, opt_state = train_state.tx.update(
    grads, train_state.opt_state, train_state.params, **extra_args
  )
  params = optax.apply_updates(train_state.params, updates)
  return train_state.replace(step=train_state.step + 1, params=params, opt_state=opt_state)
