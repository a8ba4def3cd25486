r"""Butcher tableaus: the coefficients of explicit Runge–Kutta methods, as data.

A tableau says nothing about how a step is taken or how its size is controlled: the
stepper (:func:`~optaxderived.ode.runge_kutta`) reads it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from optaxderived._core import checks

_FN = "od.ode.ButcherTableau"
_COEF_TOL = 1e-12  # how exactly the consistency conditions of a tableau must hold


def _floats(name: str, values: Any) -> tuple[float, ...]:
  """``values`` as a tuple of finite floats, or ``ValueError`` naming ``name``."""
  try:
    out = tuple(float(v) for v in values)
  except (TypeError, ValueError):
    raise ValueError(f"{_FN}: {name} must be a sequence of numbers, got {values!r}") from None
  if not all(math.isfinite(v) for v in out):
    raise ValueError(f"{_FN}: {name} must hold finite numbers, got {values!r}")
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
    >>> import optaxderived as od
    >>> tableau = od.ode.ButcherTableau(c=[0, 1], a=[[1]], b=[0.5, 0.5], order=2,
    ...                                 b_error=[-0.5, 0.5])
    >>> tableau == od.ode.HEUN, tableau.num_stages, tableau.fsal
    (True, 2, False)
  """

  c: tuple[float, ...]
  a: tuple[tuple[float, ...], ...]
  b: tuple[float, ...]
  order: int
  b_error: tuple[float, ...] | None = None
  embedded_order: int | None = dataclasses.field(default=None, kw_only=True)

  def __post_init__(self) -> None:
    c = _floats("c", self.c)
    s = len(c)
    if s == 0 or c[0] != 0.0:
      raise ValueError(f"{_FN}: c must be a non-empty sequence starting with 0, got {self.c!r}")
    try:
      rows = tuple(_floats(f"a[{i}]", row) for i, row in enumerate(self.a))
    except TypeError:
      raise ValueError(f"{_FN}: a must be a sequence of rows, got {self.a!r}") from None
    if len(rows) != s - 1 or any(len(row) != i + 1 for i, row in enumerate(rows)):
      raise ValueError(
        f"{_FN}: a must hold s - 1 = {s - 1} rows, row i holding i coefficients, got {self.a!r}"
      )
    for i, row in enumerate(rows):
      if abs(sum(row) - c[i + 1]) > _COEF_TOL:
        raise ValueError(
          f"{_FN}: row {i + 1} of a must sum to c[{i + 1}] = {c[i + 1]}, got {row!r}"
        )
    b = _floats("b", self.b)
    if len(b) != s or abs(sum(b) - 1.0) > _COEF_TOL:
      raise ValueError(f"{_FN}: b must hold s = {s} weights summing to 1, got {self.b!r}")
    checks.check_int(_FN, "order", self.order)
    b_error = None
    if self.b_error is not None:
      b_error = _floats("b_error", self.b_error)
      if len(b_error) != s or abs(sum(b_error)) > _COEF_TOL:
        raise ValueError(
          f"{_FN}: b_error must hold s = {s} weights summing to 0, got {self.b_error!r}"
        )
    if self.embedded_order is not None:
      if b_error is None:
        raise ValueError(
          f"{_FN}: embedded_order needs b_error (the embedded error estimate), "
          f"got embedded_order={self.embedded_order!r}"
        )
      checks.check_int(_FN, "embedded_order", self.embedded_order)
    object.__setattr__(self, "c", c)
    object.__setattr__(self, "a", rows)
    object.__setattr__(self, "b", b)
    object.__setattr__(self, "b_error", b_error)

  @property
  def num_stages(self) -> int:
    """The number of stages ``s``, the gradient evaluations of one step (without FSAL reuse)."""
    return len(self.c)

  @property
  def fsal(self) -> bool:
    """Whether the tableau is *first same as last*: the last stage is evaluated at the step's
    result.

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
    """The order ``q + 1`` of the error, ``q`` the lower order of the pair: O(h^(q+1))."""
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
