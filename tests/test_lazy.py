"""od.lazy, od.sparse.RowSparse, od.sparse.apply_updates, od.sparse.row_sparse_grad.

References: NumPy float64 Adam / LazyAdam loops written from the formulas, a worked example
computed by hand, optax's own optimizers (touched rows and all-rows-touched
equal the plain inner optimizer), and jax.grad of a dense lookup for row_sparse_grad.
"""

from __future__ import annotations

import functools

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_keeps_dtype
from helpers import assert_state_stable
from helpers import assert_trees_close
from helpers import run_scan
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optaxderived as od
from optaxderived._transforms import lazy_elementwise

# ---------------------------------------------------------------------------------------------
# Data and NumPy references


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "embed": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
    },
  }


def make_grads(steps=5, seed=1):
  """Dense gradients with whole rows of zeros (embed, kernel) and all-zero bias steps."""
  rng = np.random.default_rng(seed)
  seq = []
  for t in range(steps):
    embed = rng.normal(size=(6, 3)) * (rng.random((6, 1)) < 0.5)
    embed[t % 6] = rng.normal(size=3)  # at least one touched row
    kernel = rng.normal(size=(3, 2)) * (rng.random((3, 1)) < 0.6)
    bias = rng.normal(size=2) * (t % 2)
    seq.append({"embed": embed, "dense": {"kernel": kernel, "bias": bias}})
  return seq


def stack(seq):
  return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs), jnp.float32), *seq)


def stack_sparse(seq):
  """Stacks RowSparse gradients of equal sizes (indices stay int32)."""
  return jax.tree.map(
    lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]).astype(
      jnp.int32 if jnp.issubdtype(jnp.asarray(xs[0]).dtype, jnp.integer) else jnp.float32
    ),
    *seq,
  )


def np_row_mask(g):
  g = np.asarray(g)
  if g.ndim <= 1:
    return np.asarray(np.any(g != 0))
  return np.any(g != 0, axis=tuple(range(1, g.ndim))).reshape((-1,) + (1,) * (g.ndim - 1))


def np_lazy_adam(params, grads_seq, *, lr, b1=0.9, b2=0.999, eps=1e-8, freeze, lazy_leaves):
  """Float64 Adam where leaves in ``lazy_leaves`` only move at touched rows; with
  ``freeze`` their untouched rows also keep m and v (LazyAdam), else m, v decay."""
  flat, treedef = jax.tree.flatten(params)
  paths = jax.tree.leaves(od.tree_paths(params))
  p = [np.asarray(x, np.float64) for x in flat]
  m = [np.zeros_like(x) for x in p]
  v = [np.zeros_like(x) for x in p]
  for t, grads in enumerate(grads_seq, start=1):
    for i, g in enumerate(jax.tree.leaves(grads)):
      g = np.asarray(g, np.float64)
      m_new = b1 * m[i] + (1 - b1) * g
      v_new = b2 * v[i] + (1 - b2) * g * g
      u = -lr * (m_new / (1 - b1**t)) / (np.sqrt(v_new / (1 - b2**t)) + eps)
      if paths[i] in lazy_leaves:
        r = np_row_mask(g)
        u = np.where(r, u, 0.0)
        if freeze:
          m_new, v_new = np.where(r, m_new, m[i]), np.where(r, v_new, v[i])
      m[i], v[i] = m_new, v_new
      p[i] = p[i] + u
  return treedef.unflatten(p), treedef.unflatten(m), treedef.unflatten(v)


def to_row_sparse(dense, rng, *, pad=0, split=True, size=16):
  """An equivalent RowSparse: the touched rows in random order, some split in two
  duplicates that sum to the row, ``pad`` padding entries with junk values, and more
  padding up to ``size`` entries (static shapes: one compilation)."""
  dense = np.asarray(dense, np.float64)
  rows = np.flatnonzero(np.any(dense.reshape(len(dense), -1) != 0, axis=1))
  indices, values = [], []
  for r in rng.permutation(rows):
    if split and rng.random() < 0.5:
      part = rng.normal(size=dense.shape[1:])
      indices += [r, r]
      values += [part, dense[r] - part]
    else:
      indices.append(r)
      values.append(dense[r])
  junk = [-1, len(dense), len(dense) + 3, -len(dense) - 1]
  for j in range(max(pad, size - len(indices))):
    indices.append(junk[j % 4])
    values.append(rng.normal(size=dense.shape[1:]) if j < pad else np.zeros(dense.shape[1:]))
  return od.sparse.RowSparse(
    jnp.asarray(indices, jnp.int32), jnp.asarray(np.stack(values), jnp.float32)
  )


# The two paths of a RowSparse leaf: row-sparse, and densified (the switch point at 0).
PATHS = pytest.mark.parametrize("dense_above", [None, 0.0], ids=["rows", "densified"])


def dense_of(u, num_rows):
  """A table's update as a dense array: a RowSparse (the row-sparse path) scattered, a dense
  array (the densified path) as it is."""
  if isinstance(u, od.sparse.RowSparse):
    return u.todense(num_rows)
  assert jnp.shape(u)[0] == num_rows
  return jnp.asarray(u)


def run_steps(tx, params, grads_seq, state=None):
  """update + od.sparse.apply_updates, jitted once: params, state, updates of each step."""
  step = jax.jit(
    lambda p, s, g: (lambda u, s: (od.sparse.apply_updates(p, u), s, u))(*tx.update(g, s, p))
  )
  state, all_updates = tx.init(params) if state is None else state, []
  for grads in grads_seq:
    params, state, updates = step(params, state, grads)
    all_updates.append(updates)
  return params, state, all_updates


ELEMENTWISE = {
  "sgd": lambda: optax.sgd(0.1),
  "nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
  "rmsprop": lambda: optax.rmsprop(0.01, momentum=0.5),
  "adam": lambda: optax.adam(0.1),
  "adamw": lambda: optax.adamw(0.1, weight_decay=0.1),
  "lion": lambda: optax.lion(0.01),
  "chain": lambda: optax.chain(
    optax.scale_by_adam(eps=1e-6), optax.add_decayed_weights(0.01), optax.scale(-0.1)
  ),
  "injected": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=0.1),
}

# ---------------------------------------------------------------------------------------------
# Dense row masks


