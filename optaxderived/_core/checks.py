"""Eager validation of hyperparameters: one rule and one message format for every factory.

Every check takes the public function (``"od.accumulate"``, ``"od.ode.heun"``), the argument
and the value, and raises ``ValueError("od.accumulate: every_k must be an integer >= 1, got
0")``. Only concrete values are checked: a schedule (a callable) or a traced value (as
``optax.inject_hyperparams`` passes under ``jit``) is accepted as it is; anything else must be
a real scalar. Arrays are tested for ``ndim`` before they are read, so a global array that
spans other processes' devices gets this error instead of a failed host transfer.
"""

from __future__ import annotations

import math
from typing import Any
from typing import NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _fail(fn: str, name: str, what: str, value: Any) -> NoReturn:
  raise ValueError(f"{fn}: {name} {what}, got {value!r}")


def _scalar_array(value: Any) -> np.ndarray | None:
  """``value`` as a 0-d NumPy array, or None when it has dimensions (read without a copy
  from the device only once it is known to be a scalar)."""
  if getattr(value, "ndim", 0) != 0:
    return None
  array = np.asarray(value)
  return array if array.ndim == 0 else None


def concrete_scalar(value: Any) -> float | None:
  """A concrete real scalar as a float; None for a schedule, a traced value or an array."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  array = _scalar_array(value)
  if array is None or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
    return None
  return float(array)


def _real_scalar(fn: str, name: str, value: Any, schedule: bool) -> float | None:
  """``value`` as a float; None for a schedule or a traced value (passed as they are).

  Raises ``ValueError`` for anything else that is not a real scalar (a string, a bool, a
  complex number, an array with dimensions), and for a schedule when ``schedule`` is False.
  """
  if callable(value) and not schedule:
    _fail(fn, name, "must be a number, not a schedule", value)
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  array = _scalar_array(value)
  if (
    array is None
    or array.dtype == np.bool_
    or not np.issubdtype(array.dtype, np.number)
    or np.iscomplexobj(array)
  ):
    _fail(
      fn,
      name,
      "must be a real number or a schedule" if schedule else "must be a real number",
      value,
    )
  return float(array)


def check_range(
  fn: str,
  name: str,
  value: Any,
  *,
  low: float = -math.inf,
  high: float = math.inf,
  low_open: bool = False,
  high_open: bool = False,
  schedule: bool = True,
) -> None:
  """Raises ``ValueError`` unless ``value`` is a real scalar in the given interval (or a
  schedule, unless ``schedule=False``, or a traced value).

  Example:
    >>> from optaxderived._core.checks import check_range
    >>> check_range("od.param_ema", "decay", 1.0, low=0.0, high=1.0, high_open=True)
    Traceback (most recent call last):
    ...
    ValueError: od.param_ema: decay must be in [0.0, 1.0), got 1.0
  """
  x = _real_scalar(fn, name, value, schedule)
  if x is None:
    return
  if (
    math.isnan(x) or x < low or x > high or (low_open and x == low) or (high_open and x == high)
  ):
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    _fail(fn, name, f"must be in {interval}", value)


def check_positive(fn: str, name: str, value: Any, *, finite: bool = False) -> None:
  """Raises ``ValueError`` unless ``value`` is a real scalar > 0 (schedules pass), and
  finite when ``finite``."""
  x = _real_scalar(fn, name, value, schedule=True)
  if x is not None and not (x > 0 and (math.isfinite(x) or not finite)):
    _fail(fn, name, f"must be {'finite and ' if finite else ''}> 0", value)


def check_finite(fn: str, name: str, value: Any, *, low: float = -math.inf) -> None:
  """Raises ``ValueError`` unless ``value`` is a finite real scalar >= ``low`` (schedules
  pass): a learning rate of 0, as a warmup schedule gives at its first step, is valid."""
  x = _real_scalar(fn, name, value, schedule=True)
  if x is not None and not (math.isfinite(x) and x >= low):
    _fail(
      fn, name, "must be finite" if low == -math.inf else f"must be finite and >= {low}", value
    )


def check_float_dtype(fn: str, name: str, value: Any) -> Any:
  """``value`` as a canonical floating dtype; ``ValueError`` naming ``name`` otherwise."""
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    _fail(fn, name, "must be a floating dtype", value)
  return jax.dtypes.canonicalize_dtype(dtype)


def check_int(fn: str, name: str, value: Any, *, low: int = 1, schedule: bool = True) -> None:
  """Raises ``ValueError`` unless ``value`` is an integer >= ``low`` (schedules pass unless
  ``schedule=False``)."""
  if callable(value) and schedule or isinstance(value, jax.core.Tracer):
    return
  if (
    isinstance(value, jax.Array | np.ndarray)
    and value.ndim == 0
    and np.issubdtype(value.dtype, np.integer)
  ):
    value = int(value)  # a concrete int array, as optax.inject_hyperparams passes at init
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
    _fail(fn, name, f"must be an integer >= {low}", value)


def check_bool(fn: str, name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is a bool (a truthy string is not one)."""
  if not isinstance(value, bool | np.bool_):
    _fail(fn, name, "must be a bool", value)


def check_choice(fn: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if not isinstance(value, str) or value not in choices:
    _fail(fn, name, f"must be one of {choices}", value)


def check_transformation(fn: str, name: str, value: Any, *, optional: bool = False) -> None:
  """Raises ``ValueError`` unless ``value`` is an ``optax.GradientTransformation`` (or None
  when ``optional``); the message says what is usually meant instead of a factory."""
  if optional and value is None:
    return
  if not isinstance(value, optax.GradientTransformation):
    hint = " (call the factory: optax.adam(1e-3), not optax.adam)" if callable(value) else ""
    _fail(fn, name, f"must be an optax.GradientTransformation{hint}", value)


def require_params(params: Any, fn: str) -> None:
  """Raises ``ValueError`` in ``update`` when a transformation that needs params got none."""
  if params is None:
    raise ValueError(f"{fn} needs the current params: call update(updates, state, params)")


def check_same_tree(
  fn: str, updates: Any, other: Any, what: str, *, is_leaf: Any = None
) -> None:
  """Raises ``ValueError`` naming ``fn`` when ``updates`` and ``other`` (the params, or a
  state tree shaped like them) do not have the same tree structure (``is_leaf``: nodes of
  ``updates`` that stand for one leaf, such as row-sparse gradients)."""
  # (PyTreeDef comes from a compiled module with no stub: Any to the type checker)
  want: Any = jax.tree.structure(other)
  got: Any = jax.tree.structure(updates, is_leaf=is_leaf)
  if got != want:
    raise ValueError(
      f"{fn}: the updates do not have the tree structure of the {what}: {got} vs {want}"
    )
