"""Baselines: optax's own steps against the floor of a kernel moving the same bytes."""

import jax
import numpy as np
import optax

from benchmarks.harness import Case
from benchmarks.harness import floor_subject
from benchmarks.harness import tx_subject


def _check_sgd(params, grads):
  """optax.sgd's step is ``p - lr * g`` (NumPy float64 reference)."""
  tx = optax.sgd(0.1)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(u, -0.1 * np.asarray(g, np.float64), rtol=1e-6)


def _check_adam(params, grads):
  """optax.adam's first step is ``-lr * g / (|g| + eps)`` (bias-corrected moments)."""
  tx = optax.adam(1e-3)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
    g = np.asarray(g, np.float64)
    np.testing.assert_allclose(u, -1e-3 * g / (np.abs(g) + 1e-8), rtol=1e-5, atol=1e-9)


def cases() -> list[Case]:
  return [
    Case(
      "sgd",
      tx_subject("optax.sgd(0.1)", optax.sgd(0.1)),
      floor_subject(0),
      check=_check_sgd,
    ),
    Case(
      "adam",
      tx_subject("optax.adam(1e-3)", optax.adam(1e-3)),
      floor_subject(2),
      check=_check_adam,
    ),
  ]