def test_worked_example():
  """Adam lr 0.1 (eps 1e-6), a 3x2 table of ones, two steps computed by hand."""
  tx = od.lazy(optax.adam(0.1, eps=1e-6))
  params = {"embed": jnp.ones((3, 2))}
  state = tx.init(params)
  g1 = jnp.array([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
  g2 = jnp.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
  update = jax.jit(tx.update)
  updates, state = update({"embed": g1}, state, params)
  params = optax.apply_updates(params, updates)
  # float32 optax against the hand-computed float64 figures: within a few float32 ulps.
  np.testing.assert_allclose(
    params["embed"], [[0.9000001, 1.0], [0.9000002, 0.9000002], [1.0, 1.0]], atol=1e-6
  )
  updates, state = update({"embed": g2}, state, params)
  params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(
    params["embed"], [[0.8000002, 1.0], [0.9000002, 0.9000002], [1.0, 1.0]], atol=2e-6
  )
  # Row 1 is frozen although its first moment decayed from 0.05 to 0.045, not to zero.
  np.testing.assert_allclose(optax.tree.get(state, "mu")["embed"][1], [0.045, 0.045], rtol=1e-6)
  assert int(state.touched_rows) == 1


@pytest.mark.parametrize("freeze_state", [False, True])
@pytest.mark.parametrize("include", [None, "embed", ["embed", "kernel$"]])
def test_matches_numpy_adam_and_lazy_adam(freeze_state, include):
  params, grads_seq = make_params(), make_grads()
  lazy_leaves = {
    None: {"embed", "dense/kernel", "dense/bias"},
    "embed": {"embed"},
    ("embed", "kernel$"): {"embed", "dense/kernel"},
  }[include if not isinstance(include, list) else tuple(include)]
  tx = od.lazy(optax.adam(0.05), include=include, freeze_state=freeze_state)
  final, state, _ = run_scan(tx, params, stack(grads_seq))
  ref_p, ref_m, ref_v = np_lazy_adam(
    params, grads_seq, lr=0.05, freeze=freeze_state, lazy_leaves=lazy_leaves
  )
  assert_trees_close(final, ref_p, rtol=1e-5, atol=1e-6)
  assert_trees_close(optax.tree.get(state, "mu"), ref_m, rtol=1e-5, atol=1e-7)
  assert_trees_close(optax.tree.get(state, "nu"), ref_v, rtol=1e-5, atol=1e-9)


def test_the_two_semantics_differ_where_they_should():
  """A row touched at step 1 only: Su semantics decays its moments at step 2, LazyAdam
  keeps them; neither moves the row at step 2."""
  params = {"embed": jnp.zeros((2, 1))}
  grads = stack([{"embed": np.array([[1.0], [1.0]])}, {"embed": np.array([[1.0], [0.0]])}])
  out = {
    f: run_scan(od.lazy(optax.adam(0.1), freeze_state=f), params, grads) for f in (False, True)
  }
  mu = [optax.tree.get(out[f][1], "mu")["embed"][1, 0] for f in (False, True)]
  nu = [optax.tree.get(out[f][1], "nu")["embed"][1, 0] for f in (False, True)]
  np.testing.assert_allclose(mu, [0.9 * 0.1, 0.1], rtol=1e-6)
  np.testing.assert_allclose(nu, [0.999 * 0.001, 0.001], rtol=1e-6)
  for f in (False, True):
    np.testing.assert_array_equal(out[f][2]["embed"][1, 1], 0.0)


@pytest.mark.parametrize("name", ["adam", "nesterov", "adamw"])
def test_touched_rows_equal_the_plain_inner_optimizer(name):
  """freeze_state=False: the inner state is the plain optimizer's, and the update is the
  plain update on touched rows and zero elsewhere, at every step."""
  params, grads_seq = make_params(), make_grads()
  inner = ELEMENTWISE[name]()
  tx = od.lazy(inner)
  state, plain_state = tx.init(params), inner.init(params)
  update, plain_update = jax.jit(tx.update), jax.jit(inner.update)
  for grads in grads_seq:
    grads = jax.tree.map(jnp.asarray, grads)
    updates, state = update(grads, state, params)
    plain, plain_state = plain_update(grads, plain_state, params)
    expected = jax.tree.map(lambda u, g: np.where(np_row_mask(g), u, 0.0), plain, grads)
    assert_trees_close(updates, expected, rtol=0)
    assert_trees_close(state.inner_state, plain_state, rtol=0)
    params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("freeze_state", [False, True])
def test_all_rows_touched_equals_the_inner_optimizer(freeze_state):
  params = make_params()
  rng = np.random.default_rng(3)
  grads_seq = [jax.tree.map(lambda p: rng.normal(size=p.shape), params) for _ in range(4)]
  p1, s1, _ = run_scan(
    od.lazy(optax.adam(0.1), freeze_state=freeze_state), params, stack(grads_seq)
  )
  p2, s2, _ = run_scan(optax.adam(0.1), params, stack(grads_seq))
  assert_trees_close(p1, p2, rtol=1e-6)  # the same ops, fused differently
  assert_trees_close(s1.inner_state, s2, rtol=1e-6)
  assert int(s1.touched_rows) == 6 + 3 + 1


def test_what_counts_as_touched():
  """Any non-zero entry (the smallest normal float, inf, NaN) touches its row; -0.0 does
  not (nor does a subnormal on CPU, which XLA flushes to zero, as it does for g != 0)."""
  tiny = np.finfo(np.float32).tiny
  g = jnp.array([[0.0, -0.0], [0.0, tiny], [np.inf, 0.0], [0.0, np.nan], [0.0, 0.0]])
  tx = od.lazy(optax.sgd(1.0, momentum=0.5))
  params = {"embed": jnp.zeros((5, 2)), "v": jnp.zeros(2)}
  grads = {"embed": g, "v": jnp.array([0.0, -0.0])}
  state = tx.init(params)
  state = state._replace(inner_state=jax.tree.map(jnp.ones_like, state.inner_state))
  updates, state = jax.jit(tx.update)(grads, state, params)
  moved = np.any(np.asarray(updates["embed"]) != 0, axis=1)
  np.testing.assert_array_equal(moved, [False, True, True, True, False])
  np.testing.assert_array_equal(updates["v"], 0.0)  # a 1-D leaf is one row
  assert int(state.touched_rows) == 3


def test_untouched_rows_and_leaves_stay_put_under_scan():
  params = make_params()
  grads_seq = make_grads()
  for t in range(len(grads_seq)):
    grads_seq[t]["embed"][5] = 0.0  # row 5 never touched
    grads_seq[t]["dense"]["bias"] = np.zeros(2)  # bias never touched
  final, state, updates = run_scan(od.lazy(optax.adam(0.1)), params, stack(grads_seq))
  np.testing.assert_array_equal(final["embed"][5], params["embed"][5])
  np.testing.assert_array_equal(final["dense"]["bias"], params["dense"]["bias"])
  assert updates["embed"].shape == (5, 6, 3)


# ---------------------------------------------------------------------------------------------
# Row-sparse gradients


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sparse_and_dense(tx_sparse, tx_dense, params, sparse_seq, dense_seq):
  """Both paths under lax.scan, in one compilation."""

  def run(tx, seq):
    def step(carry, grads):
      p, s = carry
      u, s = tx.update(grads, s, p)
      return (od.sparse.apply_updates(p, u), s), u

    return jax.lax.scan(step, (params, tx.init(params)), seq)

  return run(tx_sparse, sparse_seq), run(tx_dense, dense_seq)


@PATHS
@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_row_sparse_equals_dense_lazy_with_frozen_state(name, dense_above):
  """A RowSparse gradient (shuffled, duplicates, padding) gives what the dense
  freeze_state=True path gives on the equivalent dense gradient, params and state, on the
  row-sparse path and on the densified one."""
  params, grads_seq = make_params(), make_grads()
  rng = np.random.default_rng(4)
  sparse_seq = [
    {**g, "embed": to_row_sparse(g["embed"], rng, pad=t % 3)} for t, g in enumerate(grads_seq)
  ]
  tx_sparse = od.lazy(ELEMENTWISE[name](), include="embed", dense_above=dense_above)
  tx_dense = od.lazy(ELEMENTWISE[name](), include="embed", freeze_state=True)
  ((p1, s1), u1), ((p2, s2), u2) = _sparse_and_dense(
    tx_sparse, tx_dense, params, stack_sparse(sparse_seq), stack(grads_seq)
  )
  assert_trees_close(p1, p2, rtol=2e-5, atol=2e-6)
  assert_trees_close(s1.inner_state, s2.inner_state, rtol=2e-5, atol=2e-6)
  assert isinstance(u1["embed"], od.sparse.RowSparse) == (dense_above is None)
  for t in range(len(grads_seq)):
    u_t = jax.tree.map(lambda x, t=t: x[t], u1["embed"])
    np.testing.assert_allclose(dense_of(u_t, 6), u2["embed"][t], rtol=2e-5, atol=2e-6)
  assert_trees_close(u1["dense"], u2["dense"], rtol=2e-5, atol=2e-6)
  np.testing.assert_array_equal(s1.touched_rows, s2.touched_rows)


def test_row_sparse_leaf_is_frozen_while_dense_leaves_follow_freeze_state():
  """With freeze_state=False the dense leaves decay their moments; the RowSparse leaf
  still touches only its rows."""
  params, grads_seq = make_params(), make_grads()
  rng = np.random.default_rng(5)
  sparse_seq = [{**g, "embed": to_row_sparse(g["embed"], rng)} for g in grads_seq]
  p1, s1, _ = run_steps(od.lazy(optax.adam(0.05)), params, sparse_seq)
  ref_frozen = np_lazy_adam(params, grads_seq, lr=0.05, freeze=True, lazy_leaves={"embed"})
  ref_su = np_lazy_adam(
    params,
    grads_seq,
    lr=0.05,
    freeze=False,
    lazy_leaves={"embed", "dense/kernel", "dense/bias"},
  )
  np.testing.assert_allclose(p1["embed"], ref_frozen[0]["embed"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    optax.tree.get(s1, "mu")["embed"], ref_frozen[1]["embed"], rtol=1e-5, atol=1e-7
  )
  assert_trees_close(p1["dense"], ref_su[0]["dense"], rtol=1e-5, atol=1e-6)
  assert_trees_close(
    optax.tree.get(s1, "nu")["dense"], ref_su[2]["dense"], rtol=1e-5, atol=1e-9
  )


@PATHS
def test_row_sparse_under_jit_and_scan_with_optax_apply_updates(dense_above):
  """Static shapes: a stacked RowSparse (fixed count, padded) goes through lax.scan, and
  optax.apply_updates scatters it (RowSparse.__radd__) or adds the densified update."""
  params, grads_seq = make_params(), make_grads()
  rng = np.random.default_rng(6)
  sparse_seq = []
  for g in grads_seq:
    sparse_seq.append({**g, "embed": to_row_sparse(g["embed"], rng, split=False, size=8)})
  final, state, updates = run_scan(
    od.lazy(optax.adam(0.05), include="embed", dense_above=dense_above),
    params,
    stack_sparse(sparse_seq),
  )
  ref = np_lazy_adam(params, grads_seq, lr=0.05, freeze=True, lazy_leaves={"embed"})
  assert_trees_close(final, ref[0], rtol=1e-5, atol=1e-6)
  if dense_above is None:
    assert updates["embed"].indices.shape == (5, 8)
  else:
    assert updates["embed"].shape == (5, 6, 3)


@PATHS
def test_padding_has_no_effect(dense_above):
  params, grads_seq = make_params(), make_grads(2)
  tx = od.lazy(optax.adam(0.1), dense_above=dense_above)
  rng = np.random.default_rng(7)
  plain = [{**g, "embed": to_row_sparse(g["embed"], rng, split=False)} for g in grads_seq]
  padded = []
  for g in plain:
    s = g["embed"]
    junk = jnp.asarray([-1, 6, 100, -7], jnp.int32)
    padded.append(
      {
        **g,
        "embed": od.sparse.RowSparse(
          jnp.concatenate([junk[:2], s.indices, junk[2:]]),
          jnp.concatenate([jnp.full((2, 3), 7.0), s.values, jnp.full((2, 3), -3.0)]),
        ),
      }
    )
  p1, s1, _ = run_steps(tx, params, plain)
  p2, s2, _ = run_steps(tx, params, padded)
  assert_trees_close(p1, p2, rtol=0)
  assert_trees_close(s1, s2, rtol=0)
  # Padding only: nothing moves but Adam's count.
  only = {
    **jax.tree.map(jnp.zeros_like, params),
    "embed": od.sparse.RowSparse(junk, jnp.ones((4, 3))),
  }
  p3, s3, u3 = run_steps(tx, p2, [only], state=s2)
  np.testing.assert_array_equal(p3["embed"], p2["embed"])
  np.testing.assert_array_equal(
    optax.tree.get(s3, "mu")["embed"], optax.tree.get(s2, "mu")["embed"]
  )
  np.testing.assert_array_equal(dense_of(u3[0]["embed"], 6), 0.0)
  assert int(optax.tree.get(s3, "count")) == int(optax.tree.get(s2, "count")) + 1


@PATHS
def test_duplicates_are_summed(dense_above):
  params = {"embed": jnp.zeros((4, 2))}
  tx = od.lazy(optax.sgd(1.0, momentum=0.5), dense_above=dense_above)
  dup = od.sparse.RowSparse(
    jnp.array([2, 0, 2, 2]), jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [-1.0, 0.5]])
  )
  one = od.sparse.RowSparse(jnp.array([0, 2]), jnp.array([[3.0, 4.0], [5.0, 8.5]]))
  p1, s1, _ = run_steps(tx, params, [{"embed": dup}] * 2)
  p2, s2, _ = run_steps(tx, params, [{"embed": one}] * 2)
  assert_trees_close(p1, p2, rtol=1e-6)
  assert_trees_close(s1, s2, rtol=1e-6)
  np.testing.assert_allclose(p1["embed"], -2.5 * np.array([[3, 4], [0, 0], [5, 8.5], [0, 0]]))


@PATHS
def test_a_row_given_with_zero_values_counts_as_touched(dense_above):
  """Explicit indices are the truth (a zero gradient is not an unused row): the row moves
  on its momentum, where the dense mask would have frozen it (the densified path masks
  the rows of the indices, not the non-zero rows)."""
  params = {"embed": jnp.zeros((3, 2))}
  tx = od.lazy(optax.sgd(1.0, momentum=0.5), dense_above=dense_above)
  first = od.sparse.RowSparse(jnp.array([1]), jnp.array([[1.0, 1.0]]))
  zero = od.sparse.RowSparse(jnp.array([1]), jnp.array([[0.0, 0.0]]))
  p, s, _ = run_steps(tx, params, [{"embed": first}, {"embed": zero}])
  np.testing.assert_allclose(p["embed"][1], [-1.5, -1.5])
  assert int(s.touched_rows) == 1


# ---------------------------------------------------------------------------------------------
# The switch point: a RowSparse over a large share of its table is densified


def _switch_problem(sizes, rows=20, steps=4, seed=0):
  """Params with two tables of ``rows`` rows and a per-item bias, and ``steps`` gradients:
  RowSparse leaves of ``sizes[name]`` indices (duplicates and padding) and a dense leaf."""
  rng = np.random.default_rng(seed)
  params = {
    "a": jnp.asarray(rng.normal(size=(rows, 3)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(rows, 2)), jnp.float32),
    "bias": jnp.asarray(rng.normal(size=(rows,)), jnp.float32),
    "w": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
  }
  seq = []
  for _ in range(steps):
    grads = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
    for name in ("a", "b", "bias"):
      n = sizes[name]
      idx = rng.integers(0, rows, size=n)
      idx[1::3] = idx[::3][: len(idx[1::3])]  # duplicates
      idx[2::5] = rng.choice([-1, rows, rows + 7], size=len(idx[2::5]))  # padding
      vals = rng.normal(size=(n, *params[name].shape[1:]))
      grads[name] = od.sparse.RowSparse(
        jnp.asarray(idx, jnp.int32), jnp.asarray(vals, jnp.float32)
      )
    seq.append(grads)
  return params, seq


@functools.partial(jax.jit, static_argnums=0)
def _scan_steps(tx, params, seq):
  """update + od.sparse.apply_updates under lax.scan: final params, state, stacked updates."""

  def step(carry, grads):
    p, s = carry
    u, s = tx.update(grads, s, p)
    return (od.sparse.apply_updates(p, u), s), u

  (p, s), u = jax.lax.scan(step, (params, tx.init(params)), seq)
  return p, s, u


@pytest.mark.parametrize("inner", ["adam", "nesterov", "lion"])
def test_the_switched_path_equals_the_row_sparse_path_and_dense_lazy(inner):
  """With the default switch point (0.125), table "a" (2 indices in 20 rows: 0.1) stays
  row-sparse, "b" (3: 0.15) and the bias (30, more than its rows) are densified; over
  several steps under jit + lax.scan, params, state, touched counts and updates equal those
  of the row-sparse path (dense_above=None), of the densified path (dense_above=0.0) and of
  the dense row-masked path with frozen state on the equivalent dense gradients."""
  params, seq = _switch_problem({"a": 2, "b": 3, "bias": 30})
  seq = stack_sparse(seq)
  make = ELEMENTWISE[inner]
  results = {
    name: _scan_steps(od.lazy(make(), **kwargs), params, seq)
    for name, kwargs in {
      "default": {},
      "rows": dict(dense_above=None),
      "densified": dict(dense_above=0.0),
    }.items()
  }
  dense_seq = {
    **seq,
    **{
      k: jax.vmap(lambda g, k=k: g.todense(params[k].shape[0]))(seq[k])
      for k in ("a", "b", "bias")
    },
  }
  frozen = od.lazy(make(), freeze_state=True)
  dense_p, dense_s, dense_u = _scan_steps(frozen, params, dense_seq)
  # Which path each leaf took: a RowSparse update is the row-sparse path.
  kinds = {k: isinstance(u, od.sparse.RowSparse) for k, u in results["default"][2].items()}
  assert kinds == {"a": True, "b": False, "bias": False, "w": False}
  for name, (p, s, u) in results.items():
    assert_trees_close(p, results["rows"][0], rtol=2e-6, atol=2e-7)
    assert_trees_close(s, results["rows"][1], rtol=2e-6, atol=2e-7)
    np.testing.assert_array_equal(s.touched_rows, results["rows"][1].touched_rows)
    for k in ("a", "b", "bias"):
      num_rows = params[k].shape[0]
      for t in range(4):
        u_t = dense_of(jax.tree.map(lambda x, t=t: x[t], u[k]), num_rows)
        ref_t = jax.tree.map(lambda x, t=t: x[t], results["rows"][2][k])
        np.testing.assert_allclose(u_t, dense_of(ref_t, num_rows), rtol=2e-6, atol=2e-7)
        if k != "bias":  # the dense path masks a 1-D leaf as a whole
          np.testing.assert_allclose(u_t, dense_u[k][t], rtol=2e-6, atol=2e-7, err_msg=name)
  # Against the dense path, the tables only (it masks a 1-D leaf as a whole).
  tables = lambda tree: {k: tree[k] for k in ("a", "b")}
  assert_trees_close(tables(results["default"][0]), tables(dense_p), rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize(
  "n, rows, dense_above, densified",
  [
    (2, 20, 0.1, False),  # 0.1 of the rows: not above
    (3, 20, 0.1, True),
    (0, 20, 0.0, False),  # no index: nothing to densify
    (1, 20, 0.0, True),  # 0: every RowSparse with an index
    (40, 20, 1.0, False),  # 1: never, even with more indices than rows
    (40, 20, None, False),  # None: never
    (19, 20, 0.9, True),
    (2, 20, od.lazy.__kwdefaults__["dense_above"], False),  # the default
    (3, 20, od.lazy.__kwdefaults__["dense_above"], True),
  ],
)
def test_the_switch_point_and_its_override(n, rows, dense_above, densified):
  params = {"e": jnp.ones((rows, 2))}
  idx = jnp.arange(n, dtype=jnp.int32) % rows
  g = {"e": od.sparse.RowSparse(idx, jnp.ones((n, 2)))}
  tx = od.lazy(optax.adam(0.1), dense_above=dense_above)
  updates, state = jax.jit(tx.update)(g, tx.init(params), params)
  assert isinstance(updates["e"], od.sparse.RowSparse) != densified
  assert int(state.touched_rows) == min(n, rows)
  # Either way the same step.
  other = od.lazy(optax.adam(0.1), dense_above=0.0 if not densified else None)
  ref, ref_state = jax.jit(other.update)(g, other.init(params), params)
  np.testing.assert_allclose(dense_of(updates["e"], rows), dense_of(ref["e"], rows), rtol=1e-6)
  assert_trees_close(state, ref_state, rtol=1e-6)


def test_the_default_switch_point():
  """Where the two paths cross on a 1,000,000 x 64 table on CPU (benchmarks/RESULTS.md)."""
  assert od.lazy.__kwdefaults__["dense_above"] == 0.125


def test_densified_tables_keep_their_sharding():
  """Rows split over 8 devices: the densified path keeps params and state sharded as they
  are, and gives the row-sparse path's result."""
  from jax.sharding import Mesh
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()), ("x",))
  rows = NamedSharding(mesh, P("x", None))
  params = {"embed": jax.device_put(jnp.arange(64 * 4, dtype=jnp.float32).reshape(64, 4), rows)}
  ids = jnp.array([3, 60, 3, -1, 17, 40, 33, 60, 9, 9], jnp.int32)
  grads = {"embed": od.sparse.RowSparse(ids, jnp.linspace(-1, 1, 40).reshape(10, 4))}

  def run(tx):
    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return od.sparse.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for _ in range(2):
      p, s = jax.jit(step)(p, s, grads)
    return p, s

  new, new_state = run(od.lazy(optax.adam(0.1), dense_above=0.0))
  ref, ref_state = run(od.lazy(optax.adam(0.1), dense_above=None))
  assert_trees_close(new, ref, rtol=1e-6)
  assert_trees_close(new_state, ref_state, rtol=1e-6)
  assert new["embed"].sharding.is_equivalent_to(rows, 2)
  for name in ("mu", "nu"):
    assert optax.tree.get(new_state, name)["embed"].sharding.is_equivalent_to(rows, 2)


