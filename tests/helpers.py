"""Checks every transformation's tests share (import with ``from helpers import ...``)."""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def shapes_and_dtypes(tree: Any) -> Any:
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def run_scan(
  tx: optax.GradientTransformation, params: Any, grads_seq: Any, **extra: Any
) -> tuple[Any, Any, Any]:
  """Runs ``update`` + ``apply_updates`` under ``jit(lax.scan)`` over a stacked gradient
  sequence (leading axis = steps). Returns the final params, state and stacked updates.

  ``lax.scan`` fails when the state's dtypes or shapes change between steps, so this is
  also the test of state stability.
  """

  def step(carry, grads):
    params, state = carry
    updates, state = tx.update(grads, state, params, **extra)
    return (optax.apply_updates(params, updates), state), updates

  (params, state), updates = jax.jit(lambda c, g: jax.lax.scan(step, c, g))(
    (params, tx.init(params)), grads_seq
  )
  return params, state, updates


def assert_state_stable(
  tx: optax.GradientTransformation, params: Any, grads: Any, **extra: Any
) -> None:
  """The state after an update has the dtypes, shapes and structure of the initial one."""
  state = tx.init(params)
  _, new_state = jax.jit(functools.partial(tx.update, **extra))(grads, state, params)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert shapes_and_dtypes(new_state) == shapes_and_dtypes(state)


def assert_keeps_dtype(
  tx: optax.GradientTransformation, params: Any, grads: Any, **extra: Any
) -> None:
  """Updates keep the gradients' dtype and params keep theirs (bf16 stays bf16)."""
  state = tx.init(params)
  for _ in range(2):
    updates, state = jax.jit(functools.partial(tx.update, **extra))(grads, state, params)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
      assert u.dtype == g.dtype, (u.dtype, g.dtype)
    new_params = optax.apply_updates(params, updates)
    for p, q in zip(jax.tree.leaves(new_params), jax.tree.leaves(params), strict=True):
      assert p.dtype == q.dtype, (p.dtype, q.dtype)
    params = new_params


def assert_trees_close(actual: Any, desired: Any, rtol: float = 1e-6, atol: float = 0.0):
  """Leafwise ``np.testing.assert_allclose`` in float64, with the same structure."""
  assert jax.tree.structure(actual) == jax.tree.structure(desired)
  for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
    np.testing.assert_allclose(
      np.asarray(a, np.float64), np.asarray(d, np.float64), rtol=rtol, atol=atol
    )


# Gradient sequences with given global norms, for the norm-history clipping rules.


def np_norm(grads) -> float:
  return math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in grads.values()))


_rng = np.random.default_rng(0)


_DIRECTIONS = [{"w": _rng.normal(size=(3, 4)), "b": _rng.normal(size=5)} for _ in range(32)]


def make_seq(norms):
  """Gradients with the given global norms; "nan", "inf" and "-inf" put that value in one
  entry of an otherwise ordinary gradient."""
  seq = []
  for i, n in enumerate(norms):
    d = _DIRECTIONS[i % len(_DIRECTIONS)]
    scale = 1.0 if isinstance(n, str) else n / np_norm(d)
    g = {k: (v * scale).astype(np.float32) for k, v in d.items()}
    if isinstance(n, str):
      g["w"][1, 2] = float(n)
    seq.append(g)
  return seq
