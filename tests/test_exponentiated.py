"""Exponentiated gradient: EG, normalised EG, EG± and EG step-size adaptation.

References are NumPy float64 loops written from the formulas, worked examples computed by
hand, the step-size trajectory of the per-coordinate rule on a quadratic and the pitfall of
the unnormalised rule.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_keeps_dtype
from helpers import assert_state_stable
from helpers import assert_trees_close
from helpers import run_scan
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import optaxderived as od

F32_EPS = float(np.finfo(np.float32).eps)
FEW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def np64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def random_tree(seed, shapes, positive=False):
  rng = np.random.default_rng(seed)
  tree = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  if positive:
    tree = {k: np.exp(0.5 * v).astype(np.float32) for k, v in tree.items()}
  return jax.tree.map(jnp.asarray, tree)


def stacked_grads(seed, shapes, steps, scale=1.0):
  rng = np.random.default_rng(seed)
  return {
    k: jnp.asarray(scale * rng.normal(size=(steps, *s)), jnp.float32) for k, s in shapes.items()
  }


SHAPES = {"a": (3, 4), "b": (5,), "c": (2, 3, 2)}


# ---------------------------------------------------------------------------------------------
# NumPy references (float64, from the formulas).


def np_eg(theta, g, lr, axes=None):
  if axes is None:
    return theta * np.exp(-lr * g)
  z = np.log(theta) - lr * g
  z = np.exp(z - z.max(axis=axes, keepdims=True))
  return z / z.sum(axis=axes, keepdims=True)


def np_eg_pm(theta0, grads, lrs, total_mass=None, init_scale=1e-2):
  """EG± over a dict of leaves; returns the params and (u, v) after every step."""
  keys = sorted(theta0)
  theta0 = {k: np.asarray(theta0[k], np.float64) for k in keys}
  if total_mass is None:
    s = init_scale
  else:
    n = sum(theta0[k].size for k in keys)
    s = (total_mass - sum(np.abs(theta0[k]).sum() for k in keys)) / (2 * n)
  u = {k: np.maximum(theta0[k], 0) + s for k in keys}
  v = {k: np.maximum(-theta0[k], 0) + s for k in keys}
  for g, lr in zip(grads, lrs, strict=True):
    r = {k: np.exp(-lr * np.asarray(g[k], np.float64)) for k in keys}
    if total_mass is None:
      u = {k: u[k] * r[k] for k in keys}
      v = {k: v[k] / r[k] for k in keys}
    else:
      z = sum((u[k] * r[k] + v[k] / r[k]).sum() for k in keys)
      u = {k: total_mass * u[k] * r[k] / z for k in keys}
      v = {k: total_mass * v[k] / (r[k] * z) for k in keys}
  return {k: u[k] - v[k] for k in keys}, u, v


def np_eg_step_size(
  theta, grads, *, lr, momentum, gamma, granularity, normalize, c=1.0, bounds=(1e-3, 1e3)
):
  """EG step-size adaptation around SGD with momentum (m ← βm + g, u = −lr·m), float64."""
  keys = sorted(theta)
  theta = {k: np.asarray(theta[k], np.float64) for k in keys}
  m = {k: np.zeros_like(theta[k]) for k in keys}
  prev = {k: np.zeros_like(theta[k]) for k in keys}
  if granularity == "element":
    gains = {k: np.ones_like(theta[k]) for k in keys}
  else:
    gains = {k: 1.0 for k in keys}
  history = []
  for g in grads:
    g = {k: np.asarray(g[k], np.float64) for k in keys}

    def frac(us, gs):
      dot = sum(np.sum(u * -x) for u, x in zip(us, gs, strict=True))
      if not normalize:
        return dot
      denom = np.sqrt(sum(np.sum(u * u) for u in us)) * np.sqrt(sum(np.sum(x * x) for x in gs))
      return dot / denom if denom > 0 else 0.0

    if granularity == "element":
      e = {k: np.sign(prev[k]) * np.sign(-g[k]) if normalize else prev[k] * -g[k] for k in keys}
    elif granularity == "leaf":
      e = {k: frac([prev[k]], [g[k]]) for k in keys}
    else:
      total = frac([prev[k] for k in keys], [g[k] for k in keys])
      e = {k: total for k in keys}
    gains = {k: np.clip(gains[k] * np.exp(np.clip(gamma * e[k], -c, c)), *bounds) for k in keys}
    m = {k: momentum * m[k] + g[k] for k in keys}
    u = {k: -lr * m[k] for k in keys}
    theta = {k: theta[k] + gains[k] * u[k] for k in keys}
    prev = u
    history.append(gains)
  return theta, history


# ---------------------------------------------------------------------------------------------
# exponentiated_gradient.


def test_eg_worked_examples():
  tx = od.exponentiated_gradient(0.1)
  theta = jnp.array([0.5, 2.0])
  u, _ = tx.update(jnp.array([1.0, -1.0]), tx.init(theta), theta)
  assert_trees_close(optax.apply_updates(theta, u), np.array([0.4524187, 2.2103418]), rtol=1e-6)

  tx = od.exponentiated_gradient(0.1, simplex_axis=0)
  theta = jnp.array([0.5, 0.5])
  u, _ = tx.update(jnp.array([1.0, 0.0]), tx.init(theta), theta)
  assert_trees_close(optax.apply_updates(theta, u), np.array([0.4750208, 0.5249792]), rtol=1e-6)


@pytest.mark.parametrize("simplex_axis", [None, -1, (0, -1)])
def test_eg_matches_numpy_over_steps_with_a_schedule(simplex_axis):
  steps = 6
  schedule = optax.linear_schedule(0.3, 0.05, steps)
  shapes = SHAPES if simplex_axis != (0, -1) else {"a": (3, 4), "c": (2, 3, 2)}
  params = random_tree(0, shapes, positive=True)
  grads = stacked_grads(1, shapes, steps)
  final, state, _ = run_scan(
    od.exponentiated_gradient(schedule, simplex_axis=simplex_axis), params, grads
  )
  theta = np64(params)
  for t in range(steps):
    lr = float(schedule(t))
    theta = {
      k: np_eg(theta[k], np.asarray(grads[k][t], np.float64), lr, simplex_axis) for k in theta
    }
  assert_trees_close(final, theta, rtol=2e-5)
  assert int(state.count) == steps


@pytest.mark.parametrize("simplex_axis", [None, -1])
def test_eg_never_underflows_to_zero_nor_nan(simplex_axis):
  """Many shrinking steps stop at the smallest normal number, so a slice can come back from
  them (it reached exactly 0, then 0/0 = NaN on the simplex, before the absolute floor)."""
  tx = od.exponentiated_gradient(1.0, simplex_axis=simplex_axis)
  params = jnp.array([0.5, 0.5])
  state = tx.init(params)
  # (unnormalised EG only shrinks the first entry, then grows it slowly: e^100 overflows)
  down = jnp.array([100.0, -100.0]) if simplex_axis is not None else jnp.array([100.0, 0.0])
  up = -down if simplex_axis is not None else -down / 100
  for t in range(12):
    updates, state = tx.update(down if t < 8 else up, state, params)
    params = optax.apply_updates(params, updates)
    assert bool(jnp.all((params > 0) & jnp.isfinite(params))), (t, params)
  if simplex_axis is not None:
    assert float(params[0]) > 0.99  # back on the favoured side after 4 steps


def test_empty_trees_are_no_ops():
  """An optax.masked branch or a partition label that matched no params gives empty trees."""
  params = {"w": jnp.ones(3)}
  for tx in (
    od.eg_step_size(optax.sgd(0.1), 0.1, granularity="global"),
    od.eg_plus_minus(0.1, total_mass=10.0),
  ):
    masked = optax.masked(tx, {"w": False})
    updates, _ = masked.update({"w": jnp.ones(3)}, masked.init(params), params)
    np.testing.assert_array_equal(updates["w"], jnp.ones(3))


def test_eg_simplex_accepts_empty_slices():
  params = {"empty": jnp.ones((4, 0)), "none": jnp.ones((0,)), "w": jnp.full((2, 3), 1 / 3)}
  tx = od.exponentiated_gradient(0.1, simplex_axis=-1)
  updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
  assert updates["empty"].shape == (4, 0) and updates["none"].shape == (0,)
  np.testing.assert_allclose(jnp.sum(params["w"] + updates["w"], axis=-1), 1.0, rtol=1e-6)


def test_eg_simplex_keeps_slices_on_the_simplex_from_an_unnormalised_start():
  params = {"w": jnp.array([[1.0, 2.0, 3.0], [0.1, 0.1, 0.2]])}
  grads = stacked_grads(2, {"w": (2, 3)}, 5)
  final, _, _ = run_scan(od.exponentiated_gradient(0.5, simplex_axis=1), params, grads)
  np.testing.assert_allclose(final["w"].sum(axis=1), 1.0, rtol=1e-6)
  assert np.all(final["w"] > 0)


def test_eg_needs_strictly_positive_params_at_init():
  tx = od.exponentiated_gradient(0.1)
  with pytest.raises(ValueError, match=r"strictly positive.*'layer/w'.*1 entries"):
    tx.init({"layer": {"w": jnp.array([1.0, 0.0, 2.0])}})
  with pytest.raises(ValueError, match="strictly positive"):
    tx.init(jnp.array([1.0, -1.0]))
  with pytest.raises(ValueError, match="strictly positive"):
    tx.init(jnp.array([1.0, jnp.nan]))
  jax.eval_shape(tx.init, jnp.array([1.0, -1.0]))  # abstract params cannot be checked


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan")])
def test_eg_rejects_a_non_positive_learning_rate(lr):
  with pytest.raises(ValueError, match="learning_rate"):
    od.exponentiated_gradient(lr)
  with pytest.raises(ValueError, match="learning_rate"):
    od.eg_plus_minus(lr)


def test_eg_validates_simplex_axis_and_params():
  with pytest.raises(ValueError, match="simplex_axis"):
    od.exponentiated_gradient(0.1, simplex_axis="last")
  with pytest.raises(ValueError, match="simplex_axis"):
    od.exponentiated_gradient(0.1, simplex_axis=(0, True))
  with pytest.raises(ValueError, match="simplex_axis=2 is out of range for the leaf 'v'"):
    od.exponentiated_gradient(0.1, simplex_axis=2).init({"v": jnp.ones((2, 2))})
  with pytest.raises(ValueError, match="repeats"):
    od.exponentiated_gradient(0.1, simplex_axis=(0, -2)).init({"v": jnp.ones((2, 2))})
  tx = od.exponentiated_gradient(0.1)
  with pytest.raises(ValueError, match="exponentiated_gradient needs the current params"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
  with pytest.raises(ValueError, match="exponentiated_gradient.*tree structure"):
    tx.update({"a": jnp.ones(2)}, tx.init({"b": jnp.ones(2)}), {"b": jnp.ones(2)})


@jax.jit
def eg_step(params, g, lr):
  """One EG step with a traced learning rate: compiled once for every hypothesis example."""
  tx = od.exponentiated_gradient(lr)
  updates, _ = tx.update(g, tx.init(params), params)
  return optax.apply_updates(params, updates)


@FEW
@given(
  theta=hnp.arrays(np.float32, 6, elements=st.floats(2.0**-16, 1e3, width=32)),
  g=hnp.arrays(np.float32, 6, elements=st.floats(-1e3, 1e3, width=32)),
  lr=st.floats(1e-3, 0.04),  # |ηg| ≤ 40: two growth steps stay below float32's max
)
def test_eg_keeps_params_positive(theta, g, lr):
  params = jnp.asarray(theta)
  for sign in (1.0, -1.0, 1.0):  # shrink, grow back, shrink again
    new = eg_step(params, sign * jnp.asarray(g), lr)
    assert np.all(np.asarray(new) > 0) and np.all(np.isfinite(new))
    exact = np_eg(np.asarray(params, np.float64), sign * np.asarray(g, np.float64), lr)
    old = np.asarray(params, np.float64)
    r = -lr * sign * np.asarray(g, np.float64)
    free = r > math.log(8 * F32_EPS)  # where the floor does not bind
    # exp(r) in float32 is off by about eps·|r|, and an additive update carries an absolute
    # error of a few eps·θ_old (documented).
    error = np.abs(np.asarray(new, np.float64) - exact)
    bound = (1e-6 + 2 * F32_EPS * np.abs(r)) * exact + 3 * F32_EPS * old
    assert np.all((error <= bound)[free]), error / exact
    assert np.all(np.asarray(new) >= old * 2 * F32_EPS)  # the floor
    params = new


@jax.jit
def eg_simplex_step(params, g, lr):
  tx = od.exponentiated_gradient(lr, simplex_axis=-1)
  updates, _ = tx.update(g, tx.init(params), params)
  return optax.apply_updates(params, updates)


@FEW
@given(
  logits=hnp.arrays(np.float32, (3, 5), elements=st.floats(-8, 8, width=32)),
  g=hnp.arrays(np.float32, (3, 5), elements=st.floats(-100, 100, width=32)),
  lr=st.floats(1e-3, 0.1),
)
def test_eg_simplex_invariants(logits, g, lr):
  params = jax.nn.softmax(jnp.asarray(logits), axis=-1)
  new = np.asarray(eg_simplex_step(params, jnp.asarray(g), lr), np.float64)
  assert np.all(new > 0)
  np.testing.assert_allclose(new.sum(-1), 1.0, atol=2e-5)
  old = np.asarray(params, np.float64)
  exact = np_eg(old, np.asarray(g, np.float64), lr, -1)
  free = exact / old > 8 * F32_EPS  # where the floor of the factor does not bind
  error = np.abs(new - exact)
  assert np.all((error <= 1e-5 * exact + 4 * F32_EPS * old)[free]), error
  assert np.all(new >= 2 * F32_EPS * old)


def test_eg_floor_keeps_a_huge_step_off_zero_in_float32_and_bfloat16():
  for dtype in (jnp.float32, jnp.bfloat16):
    tx = od.exponentiated_gradient(1.0)
    params = jnp.array([1.0, 3.0, 0.7], dtype)
    updates, _ = tx.update(jnp.array([40.0, 1e4, 0.1], dtype), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert new.dtype == dtype and np.all(np.asarray(new, np.float64) > 0)
    # A plain multiplication would give exp(-40) and exp(-1e4): 0 after adding -θ.
    np.testing.assert_allclose(float(new[2]), 0.7 * math.exp(-0.1), rtol=1e-2)


def test_eg_state_dtypes_and_bf16():
  params = {"w": jnp.full((4, 3), 0.25, jnp.bfloat16), "b": jnp.ones(3, jnp.bfloat16)}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
  for axis in (None, -1):
    tx = od.exponentiated_gradient(0.1, simplex_axis=axis)
    assert_state_stable(tx, params, grads)
    assert_keeps_dtype(tx, params, grads)


def test_eg_inject_hyperparams_equals_the_plain_factory():
  params = random_tree(3, {"w": (2, 4)}, positive=True)
  grads = stacked_grads(4, {"w": (2, 4)}, 3)
  plain, _, _ = run_scan(od.exponentiated_gradient(0.2, simplex_axis=-1), params, grads)
  injected_tx = optax.inject_hyperparams(
    od.exponentiated_gradient, static_args=("simplex_axis",)
  )(learning_rate=0.2, simplex_axis=-1)
  injected, state, _ = run_scan(injected_tx, params, grads)
  assert_trees_close(injected, plain, rtol=1e-6)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.2)
  with pytest.raises(ValueError, match="static_args"):
    tx = optax.inject_hyperparams(od.exponentiated_gradient)(learning_rate=0.2, simplex_axis=-1)
    jax.jit(tx.update)(grads["w"][0], tx.init(params["w"]), params["w"])


def test_eg_in_a_flax_train_state():
  from flax.training import train_state

  params = {"rates": jnp.array([0.5, 1.0, 2.0])}
  state = train_state.TrainState.create(
    apply_fn=None, params=params, tx=od.exponentiated_gradient(0.1)
  )
  state = state.apply_gradients(grads={"rates": jnp.array([1.0, 0.0, -1.0])})
  assert_trees_close(state.params["rates"], np.array([0.5, 1.0, 2.0]) * np.exp([-0.1, 0, 0.1]))


def test_eg_learns_mixture_weights():
  """A mixture of three fixed densities fitted by maximum likelihood on the simplex."""
  rng = np.random.default_rng(0)
  true = np.array([0.6, 0.3, 0.1])
  comp = rng.choice(3, size=4000, p=true)
  x = rng.normal(loc=np.array([-2.0, 0.0, 2.0])[comp], scale=0.5)
  dens = jnp.asarray(np.exp(-0.5 * ((x[:, None] - np.array([-2.0, 0, 2.0])) / 0.5) ** 2))

  def nll(w):
    return -jnp.mean(jnp.log(dens @ w))

  tx = od.exponentiated_gradient(1.0, simplex_axis=0)
  w = jnp.full(3, 1 / 3)
  state = tx.init(w)

  @jax.jit
  def step(w, state):
    updates, state = tx.update(jax.grad(nll)(w), state, w)
    return optax.apply_updates(w, updates), state

  for _ in range(200):
    w, state = step(w, state)
  np.testing.assert_allclose(w, np.bincount(comp) / comp.size, atol=2e-2)
  assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# eg_plus_minus.


def test_eg_plus_minus_worked_examples():
  tx = od.eg_plus_minus(0.1, init_scale=1.0)
  params = jnp.zeros(2)
  g = jnp.array([0.5, -0.5])
  updates, state = tx.update(g, tx.init(params), params)
  assert_trees_close(optax.apply_updates(params, updates), np.array([-0.1000417, 0.1000417]))
  assert_trees_close(state.u, np.array([0.9512294, 1.0512711]), rtol=1e-6)
  assert_trees_close(state.v, np.array([1.0512711, 0.9512294]), rtol=1e-6)

  tx = od.eg_plus_minus(0.1, total_mass=2.0)
  state = tx.init(params)
  assert_trees_close(state.u, np.array([0.5, 0.5]))
  updates, state = tx.update(g, state, params)
  assert_trees_close(optax.apply_updates(params, updates), np.array([-0.0499584, 0.0499584]))
  assert_trees_close(state.u, np.array([0.4750208, 0.5249792]), rtol=1e-6)
  assert_trees_close(state.v, np.array([0.5249792, 0.4750208]), rtol=1e-6)


@pytest.mark.parametrize("total_mass", [None, 40.0])
def test_eg_plus_minus_matches_numpy_over_steps(total_mass):
  steps = 6
  schedule = optax.exponential_decay(0.2, 1, 0.8)
  params = random_tree(5, SHAPES)
  grads = stacked_grads(6, SHAPES, steps)
  tx = od.eg_plus_minus(schedule, total_mass=total_mass, init_scale=0.05)
  final, state, _ = run_scan(tx, params, grads)
  per_step = [{k: grads[k][t] for k in grads} for t in range(steps)]
  theta, u, v = np_eg_pm(
    params, per_step, [float(schedule(t)) for t in range(steps)], total_mass, 0.05
  )
  assert_trees_close(final, theta, rtol=1e-5, atol=1e-6)
  assert_trees_close(state.u, u, rtol=1e-5)
  assert_trees_close(state.v, v, rtol=1e-5)


@jax.jit
def eg_pm_run(params, grads, lr):
  """EG± (total mass 10) over a gradient sequence, with a traced learning rate."""
  return run_scan(od.eg_plus_minus(lr, total_mass=10.0), params, grads)[:2]


@FEW
@given(
  theta=hnp.arrays(np.float32, 7, elements=st.floats(-1, 1, width=32)),
  g=hnp.arrays(np.float32, (4, 7), elements=st.floats(-50, 50, width=32)),
  lr=st.floats(1e-3, 1.0),
)
def test_eg_plus_minus_conserves_the_mass(theta, g, lr):
  final, state = eg_pm_run({"w": jnp.asarray(theta)}, {"w": jnp.asarray(g)}, lr)
  mass = float(jnp.sum(state.u["w"]) + jnp.sum(state.v["w"]))
  assert mass == pytest.approx(10.0, rel=1e-5)
  assert np.all(state.u["w"] >= 0) and np.all(state.v["w"] >= 0)
  assert float(jnp.sum(jnp.abs(final["w"]))) <= 10.0 * (1 + 1e-5)
  np.testing.assert_allclose(final["w"], state.u["w"] - state.v["w"], atol=1e-5)


def test_eg_plus_minus_init_and_validation():
  params = {"a": jnp.array([0.5, -1.5]), "b": jnp.array([0.0])}
  state = od.eg_plus_minus(0.1, init_scale=0.25).init(params)
  assert_trees_close(state.u, {"a": np.array([0.75, 0.25]), "b": np.array([0.25])})
  assert_trees_close(state.v, {"a": np.array([0.25, 1.75]), "b": np.array([0.25])})
  state = od.eg_plus_minus(0.1, total_mass=5.0).init(params)  # s = (5 - 2) / 6
  assert_trees_close(state.u, {"a": np.array([1.0, 0.5]), "b": np.array([0.5])})
  with pytest.raises(ValueError, match=r"L1 norm 2.0 must be below total_mass=2.0"):
    od.eg_plus_minus(0.1, total_mass=2.0).init(params)
  bad = jax.jit(od.eg_plus_minus(0.1, total_mass=1.0).init)(params)  # traced: NaN, no raise
  assert np.all(np.isnan(bad.u["b"]))
  for kwargs, name in [
    ({"total_mass": 0.0}, "total_mass"),
    ({"total_mass": -1.0}, "total_mass"),
    ({"init_scale": 0.0}, "init_scale"),
  ]:
    with pytest.raises(ValueError, match=name):
      od.eg_plus_minus(0.1, **kwargs)
  tx = od.eg_plus_minus(0.1)
  with pytest.raises(ValueError, match="eg_plus_minus needs the current params"):
    tx.update(params, tx.init(params))


def test_eg_plus_minus_bf16_starts_exactly_at_the_params():
  params = {"w": jnp.array([1.0, 0.3, -0.7, 3.0], jnp.bfloat16)}
  tx = od.eg_plus_minus(0.1)
  state = tx.init(params)
  np.testing.assert_array_equal(state.u["w"] - state.v["w"], params["w"].astype(jnp.float32))
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  np.testing.assert_array_equal(optax.apply_updates(params, updates)["w"], params["w"])


def test_eg_simplex_stays_on_the_simplex_in_bf16():
  p = jnp.array([[0.25, 0.25, 0.5]], jnp.bfloat16)
  tx = od.exponentiated_gradient(1.0, simplex_axis=-1)
  updates, _ = tx.update(jnp.array([[100.0, 100.0, 0.0]], jnp.bfloat16), tx.init(p), p)
  new = optax.apply_updates(p, updates).astype(jnp.float32)
  np.testing.assert_allclose(new.sum(-1), 1.0, atol=2**-7)
  assert np.all(np.asarray(new) > 0)


def test_eg_plus_minus_bf16_params_track_the_float32_state():
  params = {"w": jnp.array([0.3, -0.2, 0.0, 1.0], jnp.bfloat16)}
  grads = {"w": jnp.asarray(np.random.default_rng(7).normal(size=(50, 4)), jnp.bfloat16)}
  tx = od.eg_plus_minus(0.05)
  assert_keeps_dtype(tx, params, {"w": grads["w"][0]})
  assert_state_stable(tx, params, {"w": grads["w"][0]})
  final, state, _ = run_scan(tx, params, grads)
  assert state.u["w"].dtype == jnp.float32 and final["w"].dtype == jnp.bfloat16
  # The update moves the params to u - v each step: no drift over 50 bf16 steps.
  np.testing.assert_allclose(
    np.asarray(final["w"], np.float32), state.u["w"] - state.v["w"], rtol=8e-3, atol=1e-3
  )


def test_eg_plus_minus_inject_hyperparams():
  params = random_tree(8, {"w": (6,)})
  grads = stacked_grads(9, {"w": (6,)}, 3)
  plain, _, _ = run_scan(od.eg_plus_minus(0.3, total_mass=20.0), params, grads)
  injected, _, _ = run_scan(
    optax.inject_hyperparams(od.eg_plus_minus)(learning_rate=0.3, total_mass=20.0),
    params,
    grads,
  )
  assert_trees_close(injected, plain, rtol=1e-6)


def test_eg_plus_minus_fits_a_sparse_linear_model():
  """EG± with a mass budget recovers a sparse signed weight vector (least squares)."""
  rng = np.random.default_rng(0)
  w_true = np.zeros(20)
  w_true[[2, 7, 11]] = [1.5, -2.0, 0.5]
  x = rng.normal(size=(200, 20))
  y = jnp.asarray(x @ w_true)
  x = jnp.asarray(x)
  tx = od.eg_plus_minus(0.05, total_mass=5.0)
  w = jnp.zeros(20)
  state = tx.init(w)

  @jax.jit
  def step(w, state):
    g = jax.grad(lambda w: 0.5 * jnp.mean((x @ w - y) ** 2))(w)
    updates, state = tx.update(g, state, w)
    return optax.apply_updates(w, updates), state

  for _ in range(400):
    w, state = step(w, state)
  np.testing.assert_allclose(w, w_true, atol=0.05)


# ---------------------------------------------------------------------------------------------
# eg_step_size.


def test_eg_step_size_reproduces_the_reference_trajectory():
  """L = ½(θ₁² + 15θ₂²), θ₀ = [1, 0.1], η = 0.1, γ = 1 (γ/η = 10 here)."""
  tx = od.eg_step_size(
    optax.sgd(0.1),
    10.0,
    granularity="element",
    normalize=False,
    max_exponent=math.inf,
    bounds=(0.0, math.inf),
  )
  grad = jax.grad(lambda t: 0.5 * (t[0] ** 2 + 15 * t[1] ** 2))
  theta = jnp.array([1.0, 0.1])
  state = tx.init(theta)
  update = jax.jit(tx.update)
  expected_theta = [
    [0.9, -0.05],
    [0.678636, -0.025651],
    [0.371198, -0.008981],
    [0.154862, -0.002834],
  ]
  expected_gains = [[1, 1], [2.459603, 0.324652], [4.530227, 0.433256], [5.828039, 0.456305]]
  for t in range(4):
    updates, state = update(grad(theta), state, theta)
    theta = optax.apply_updates(theta, updates)
    np.testing.assert_allclose(state.gains, expected_gains[t], rtol=2e-6)
    np.testing.assert_allclose(theta, expected_theta[t], rtol=2e-5, atol=1e-6)


def run_quadratic(tx, theta0, curvature, steps):
  grad = jax.grad(lambda t: 0.5 * jnp.sum(curvature * t**2))
  theta, state = theta0, tx.init(theta0)
  update = jax.jit(tx.update)
  gains = []
  for _ in range(steps):
    updates, state = update(grad(theta), state, theta)
    theta = optax.apply_updates(theta, updates)
    gains.append(np.asarray(state.gains))
  return theta, np.array(gains)


def test_eg_step_size_pitfall_reference_dies_and_safeguards_rescue():
  """Curvature 25, θ = 1, η = 0.1: the first product is −937.5."""
  curvature, theta0 = jnp.array([25.0]), jnp.array([1.0])
  # Without clipping and bounds the gain underflows to 0 and stays there: training stops.
  raw = od.eg_step_size(
    optax.sgd(0.1), 10.0, granularity="element", normalize=False,
    max_exponent=math.inf, bounds=(0.0, math.inf),
  )  # fmt: skip
  theta, gains = run_quadratic(raw, theta0, curvature, 4)
  np.testing.assert_array_equal(gains[1:, 0], 0.0)
  assert float(theta[0]) == -1.5  # frozen after the first step
  # The reference then turns the dead gain into NaN (0·e^{+1406}); NumPy float64 shows it,
  # so this is the algorithm, not a float32 artefact.
  with np.errstate(over="ignore", invalid="ignore"):
    nu, g_prev, th = 1.0, 0.0, 1.0
    history = []
    for _ in range(4):
      g = 25.0 * th
      nu = nu * np.exp(g_prev * g)
      th, g_prev = th - 0.1 * nu * g, g
      history.append(nu)
  assert history[1] == 0.0 and np.isnan(history[3])
  # The defaults keep the gains inside their bounds, and the gains shrink the divergent step.
  for normalize in (False, True):
    safe = od.eg_step_size(optax.sgd(0.1), 10.0, granularity="element", normalize=normalize)
    theta, gains = run_quadratic(safe, theta0, curvature, 60)
    assert np.all((gains >= 1e-3) & (gains <= 1e3))
    assert abs(float(theta[0])) < 1e-3
  # Plain SGD with this step size diverges (|1 − 2.5| > 1).
  theta, _ = run_quadratic(od.eg_step_size(optax.sgd(0.1), 0.0), theta0, curvature, 10)
  assert abs(float(theta[0])) > 50


ADVERSARIAL = st.sampled_from(
  [0.0, 1.0, -1.0, 1e-30, -1e-30, 1e15, -1e15, 1e30, -1e30, 3e38, math.inf, -math.inf, math.nan]
)
GRANULARITIES = ("global", "leaf", "element")


@jax.jit
def gains_over(grads, params):
  """Every (granularity, normalize) pair over one gradient sequence: one compilation."""
  out = {}
  for granularity in GRANULARITIES:
    for normalize in (True, False):
      tx = od.eg_step_size(
        optax.sgd(0.5), 3.0, granularity=granularity, normalize=normalize, bounds=(0.01, 50.0)
      )

      def step(state, g, tx=tx):
        _, state = tx.update(g, state, params)
        return state, state.gains

      out[granularity, normalize] = jax.lax.scan(step, tx.init(params), grads)[1]
  return out


@FEW
@given(seq=st.lists(hnp.arrays(np.float32, 4, elements=ADVERSARIAL), min_size=8, max_size=8))
def test_eg_step_size_gains_stay_within_bounds_on_adversarial_gradients(seq):
  seq = np.stack(seq)
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  history = gains_over({"a": jnp.asarray(seq[:, :2]), "b": jnp.asarray(seq[:, 2:])}, params)
  for key, gains in history.items():
    for gain in jax.tree.leaves(gains):
      gain = np.asarray(gain)
      assert np.all(np.isfinite(gain)) and np.all((gain >= 0.01) & (gain <= 50.0)), (key, gain)


@pytest.mark.parametrize("granularity", ["global", "leaf", "element"])
@pytest.mark.parametrize("normalize", [True, False])
def test_eg_step_size_matches_numpy(granularity, normalize):
  steps = 8
  params = random_tree(10, SHAPES)
  grads = stacked_grads(11, SHAPES, steps)
  gamma = 0.7 if normalize else 4.0
  tx = od.eg_step_size(
    optax.sgd(0.1, momentum=0.5),
    gamma,
    granularity=granularity,
    normalize=normalize,
    max_exponent=0.5,
    bounds=(0.2, 3.0),
  )
  final, state, _ = run_scan(tx, params, grads)
  per_step = [{k: grads[k][t] for k in grads} for t in range(steps)]
  theta, history = np_eg_step_size(
    params, per_step, lr=0.1, momentum=0.5, gamma=gamma, granularity=granularity,
    normalize=normalize, c=0.5, bounds=(0.2, 3.0),
  )  # fmt: skip
  assert_trees_close(final, theta, rtol=1e-5, atol=1e-6)
  expected_gains = history[-1]
  if granularity == "global":
    np.testing.assert_allclose(state.gains, expected_gains["a"], rtol=1e-5)
  else:
    assert_trees_close(state.gains, expected_gains, rtol=1e-5)
  gains = [np.asarray(g) for g in jax.tree.leaves(state.gains)]
  assert not all(np.all(g == 1) for g in gains)  # the gains did move


def test_eg_step_size_with_zero_meta_rate_is_the_inner_optimizer():
  params = random_tree(12, SHAPES)
  grads = stacked_grads(13, SHAPES, 5)
  adam_final, _, _ = run_scan(optax.adam(1e-2), params, grads)
  for granularity in GRANULARITIES:
    tx = od.eg_step_size(optax.adam(1e-2), 0.0, granularity=granularity)
    final, _, _ = run_scan(tx, params, grads)
    assert_trees_close(final, adam_final, rtol=1e-6)


def test_eg_step_size_zero_gradient_and_schedule():
  tx = od.eg_step_size(optax.sgd(0.1), lambda count: 0.5 * count, granularity="leaf")
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  for g in ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [1.0, 2.0, 0.0]):
    _, state = tx.update({"w": jnp.array(g)}, state, params)
  # Steps 0 and 1 (no previous update, zero gradient) and step 2 (previous update zero) keep
  # the gain at 1; step 3 has cosine 1 and γ = 0.5·3, clipped to max_exponent = 1.
  np.testing.assert_allclose(state.gains["w"], math.e, rtol=1e-6)


def test_eg_step_size_nested_global_times_element_matches_numpy():
  inner = od.eg_step_size(optax.sgd(0.1), 0.3, granularity="element")
  tx = od.eg_step_size(inner, 0.5, granularity="global", max_exponent=0.2)
  params = random_tree(14, {"a": (4,), "b": (3,)})
  grads = stacked_grads(15, {"a": (4,), "b": (3,)}, 6)
  final, _, _ = run_scan(tx, params, grads)
  theta = np64(params)
  s = {k: np.ones_like(v) for k, v in theta.items()}
  big_s, prev_u, prev_v = 1.0, None, None
  for t in range(6):
    g = {k: np.asarray(grads[k][t], np.float64) for k in theta}
    u = {k: -0.1 * g[k] for k in theta}
    if prev_u is not None:
      s = {
        k: np.clip(s[k] * np.exp(np.clip(0.3 * np.sign(prev_u[k] * -g[k]), -1, 1)), 1e-3, 1e3)
        for k in theta
      }
      dot = sum(np.sum(prev_v[k] * -g[k]) for k in theta)
      norms = np.sqrt(sum(np.sum(prev_v[k] ** 2) for k in theta)) * np.sqrt(
        sum(np.sum(g[k] ** 2) for k in theta)
      )
      big_s = np.clip(big_s * np.exp(np.clip(0.5 * dot / norms, -0.2, 0.2)), 1e-3, 1e3)
    v = {k: s[k] * u[k] for k in theta}
    theta = {k: theta[k] + big_s * v[k] for k in theta}
    prev_u, prev_v = u, v
  assert_trees_close(final, theta, rtol=1e-5, atol=1e-7)


def test_eg_step_size_validation():
  sgd = optax.sgd(0.1)
  cases = [
    (lambda: od.eg_step_size(sgd, -0.1), "meta_learning_rate"),
    (lambda: od.eg_step_size(sgd, 0.1, granularity="layer"), "granularity"),
    (lambda: od.eg_step_size(sgd, 0.1, normalize="yes"), "normalize"),
    (lambda: od.eg_step_size(sgd, 0.1, max_exponent=0.0), "max_exponent"),
    (lambda: od.eg_step_size(sgd, 0.1, bounds=(2.0, 1.0)), "bounds"),
    (lambda: od.eg_step_size(sgd, 0.1, bounds=(-1.0, 1.0)), "bounds"),
    (lambda: od.eg_step_size(sgd, 0.1, bounds=1.0), "bounds"),
    (lambda: od.eg_step_size(lambda g: g, 0.1), "inner"),
  ]
  for make, name in cases:
    with pytest.raises(ValueError, match=name):
      make()
  tx = od.eg_step_size(sgd, 0.1)
  with pytest.raises(ValueError, match="eg_step_size.*tree structure"):
    tx.update({"x": jnp.ones(2)}, tx.init({"y": jnp.ones(2)}))


def test_eg_step_size_dtypes_inject_and_extra_args():
  params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros(3, jnp.bfloat16)}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
  for granularity in ("global", "leaf", "element"):
    tx = od.eg_step_size(optax.adam(1e-2), 0.1, granularity=granularity)
    assert_state_stable(tx, params, grads)
    assert_keeps_dtype(tx, params, grads)

  p32 = random_tree(16, {"w": (5,)})
  g32 = stacked_grads(17, {"w": (5,)}, 4)
  plain, _, _ = run_scan(od.eg_step_size(optax.adam(1e-2), 0.4, max_exponent=0.3), p32, g32)
  inject = optax.inject_hyperparams(od.eg_step_size)
  injected, state, _ = run_scan(
    inject(optax.adam(1e-2), meta_learning_rate=0.4, max_exponent=0.3), p32, g32
  )
  assert_trees_close(injected, plain, rtol=1e-6)
  assert float(state.hyperparams["meta_learning_rate"]) == pytest.approx(0.4)

  def needs_value():  # an inner optimizer that requires an extra keyword argument
    def update(updates, state, params=None, *, value):
      return jax.tree.map(lambda g: -value * g, updates), state

    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

  tx = od.eg_step_size(needs_value(), 0.1)
  updates, _ = tx.update(p32, tx.init(p32), p32, value=2.0)
  assert_trees_close(updates, jax.tree.map(lambda x: -2.0 * x, p32))
  state = optax.chain(optax.clip(1.0), tx).init(p32)
  assert optax.tree.get(state, "gains")["w"].shape == ()


def test_eg_step_size_in_flax_nnx_and_train_state():
  from flax import nnx
  from flax.training import train_state

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
      return self.dense(x)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 4)), jnp.float32)
  y = x @ jnp.array([[1.0], [-2.0], [0.5], [0.0]])
  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
    model, od.eg_step_size(optax.adam(3e-2), 0.05, granularity="element"), wrt=nnx.Param
  )

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  first = train_step(model, optimizer)
  for _ in range(100):
    loss = train_step(model, optimizer)
  assert loss < 0.05 * first
  gains = optax.tree.get(nnx.as_pure(optimizer.opt_state), "gains")
  assert gains["dense"]["kernel"].shape == (4, 1)
  assert not np.allclose(gains["dense"]["kernel"], 1.0)

  params = {"w": jnp.zeros(4)}
  state = train_state.TrainState.create(
    apply_fn=None, params=params, tx=od.eg_step_size(optax.sgd(0.1), 1.0)
  )
  for _ in range(3):
    state = state.apply_gradients(grads={"w": -jnp.ones(4)})
  # Aligned steps: gains e^1 then e^2 (cosine 1, clipped at 1): 0.1·(1 + e + e²).
  np.testing.assert_allclose(state.params["w"], 0.1 * (1 + math.e + math.e**2), rtol=1e-6)


def test_param_shaped_state_follows_the_params_sharding():
  from jax.sharding import Mesh
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
  sharding = NamedSharding(mesh, P("d"))
  host = {"w": jnp.linspace(-1.0, 1.0, 16), "b": jnp.linspace(0.5, 1.5, 8)}
  sharded = jax.device_put(host, sharding)
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p), host)
  positive = jax.tree.map(jnp.abs, sharded)
  for tx, params in (
    (od.eg_plus_minus(0.1), sharded),
    (od.eg_step_size(optax.adam(1e-2), 0.3, granularity="element"), sharded),
    (od.exponentiated_gradient(0.1), positive),
  ):
    state = tx.init(params)
    for leaf in jax.tree.leaves(state):
      if leaf.ndim == 1:
        assert leaf.sharding.is_equivalent_to(sharding, 1), leaf.sharding
    results = []
    local = jax.device_get(params)
    for p, s in ((params, state), (local, tx.init(local))):
      u, s = jax.jit(tx.update)(grads, s, p)
      u, s = jax.jit(tx.update)(grads, s, optax.apply_updates(p, u))
      results.append(u)
    assert_trees_close(results[0], results[1], rtol=1e-6)


def test_updates_vmap_over_independent_problems():
  params = jnp.asarray(np.random.default_rng(18).uniform(0.5, 2.0, size=(3, 4)), jnp.float32)
  grads = jnp.asarray(np.random.default_rng(19).normal(size=(3, 4)), jnp.float32)
  for tx in (
    od.exponentiated_gradient(0.3, simplex_axis=0),
    od.eg_plus_minus(0.3, total_mass=20.0),
    od.eg_step_size(optax.adam(0.1), 0.5),
  ):
    states = jax.vmap(tx.init)(params)
    step = jax.vmap(lambda g, s, p, tx=tx: tx.update(g, s, p))
    batched, states = step(grads, states, params)
    batched, _ = step(-grads, states, optax.apply_updates(params, batched))
    for i in range(3):
      state = tx.init(params[i])
      single, state = tx.update(grads[i], state, params[i])
      single, _ = tx.update(-grads[i], state, optax.apply_updates(params[i], single))
      np.testing.assert_allclose(batched[i], single, rtol=1e-6, atol=1e-7)