@pytest.mark.parametrize("dense_above", [None, 0.0], ids=["row_sparse", "densified"])
@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_row_sparse_tables_are_sharded_over_devices(axis_type, dense_above):
  """Rows split over 8 devices, on an auto or an explicit mesh (sharding in types):
  row_sparse_grad, both paths of od.lazy and apply_updates give the result of one device;
  params and state keep their sharding; the table is never gathered whole."""
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  assert len(jax.devices()) == 8
  mesh = jax.make_mesh((8,), ("x",), axis_types=(getattr(AxisType, axis_type),))
  rows = NamedSharding(mesh, P("x", None))
  params = {
    "embed": jnp.arange(64 * 4, dtype=jnp.float32).reshape(64, 4) / 100,
    "bias": jnp.ones(3),
  }
  ids = jnp.array([3, 60, 3, -1, 17], jnp.int32)

  def loss(p, looked_up):
    return jnp.sum(jnp.sin(looked_up) * p["bias"][:1]) + jnp.sum(p["bias"] ** 2)

  grad_fn = od.sparse.row_sparse_grad(loss, table="embed")
  tx = od.lazy(optax.adam(0.1), dense_above=dense_above)

  def step(p, s, ids):
    _, g = grad_fn(p, ids)
    u, s = tx.update(g, s, p)
    return od.sparse.apply_updates(p, u), s

  ref, ref_state = jax.jit(step)(params, tx.init(params), ids)
  with jax.set_mesh(mesh):
    sharded = {**params, "embed": jax.device_put(params["embed"], rows)}
    state = tx.init(sharded)
    assert optax.tree.get(state, "mu")["embed"].sharding.is_equivalent_to(rows, 2)
    compiled = jax.jit(step).lower(sharded, state, ids).compile()
    # The partitioned program holds 8 rows of the table per device, never the whole table.
    hlo = compiled.as_text()
    assert "all-gather" not in hlo and "f32[8,4]" in hlo and "f32[64,4]" not in hlo
    new, new_state = compiled(sharded, state, ids)
    assert_trees_close(new, ref, rtol=0)
    assert_trees_close(new_state, ref_state, rtol=0)
    assert new["embed"].sharding.is_equivalent_to(rows, 2)
    for name in ("mu", "nu"):
      assert optax.tree.get(new_state, name)["embed"].sharding.is_equivalent_to(rows, 2)
    # The dense row-masked path keeps the sharding too.
    touched = (jnp.arange(64) % 5 == 0)[:, None]
    dense = {"embed": jnp.where(touched, 1.0, 0.0) * sharded["embed"], "bias": jnp.ones(3)}
    u, dense_state = jax.jit(tx.update)(dense, state, sharded)
    assert optax.apply_updates(sharded, u)["embed"].sharding.is_equivalent_to(rows, 2)
    assert optax.tree.get(dense_state, "mu")["embed"].sharding.is_equivalent_to(rows, 2)


