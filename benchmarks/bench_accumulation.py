"""Accumulation: od.accumulate against optax.MultiSteps, per micro step over whole cycles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxderived as od
from benchmarks.harness import Case
from benchmarks.harness import all_checks
from benchmarks.harness import check_close
from benchmarks.harness import tx_subject


def _check_first_window(k, lr):
  """Holds the params for ``k - 1`` micro steps, then takes Adam's first step on the mean.

  With the same gradient ``g`` on every micro step the window mean is ``g``, and Adam's first
  (bias-corrected) step is ``-lr * g / (|g| + eps)`` (NumPy float64 reference).
  """

  def check(params, grads):
    tx = od.accumulate(optax.adam(lr), k)
    update = jax.jit(tx.update)
    current, state = jax.tree.map(jnp.copy, params), tx.init(params)
    for micro in range(k):
      updates, state = update(grads, state, current)
      current = optax.apply_updates(current, updates)
      if micro < k - 1:
        for u in jax.tree.leaves(updates):
          assert not np.any(np.asarray(u)), "a holding micro step moved the params"
    for p, q, g in zip(*map(jax.tree.leaves, (current, params, grads)), strict=True):
      g = np.asarray(g, np.float64)
      expected = np.asarray(q, np.float64) - lr * g / (np.abs(g) + 1e-8)
      np.testing.assert_allclose(p, expected, rtol=1e-5, atol=1e-6)

  return check


def cases() -> list[Case]:
  ours = tx_subject("od.accumulate(optax.adam(1e-3), 4)", od.accumulate(optax.adam(1e-3), 4))
  multi = tx_subject(
    "optax.MultiSteps(optax.adam(1e-3), 4)", optax.MultiSteps(optax.adam(1e-3), 4)
  )
  heavy = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=1e-2))
  ours_heavy = tx_subject("od.accumulate(clip + adamw, 8)", od.accumulate(heavy, 8))
  multi_heavy = tx_subject("optax.MultiSteps(clip + adamw, 8)", optax.MultiSteps(heavy, 8))
  options = dict(skip_if=lambda g, p: optax.tree.norm(g) > 1e6, mean_extra_args=("value",))
  ours_options = tx_subject(
    "od.accumulate(adam, 4, skip_if=..., mean_extra_args=('value',))",
    od.accumulate(optax.adam(1e-3), 4, **options),
    value=jnp.float32(1.0),
  )
  plain = tx_subject("od.accumulate(optax.adam(1e-3), 4)", od.accumulate(optax.adam(1e-3), 4))
  return [
    Case(
      "accumulate_options_k4",
      ours_options,
      plain,
      cycle=4,
      target=1.05,
      check=check_close(ours_options, plain, cycle=8),
    ),
    Case(
      "accumulate_adam_k4",
      ours,
      multi,
      cycle=4,
      target=0.8,
      check=all_checks(_check_first_window(4, 1e-3), check_close(ours, multi, cycle=8)),
    ),
    Case(
      "accumulate_clip_adamw_k8",
      ours_heavy,
      multi_heavy,
      cycle=8,
      check=check_close(ours_heavy, multi_heavy, cycle=16),
    ),
  ]
