"""The numerical rules every technique follows, written once.

- Reductions and accumulators are computed in *at least float32*: bf16 and f16 are widened,
  float64 and complex keep their precision (:func:`wide_dtype`, :func:`wide`).
- Norms are sums of ``|x|²`` in that dtype, complex leaves included (:func:`sum_of_squares`),
  exact for finite values whose squares overflow (:func:`unit_norms`, :func:`global_norm`).
- A hyperparameter may be a number or a schedule of a step count (:func:`value_at`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def wide_dtype(*dtypes: Any) -> Any:
  """The promoted dtype of ``dtypes``, at least float32 (bf16 → float32, float64 stays)."""
  return jnp.result_type(jnp.float32, *dtypes)


def wide(x: jax.Array) -> jax.Array:
  """``x`` in at least float32 (bf16 and f16 are widened; float64 and complex stay)."""
  return x.astype(wide_dtype(x.dtype))


def widen_stored(p: jax.Array, dtype: Any) -> jax.Array:
  """``p`` in ``dtype``, holding the value ``p`` has once stored in its own dtype.

  Under ``jit`` XLA may keep ``params + updates`` in excess precision (bf16 arithmetic
  done in float32, the rounding to bf16 dropped when the result is widened again), so an
  average of the params would follow values they never hold; ``reduce_precision`` rounds
  for sure.
  """
  wide = p.astype(dtype)
  if jnp.issubdtype(p.dtype, jnp.floating) and jnp.finfo(p.dtype).bits < jnp.finfo(dtype).bits:
    info = jnp.finfo(p.dtype)
    wide = jax.lax.reduce_precision(wide, exponent_bits=info.nexp, mantissa_bits=info.nmant)
  return wide


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


def _axes(x: jax.Array, scope: str) -> tuple[int, ...] | None:
  """The axes a unit's norm reduces over: axis 0 is kept for rows of ndim >= 2 leaves."""
  if scope == "row" and x.ndim >= 2:
    return tuple(range(1, x.ndim))
  return None


def _stable_norm(norms: list[jax.Array]) -> jax.Array:
  """The L2 norm of a few non-negative unit norms, without overflow (max-scaled).

  Reduced array by array, not concatenated: under an explicit mesh, vectors of row norms
  sharded differently cannot be concatenated."""
  m = functools.reduce(jnp.maximum, [jnp.max(n, initial=0.0) for n in norms])
  safe = jnp.where((m > 0) & jnp.isfinite(m), m, jnp.ones_like(m))
  total = sum(jnp.sum(jnp.square(n / safe)) for n in norms)
  return jnp.where(jnp.isinf(m), jnp.inf, safe * jnp.sqrt(total))


def explicitly_sharded(x: jax.Array) -> bool:
  """Whether ``x``'s type is sharded over an explicit mesh axis (``jax.typeof``)."""
  return any(axis is not None for axis in jax.typeof(x).sharding.spec)


def unit_norms(leaves: list[jax.Array], scope: str) -> tuple[list[jax.Array], jax.Array]:
  """The L2 norm of every unit (``scope``: ``"global"`` the whole tree, ``"leaf"`` each leaf,
  ``"row"`` each row of axis 0 of each leaf: a vector of row norms) and the global norm.

  The norms are ``sqrt`` of float32 (or wider) sums of squares. When a sum overflows to inf,
  a ``lax.cond`` recomputes the overflowed units from values scaled by ``2^-e`` (``e`` half
  the dtype's largest exponent: ``2^-64`` in float32): the scaled sum of squares overflows
  only when the norm itself does, and the entries it loses to underflow (``|x| < ~2``) are
  negligible next to a norm above ``~1e19``. So finite gradients always get their finite norm
  and an infinite entry an infinite one, at the cost of one reduction in the common case.
  """
  axes = [None if scope == "global" else _axes(x, scope) for x in leaves]
  sums = [sum_of_squares(x, a) for x, a in zip(leaves, axes, strict=True)]
  if scope == "row":
    # Without the barrier XLA turns sum(row sums) into a second reduction of x² and then
    # materialises x² for both (a leaf-sized temporary per leaf).
    sums = jax.lax.optimization_barrier(sums)
  total = sum(s if s.ndim == 0 else jnp.sum(s) for s in sums)  # (no reduce of a scalar)

  def plain():
    if scope == "global":
      return [jnp.sqrt(total)], jnp.sqrt(total)
    return [jnp.sqrt(s) for s in sums], jnp.sqrt(total)

  def rescaled():
    dtypes = {wide_dtype(x.dtype) for x in leaves}
    if len(dtypes) == 1 and not any(explicitly_sharded(s) for s in sums):
      # The common case: the scalar work on one vector of all the units (elementwise, so
      # the same values as unit by unit below, in a fraction of the HLO). Explicitly
      # sharded vectors of row norms cannot be concatenated: they go unit by unit.
      e = jnp.finfo(jnp.zeros([], dtypes.pop()).real.dtype).maxexp // 2
      flat_sums = jnp.concatenate([jnp.ravel(s) for s in sums])
      flat_scaled = jnp.concatenate(
        [
          jnp.ravel(sum_of_squares(wide(x) * 2.0**-e, a))
          for x, a in zip(leaves, axes, strict=True)
        ]
      )
      flat = jnp.where(
        jnp.isinf(flat_sums), jnp.sqrt(flat_scaled) * 2.0**e, jnp.sqrt(flat_sums)
      )
      norm = _stable_norm([flat])
      if scope == "global":
        return [norm], norm
      bounds = np.cumsum([0] + [s.size for s in sums])
      norms = [
        flat[i:j].reshape(s.shape)
        for i, j, s in zip(bounds[:-1], bounds[1:], sums, strict=True)
      ]
      return norms, norm
    norms = []
    for x, a, s in zip(leaves, axes, sums, strict=True):
      x = wide(x)
      e = jnp.finfo(x.real.dtype).maxexp // 2
      scaled = jnp.sqrt(sum_of_squares(x * 2.0**-e, a)) * 2.0**e
      norms.append(jnp.where(jnp.isinf(s), scaled, jnp.sqrt(s)))
    norm = _stable_norm(norms)
    return ([norm] if scope == "global" else norms), norm

  # ~isfinite, not isinf: with a NaN elsewhere the total is NaN, and the finite units whose
  # squares overflowed must still get their exact norms
  return jax.lax.cond(~jnp.isfinite(total), rescaled, plain)


def global_norm(leaves: list[jax.Array]) -> jax.Array:
  """The L2 norm of all ``leaves`` together, in at least float32, exact for finite values
  whose squares overflow (see :func:`unit_norms`); 0 for no leaves."""
  if not leaves:
    return jnp.zeros([], jnp.float32)
  return unit_norms(leaves, "global")[1]
