"""Eager validation of hyperparameters, with errors that name the argument and the value.

Only concrete values are checked: a schedule (a callable) or a traced value (as
``optax.inject_hyperparams`` passes under ``jit``) is accepted as it is; anything else must be
a real scalar.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_scalar(value: Any) -> float | None:
  """A concrete real scalar as a float; None for a schedule, a traced value or an array."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  array = np.asarray(value)
  if array.ndim != 0 or not np.issubdtype(array.dtype, np.number):
    return None
  return float(array)


def _real_scalar(name: str, value: Any, schedule: bool) -> float | None:
  """``value`` as a float; None for a schedule or a traced value (passed as they are).

  Raises ``ValueError`` for anything else that is not a real scalar (a string, a bool, a
  complex number, an array with dimensions), and for a schedule when ``schedule`` is False.
  """
  if callable(value) and not schedule:
    raise ValueError(f"{name} must be a number, not a schedule, got {value!r}")
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  array = np.asarray(value)
  if (
    array.ndim != 0
    or array.dtype == np.bool_
    or not np.issubdtype(array.dtype, np.number)
    or np.iscomplexobj(array)
  ):
    kind = "a real number or a schedule" if schedule else "a real number"
    raise ValueError(f"{name} must be {kind}, got {value!r}")
  return float(array)


def check_range(
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
    >>> from optaxderived._checks import check_range
    >>> check_range("decay", 1.0, low=0.0, high=1.0, high_open=True)
    Traceback (most recent call last):
    ...
    ValueError: decay must be in [0.0, 1.0), got 1.0
  """
  x = _real_scalar(name, value, schedule)
  if x is None:
    return
  if (
    math.isnan(x) or x < low or x > high or (low_open and x == low) or (high_open and x == high)
  ):
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_positive(name: str, value: Any, *, finite: bool = False) -> None:
  """Raises ``ValueError`` unless ``value`` is a real scalar > 0 (schedules pass), and
  finite when ``finite``."""
  x = _real_scalar(name, value, schedule=True)
  if x is not None and not (x > 0 and (math.isfinite(x) or not finite)):
    raise ValueError(f"{name} must be {'finite and ' if finite else ''}> 0, got {value!r}")


def check_float_dtype(name: str, value: Any) -> Any:
  """``value`` as a canonical floating dtype; ``ValueError`` naming ``name`` otherwise."""
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating dtype, got {value!r}")
  return jax.dtypes.canonicalize_dtype(dtype)


def check_int(name: str, value: Any, *, low: int = 1) -> None:
  """Raises ``ValueError`` unless ``value`` is an integer >= ``low`` (schedules pass)."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return
  if (
    isinstance(value, jax.Array | np.ndarray)
    and value.ndim == 0
    and np.issubdtype(value.dtype, np.integer)
  ):
    value = int(value)  # a concrete int array, as optax.inject_hyperparams passes at init
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is a bool (a truthy string is not one)."""
  if not isinstance(value, bool | np.bool_):
    raise ValueError(f"{name} must be a bool, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def require_params(params: Any, transformation: str) -> None:
  """Raises ``ValueError`` in ``update`` when a transformation that needs params got none."""
  if params is None:
    raise ValueError(
      f"{transformation} needs the current params: call update(updates, state, params)"
    )


def check_same_tree(transformation: str, updates: Any, other: Any, what: str) -> None:
  """Raises ``ValueError`` naming ``transformation`` when ``updates`` and ``other`` (the
  params, or a state tree shaped like them) do not have the same tree structure."""
  want, got = jax.tree.structure(other), jax.tree.structure(updates)
  if got != want:
    raise ValueError(
      f"{transformation}: the updates do not have the tree structure of the {what}: "
      f"{got} vs {want}"
    )
