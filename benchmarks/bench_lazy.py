"""Row-sparse lazy Adam on a 1,000,000 x 64 embedding table against dense optax.adam.

Each step touches a fixed number of distinct rows (0.1%, 1%, 10% of the table). Ours is the
step a user writes with a row-sparse gradient: ``od.lazy(optax.adam)`` on an
``od.sparse.RowSparse`` plus ``od.sparse.apply_updates``. The baseline is dense
``optax.adam`` on the equivalent dense gradient plus ``optax.apply_updates``. Both are
jitted with params and state donated and timed alternately, so each of our steps starts
with a cold cache, as in a real training loop.

The check is independent of our code: with the same rows touched at every step, the
untouched rows of dense Adam keep zero moments and get zero updates, so two steps of ours
must give the params of two steps of dense ``optax.adam``.

Two more cases (no target) time the row-masked path on dense gradients, both semantics,
against ``optax.adam`` on the standard 4M-parameter tree with half the rows untouched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import optaxderived as od
from benchmarks.harness import Case
from benchmarks.harness import Subject
from benchmarks.harness import check_close
from benchmarks.harness import random_like
from benchmarks.harness import tx_subject

ROWS, DIM = 1_000_000, 64
FRACTIONS = {"0.1%": 0.001, "1%": 0.01, "10%": 0.1}
TARGETS = {"1%": 0.1}  # the target: at least 10x faster at 10,000 touched rows


def _params(scale: float) -> dict[str, jax.Array]:
  rows = max(1, round(ROWS * scale))
  return {"embedding": jax.random.normal(jax.random.key(0), (rows, DIM), jnp.float32)}


def _batch(fraction: float):
  def batch(params, key):
    rows = params["embedding"].shape[0]
    touched = max(1, round(rows * fraction))
    k_idx, k_val = jax.random.split(key)
    indices = jax.random.choice(k_idx, rows, (touched,), replace=False).astype(jnp.int32)
    values = jax.random.normal(k_val, (touched, DIM), jnp.float32)
    sparse = od.sparse.RowSparse(indices, values)
    return {"sparse": sparse, "dense": sparse.todense(rows)}

  return batch


def _sparse_subject(lr: float) -> Subject:
  tx = od.lazy(optax.adam(lr))

  def step(carry, batch):
    params, state = carry
    updates, state = tx.update({"embedding": batch["sparse"]}, state, params)
    return od.sparse.apply_updates(params, updates), state

  return Subject("od.lazy(adam) + RowSparse", lambda p: (p, tx.init(p)), step)


def _dense_subject(lr: float) -> Subject:
  tx = optax.adam(lr)

  def step(carry, batch):
    params, state = carry
    updates, state = tx.update({"embedding": batch["dense"]}, state, params)
    return optax.apply_updates(params, updates), state

  return Subject("optax.adam (dense grad)", lambda p: (p, tx.init(p)), step)


def _half_zero_rows(params, key):
  """A dense gradient of random normals where half the rows of each matrix are zero."""
  grads = random_like(params, key)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(grads))
  return {
    name: g * (jax.random.uniform(k, (g.shape[0], 1)) < 0.5) if g.ndim == 2 else g
    for (name, g), k in zip(sorted(grads.items()), keys, strict=True)
  }


def cases() -> list[Case]:
  ours, dense = _sparse_subject(1e-3), _dense_subject(1e-3)
  sparse_cases = [
    Case(
      f"lazy_rowsparse_{name}",
      ours,
      dense,
      target=TARGETS.get(name),
      check=check_close(ours, dense, cycle=2, rtol=1e-6, atol=1e-7),
      batch=_batch(fraction),
      params=_params,
    )
    for name, fraction in FRACTIONS.items()
  ]
  # The row-masked path on dense gradients (about 4M params, half the rows untouched): its
  # overhead over optax.adam. With the same rows untouched at every step, dense Adam leaves
  # them in place too, so both compute the same params (the check).
  adam = tx_subject("optax.adam(1e-3)", optax.adam(1e-3))
  masked_cases = []
  for name, freeze in (("mask", False), ("freeze", True)):
    tx = od.lazy(optax.adam(1e-3), freeze_state=freeze)
    lazy = tx_subject(f"od.lazy(adam, freeze_state={freeze})", tx)
    check = check_close(lazy, adam, cycle=2, rtol=1e-6, atol=1e-7)
    masked_cases.append(
      Case(f"lazy_dense_{name}", lazy, adam, check=check, batch=_half_zero_rows)
    )
  return sparse_cases + masked_cases
