"""Row-sparse lazy Adam on a 1,000,000 x 64 embedding table against dense optax.adam.

Each step touches a fixed number of distinct rows (0.1%, 1%, 10%, 50% of the table). Ours is
the step a user writes with a row-sparse gradient: ``od.lazy(optax.adam)`` on an
``od.sparse.RowSparse`` plus ``od.sparse.apply_updates``, which takes the row-sparse path up
to ``od.lazy``'s switch point (``dense_above``, 12.5% of the rows by default) and densifies the
gradient above it. The baseline is dense ``optax.adam`` on the equivalent dense gradient
(given, not computed in the step) plus ``optax.apply_updates``. Both are jitted with params
and state donated and timed alternately, so each of our steps starts with a cold cache, as
in a real training loop.

Around the switch point, each path is also timed forced (``dense_above=None``: row-sparse;
``dense_above=0.0``: densified), and the densified step is timed written by hand as one
jitted function (scatter-add into zeros, then Adam on the touched rows): the limit of the
densified path, whose dense gradient is a table-sized temporary that the baseline is given.
At 1% of the rows, the row-sparse step is timed written by hand with distinct indices (no sort,
no sum of duplicates): the floor of a row-sparse step, the gathers and scatters of three tables.

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
LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8
FRACTIONS = {"0.1%": 0.001, "1%": 0.01, "10%": 0.1, "50%": 0.5}
# The targets: at least 10x faster at 10,000 touched rows, and at least 0.95x dense speed
# where the gradient touches a large share of the table.
TARGETS = {"1%": 0.1, "10%": 1 / 0.95, "50%": 1 / 0.95}
FORCED = ("10%", 0.1), ("50%", 0.5)  # the rows of the forced paths


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


def _sparse_subject(lr: float, **kwargs) -> Subject:
  tx = od.lazy(optax.adam(lr), **kwargs)

  def step(carry, batch):
    params, state = carry
    updates, state = tx.update({"embedding": batch["sparse"]}, state, params)
    return od.sparse.apply_updates(params, updates), state

  args = "".join(f", {k}={v}" for k, v in kwargs.items())
  return Subject(f"od.lazy(adam{args}) + RowSparse", lambda p: (p, tx.init(p)), step)


def _hand_densified_subject(lr: float) -> Subject:
  """The densified step by hand, as one jitted function: the RowSparse scatter-added into
  zeros, the touched rows' mask scattered from the indices, then Adam on the touched rows
  (the state of the others kept, as od.lazy does) and the params updated in place."""

  def init(params):
    table = params["embedding"]
    return params, jnp.zeros_like(table), jnp.zeros_like(table), jnp.zeros([], jnp.int32)

  def step(carry, batch):
    params, mu, nu, count = carry
    sparse, table = batch["sparse"], params["embedding"]
    rows = table.shape[0]
    g = sparse.todense(rows)
    touched = jnp.zeros((rows,), bool).at[sparse.indices].set(True, mode="drop")[:, None]
    count = count + 1
    t = count.astype(jnp.float32)
    mu = jnp.where(touched, B1 * mu + (1 - B1) * g, mu)
    nu = jnp.where(touched, B2 * nu + (1 - B2) * g * g, nu)
    delta = lr * (mu / (1 - B1**t)) / (jnp.sqrt(nu / (1 - B2**t)) + EPS)
    return {"embedding": jnp.where(touched, table - delta, table)}, mu, nu, count

  return Subject("hand-written densified adam", init, step)


def _hand_row_sparse_subject(lr: float) -> Subject:
  """The row-sparse step by hand, as one jitted function, with what this batch allows and a
  RowSparse in general does not: its indices are distinct and in range, so no sort, no sum of
  duplicates, no padding. The rows of the params and moments gathered, Adam on them, the rows
  scattered back in place: the floor of any row-sparse step on this backend."""

  def init(params):
    table = params["embedding"]
    return params, jnp.zeros_like(table), jnp.zeros_like(table), jnp.zeros([], jnp.int32)

  def step(carry, batch):
    params, mu, nu, count = carry
    rows, g, table = batch["sparse"].indices, batch["sparse"].values, params["embedding"]
    count = count + 1
    t = count.astype(jnp.float32)
    m = B1 * mu[rows] + (1 - B1) * g
    v = B2 * nu[rows] + (1 - B2) * g * g
    p = table[rows] - lr * (m / (1 - B1**t)) / (jnp.sqrt(v / (1 - B2**t)) + EPS)
    put = lambda x, r: x.at[rows].set(r, unique_indices=True)  # noqa: E731
    return {"embedding": put(table, p)}, put(mu, m), put(nu, v), count

  return Subject("hand-written row-sparse adam, distinct rows", init, step)


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


def _case(name: str, ours: Subject, dense: Subject, fraction: float, target=None) -> Case:
  return Case(
    name,
    ours,
    dense,
    target=target,
    check=check_close(ours, dense, cycle=2, rtol=1e-6, atol=1e-7),
    batch=_batch(fraction),
    params=_params,
  )


def cases() -> list[Case]:
  ours, dense = _sparse_subject(LR), _dense_subject(LR)
  sparse_cases = [
    _case(f"lazy_rowsparse_{name}", ours, dense, fraction, TARGETS.get(name))
    for name, fraction in FRACTIONS.items()
  ]
  # The row-sparse step by hand at 1% of the rows (the floor of any row-sparse step).
  sparse_cases.append(
    _case("lazy_rowsparse_hand_1%", _hand_row_sparse_subject(LR), dense, FRACTIONS["1%"])
  )
  # The switch point: each path forced, and the densified step by hand (its limit).
  forced = {"sparse": _sparse_subject(LR, dense_above=None)}
  forced["dense"] = _sparse_subject(LR, dense_above=0.0)
  forced["hand"] = _hand_densified_subject(LR)
  sparse_cases += [
    _case(f"lazy_rowsparse_{path}_{name}", subject, dense, fraction)
    for name, fraction in FORCED
    for path, subject in forced.items()
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