@pytest.mark.parametrize(
  "inner",
  [
    optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1)),
    optax.lamb(0.1),
    optax.adafactor(0.1),
    optax.chain(optax.scale_by_trust_ratio(), optax.sgd(0.1)),
  ],
  ids=["global_norm", "lamb", "adafactor", "trust_ratio"],
)
@PATHS
def test_non_elementwise_inner_optimizers_get_a_clear_error(inner, dense_above):
  """On both paths: the densified path could run them, but its results would then differ
  from the row-sparse path's (a norm over the table, not the rows), so it refuses them too."""
  params = {"embed": jnp.ones((5, 3)), "w": jnp.ones((3, 2))}
  grads = {
    "embed": od.sparse.RowSparse(jnp.array([1, 3]), jnp.ones((2, 3))),
    "w": jnp.ones((3, 2)),
  }
  tx = od.lazy(inner, dense_above=dense_above)
  with pytest.raises(ValueError, match="elementwise"):
    jax.jit(tx.update)(grads, tx.init(params), params)
  # The dense row-masked path takes them.
  dense = {**grads, "embed": grads["embed"].todense(5)}
  updates, _ = jax.jit(tx.update)(dense, tx.init(params), params)
  np.testing.assert_array_equal(updates["embed"][np.array([0, 2, 4])], 0.0)


