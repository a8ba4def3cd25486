"""Clipping: `chain(od.clip_norm(1.0, ...), adam)` against `chain(clip_by_global_norm, adam)`.

The target (ratio <= 1.05) is for the global scope, hard and soft; the leaf and row
scopes are recorded against the same optax step, which clips by the global norm only.
"""

import jax
import numpy as np
import optax

import optaxderived as od
from benchmarks.harness import Case
from benchmarks.harness import all_checks
from benchmarks.harness import check_close
from benchmarks.harness import tx_subject


def np_clip(leaves: list[np.ndarray], gamma: float, soft: bool, scope: str) -> list[np.ndarray]:
  """The clipped leaves in float64, from the formulas (vectorised over rows)."""
  leaves = [np.asarray(x, np.float64) for x in leaves]

  def factor(norm):
    return gamma / (norm + gamma) if soft else np.minimum(1.0, gamma / np.maximum(norm, 1e-300))

  if scope == "global":
    f = factor(np.sqrt(sum(np.sum(x**2) for x in leaves)))
    return [x * f for x in leaves]
  out = []
  for x in leaves:
    if scope == "row" and x.ndim >= 2:
      norms = np.sqrt(np.sum(x.reshape(x.shape[0], -1) ** 2, axis=1))
      out.append(x * factor(norms).reshape((-1,) + (1,) * (x.ndim - 1)))
    else:
      out.append(x * factor(np.sqrt(np.sum(x**2))))
  return out


def _check_clip(soft: bool, scope: str):
  """The clip alone (on the benchmark's gradients) against the NumPy reference."""

  def check(params, grads):
    tx = od.clip_norm(1.0, soft=soft, scope=scope)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params))
    expected = np_clip(jax.tree.leaves(grads), 1.0, soft, scope)
    for u, e in zip(jax.tree.leaves(updates), expected, strict=True):
      np.testing.assert_allclose(np.asarray(u, np.float64), e, rtol=2e-5, atol=1e-12)

  return check


BASELINE = "chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))"


def _baseline():
  return tx_subject(BASELINE, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)))


def _ours(soft: bool, scope: str):
  args = ", ".join(["1.0"] + (["soft=True"] if soft else []) + [f'scope="{scope}"'])
  return tx_subject(
    f"chain(od.clip_norm({args}), optax.adam(1e-3))",
    optax.chain(od.clip_norm(1.0, soft=soft, scope=scope), optax.adam(1e-3)),
  )


def cases() -> list[Case]:
  hard_global = _ours(False, "global")
  return [
    Case(
      "clip_norm_global",
      hard_global,
      _baseline(),
      target=1.05,
      check=all_checks(_check_clip(False, "global"), check_close(hard_global, _baseline())),
    ),
    Case(
      "clip_norm_global_soft",
      _ours(True, "global"),
      _baseline(),
      target=1.05,
      check=_check_clip(True, "global"),
    ),
    Case("clip_norm_leaf", _ours(False, "leaf"), _baseline(), check=_check_clip(False, "leaf")),
    Case("clip_norm_row", _ours(False, "row"), _baseline(), check=_check_clip(False, "row")),
    Case("clip_norm_row_soft", _ours(True, "row"), _baseline(), check=_check_clip(True, "row")),
  ]
