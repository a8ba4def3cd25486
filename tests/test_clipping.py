"""od.clip_norm: hard and soft clipping over the tree, each leaf or each row."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from helpers import assert_keeps_dtype
from helpers import assert_state_stable
from helpers import assert_trees_close
from helpers import run_scan
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optaxderived as od

SCOPES = ("global", "leaf", "row")


# ---------------------------------------------------------------------------------------------
# The NumPy float64 reference, written from the formulas.


def np_units(leaves: list[np.ndarray], scope: str) -> list[list[tuple[int, tuple]]]:
  """The units of a scope as lists of (leaf index, index into the leaf) blocks."""
  if scope == "global":
    return [[(i, ()) for i in range(len(leaves))]]
  units = []
  for i, x in enumerate(leaves):
    if scope == "row" and x.ndim >= 2:
      units.extend([[(i, (r,))] for r in range(x.shape[0])])
    else:
      units.append([(i, ())])
  return units


def np_clip(grads, gamma: float, soft: bool, scope: str):
  """Clipped updates, the global norm and the clipped fraction, in float64."""
  leaves, treedef = jax.tree.flatten(grads)
  leaves = [np.asarray(x, np.complex128 if jnp.iscomplexobj(x) else np.float64) for x in leaves]
  out = [x.copy() for x in leaves]
  clipped = 0
  units = np_units(leaves, scope)
  for unit in units:
    norm = math.sqrt(sum(float(np.sum(np.abs(leaves[i][idx]) ** 2)) for i, idx in unit))
    if soft:
      factor = gamma / (norm + gamma)
      clipped += norm > 0
    else:
      factor = min(1.0, gamma / norm) if norm > 0 else 1.0
      clipped += norm > gamma
    for i, idx in unit:
      out[i][idx] = leaves[i][idx] * factor
  global_norm = math.sqrt(sum(float(np.sum(np.abs(x) ** 2)) for x in leaves))
  return treedef.unflatten(out), global_norm, clipped / len(units)


def make_grads(seed: int = 0, scale: float = 1.0):
  """1-D, 2-D, 3-D and 0-D leaves whose rows have norms on both sides of 1."""
  rng = np.random.default_rng(seed)
  row_scales = np.array([0.05, 0.3, 2.0, 5.0])[:, None]
  return {
    "bias": jnp.asarray(scale * rng.normal(size=5) * 0.2, jnp.float32),
    "kernel": jnp.asarray(scale * rng.normal(size=(4, 3)) * row_scales, jnp.float32),
    "conv": jnp.asarray(scale * rng.normal(size=(3, 2, 2)), jnp.float32),
    "gain": jnp.asarray(scale * 0.7, jnp.float32),
  }


@functools.partial(jax.jit, static_argnames=("soft", "scope"))
def clip(grads, gamma, *, soft=False, scope="global"):
  """One update of ``od.clip_norm`` (gamma traced: one compile per form, scope and tree)."""
  tx = od.clip_norm(gamma, soft=soft, scope=scope)
  return tx.update(grads, tx.init(grads))


# ---------------------------------------------------------------------------------------------
# Values.


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("gamma, scale", [(1.0, 1.0), (0.5, 3.0), (100.0, 1.0)])
def test_matches_the_numpy_reference(scope, soft, gamma, scale):
  grads = make_grads(scale=scale)
  updates, state = clip(grads, gamma, soft=soft, scope=scope)
  expected, norm, fraction = np_clip(grads, gamma, soft, scope)
  assert_trees_close(updates, expected, rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(state.norm, norm, rtol=1e-6)
  np.testing.assert_allclose(state.clipped_fraction, fraction, rtol=1e-6)
  assert state.norm.dtype == jnp.float32 and state.clipped_fraction.dtype == jnp.float32


def test_the_clipped_fraction_counts_rows():
  grads = make_grads()  # kernel rows: 2 of 4 above 1; conv rows; bias and gain whole
  _, _, fraction = np_clip(grads, 1.0, False, "row")
  _, state = clip(grads, 1.0, scope="row")
  assert 0 < fraction < 1
  assert float(state.clipped_fraction) == pytest.approx(fraction)
  _, state = clip(grads, 1.0, soft=True, scope="row")  # soft: every non-zero unit
  assert float(state.clipped_fraction) == 1.0


def test_the_worked_examples():
  big, small = {"g": jnp.array([3.0, 4.0])}, {"g": jnp.array([0.3, 0.4])}
  hard, soft = od.clip_norm(1.0), od.clip_norm(1.0, soft=True)
  clip = lambda tx, g: tx.update(g, tx.init(g))[0]["g"]
  np.testing.assert_allclose(clip(hard, big), [0.6, 0.8], rtol=1e-6)
  np.testing.assert_allclose(clip(soft, big), [0.5, 2 / 3], rtol=1e-6)
  np.testing.assert_array_equal(clip(hard, small), small["g"])  # unchanged, bit for bit
  np.testing.assert_allclose(clip(soft, small), [0.2, 0.8 / 3], rtol=1e-6)  # x 2/3
  factors = [float(clip(tx, big)[0]) / 3 for tx in (hard, soft)]
  assert 0.5 * factors[0] <= factors[1] <= factors[0]  # 0.1 <= 0.1667 <= 0.2


@pytest.mark.parametrize("scale", [0.01, 0.5, 1.0, 20.0])
def test_hard_global_equals_optax_clip_by_global_norm(scale):
  grads = make_grads(seed=1, scale=scale)
  theirs = optax.clip_by_global_norm(1.0)
  expected, _ = theirs.update(grads, theirs.init(grads))
  updates, _ = clip(grads, 1.0)
  assert_trees_close(updates, expected, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
  st.lists(st.floats(1e-3, 1e3), min_size=4, max_size=4),
  st.floats(1e-2, 1e2),
  st.sampled_from(SCOPES),
  st.integers(0, 2**16),
)
def test_soft_lies_between_half_hard_and_hard(scales, gamma, scope, seed):
  grads = make_grads(seed)
  grads = {k: v * s for (k, v), s in zip(sorted(grads.items()), scales, strict=True)}
  u_hard, _ = clip(grads, gamma, scope=scope)
  u_soft, _ = clip(grads, gamma, soft=True, scope=scope)
  for g, h, s in zip(*(jax.tree.leaves(t) for t in (grads, u_hard, u_soft)), strict=True):
    g, h, s = (np.abs(np.asarray(x, np.float64)) for x in (g, h, s))
    tol = 1e-5 * g + 1e-30
    assert np.all(0.5 * h <= s + tol) and np.all(s <= h + tol)
    assert np.all(h <= g + tol)
  # Hard clipping caps every unit's norm at gamma, as the reference says.
  expected, _, _ = np_clip(grads, gamma, False, scope)
  assert_trees_close(u_hard, expected, rtol=1e-5, atol=1e-30)


def test_zero_gradients_pass_unchanged_with_zero_norm():
  grads = jax.tree.map(jnp.zeros_like, make_grads())
  for scope in SCOPES:
    for soft in (False, True):
      updates, state = clip(grads, 1.0, soft=soft, scope=scope)
      assert_trees_close(updates, grads)
      assert float(state.norm) == 0 and float(state.clipped_fraction) == 0


def test_an_empty_tree_and_an_empty_leaf():
  tx = od.clip_norm(1.0, scope="row")
  updates, state = tx.update({}, tx.init({}))
  assert updates == {} and float(state.norm) == 0 and int(state.count) == 1
  grads = {"empty": jnp.zeros((0, 3)), "w": jnp.array([3.0, 4.0])}
  updates, state = jax.jit(tx.update)(grads, tx.init(grads))
  assert updates["empty"].shape == (0, 3)
  np.testing.assert_allclose(updates["w"], [0.6, 0.8], rtol=1e-6)


def test_infinite_max_norm_disables_clipping():
  grads = make_grads(scale=10.0)
  for soft in (False, True):
    updates, state = clip(grads, float("inf"), soft=soft, scope="row")
    assert_trees_close(updates, grads)
    assert float(state.clipped_fraction) == 0.0  # every factor is exactly 1


def test_overflowing_units_keep_their_norm_next_to_a_nan():
  grads = {"a": jnp.array([[3e20, 4e20], [jnp.nan, 1.0]]), "b": jnp.array([[6e20, 8e20]])}
  for scope in ("row", "leaf"):
    updates, _ = clip(grads, 1.0, soft=False, scope=scope)
    np.testing.assert_allclose(updates["b"], [[0.6, 0.8]], rtol=1e-6)
  updates, _ = clip(grads, 1.0, soft=False, scope="row")
  np.testing.assert_allclose(updates["a"][0], [0.6, 0.8], rtol=1e-6)
  assert np.all(np.isnan(updates["a"][1]))


# ---------------------------------------------------------------------------------------------
# Non-finite gradients: never silently zeroed.


@pytest.mark.parametrize("soft", [False, True])
def test_a_nan_propagates_to_its_unit(soft):
  grads = make_grads()
  grads["kernel"] = grads["kernel"].at[1, 2].set(jnp.nan)
  updates, state = clip(grads, 1.0, soft=soft)
  assert np.isnan(state.norm)
  assert all(np.all(np.isnan(u)) for u in jax.tree.leaves(updates))  # the whole tree
  updates, state = clip(grads, 1.0, soft=soft, scope="row")
  assert np.isnan(state.norm)
  assert np.all(np.isnan(updates["kernel"][1]))  # the row
  assert np.all(np.isfinite(np.delete(np.asarray(updates["kernel"]), 1, axis=0)))
  assert np.all(np.isfinite(updates["conv"]))


@pytest.mark.parametrize("scope", SCOPES)
def test_an_infinite_entry_gives_an_infinite_norm_and_non_finite_updates(scope):
  grads = make_grads()
  grads["kernel"] = grads["kernel"].at[3, 0].set(jnp.inf)
  updates, state = clip(grads, 1.0, scope=scope)
  assert np.isposinf(state.norm)
  assert np.isnan(updates["kernel"][3, 0])  # inf * 0, not a silent 0
  assert np.all(np.isfinite(updates["conv"]))


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("soft", [False, True])
def test_finite_gradients_whose_squares_overflow_get_their_exact_norm(scope, soft):
  grads = make_grads()
  grads["kernel"] = grads["kernel"].at[2].set(jnp.array([3e20, -4e20, 1e19]))
  updates, state = clip(grads, 1.0, soft=soft, scope=scope)
  expected, norm, fraction = np_clip(grads, 1.0, soft, scope)
  assert np.isfinite(state.norm)
  np.testing.assert_allclose(state.norm, norm, rtol=1e-6)
  np.testing.assert_allclose(state.clipped_fraction, fraction, rtol=1e-6)
  assert_trees_close(updates, expected, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("scope", SCOPES)
def test_overflowing_squares_of_float_and_complex_leaves_together_get_their_exact_norms(scope):
  # two compute dtypes in one tree: the recomputation scales each leaf in its own dtype
  grads = make_grads()
  grads["kernel"] = grads["kernel"].at[2].set(jnp.array([3e20, -4e20, 1e19]))
  grads["phase"] = jnp.array([[3e20 + 4e20j, 1j], [2.0, 0.5j]], jnp.complex64)
  updates, state = clip(grads, 1.0, soft=False, scope=scope)
  expected, norm, fraction = np_clip(grads, 1.0, False, scope)
  np.testing.assert_allclose(state.norm, norm, rtol=1e-6)
  np.testing.assert_allclose(state.clipped_fraction, fraction, rtol=1e-6)
  assert updates["phase"].dtype == jnp.complex64
  for key, value in expected.items():  # complex-aware, unlike assert_trees_close
    np.testing.assert_allclose(np.asarray(updates[key]), value, rtol=2e-6, atol=1e-30)


def test_apply_if_finite_skips_a_nan_step():
  tx = optax.apply_if_finite(optax.chain(od.clip_norm(1.0), optax.sgd(0.1)), 3)
  params = make_grads()
  grads = jax.tree.map(jnp.ones_like, params)
  grads["bias"] = grads["bias"].at[0].set(jnp.nan)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert all(np.all(u == 0) for u in jax.tree.leaves(updates))
  assert int(state.notfinite_count) == 1


# ---------------------------------------------------------------------------------------------
# Schedules, hyperparameter injection, validation.


def test_a_max_norm_schedule_is_evaluated_at_the_number_of_calls():
  schedule = optax.linear_schedule(1.0, 4.0, transition_steps=3)  # 1, 2, 3, 4
  tx = od.clip_norm(schedule)
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.full((4, 3), 100.0)}
  _, state, updates = run_scan(tx, params, grads)
  norms = np.linalg.norm(np.asarray(updates["w"]), axis=1)
  np.testing.assert_allclose(norms, [1.0, 2.0, 3.0, 4.0], rtol=1e-6)
  assert int(state.count) == 4


@pytest.mark.parametrize("scope", ["global", "row"])
def test_inject_hyperparams_gives_the_same_result_and_a_runtime_soft_flag(scope):
  grads = make_grads(scale=2.0)
  injected = optax.inject_hyperparams(od.clip_norm)(max_norm=0.5, soft=True, scope=scope)
  state = injected.init(grads)  # a Python bool is a static argument of inject_hyperparams
  updates, state = jax.jit(injected.update)(grads, state)
  expected, _, _ = np_clip(grads, 0.5, True, scope)
  assert_trees_close(updates, expected, rtol=2e-6, atol=1e-7)
  assert set(state.hyperparams) == {"max_norm"}
  # An array flag is injected too, and switches between the forms at run time.
  injected = optax.inject_hyperparams(od.clip_norm)(0.5, soft=jnp.asarray(True), scope=scope)
  state = injected.init(grads)
  update = jax.jit(injected.update)
  updates, state = update(grads, state)
  assert_trees_close(updates, expected, rtol=2e-6, atol=1e-7)
  state.hyperparams["max_norm"] = jnp.asarray(0.25)
  state.hyperparams["soft"] = jnp.asarray(False)
  updates, state = update(grads, state)
  expected, norm, fraction = np_clip(grads, 0.25, False, scope)
  assert_trees_close(updates, expected, rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(optax.tree.get(state, "clipped_fraction"), fraction, rtol=1e-6)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"max_norm": 0.0}, "max_norm must be > 0, got 0.0"),
    ({"max_norm": -1.0}, "max_norm must be > 0, got -1.0"),
    ({"max_norm": float("nan")}, "max_norm must be > 0, got nan"),
    ({"max_norm": 1.0, "scope": "rows"}, "scope must be one of .*'rows'"),
    ({"max_norm": 1.0, "scope": None}, "scope must be one of .*None"),
    ({"max_norm": 1.0, "soft": "yes"}, "soft must be a bool, got 'yes'"),
    ({"max_norm": 1.0, "soft": None}, "soft must be a bool, got None"),
  ],
)
def test_bad_hyperparameters_raise_value_error(kwargs, message):
  with pytest.raises(ValueError, match=message):
    od.clip_norm(**kwargs)


# ---------------------------------------------------------------------------------------------
# Under jit, scan, vmap, chains, bf16, Flax.


@pytest.mark.parametrize(
  "scope, soft", [("global", False), ("leaf", True), ("row", False), ("row", True)]
)
def test_state_is_stable_under_scan_and_bf16_stays_bf16(scope, soft):
  tx = od.clip_norm(1.0, soft=soft, scope=scope)
  params = make_grads()
  steps = jax.tree.map(lambda x: jnp.stack([x, 2 * x, 0.1 * x]), make_grads(seed=3))
  _, state, updates = run_scan(tx, params, steps)
  for t in range(3):
    expected, norm, _ = np_clip(jax.tree.map(lambda x, t=t: x[t], steps), 1.0, soft, scope)
    assert_trees_close(
      jax.tree.map(lambda x, t=t: x[t], updates), expected, rtol=2e-6, atol=1e-7
    )
  np.testing.assert_allclose(state.norm, norm, rtol=1e-6)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert_keeps_dtype(tx, bf16, bf16)
  assert_state_stable(tx, bf16, bf16)
  updates, _ = jax.jit(tx.update)(bf16, tx.init(bf16))
  expected, _, _ = np_clip(bf16, 1.0, soft, scope)
  assert_trees_close(updates, expected, rtol=1e-2, atol=1e-3)  # one bf16 rounding


def test_the_norm_is_read_with_tree_get_from_a_chain():
  tx = optax.chain(od.clip_norm(1.0, scope="leaf"), optax.adam(1e-3))
  grads = make_grads(scale=3.0)
  _, state = jax.jit(tx.update)(grads, tx.init(grads), grads)
  _, norm, fraction = np_clip(grads, 1.0, False, "leaf")
  np.testing.assert_allclose(optax.tree.get(state, "norm"), norm, rtol=1e-6)
  np.testing.assert_allclose(optax.tree.get(state, "clipped_fraction"), fraction)


def test_vmap_clips_each_example_separately():
  tx = od.clip_norm(1.0, soft=True)
  per_example = jax.tree.map(
    lambda x: jnp.stack([x, 0.01 * x, 10 * x]), make_grads(seed=5)
  )  # leading axis: examples
  state = tx.init(make_grads())
  updates, states = jax.vmap(tx.update, in_axes=(0, None))(per_example, state)
  for e in range(3):
    example = jax.tree.map(lambda x, e=e: x[e], per_example)
    expected, norm, _ = np_clip(example, 1.0, True, "global")
    assert_trees_close(jax.tree.map(lambda x, e=e: x[e], updates), expected, rtol=2e-6)
    np.testing.assert_allclose(states.norm[e], norm, rtol=1e-6)


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(3, 4, rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)


def test_nnx_optimizer_and_train_state():
  tx = optax.chain(od.clip_norm(0.1, soft=True, scope="row"), optax.sgd(1.0))
  model = _Net(nnx.Rngs(0))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), nnx.state(model, nnx.Param))
  expected_update, _, _ = np_clip(nnx.as_pure(grads), 0.1, True, "row")
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx.jit(lambda m, o, g: o.update(m, g))(model, optimizer, grads)
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  expected = jax.tree.map(lambda p, u: np.asarray(p, np.float64) - u, params, expected_update)
  assert_trees_close(after, expected, rtol=1e-6, atol=1e-7)
  assert float(optax.tree.get(nnx.as_pure(optimizer.opt_state), "clipped_fraction")) == 1.0

  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  state = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, nnx.as_pure(grads))
  assert_trees_close(state.params, expected, rtol=1e-6, atol=1e-7)