def _future_primitive():
  """An elementwise primitive JAX does not ship (as a new or renamed one would look)."""
  prim = jex.core.Primitive("od_test_future_double")
  prim.def_impl(lambda x: 2 * x)
  prim.def_abstract_eval(lambda x: x)
  return prim


def _apply_to_updates(fun, which=None):
  """A stateless inner transformation applying ``fun`` to the updates (to ``which`` only)."""

  def update(updates, state, params=None):
    del params
    return {k: fun(u) if which in (None, k) else u for k, u in updates.items()}, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _sparse_problem():
  params = {"embed": jnp.ones((5, 3)), "w": jnp.ones((3, 2))}
  grads = {
    "embed": od.sparse.RowSparse(jnp.array([1, 3]), jnp.ones((2, 3))),
    "w": jnp.ones((3, 2)),
  }
  return params, grads


@PATHS
def test_an_unknown_primitive_on_the_rows_gets_a_clear_error(dense_above):
  """A primitive the check does not know is refused with a ValueError naming od.lazy and
  the primitive (conservative: never a guess, never an error from inside JAX)."""
  prim = _future_primitive()
  params, grads = _sparse_problem()
  tx = od.lazy(_apply_to_updates(prim.bind), dense_above=dense_above)
  with pytest.raises(ValueError, match=r"^od.lazy: .*`od_test_future_double`.* does not know"):
    tx.update(grads, tx.init(params), params)
  # On a dense leaf only, the row values never meet it: accepted, and it runs.
  tx = od.lazy(_apply_to_updates(prim.bind, which="w"), dense_above=dense_above)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["w"], 2.0)
  np.testing.assert_array_equal(dense_of(updates["embed"], 5), grads["embed"].todense(5))
  # The dense row-masked path does not trace the inner update: it takes it.
  dense = {**grads, "embed": grads["embed"].todense(5)}
  updates, _ = tx.update(dense, tx.init(params), params)
  np.testing.assert_array_equal(updates["embed"][np.array([1, 3])], 1.0)


def test_a_known_primitive_missing_from_the_list_is_refused_clearly(monkeypatch):
  """As if a JAX release renamed `mul`: sgd is refused with the name, not mis-judged."""
  monkeypatch.setattr(lazy_elementwise, "ELEMENTWISE", lazy_elementwise.ELEMENTWISE - {"mul"})
  params, grads = _sparse_problem()
  tx = od.lazy(optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"^od.lazy: .*the primitive `mul`.* does not know"):
    jax.jit(tx.update)(grads, tx.init(params), params)


def test_a_jaxpr_the_check_cannot_read_gets_a_clear_error(monkeypatch):
  """A change in JAX's jaxpr internals surfaces as a ValueError naming od.lazy."""

  def broken(jaxpr, in_rows):
    raise AttributeError("'JaxprEqn' object has no attribute 'primitive'")

  monkeypatch.setattr(lazy_elementwise, "row_flow", broken)
  params, grads = _sparse_problem()
  tx = od.lazy(optax.adam(0.1))
  with pytest.raises(ValueError, match=r"^od.lazy: .*could not be read with JAX") as info:
    tx.update(grads, tx.init(params), params)
  assert isinstance(info.value.__cause__, AttributeError)


@PATHS
def test_calls_and_custom_derivatives_are_followed(dense_above):
  """jit and custom_jvp bodies are read; a reduction inside a jit body is still caught."""
  params, grads = _sparse_problem()
  elementwise = jax.jit(lambda u: jax.nn.relu(u) * 0.5)  # custom_jvp_call inside a jit
  tx = od.lazy(_apply_to_updates(elementwise), dense_above=dense_above)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_array_equal(dense_of(updates["embed"], 5), 0.5 * grads["embed"].todense(5))
  mixing = jax.jit(lambda u: u / jnp.sum(u))
  tx = od.lazy(_apply_to_updates(mixing), dense_above=dense_above)
  with pytest.raises(ValueError, match=r"^od.lazy: .*applies `reduce_sum`"):
    jax.jit(tx.update)(grads, tx.init(params), params)


def test_a_transformation_mapping_over_a_row_sparse_is_caught():
  """On the row-sparse path (the densified path's update is a dense array, which maps)."""
  params = {"embed": jnp.ones((5, 3))}
  grads = {"embed": od.sparse.RowSparse(jnp.array([1, 3]), jnp.ones((2, 3)))}
  tx = optax.chain(od.lazy(optax.scale_by_adam(), dense_above=None), optax.scale(-0.1))
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  with pytest.raises(ValueError, match="inside od.lazy"):
    od.sparse.apply_updates(params, updates)


# ---------------------------------------------------------------------------------------------
# apply_updates and RowSparse


def test_apply_updates():
  params = {"a": jnp.ones((4, 2)), "b": jnp.ones(3, jnp.bfloat16), "c": None}
  updates = {
    "a": od.sparse.RowSparse(jnp.array([1, 1, 3, -1, 4]), jnp.arange(10.0).reshape(5, 2)),
    "b": jnp.full(3, 0.5, jnp.float32),
    "c": None,
  }
  new = od.sparse.apply_updates(params, updates)
  np.testing.assert_array_equal(new["a"], [[1, 1], [3, 5], [1, 1], [5, 6]])
  assert new["b"].dtype == jnp.bfloat16 and new["c"] is None
  dense = {**updates, "a": updates["a"].todense(4)}
  assert_trees_close(new, optax.apply_updates(params, dense), rtol=0)
  assert_trees_close(optax.apply_updates(params, updates), new, rtol=0)  # __radd__
  # NumPy params: the RowSparse is not broadcast by NumPy.
  np.testing.assert_array_equal(np.ones((4, 2)) + updates["a"], new["a"])


def test_row_sparse_shape_errors():
  params = {"embed": jnp.ones((5, 3))}
  tx = od.lazy(optax.adam(0.1))
  state = tx.init(params)
  bad = [
    (od.sparse.RowSparse(jnp.array([1.0]), jnp.ones((1, 3))), "integer"),
    (od.sparse.RowSparse(jnp.array([[1]]), jnp.ones((1, 3))), "1-D"),
    (od.sparse.RowSparse(jnp.array([1, 2]), jnp.ones((2, 4))), r"\[2, 3\]"),
  ]
  for g, message in bad:
    with pytest.raises(ValueError, match=message):
      tx.update({"embed": g}, state, params)
    with pytest.raises(ValueError, match=message):
      od.sparse.apply_updates(params, {"embed": g})
  with pytest.raises(ValueError, match="needs the current params"):
    tx.update({"embed": od.sparse.RowSparse(jnp.array([1]), jnp.ones((1, 3)))}, state)
  with pytest.raises(ValueError, match="does not match"):
    tx.update({"embed": jnp.ones((5, 3))}, state, {"other": jnp.ones((5, 3))})


