"""The numerical rules every technique follows, written once.

- Reductions and accumulators are computed in *at least float32*: bf16 and f16 are widened,
  float64 and complex keep their precision (:func:`wide_dtype`, :func:`wide`).
- Norms are sums of ``|x|²`` in that dtype, complex leaves included (:func:`sum_of_squares`).
- A hyperparameter may be a number or a schedule of a step count (:func:`value_at`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def wide_dtype(*dtypes: Any) -> Any:
  """The promoted dtype of ``dtypes``, at least float32 (bf16 → float32, float64 stays)."""
  return jnp.result_type(jnp.float32, *dtypes)


def wide(x: jax.Array) -> jax.Array:
  """``x`` in at least float32 (bf16 and f16 are widened; float64 and complex stay)."""
  return x.astype(wide_dtype(x.dtype))


def sum_of_squares(x: jax.Array, axes: tuple[int, ...] | None = None) -> jax.Array:
  """``Σ |x|²`` over ``axes`` (all by default), in at least float32, complex included.

  Example:
    >>> import jax.numpy as jnp
    >>> from optaxderived._core.numerics import sum_of_squares
    >>> sum_of_squares(jnp.array([3.0, 4.0], jnp.bfloat16))
    Array(25., dtype=float32)
  """
  x = wide(x)
  if jnp.iscomplexobj(x):
    return jnp.sum(jnp.square(x.real) + jnp.square(x.imag), axis=axes)
  return jnp.sum(jnp.square(x), axis=axes)


def value_at(hyperparameter: Any, count: Any) -> Any:
  """A hyperparameter at a step count: a schedule is called with it, a number returned."""
  return hyperparameter(count) if callable(hyperparameter) else hyperparameter
