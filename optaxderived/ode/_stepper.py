r"""The Runge–Kutta stepper: a tableau as an optimizer on the gradient flow.

Gradient descent is Euler's method on the gradient flow :math:`\dot\theta = -\nabla L(\theta)`
with step :math:`h` = the learning rate. A Runge–Kutta tableau gives a higher-order step that
evaluates the gradient at several stage points per step, on the same mini-batch; an embedded
error estimate turns :math:`h` into an adaptive learning rate with accept/reject.
:meth:`Stepper.step` (``od.ode.heun(0.1).step(loss_fn, params, state, batch)``) owns the
gradient evaluations: one ``jax.value_and_grad`` per stage, on the same arguments.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxderived._core import checks
from optaxderived._core import numerics
from optaxderived.ode._controller import PI_MIN_PREV_ERROR
from optaxderived.ode._controller import Controller
from optaxderived.ode._tableaus import BOSH3
from optaxderived.ode._tableaus import DOPRI5
from optaxderived.ode._tableaus import EULER
from optaxderived.ode._tableaus import HEUN
from optaxderived.ode._tableaus import MIDPOINT
from optaxderived.ode._tableaus import RALSTON
from optaxderived.ode._tableaus import RK4
from optaxderived.ode._tableaus import ButcherTableau

# A stage: ``stage_fn(params) -> (grads, loss)`` (``loss`` may be None).
StageFn = Callable[[Any], tuple[Any, Any]]


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

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> state = od.ode.rk23(0.1).init(jnp.ones(3))
    >>> state.step_size, state.accepted, state.fsal_grads is None
    (Array(0.1, dtype=float32), Array(True, dtype=bool), True)
  """

  count: jax.Array  # type: ignore[assignment]  # a field, shadowing tuple.count
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

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> stepper = od.ode.heun(0.1)
    >>> _, _, info = stepper.step(lambda p: 0.5 * p**2, jnp.ones([]),
    ...                           stepper.init(jnp.ones([])))
    >>> info.loss, info.grad_evals, info.accepted
    (Array(0.5, dtype=float32), Array(2, dtype=int32), Array(True, dtype=bool))
  """

  loss: jax.Array
  aux: Any
  grad_evals: jax.Array
  step_size: jax.Array
  accepted: jax.Array
  error: jax.Array


def _add_saturating(count: jax.Array, n: Any) -> jax.Array:
  top = jnp.iinfo(count.dtype).max
  return jnp.where(count > top - n, top, count + n).astype(count.dtype)


def _point(params: Any, increment: Any, *, cast: bool) -> Any:
  """``params + increment`` in the increment's dtype, rounded to the params' when ``cast``."""

  def leaf(p, d):
    x = jnp.asarray(p, d.dtype) + d
    return x.astype(jnp.result_type(p)) if cast else x

  return jax.tree.map(leaf, params, increment)


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@dataclasses.dataclass(frozen=True)
class Stepper:
  """An explicit Runge–Kutta method as an optimizer; built by :func:`runge_kutta`.

  ``init(params) -> StepperState`` and ``step(loss_fn, params, state, *args, has_aux=False,
  **kwargs) -> (params, state, info)``. Its fields are the arguments of :func:`runge_kutta`,
  where their defaults and meaning are given; a bad one raises ``ValueError``.

  Example:
    >>> import optaxderived as od
    >>> stepper = od.ode.rk23(0.1)
    >>> stepper.tableau == od.ode.BOSH3, stepper.adaptive, stepper.num_stages
    (True, True, 4)
  """

  tableau: ButcherTableau
  learning_rate: optax.ScalarOrSchedule
  adaptive: bool
  rtol: float
  atol: float
  controller: Literal["pi", "i"]
  safety: float
  factor_min: float
  factor_max: float
  min_step_size: float
  max_step_size: float | None
  fsal: bool
  accumulator_dtype: Any

  def __post_init__(self) -> None:
    # Built by runge_kutta or a shorthand, this passes: they check first, naming themselves.
    _check("od.ode.Stepper", _arguments(self))

  @property
  def num_stages(self) -> int:
    """The number of stages ``s`` of the tableau (gradient evaluations per step, no reuse)."""
    return self.tableau.num_stages

  @property
  def _controller(self) -> Controller:
    return Controller(
      controller=self.controller,
      error_order=self.tableau.error_order,
      safety=self.safety,
      factor_min=self.factor_min,
      factor_max=self.factor_max,
      min_step_size=self.min_step_size,
      max_step_size=self.max_step_size,
    )

  def init(self, params: Any) -> StepperState:
    """The initial state for ``params``."""
    dtype = numerics.wide_dtype(*[jnp.result_type(x) for x in jax.tree.leaves(params)])
    if self.adaptive:
      step_size = self._controller.clamp(jnp.asarray(self.learning_rate, dtype))
    else:
      step_size = jnp.asarray(
        numerics.value_at(self.learning_rate, jnp.zeros([], jnp.int32)), dtype
      )
    state = StepperState(
      count=jnp.zeros([], jnp.int32),
      step_size=step_size,
      accepted=jnp.ones([], bool),
      error=jnp.full([], jnp.nan, dtype),
      prev_error=jnp.full([], PI_MIN_PREV_ERROR, dtype),
      num_rejected=jnp.zeros([], jnp.int32),
      num_grad_evals=jnp.zeros([], jnp.int32),
    )
    if self.fsal:
      state = state._replace(
        fsal_loss=jnp.zeros([], dtype),
        fsal_grads=optax.tree.zeros_like(params),
        fsal_valid=jnp.zeros([], bool),
      )
    return state

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

    first_evals: Any
    if state.fsal_valid is None:  # no first-same-as-last reuse
      loss, aux, grads = evaluate(params)
      first_evals = 1
    else:
      if has_aux:
        raise ValueError(
          "od.ode.Stepper.step: fsal=True keeps the last stage's loss and gradient in the "
          "state but cannot keep aux: use has_aux=False, or fsal=False"
        )
      fsal_loss, fsal_grads = state.fsal_loss, state.fsal_grads
      assert fsal_loss is not None
      dtype = fsal_loss.dtype

      def fresh(_):
        loss, _, grads = evaluate(params)
        return jnp.asarray(loss, dtype), grads

      def reuse(_):
        return fsal_loss, fsal_grads

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

  # ---------------------------------------------------------------------------------------
  # The method (shared with as_transformation).

  def _advance(
    self,
    grads0: Any,
    state: StepperState,
    params: Any,
    stage_fn: StageFn,
    loss0: Any,
    first_evals: Any = 1,
  ) -> tuple[Any, Any, StepperState, tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
    """One step from the first stage's gradient ``grads0``.

    ``stage_fn(p) -> (grads, loss)`` evaluates the other stages (``loss`` may be None);
    ``first_evals`` is what the first stage cost (0 when reused, 1 otherwise). Returns
    ``(params, delta, state, (grad_evals, h, accepted, error))``, where ``delta`` is the
    parameter change in the accumulation dtype (zeros after a rejected step).
    """
    dtype = state.step_size.dtype
    if self.adaptive:
      h = state.step_size
    else:
      h = jnp.asarray(numerics.value_at(self.learning_rate, state.count), dtype)
    grads, increment, last_loss = self._stages(params, h, grads0, stage_fn)
    candidate = _point(params, increment, cast=False)
    error = jnp.full([], jnp.nan, dtype)
    if self.tableau.b_error is not None:
      error = self._scaled_error(params, candidate, h, grads).astype(dtype)
    new_params = _point(params, increment, cast=True)
    count = optax.safe_increment(state.count)

    if self.adaptive:
      error = jnp.where(_all_finite(candidate) & ~jnp.isnan(error), error, jnp.inf)
      # a non-finite step is never accepted, not even at min_step_size
      accepted = jnp.isfinite(error) & ((error <= 1.0) | (h <= self.min_step_size))
      step_size, prev_error = self._controller.adapt(
        h, error, accepted, state.accepted, state.prev_error
      )
      new_params = jax.tree.map(lambda x, p: jnp.where(accepted, x, p), new_params, params)
      increment = jax.tree.map(lambda d: jnp.where(accepted, d, jnp.zeros_like(d)), increment)
      num_rejected = jnp.where(
        accepted, state.num_rejected, optax.safe_increment(state.num_rejected)
      )
    else:
      accepted = jnp.ones([], bool)
      step_size = jnp.asarray(numerics.value_at(self.learning_rate, count), dtype)
      prev_error, num_rejected = state.prev_error, state.num_rejected

    evals = jnp.asarray(first_evals + self.num_stages - 1, jnp.int32)
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

  def _stages(
    self, params: Any, h: jax.Array, grads0: Any, stage_fn: StageFn
  ) -> tuple[list[Any], Any, Any]:
    """The stage gradients, the solution's increment and the last stage's loss."""
    tableau = self.tableau
    grads = [grads0]
    increment = last_loss = None
    for row in tableau.a:
      increment = self._increment(params, h, row, grads)
      stage_grads, last_loss = stage_fn(_point(params, increment, cast=True))
      grads.append(stage_grads)
    if not tableau.fsal:  # else the last stage point is the solution, computed the same way
      increment = self._increment(params, h, tableau.b, grads)
    return grads, increment, last_loss

  def _acc_dtype(self, x: Any) -> Any:
    dtype = jnp.result_type(x)
    if self.accumulator_dtype is None:
      return dtype
    return jnp.promote_types(self.accumulator_dtype, dtype)

  def _increment(
    self, params: Any, h: jax.Array, coefs: tuple[float, ...], grads: list[Any]
  ) -> Any:
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

  def _scaled_error(
    self, params: Any, candidate: Any, h: jax.Array, grads: list[Any]
  ) -> jax.Array:
    """``rms(e / (atol + rtol max(|θ₀|, |θ₁|)))`` over every element of every leaf."""
    b_error = self.tableau.b_error
    assert b_error is not None
    used = [(c, g) for c, g in zip(b_error, grads, strict=True) if c != 0.0]
    size = sum(np.size(p) for p in jax.tree.leaves(params))
    if size == 0:
      return jnp.zeros([], h.dtype)

    def leaf(p, x, *gs):
      dtype = x.dtype
      e = h.astype(dtype) * sum(
        c * jnp.asarray(g, dtype) for (c, _), g in zip(used, gs, strict=True)
      )
      scale = self.atol + self.rtol * jnp.maximum(jnp.abs(jnp.asarray(p, dtype)), jnp.abs(x))
      return numerics.sum_of_squares(jnp.where(e == 0, jnp.zeros([], dtype), e / scale))

    squares = jax.tree.leaves(jax.tree.map(leaf, params, candidate, *[g for _, g in used]))
    return jnp.sqrt(sum(squares) / size)


def _arguments(stepper: Stepper) -> dict[str, Any]:
  """The fields of ``stepper``: the arguments of :func:`runge_kutta` that built it."""
  return {field.name: getattr(stepper, field.name) for field in dataclasses.fields(stepper)}


def _check(fn: str, arguments: dict[str, Any]) -> None:
  """Raises ``ValueError`` naming ``fn`` (the public function) for a bad argument."""
  tableau, learning_rate = arguments["tableau"], arguments["learning_rate"]
  rtol, atol = arguments["rtol"], arguments["atol"]
  min_step_size, max_step_size = arguments["min_step_size"], arguments["max_step_size"]
  if not isinstance(tableau, ButcherTableau):
    raise ValueError(f"{fn}: tableau must be an od.ode.ButcherTableau, got {tableau!r}")
  checks.check_positive(fn, "learning_rate", learning_rate)
  checks.check_range(fn, "rtol", rtol, low=0.0)
  checks.check_range(fn, "atol", atol, low=0.0)
  if checks.concrete_scalar(rtol) == 0.0 and checks.concrete_scalar(atol) == 0.0:
    raise ValueError(f"{fn}: rtol and atol cannot both be 0, got rtol={rtol}, atol={atol}")
  Controller(
    controller=arguments["controller"],
    error_order=tableau.error_order,
    safety=arguments["safety"],
    factor_min=arguments["factor_min"],
    factor_max=arguments["factor_max"],
    min_step_size=min_step_size,
    max_step_size=max_step_size,
  ).check(fn)
  if arguments["adaptive"]:
    if tableau.b_error is None:
      raise ValueError(
        f"{fn}: adaptive=True needs a tableau with an embedded error estimate (b_error); "
        f"got a tableau of order {tableau.order} without one"
      )
    if callable(learning_rate):
      raise ValueError(
        f"{fn}: learning_rate must be a number when adaptive=True (it is the initial step "
        f"size; the controller picks the next ones), got {learning_rate!r}"
      )
  elif not (checks.concrete_scalar(min_step_size) == 0.0 and max_step_size is None):
    raise ValueError(
      f"{fn}: min_step_size and max_step_size bound adaptive steps: pass adaptive=True, "
      f"got min_step_size={min_step_size!r}, max_step_size={max_step_size!r}"
    )
  if arguments["fsal"] and not tableau.fsal:
    raise ValueError(
      f"{fn}: fsal=True needs a tableau whose last stage is evaluated at the step's result "
      "(od.ode.BOSH3, od.ode.DOPRI5)"
    )
  if arguments["accumulator_dtype"] is not None:
    checks.check_float_dtype(fn, "accumulator_dtype", arguments["accumulator_dtype"])


def _stepper(fn: str, arguments: dict[str, Any]) -> Stepper:
  """``Stepper(**arguments)``, checked first so that a bad argument names ``fn``."""
  _check(fn, arguments)
  return Stepper(**arguments)


def runge_kutta(
  tableau: ButcherTableau,
  learning_rate: optax.ScalarOrSchedule,
  *,
  adaptive: bool = False,
  rtol: float = 1e-3,
  atol: float = 1e-6,
  controller: Literal["pi", "i"] = "pi",
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
    tableau: the method, e.g. ``od.ode.HEUN``, ``od.ode.RK4``, ``od.ode.BOSH3``,
      ``od.ode.DOPRI5``.
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
      ("first same as last", ``od.ode.BOSH3`` and ``od.ode.DOPRI5``): one evaluation fewer
      per step. Only valid when the loss is the same at every step (full batch, no dropout)
      and nothing else changes the params between steps. Without it, fixed steps of such a
      tableau evaluate the last stage for the error estimate alone; to skip it, drop the
      stage: ``od.ode.ButcherTableau(c=t.c[:-1], a=t.a[:-1], b=t.b[:-1], order=t.order)``.
    accumulator_dtype: a floating dtype the stages are summed in, or None (see above).

  Returns:
    A :class:`Stepper`: ``init(params)`` and ``step(loss_fn, params, state, *args,
    has_aux=False, **kwargs) -> (params, state, info)``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
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
  return _stepper(
    "od.ode.runge_kutta",
    dict(
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
    ),
  )


_RUNGE_KUTTA = inspect.signature(runge_kutta)


def _shorthand(
  fn: str, tableau: ButcherTableau, learning_rate: Any, options: dict[str, Any]
) -> Stepper:
  """``runge_kutta(tableau, learning_rate, **options)`` (its defaults), naming ``fn``."""
  try:
    arguments = _RUNGE_KUTTA.bind(tableau, learning_rate, **options)
  except TypeError as error:  # an unknown or repeated keyword, as a call would say
    raise TypeError(f"{fn}() {error}") from None
  arguments.apply_defaults()
  return _stepper(fn, arguments.arguments)


def euler(lr: optax.ScalarOrSchedule, **kwargs: Any) -> Stepper:
  """Euler's method (``od.ode.EULER``): SGD, one gradient per step. See :func:`runge_kutta`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> stepper = od.ode.euler(0.1)
    >>> theta, _, _ = stepper.step(lambda p: 0.5 * p**2, jnp.ones([]),
    ...                            stepper.init(jnp.ones([])))
    >>> theta  # θ − h θ
    Array(0.9, dtype=float32)
  """
  return _shorthand("od.ode.euler", EULER, lr, kwargs)


def heun(lr: optax.ScalarOrSchedule, **kwargs: Any) -> Stepper:
  """Heun's method (``od.ode.HEUN``): order 2, two gradients per step.

  As in Su Jianlin's Keras ``HeunOptimizer`` (see the references of :func:`runge_kutta`): a
  plain gradient step, then a correction by half the difference of the two gradients,
  ``θ₁ = θ₀ − h g₀``, ``θ ← θ₁ − (h/2)(g(θ₁) − g₀)``. See :func:`runge_kutta` for the
  arguments.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> stepper = od.ode.heun(0.1)
    >>> params, state, info = stepper.step(lambda p: 0.5 * p**2, jnp.ones([]),
    ...                                    stepper.init(jnp.ones([])))
    >>> params
    Array(0.905, dtype=float32)
  """
  return _shorthand("od.ode.heun", HEUN, lr, kwargs)


def midpoint(lr: optax.ScalarOrSchedule, **kwargs: Any) -> Stepper:
  """The explicit midpoint method (``od.ode.MIDPOINT``): order 2, two gradients per step.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> stepper = od.ode.midpoint(0.1)
    >>> theta, _, _ = stepper.step(lambda p: 0.5 * p**2, jnp.ones([]),
    ...                            stepper.init(jnp.ones([])))
    >>> theta  # θ − h (θ − (h/2) θ)
    Array(0.905, dtype=float32)
  """
  return _shorthand("od.ode.midpoint", MIDPOINT, lr, kwargs)


def ralston(lr: optax.ScalarOrSchedule, **kwargs: Any) -> Stepper:
  """Ralston's method (``od.ode.RALSTON``): order 2, two gradients per step.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> stepper = od.ode.ralston(0.1)
    >>> theta, _, _ = stepper.step(lambda p: 0.5 * p**2, jnp.ones([]),
    ...                            stepper.init(jnp.ones([])))
    >>> theta  # on a linear flow every 2-stage order-2 method gives 1 − h + h²/2
    Array(0.905, dtype=float32)
  """
  return _shorthand("od.ode.ralston", RALSTON, lr, kwargs)


def rk4(lr: optax.ScalarOrSchedule, **kwargs: Any) -> Stepper:
  """The classical Runge–Kutta method (``od.ode.RK4``): order 4, four gradients per step.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> stepper = od.ode.rk4(0.1)
    >>> theta, _, info = stepper.step(lambda p: 0.5 * p**2, jnp.ones([]),
    ...                               stepper.init(jnp.ones([])))
    >>> theta, info.grad_evals  # exp(-0.1) = 0.90483742
    (Array(0.9048375, dtype=float32), Array(4, dtype=int32))
  """
  return _shorthand("od.ode.rk4", RK4, lr, kwargs)


def rk23(lr: float, *, adaptive: bool = True, **kwargs: Any) -> Stepper:
  """Bogacki–Shampine RK23 (``od.ode.BOSH3``), adaptive by default: 4 gradients per step
  (3 with ``fsal=True``). See :func:`runge_kutta`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> stepper = od.ode.rk23(0.1, rtol=1e-4, atol=1e-4, controller="i")
    >>> _, state, info = stepper.step(lambda p: 0.5 * p**2, jnp.ones([]),
    ...                               stepper.init(jnp.ones([])))
    >>> info.accepted, info.error, state.step_size  # h = 0.1 · 0.9 · 0.09375^(-1/3)
    (Array(True, dtype=bool), Array(0.09375, dtype=float32), Array(0.1981, dtype=float32))
  """
  return _shorthand("od.ode.rk23", BOSH3, lr, dict(kwargs, adaptive=adaptive))


def rk45(lr: float, *, adaptive: bool = True, **kwargs: Any) -> Stepper:
  """Dormand–Prince RK45 (``od.ode.DOPRI5``), adaptive by default: 7 gradients per step
  (6 with ``fsal=True``). See :func:`runge_kutta`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> stepper = od.ode.rk45(0.1, fsal=True)  # a full-batch loss: reuse the last stage
    >>> theta, state = jnp.ones([]), stepper.init(jnp.ones([]))
    >>> for _ in range(3):
    ...   theta, state, info = stepper.step(lambda p: 0.5 * p**2, theta, state)
    >>> info.grad_evals, state.num_grad_evals, bool(state.step_size > 0.1)
    (Array(6, dtype=int32), Array(19, dtype=int32), True)
  """
  return _shorthand("od.ode.rk45", DOPRI5, lr, dict(kwargs, adaptive=adaptive))