# ---------------------------------------------------------------------------------------------
# Hyperparameters, dtypes, state, integrations


def test_hyperparameter_validation():
  """Every message starts with the public function's name."""
  bad_lazy = [
    (dict(inner=3), "inner must be an optax.GradientTransformation, got 3"),
    (dict(inner=optax.adam), r"inner must be .* \(call the factory"),
    (dict(inner=optax.adam(0.1), freeze_state="yes"), "freeze_state must be a bool, got 'yes'"),
    (dict(inner=optax.adam(0.1), include="emb("), "include: invalid regex"),
    (dict(inner=optax.adam(0.1), include=[3]), "include must hold regex strings, got 3"),
    (dict(inner=optax.adam(0.1), include=3), "include must be a regex"),
    (
      dict(inner=optax.adam(0.1), dense_above=-0.1),
      r"dense_above must be in \[0.0, 1.0\], got -0.1",
    ),
    (
      dict(inner=optax.adam(0.1), dense_above=1.5),
      r"dense_above must be in \[0.0, 1.0\], got 1.5",
    ),
    (
      dict(inner=optax.adam(0.1), dense_above=float("nan")),
      "dense_above must be in .*, got nan",
    ),
    (
      dict(inner=optax.adam(0.1), dense_above="0.1"),
      "dense_above must be a real number, got '0.1'",
    ),
    (
      dict(inner=optax.adam(0.1), dense_above=True),
      "dense_above must be a real number, got True",
    ),
    (
      dict(inner=optax.adam(0.1), dense_above=np.array([0.1])),
      "dense_above must be a real number",
    ),
    (
      dict(inner=optax.adam(0.1), dense_above=lambda c: 0.1),
      "dense_above must be a number, not a",
    ),
  ]
  for kwargs, message in bad_lazy:
    with pytest.raises(ValueError, match="^od.lazy: " + message):
      od.lazy(**kwargs)
  # The switch point chooses the path when the step is traced: a traced value is refused.
  with pytest.raises(ValueError, match="^od.lazy: dense_above must be a concrete number"):
    jax.jit(lambda x: od.lazy(optax.adam(0.1), dense_above=x).init({}))(0.5)
  for fine in (0, 1, np.float32(0.5), jnp.asarray(0.25), None):  # ints and 0-d arrays too
    od.lazy(optax.adam(0.1), dense_above=fine)
  fn = "^od.sparse.row_sparse_grad: "
  with pytest.raises(ValueError, match=fn + "table must name at least one pattern"):
    od.sparse.row_sparse_grad(lambda p, r: 0.0, table=[])
  with pytest.raises(ValueError, match=fn + "table: invalid regex"):
    od.sparse.row_sparse_grad(lambda p, r: 0.0, table="(")
  with pytest.raises(ValueError, match=fn + "has_aux must be a bool"):
    od.sparse.row_sparse_grad(lambda p, r: 0.0, table="e", has_aux=None)


def test_update_errors_name_the_public_function_and_the_leaf():
  params = {"embed": jnp.ones((5, 3))}
  tx = od.lazy(optax.adam(0.1))
  state = tx.init(params)
  bad = {"embed": od.sparse.RowSparse(jnp.array([1, 2]), jnp.ones((2, 4)))}
  with pytest.raises(ValueError, match=r"^od.lazy: embed: RowSparse.values must have shape"):
    tx.update(bad, state, params)
  with pytest.raises(ValueError, match=r"^od.sparse.apply_updates: embed: RowSparse.values"):
    od.sparse.apply_updates(params, bad)
  with pytest.raises(ValueError, match=r"^od.sparse.RowSparse.__radd__: RowSparse.values"):
    params["embed"] + bad["embed"]
  with pytest.raises(ValueError, match="^od.lazy: a RowSparse update needs the current params"):
    tx.update({"embed": od.sparse.RowSparse(jnp.array([1]), jnp.ones((1, 3)))}, state)
  with pytest.raises(ValueError, match="^od.lazy: the params tree does not match"):
    tx.update({"embed": jnp.ones((5, 3))}, state, {"other": jnp.ones((5, 3))})
  with pytest.raises(ValueError, match="^od.sparse.apply_updates: the updates tree does not"):
    od.sparse.apply_updates(params, {"other": jnp.ones((5, 3))})
  with pytest.raises(ValueError, match="^od.sparse.row_sparse_grad: ids must be integers"):
    od.sparse.row_sparse_grad(lambda p, r: jnp.sum(r), table="embed")(params, jnp.ones(2))


@pytest.mark.parametrize(
  "include, same_as",
  [
    (None, "."),  # every leaf
    ((), None),  # an empty sequence of patterns: no leaf, the plain inner optimizer
    ([], None),
    (lambda path, g: g.ndim == 2, ["embed", "kernel"]),  # a predicate
    (lambda path, g: path.startswith("dense/"), "^dense/"),
  ],
  ids=["None", "empty-tuple", "empty-list", "predicate-ndim", "predicate-path"],
)
def test_include_none_empty_and_predicates(include, same_as):
  params, grads = make_params(), stack(make_grads())
  final, state, _ = run_scan(od.lazy(optax.adam(0.05), include=include), params, grads)
  if same_as is None:
    ref, ref_state, _ = run_scan(optax.adam(0.05), params, grads)
    assert int(state.touched_rows) == 0
    assert_trees_close(state.inner_state, ref_state, rtol=0)
  else:
    ref, _, _ = run_scan(od.lazy(optax.adam(0.05), include=same_as), params, grads)
  assert_trees_close(final, ref, rtol=0)


def test_a_predicate_include_is_not_called_on_row_sparse_leaves():
  """A RowSparse leaf is row-sparse whatever include says: the predicate (here reading
  ``ndim``, which a RowSparse lacks) sees the dense leaves only."""
  params, grads_seq = make_params(), make_grads(2)
  rng = np.random.default_rng(12)
  seq = [{**g, "embed": to_row_sparse(g["embed"], rng)} for g in grads_seq]
  tx = od.lazy(optax.adam(0.05), include=lambda path, g: g.ndim == 2)
  p, _, _ = run_steps(tx, params, seq)
  ref_embed = np_lazy_adam(params, grads_seq, lr=0.05, freeze=True, lazy_leaves={"embed"})
  ref_dense = np_lazy_adam(
    params, grads_seq, lr=0.05, freeze=False, lazy_leaves={"dense/kernel"}
  )
  np.testing.assert_allclose(p["embed"], ref_embed[0]["embed"], rtol=1e-5, atol=1e-6)
  assert_trees_close(p["dense"], ref_dense[0]["dense"], rtol=1e-5, atol=1e-6)


def test_a_predicate_include_that_selects_nothing_warns():
  params = make_params()
  tx = od.lazy(optax.adam(0.1), include=lambda path, g: g.ndim == 3)
  with pytest.warns(UserWarning, match="matches no parameter"):
    tx.init(params)


def test_include_pattern_that_matches_nothing_warns():
  params = make_params()
  tx = od.lazy(optax.adam(0.1), include="embbed")
  with pytest.warns(UserWarning, match="matches no parameter"):
    tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)


