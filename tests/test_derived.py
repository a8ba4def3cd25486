"""Weight decay, layer adaptation and piecewise-linear schedules: the worked examples
(§1, §2, §3), NumPy references, exclusions by path, dtypes and validation."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_keeps_dtype
from helpers import assert_trees_close
from helpers import run_scan
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optaxderived as od


def _trajectory(tx, theta0, grads):
  """The params after each gradient, computed in float64 like the worked examples."""
  with jax.enable_x64(True):
    params = jnp.asarray(theta0, jnp.float64)
    state = tx.init(params)
    out = []
    for g in grads:
      updates, state = tx.update(jnp.asarray(g, jnp.float64), state, params)
      params = optax.apply_updates(params, updates)
      out.append(np.asarray(params))
  return out


def _close(actual, desired):
  """Equal to the 7 significant digits of the worked example."""
  np.testing.assert_allclose(actual, desired, rtol=2e-7, atol=1e-9)


def _adam(eps=1e-6):
  return optax.scale_by_adam(eps=eps)


# §1: θ0 = [1, −2], lr 0.1, λ 0.01, Adam (eps 1e-6), g1 = [0.5, −1], g2 = [0.3, 0.2].
SPEC_1_GRADS = [[0.5, -1.0], [0.3, 0.2]]


def test_worked_example_1_adam_with_and_without_weight_decay():
  plain = optax.chain(_adam(), optax.scale_by_learning_rate(0.1))
  decayed = optax.chain(_adam(), od.weight_decay(0.01), optax.scale_by_learning_rate(0.1))
  p1, p2 = _trajectory(plain, [1.0, -2.0], SPEC_1_GRADS)
  _close(p1, [0.9000002, -1.9000001])
  _close(p2, [0.8042514, -1.8488976])
  d1, d2 = _trajectory(decayed, [1.0, -2.0], SPEC_1_GRADS)
  _close(d1, [0.8990002, -1.8980001])
  _close(d2, [0.8023524, -1.8449996])
  np.testing.assert_allclose(p1 - d1, [0.001, -0.002], atol=1e-6)  # lr·λ·θ0


def test_worked_example_1_sgd_with_weight_decay():
  tx = optax.chain(od.weight_decay(0.1), optax.sgd(0.1))
  p1, p2 = _trajectory(tx, [1.0, -2.0], SPEC_1_GRADS)
  _close(p1, [0.94, -1.88])
  _close(p2, [0.9006, -1.8812])


def test_worked_example_2_sgd_with_layer_adaptation():
  tx = optax.chain(od.layer_adaptation(), optax.sgd(0.01))
  w1, w2 = _trajectory(tx, [3.0, 4.0], [[0.1, -0.2], [1.0, 0.0]])
  _close(w1, [2.9776393, 4.0447214])
  np.testing.assert_allclose(np.linalg.norm(w1 - [3.0, 4.0]), 0.05, rtol=1e-5)  # lr·‖W‖
  _close(w2, [2.9274137, 4.0447214])


def test_worked_example_2_adam_weight_decay_layer_adaptation():
  tx = optax.chain(
    _adam(), od.weight_decay(0.01), od.layer_adaptation(), optax.scale_by_learning_rate(0.01)
  )
  w1, w2 = _trajectory(tx, [3.0, 4.0], [[0.1, -0.2], [0.3, 0.1]])
  _close(w1, [2.9634237, 4.0340907])
  _close(w2, [2.914734, 4.0457051])


def test_worked_example_3_piecewise_linear_values_and_sgd_example():
  schedule = od.piecewise_linear({1000: 1, 2000: 0.1})
  got = [float(schedule(t)) for t in (0, 1, 500, 1000, 1500, 2000, 3000)]
  np.testing.assert_allclose(got, [0, 0.001, 0.5, 1, 0.55, 0.1, 0.1], rtol=1e-6, atol=1e-7)
  tx = optax.sgd(od.piecewise_linear({2: 1, 4: 0.5}, scale=0.1))
  thetas = _trajectory(tx, 1.0, [1.0] * 6)
  _close(thetas, [1.0, 0.95, 0.85, 0.775, 0.725, 0.675])


def test_piecewise_linear_starting_at_zero_and_a_single_point():
  np.testing.assert_allclose(
    [float(od.piecewise_linear({0: 0.5, 100: 1})(t)) for t in (0, 50, 100, 1000)],
    [0.5, 0.75, 1.0, 1.0],
  )
  assert float(od.piecewise_linear({0: 1})(12345)) == 1.0
  assert float(od.piecewise_linear({10: 2.0}, scale=3.0)(5)) == 3.0  # 0 -> 2 over 10 steps, ×3


@settings(max_examples=30, deadline=None)
@given(
  points=st.dictionaries(
    st.integers(0, 10_000),
    st.floats(-10, 10, allow_nan=False, width=32),
    min_size=1,
    max_size=6,
  ),
  steps=st.lists(st.integers(0, 20_000), min_size=1, max_size=8),
  scale=st.floats(0.01, 10),
)
def test_piecewise_linear_matches_numpy_interp(points, steps, scale):
  xs = sorted(points)
  ys = [points[x] for x in xs]
  if xs[0] > 0:
    xs, ys = [0, *xs], [0.0, *ys]
  expected = scale * np.interp(np.asarray(steps, np.float64), xs, ys)
  got = jax.vmap(od.piecewise_linear(points, scale))(jnp.asarray(steps))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale * 10)


def test_exclusions_by_path():
  params = {
    "encoder": {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}},
    "Norm": {"scale": jnp.ones(3)},
  }
  grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
  tx = od.weight_decay(0.1, exclude=["bias", "Norm"])
  updates, _ = tx.update(grads, tx.init(params), params)
  assert_trees_close(updates["encoder"]["dense"]["kernel"], 0.6 * jnp.ones((2, 3)))
  assert_trees_close(updates["encoder"]["dense"]["bias"], grads["encoder"]["dense"]["bias"])
  assert_trees_close(updates["Norm"], grads["Norm"])

  tx = od.layer_adaptation(exclude=["bias", "Norm"])
  updates, _ = tx.update(grads, tx.init(params), params)
  ratio = np.linalg.norm(np.ones((2, 3))) / np.linalg.norm(0.5 * np.ones((2, 3)))
  assert_trees_close(updates["encoder"]["dense"]["kernel"], 0.5 * ratio * np.ones((2, 3)))
  assert_trees_close(updates["encoder"]["dense"]["bias"], grads["encoder"]["dense"]["bias"])
  assert_trees_close(updates["Norm"], grads["Norm"])


def test_layer_adaptation_matches_numpy_and_keeps_zero_norm_leaves():
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "a": jax.random.normal(keys[0], (4, 5)),
    "b": jax.random.normal(keys[1], (3, 2, 2)),
    "zero_param": jnp.zeros(3),
    "zero_update": jnp.ones(3),
  }
  grads = {
    "a": jax.random.normal(keys[2], (4, 5)),
    "b": jax.random.normal(keys[3], (3, 2, 2)),
    "zero_param": jnp.ones(3),
    "zero_update": jnp.zeros(3),
  }
  params["complex"] = params["a"] + 1j * params["b"].reshape(4, 3)[:, :1]
  grads["complex"] = grads["a"] - 2j * grads["a"]
  tx = od.layer_adaptation()
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for name in ("a", "b", "complex"):
    p, g = (
      np.asarray(x).astype(np.promote_types(x.dtype, np.float64))
      for x in (params[name], grads[name])
    )
    np.testing.assert_allclose(
      updates[name], g * np.linalg.norm(p) / np.linalg.norm(g), rtol=1e-5
    )
  assert_trees_close(updates["zero_param"], grads["zero_param"])
  assert_trees_close(updates["zero_update"], grads["zero_update"])


def _count_reductions(jaxpr) -> int:
  """``reduce_sum`` equations in a jaxpr and the jaxprs it calls, each call counted."""
  return sum(
    (eqn.primitive.name == "reduce_sum")
    + sum(_count_reductions(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
    for eqn in jaxpr.eqns
  )


def test_layer_adaptation_reduces_each_array_once():
  """Two reductions per adapted leaf, its param's and its update's norm: optax's
  scale_by_trust_ratio (safe_norm) takes four, through a materialised copy, which made the
  derive recipe 1.4x slower."""
  params = {"a": jnp.ones((4, 5)), "b": jnp.ones(3), "bias": jnp.ones(3)}
  tx = od.layer_adaptation(exclude="bias")
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params).jaxpr
  assert _count_reductions(jaxpr) == 4


def test_weight_decay_schedule_counts_updates_and_keeps_bf16():
  rate = optax.linear_schedule(0.1, 0.0, 10)
  params = {"w": jnp.ones(3, jnp.bfloat16)}
  grads = {"w": jnp.full(3, 0.5, jnp.bfloat16)}
  assert_keeps_dtype(od.weight_decay(rate), params, grads)
  assert_keeps_dtype(od.layer_adaptation(exclude="nothing|w"), params, grads)
  tx = od.weight_decay(rate)
  state = tx.init(params)
  for step in range(3):
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["w"], 0.5 + float(rate(step)), rtol=1e-2)


def test_lax_scan_and_inject_hyperparams():
  params = {"w": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])}
  grads = jax.tree.map(lambda p: jnp.stack([p * 0.1 * i for i in range(1, 5)]), params)
  tx = optax.chain(
    _adam(),
    od.weight_decay(0.01, exclude="bias"),
    od.layer_adaptation(exclude="bias"),
    optax.scale_by_learning_rate(od.piecewise_linear({2: 1.0, 4: 0.5}, 0.1)),
  )
  scanned, _, _ = run_scan(tx, params, grads)
  state, looped = tx.init(params), params
  for i in range(4):
    updates, state = tx.update(jax.tree.map(lambda g, i=i: g[i], grads), state, looped)
    looped = optax.apply_updates(looped, updates)
  assert_trees_close(scanned, looped, rtol=1e-6)

  injected = optax.inject_hyperparams(od.weight_decay)(rate=0.1)
  plain = od.weight_decay(0.1)
  one = jax.tree.map(lambda g: g[0], grads)
  u1, _ = jax.jit(injected.update)(one, injected.init(params), params)
  u2, _ = plain.update(one, plain.init(params), params)
  assert_trees_close(u1, u2)


def test_nnx_optimizer_with_exclusions():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 2, rngs=rngs)

  model = Net(nnx.Rngs(0))
  tx = optax.chain(
    _adam(),
    od.weight_decay(0.01, exclude="bias"),
    od.layer_adaptation(exclude="bias"),
    optax.scale_by_learning_rate(0.1),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  optimizer.update(model, grads)
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  step = np.linalg.norm(after["dense"]["kernel"] - before["dense"]["kernel"])
  np.testing.assert_allclose(step, 0.1 * np.linalg.norm(before["dense"]["kernel"]), rtol=1e-5)


@pytest.mark.parametrize(
  "make, message",
  [
    (lambda: od.weight_decay(-0.1), "rate must be in"),
    (lambda: od.weight_decay(0.1, exclude="("), "exclude: invalid regex"),
    (lambda: od.layer_adaptation(exclude=[3]), "exclude must hold regex strings"),
    (lambda: od.piecewise_linear({}), "points must be a non-empty"),
    (lambda: od.piecewise_linear([(1, 1.0)]), "points must be a non-empty"),
    (lambda: od.piecewise_linear({-1: 1.0}), "steps must be integers >= 0, got -1"),
    (lambda: od.piecewise_linear({1.5: 1.0}), "steps must be integers >= 0, got 1.5"),
    (lambda: od.piecewise_linear({1: float("nan")}), "multipliers must be finite"),
    (lambda: od.piecewise_linear({1: 1.0}, scale=float("nan")), "scale must be finite"),
  ],
)
def test_bad_hyperparameters_raise_value_error(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_weight_decay_needs_params():
  tx = od.weight_decay(0.1)
  with pytest.raises(ValueError, match="od.weight_decay needs the current params"):
    tx.update({"w": jnp.ones(1)}, tx.init({"w": jnp.ones(1)}))


def test_piecewise_linear_takes_string_keys_and_large_steps():
  """Keys are cast with int() as in the reference (JSON configs give strings), and sorted
  as integers; t - k is exact in integers, so steps past 2^24 keep their resolution."""
  schedule = od.piecewise_linear({"2000": 0.1, "1000": 1.0, 30: 0.5})
  want = np.interp([0, 15, 30, 1000, 1500, 2000, 9000], [0, 30, 1000, 2000], [0, 0.5, 1, 0.1])
  got = [float(schedule(t)) for t in (0, 15, 30, 1000, 1500, 2000, 9000)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  big = od.piecewise_linear({100_000_000: 0.0, 100_000_004: 1.0})
  got = [float(big(jnp.int32(100_000_000 + i))) for i in range(6)]
  np.testing.assert_allclose(got, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