@pytest.mark.parametrize("sparse", [False, "rows", "densified"])
@pytest.mark.parametrize("freeze_state", [False, True])
def test_state_is_stable_and_bf16_stays_bf16(sparse, freeze_state):
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), make_params())
  grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.bfloat16), make_grads(1)[0])
  if sparse:
    s = to_row_sparse(grads["embed"], np.random.default_rng(8), pad=1)
    grads["embed"] = od.sparse.RowSparse(s.indices, s.values.astype(jnp.bfloat16))
  dense_above = 0.0 if sparse == "densified" else None
  tx = od.lazy(
    optax.adam(0.1), include="embed|kernel", freeze_state=freeze_state, dense_above=dense_above
  )
  assert_state_stable(tx, params, grads)
  if sparse != "densified":
    assert_keeps_dtype(tx, params, grads)
    return
  # The densified update is a dense array of the values' dtype.
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert updates["embed"].shape == (6, 3) and updates["embed"].dtype == jnp.bfloat16
  new = od.sparse.apply_updates(params, updates)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new))


def test_inner_hyperparameters_can_be_injected_and_found():
  params = {"embed": jnp.ones((4, 2))}
  tx = od.lazy(optax.inject_hyperparams(optax.adam)(learning_rate=0.1), freeze_state=True)
  state = tx.init(params)
  state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.5)
  g = od.sparse.RowSparse(jnp.array([2]), jnp.ones((1, 2)))
  updates, state = jax.jit(tx.update)({"embed": g}, state, params)  # densified: 1 of 4 rows
  np.testing.assert_allclose(dense_of(updates["embed"], 4)[2], [-0.5, -0.5], rtol=1e-6)
  assert float(optax.tree.get(state, "learning_rate")) == 0.5
  # inject_hyperparams around lazy itself.
  outer = optax.inject_hyperparams(lambda learning_rate: od.lazy(optax.sgd(learning_rate)))(
    learning_rate=0.25
  )
  updates, _ = jax.jit(outer.update)({"embed": g}, outer.init(params), params)
  np.testing.assert_allclose(dense_of(updates["embed"], 4)[2], [-0.25, -0.25])


def test_flax_train_state_and_nnx_optimizer():
  from flax import nnx
  from flax.training import train_state

  params = {"embed": jnp.ones((4, 2)), "w": jnp.ones(2)}
  tx = od.lazy(optax.adam(0.1), include="embed")
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  sparse = {"embed": od.sparse.RowSparse(jnp.array([1]), jnp.ones((1, 2))), "w": jnp.ones(2)}
  state = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, sparse)  # RowSparse too
  dense = {"embed": jnp.zeros((4, 2)).at[2].set(1.0), "w": jnp.ones(2)}
  state = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, dense)
  moved = np.any(np.asarray(state.params["embed"]) != 1.0, axis=1)
  np.testing.assert_array_equal(moved, [False, True, True, False])

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(10, 4, rngs=rngs)
      self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, ids):
      return self.out(self.embed(ids).mean(1))

  model = Model(nnx.Rngs(0))
  before = np.asarray(model.embed.embedding[...])
  optimizer = nnx.Optimizer(model, od.lazy(optax.adam(0.1), include="embedding"), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, ids):
    grads = nnx.grad(lambda m: jnp.sum(m(ids) ** 2))(model)
    optimizer.update(model, grads)

  for ids in ([[1, 2]], [[3, 3]]):
    train_step(model, optimizer, jnp.asarray(ids))
  after = np.asarray(model.embed.embedding[...])
  moved = np.any(after != before, axis=1)
  np.testing.assert_array_equal(moved, [i in (1, 2, 3) for i in range(10)])


def test_state_round_trips_through_flax_serialization():
  from flax import serialization

  params = make_params()
  tx = od.lazy(optax.adam(0.1), freeze_state=True)
  _, state, _ = run_scan(tx, params, stack(make_grads(2)))
  restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
  assert isinstance(restored, od.LazyState)
  assert_trees_close(restored, state, rtol=0)


def test_freeze_state_needs_param_shaped_state():
  params = {"embed": jnp.ones((4, 3))}
  tx = od.lazy(optax.adafactor(0.1, min_dim_size_to_factor=2), freeze_state=True)
  with pytest.raises(ValueError, match="shaped like their params"):
    tx.update({"embed": jnp.ones((4, 3))}, tx.init(params), params)


# ---------------------------------------------------------------------------------------------
# row_sparse_grad


def _classifier_loss(params, rows, labels):
  logits = rows.mean(1) @ params["w"] + params["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_row_sparse_grad_equals_jax_grad_of_the_dense_lookup():
  rng = np.random.default_rng(9)
  params = {
    "embed": jnp.asarray(rng.normal(size=(20, 4)), jnp.float32),
    "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
    "b": jnp.zeros(3),
  }
  ids = jnp.asarray(rng.integers(0, 20, size=(5, 7)), jnp.int32)
  labels = jnp.asarray(rng.integers(0, 3, size=5), jnp.int32)
  loss, grads = jax.jit(od.sparse.row_sparse_grad(_classifier_loss, table="embed"))(
    params, ids, labels
  )
  dense_loss, dense = jax.jit(
    jax.value_and_grad(lambda p: _classifier_loss(p, p["embed"][ids], labels))
  )(params)
  np.testing.assert_allclose(loss, dense_loss, rtol=1e-6)
  assert isinstance(grads["embed"], od.sparse.RowSparse) and grads["embed"].values.shape == (
    35,
    4,
  )
  np.testing.assert_allclose(grads["embed"].todense(20), dense["embed"], rtol=1e-5, atol=1e-7)
  assert_trees_close({k: grads[k] for k in "wb"}, {k: dense[k] for k in "wb"}, rtol=1e-6)
  # Straight into od.lazy: equal to LazyAdam on the dense gradient.
  tx = od.lazy(optax.adam(0.1), include="embed", freeze_state=True)
  u1, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  u2, _ = jax.jit(tx.update)(dense, tx.init(params), params)
  np.testing.assert_allclose(dense_of(u1["embed"], 20), u2["embed"], rtol=1e-5, atol=1e-7)


def test_row_sparse_grad_padding_aux_and_errors():
  params = {"embed": jnp.arange(12.0).reshape(6, 2), "w": jnp.ones(2)}

  def loss_fn(params, rows):
    return jnp.sum(rows @ params["w"]), rows

  ids = jnp.array([[0, -1], [6, 2]])
  grad_fn = jax.jit(od.sparse.row_sparse_grad(loss_fn, table="embed", has_aux=True))
  (loss, rows), grads = grad_fn(params, ids)
  np.testing.assert_array_equal(rows, [[[0, 1], [0, 0]], [[0, 0], [4, 5]]])
  np.testing.assert_allclose(loss, 0 + 1 + 4 + 5)  # padding ids look up zeros
  np.testing.assert_array_equal(
    grads["embed"].todense(6), [[1, 1], [0, 0], [1, 1], [0, 0], [0, 0], [0, 0]]
  )
  np.testing.assert_allclose(grads["w"], [4, 6])
  with pytest.raises(ValueError, match="exactly one leaf"):
    od.sparse.row_sparse_grad(loss_fn, table="nope")(params, ids)
  with pytest.raises(ValueError, match="exactly one leaf"):
    od.sparse.row_sparse_grad(loss_fn, table=".")(params, ids)
  with pytest.raises(ValueError, match="ids must be integers"):
    od.sparse.row_sparse_grad(loss_fn, table="embed")(params, ids.astype(jnp.float32))
  with pytest.raises(TypeError):  # the loss does not see the table: no silent dense path
    od.sparse.row_sparse_grad(lambda p, r: jnp.sum(p["embed"]), table="embed")(params, ids)


# ---------------------------------------------------------------------------------------------
# Property: RowSparse == dense LazyAdam on random instances


@jax.jit
def _both_paths(params, idx1, val1, idx2, val2):
  rows_tx = od.lazy(optax.adam(0.1), dense_above=None)
  densified_tx = od.lazy(optax.adam(0.1), dense_above=0.0)
  dense_tx = od.lazy(optax.adam(0.1), freeze_state=True)
  out = []
  for tx, sparse in ((rows_tx, True), (densified_tx, True), (dense_tx, False)):
    p, s = params, tx.init(params)
    for idx, val in ((idx1, val1), (idx2, val2)):
      g = od.sparse.RowSparse(idx, val)
      u, s = tx.update({"e": g if sparse else g.todense(5)}, s, p)
      p = od.sparse.apply_updates(p, u)
    out.append((p, s.inner_state))
  return out


@settings(max_examples=30, deadline=None)
@given(
  st.lists(st.integers(-2, 6), min_size=6, max_size=6),
  st.lists(st.integers(-2, 6), min_size=6, max_size=6),
  st.lists(st.floats(0.1, 3.0), min_size=12, max_size=12),
  st.lists(st.sampled_from([-1.0, 1.0]), min_size=12, max_size=12),
)
def test_property_row_sparse_equals_dense_lazy_adam(idx1, idx2, magnitudes, signs):
  # Same-signed duplicates: a touched row never sums to exactly zero.
  values = np.asarray(magnitudes) * np.asarray(signs)
  row_sign = np.where(np.arange(7) % 2, 1.0, -1.0)
  val1 = np.abs(values[:6, None]) * row_sign[np.clip(idx1, 0, 6)][:, None] * [1.0, 0.5]
  val2 = np.abs(values[6:, None]) * row_sign[np.clip(idx2, 0, 6)][:, None] * [0.5, 1.0]
  params = {"e": jnp.arange(10.0).reshape(5, 2) / 10}
  (p1, s1), (p3, s3), (p2, s2) = _both_paths(
    params,
    jnp.asarray(idx1, jnp.int32),
    jnp.asarray(val1, jnp.float32),
    jnp.asarray(idx2, jnp.int32),
    jnp.asarray(val2, jnp.float32),
  )
  assert_trees_close(p1, p2, rtol=1e-5, atol=1e-6)
  assert_trees_close(s1, s2, rtol=1e-5, atol=1e-6)
  assert_trees_close(p3, p1, rtol=1e-6, atol=1e-7)
  assert_trees_close(s3, s1, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("freeze_state", [False, True])
def test_an_inner_multi_transform_with_masked_state(freeze_state):
  """optax.multi_transform (MaskedNode in its state) is the usual way to give embeddings
  their own optimizer; lazy must find its param-shaped state through it."""
  params, grads_seq = make_params(), make_grads()
  labels = {"embed": "a", "dense": {"kernel": "a", "bias": "a"}}
  tx = od.lazy(
    optax.multi_transform({"a": optax.adam(0.05)}, labels), freeze_state=freeze_state
  )
  final, _, _ = run_scan(tx, params, stack(grads_seq))
  ref = np_lazy_adam(
    params,
    grads_seq,
    lr=0.05,
    freeze=freeze_state,
    lazy_leaves={"embed", "dense/kernel", "dense/bias"},
  )
  assert_trees_close(final, ref[0], rtol=1e-5, atol=1e-6)


def test_row_sparse_next_to_frozen_dense_leaves():
  params, grads_seq = make_params(), make_grads()
  rng = np.random.default_rng(11)
  seq = [{**g, "embed": to_row_sparse(g["embed"], rng)} for g in grads_seq]
  p, _, _ = run_steps(od.lazy(optax.adam(0.05), freeze_state=True), params, seq)
  ref = np_lazy_adam(
    params, grads_seq, lr=0.05, freeze=True, lazy_leaves={"embed", "dense/kernel", "dense/bias"}
  )
  assert_trees_close(p, ref[0], rtol=1e-5, atol=1e-6)


def test_an_empty_row_sparse_gradient_is_a_no_op():
  params = {"embed": jnp.ones((4, 2))}
  tx = od.lazy(optax.adam(0.1))
  empty = {"embed": od.sparse.RowSparse(jnp.zeros((0,), jnp.int32), jnp.zeros((0, 2)))}
  updates, _ = tx.update(empty, tx.init(params), params)
  np.testing.assert_array_equal(
    od.sparse.apply_updates(params, updates)["embed"], params["embed"]
  )


def test_sparse_and_dense_paths_agree_in_mixed_precision():
  params = {"embed": jnp.asarray(np.random.default_rng(3).normal(size=(6, 3)), jnp.float32)}
  dense = np.zeros((6, 3), np.float32)
  dense[[1, 4]] = np.random.default_rng(4).normal(size=(2, 3))
  dense_grad = {"embed": jnp.asarray(dense, jnp.bfloat16)}
  sparse_grad = {
    "embed": od.sparse.RowSparse(jnp.array([1, 4]), dense_grad["embed"][jnp.array([1, 4])])
  }
  tx = od.lazy(optax.adam(0.1), freeze_state=True)
  u_dense, _ = tx.update(dense_grad, tx.init(params), params)
  u_sparse, _ = tx.update(sparse_grad, tx.init(params), params)
  np.testing.assert_array_equal(
    od.sparse.apply_updates(params, u_sparse)["embed"],
    optax.apply_updates(params, u_dense)["embed"],
  )


@pytest.mark.parametrize(
  "dtype, num_rows",
  [(jnp.uint8, 256), (jnp.int8, 128), (jnp.uint16, 65536), (jnp.int16, 40000)],
)
def test_indices_too_narrow_for_the_padding_marker_are_widened(dtype, num_rows):
  """The padding marker is num_rows: in uint8 ids of a 256-row table it wrapped to row 0."""
  table = jnp.zeros((num_rows, 2))
  last = min(num_rows - 1, int(jnp.iinfo(dtype).max))  # the last row the dtype can name
  ids = jnp.array([3, last, 3], dtype)
  sparse = od.sparse.RowSparse(ids, jnp.ones((3, 2)))
  want = np.zeros((num_rows, 2))
  want[[3, last]] = [[-2.0, -2.0], [-1.0, -1.0]]
  tx = od.lazy(optax.sgd(1.0))
  updates, _ = tx.update({"e": sparse}, tx.init({"e": table}), {"e": table})
  np.testing.assert_array_equal(od.sparse.apply_updates({"e": table}, updates)["e"], want)
  np.testing.assert_array_equal(table + sparse, -want)  # __radd__ scatters too

  def loss(params, rows):
    return jnp.sum(rows[:, 0] * jnp.arange(1.0, 4.0))

  grad_fn = od.sparse.row_sparse_grad(loss, table="e")
  table = jnp.arange(num_rows * 2, dtype=jnp.float32).reshape(num_rows, 2)
  value, grads = grad_fn({"e": table}, ids)
  assert float(value) == float(table[3, 0] + 2 * table[last, 0] + 3 * table[3, 0])
  dense = np.zeros((num_rows, 2))
  dense[3, 0], dense[last, 0] = 4.0, 2.0
  np.testing.assert_array_equal(grads["e"].todense(num_rows), dense)


def test_a_row_sparse_gradient_on_an_empty_table_is_a_no_op():
  table = {"e": jnp.zeros((0, 2))}
  tx = od.lazy(optax.adam(0.1))
  sparse = od.sparse.RowSparse(jnp.array([0, 3]), jnp.ones((2, 2)))
  updates, _ = tx.update({"e": sparse}, tx.init(table), table)
  assert od.sparse.apply_updates(table, updates)["e"].shape == (0, 2)


@pytest.mark.parametrize(
  "inner",
  [
    optax.MultiSteps(optax.sgd(1.0), 2).gradient_transformation(),
    optax.chain(optax.apply_every(2), optax.sgd(1.0)),
    od.accumulate(optax.sgd(1.0), 2),
  ],
  ids=["MultiSteps", "apply_every", "accumulate"],
)
def test_accumulating_inner_optimizers_are_refused(inner):
  """They would apply, and reset, only the rows of the emitting call."""
  with pytest.raises(ValueError, match="accumulate outside"):
    od.lazy(inner).init({"e": jnp.ones((3, 2))})
