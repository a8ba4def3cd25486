"""od.param_ema and od.ema_params: against NumPy (both modes), the worked example, and Flax."""

import flax.serialization
import hypothesis
import hypothesis.strategies as st
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

import optaxderived as od

THETA0 = {"w": np.array([[1.0, -2.0, 0.5], [0.3, 1.2, -0.7]]), "b": np.array([0.5, -1.5])}


def params32():
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), THETA0)


def random_updates(steps, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: (0.1 * rng.standard_normal((steps,) + x.shape)).astype(np.float32), THETA0
  )


def np_ema(theta0, updates, decays, *, debias):
  """The averages from the formulas, in float64, after each update.

  ``decays`` holds one decay per update (each rounded to float32, the value the float32
  computation sees); params move by the updates as given.
  """
  theta = {k: np.asarray(v, np.float64) for k, v in theta0.items()}
  m = {k: np.zeros_like(v) if debias else v.copy() for k, v in theta.items()}
  zero_weight, out = 1.0, []
  for t, mu in enumerate(decays):
    theta = {k: theta[k] + np.asarray(updates[k][t], np.float64) for k in theta}
    m = {k: mu * m[k] + (1 - mu) * theta[k] for k in theta}
    zero_weight *= mu
    out.append({k: m[k] / (1 - zero_weight) if debias else m[k] for k in theta})
  return out


def run_ema(tx, updates):
  """jit(lax.scan) of a chain whose first element emits the given updates."""

  def step(carry, u):
    params, state = carry
    new_updates, state = tx.update(u, state, params)
    params = optax.apply_updates(params, new_updates)
    return (params, state), od.ema_params(state, params)

  params = params32()
  (params, state), history = jax.jit(lambda c, us: jax.lax.scan(step, c, us))(
    (params, tx.init(params)), jax.tree.map(jnp.asarray, updates)
  )
  return params, state, history


def test_the_worked_example():
  """SGD 0.1, g ≡ 1, μ = 0.9, θ0 = 1: raw 0.09, 0.161, 0.2149; debiased below."""
  tx = optax.chain(optax.sgd(0.1), od.param_ema(0.9))
  params = jnp.array(1.0)
  state = tx.init(params)
  raw, debiased = [], []
  for _ in range(3):
    updates, state = tx.update(jnp.array(1.0), state, params)
    params = optax.apply_updates(params, updates)
    raw.append(float(state[1].ema))
    debiased.append(float(od.ema_params(state, params)))
  np.testing.assert_allclose(raw, [0.09, 0.161, 0.2149], rtol=1e-6)
  np.testing.assert_allclose(debiased, [0.9, 0.8473684, 0.7929889], rtol=1e-6)


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999])
def test_matches_numpy(decay, debias):
  updates = random_updates(30)
  _, state, history = run_ema(od.param_ema(decay, debias=debias), updates)
  reference = np_ema(THETA0, updates, [float(np.float32(decay))] * 30, debias=debias)
  for t in (0, 1, 9, 29):
    assert_trees_close(jax.tree.map(lambda x, t=t: x[t], history), reference[t], rtol=2e-6)
  assert int(state.count) == 30


def test_decay_changed_through_inject_hyperparams_is_debiased_with_the_decays_used():
  tx = optax.inject_hyperparams(od.param_ema, static_args=("debias", "accumulator_dtype"))(
    decay=lambda count: jnp.where(count < 5, 0.5, 0.95)
  )
  updates = random_updates(12, seed=1)
  _, _, history = run_ema(tx, updates)
  decays = [0.5] * 5 + [float(np.float32(0.95))] * 7
  reference = np_ema(THETA0, updates, decays, debias=True)
  assert_trees_close(jax.tree.map(lambda x: x[-1], history), reference[-1], rtol=2e-6)


def test_long_run_keeps_float32_precision():
  """1e4 updates at decay 0.9999: 1 - 0.9999**n from a plain float32 product or sum of logs
  is off by up to 1e-4 or 3e-5 relative along the way; the average itself holds 3e-6."""
  steps, decay = 10_000, 0.9999
  rng = np.random.default_rng(2)
  updates = {"x": (1e-3 * rng.standard_normal((steps, 3))).astype(np.float32)}
  tx = od.param_ema(decay)

  def step(carry, u):
    params, state = carry
    _, state = tx.update(u, state, params)
    params = optax.apply_updates(params, u)
    return (params, state), od.ema_params(state, params)

  params = {"x": jnp.array([1.0, -0.5, 2.0])}
  _, history = jax.jit(lambda c, us: jax.lax.scan(step, c, us))(
    (params, tx.init(params)), updates
  )
  reference = np_ema(
    {"x": np.array([1.0, -0.5, 2.0])}, updates, [float(np.float32(decay))] * steps, debias=True
  )
  for t in range(0, steps, 250):
    assert_trees_close(jax.tree.map(lambda x, t=t: x[t], history), reference[t], rtol=1e-5)


@hypothesis.settings(deadline=None, max_examples=30)
@hypothesis.given(
  decay=st.floats(0.0, 0.9999),
  value=st.floats(-100.0, 100.0),
  steps=st.integers(1, 40),
)
def test_debiased_average_of_constant_params_is_that_constant(decay, value, steps):
  tx = od.param_ema(decay)
  params = jnp.array([value], jnp.float32)
  state = tx.init(params)
  for _ in range(steps):
    _, state = tx.update(jnp.zeros(1), state, params)
  np.testing.assert_allclose(od.ema_params(state, params), params, rtol=2e-6, atol=1e-30)


def test_updates_pass_through_unchanged():
  adam = optax.adam(0.1)
  tx = optax.chain(adam, od.param_ema(0.9))
  params = params32()
  grads = jax.tree.map(jnp.ones_like, params)
  ours, _ = tx.update(grads, tx.init(params), params)
  theirs, _ = adam.update(grads, adam.init(params), params)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("debias", [True, False])
def test_before_any_update_the_params_are_returned(debias):
  tx = od.param_ema(0.999, debias=debias)
  params = params32()
  state = tx.init(params)
  out = od.ema_params(state, params)
  assert_trees_close(out, params)
  assert jax.jit(od.ema_params)(state, params)["w"].dtype == jnp.float32
  assert not any(
    np.isnan(x).any() for x in jax.tree.leaves(jax.jit(od.ema_params)(state, params))
  )


def test_state_fields_and_init():
  params = params32()
  state = od.param_ema(0.9).init(params)
  assert state._fields == ("count", "ema", "log_zero_weight", "log_zero_weight_compensation")
  assert_trees_close(state.ema, jax.tree.map(jnp.zeros_like, params))
  assert state.count.dtype == jnp.int32
  assert_trees_close(od.param_ema(0.9, debias=False).init(params).ema, params)
  assert optax.tree.get(state, "ema") is state.ema


def test_bf16_params_get_a_float32_average_and_bf16_eval_params():
  params = {"w": jnp.full((4,), 1.0, jnp.bfloat16)}
  grads = {"w": jnp.full((4,), -1.0, jnp.bfloat16)}
  tx = optax.chain(optax.sgd(0.01), od.param_ema(0.99))
  assert_state_stable(tx, params, grads)
  assert_keeps_dtype(tx, params, grads)
  _, state, _ = run_scan(tx, params, jax.tree.map(lambda g: jnp.stack([g] * 2), grads))
  assert state[1].ema["w"].dtype == jnp.float32
  assert od.ema_params(state, params)["w"].dtype == jnp.bfloat16
  # The float32 average of the bf16 params, against NumPy on the same bf16 trajectory.
  step = jax.jit(
    lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(grads, s, p))
  )
  state, p, trajectory = tx.init(params), params, []
  for _ in range(60):
    p, state = step(p, state)
    trajectory.append(float(p["w"][0]))
  assert len(set(trajectory)) > 30  # the bf16 params do move
  mu = float(np.float32(0.99))
  m = 0.0
  for theta in trajectory:
    m = mu * m + (1 - mu) * theta
  expected = m / (1 - mu**60)
  np.testing.assert_allclose(np.float64(state[1].ema["w"][0]) / (1 - mu**60), expected, 1e-6)
  np.testing.assert_allclose(np.float64(od.ema_params(state, p)["w"][0]), expected, 4e-3)


def test_a_bf16_accumulator_stalls_but_is_never_biased():
  # Without debiasing, (1 - 0.999) * (2 - 1) is below half a bf16 step of 1: a bf16 average
  # stays at 1 where the float32 one moves to 2 - 0.999**100.
  for dtype, want in ((jnp.bfloat16, 1.0), (None, 2 - 0.999**100)):
    tx = od.param_ema(0.999, debias=False, accumulator_dtype=dtype)
    state = tx.init(jnp.ones(1))
    for _ in range(100):
      _, state = tx.update(jnp.zeros(1), state, jnp.full(1, 2.0))
    np.testing.assert_allclose(od.ema_params(state, jnp.full(1, 2.0)), [want], rtol=1e-5)
  # Debiased, constant params stay constant in bf16 (the decay is not rounded to bf16).
  for decay in (0.99, 0.999):
    tx = od.param_ema(decay, accumulator_dtype=jnp.bfloat16)
    state = tx.init(jnp.full(3, 5.0))
    for _ in range(20):
      _, state = tx.update(jnp.zeros(3), state, jnp.full(3, 5.0))
    np.testing.assert_allclose(od.ema_params(state, jnp.full(3, 5.0)), 5.0, rtol=4e-3)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5, float("nan")])
def test_bad_decay_raises(decay):
  with pytest.raises(ValueError, match=r"decay must be in \[0.0, 1.0\), got"):
    od.param_ema(decay)


def test_bad_accumulator_dtype_missing_params_and_mismatched_trees_raise():
  with pytest.raises(ValueError, match="accumulator_dtype must be a floating dtype"):
    od.param_ema(0.9, accumulator_dtype=jnp.int32)
  with pytest.raises(ValueError, match="accumulator_dtype must be a floating dtype"):
    od.param_ema(0.9, accumulator_dtype="nope")
  tx = od.param_ema(0.9)
  state = tx.init({"a": jnp.ones(2)})
  with pytest.raises(ValueError, match="param_ema needs the current params"):
    tx.update({"a": jnp.ones(2)}, state)
  with pytest.raises(ValueError, match="param_ema: the updates, params and average"):
    tx.update({"a": jnp.ones(2), "b": jnp.ones(1)}, state, {"a": jnp.ones(2), "b": jnp.ones(1)})
  with pytest.raises(ValueError, match="ema_params: params have 2 leaves, the average has 1"):
    od.ema_params(state, {"a": jnp.ones(2), "b": jnp.ones(1)})
  with pytest.raises(
    ValueError, match="ema_params: the optimizer state holds no ParamEmaState"
  ):
    od.ema_params(optax.adam(0.1).init({"a": jnp.ones(2)}), {"a": jnp.ones(2)})


def test_accessor_inside_wrappers():
  params = params32()
  tx = optax.chain(
    optax.inject_hyperparams(optax.adam)(0.1),
    optax.masked(optax.scale(1.0), lambda p: jax.tree.map(lambda _: True, p)),
  )
  tx = optax.chain(tx, od.param_ema(0.5))
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  new_params = optax.apply_updates(params, updates)
  assert_trees_close(od.ema_params(state, new_params), new_params, rtol=1e-6)


def test_flax_train_state():
  tx = optax.chain(optax.sgd(0.1), od.param_ema(0.9))
  state = train_state.TrainState.create(apply_fn=None, params=params32(), tx=tx)
  updates = random_updates(6, seed=3)

  @jax.jit
  def train_step(state, g):
    return state.apply_gradients(grads=g)

  for t in range(6):
    state = train_step(state, jax.tree.map(lambda x, t=t: x[t], updates))
  reference = np_ema(
    THETA0, jax.tree.map(lambda x: -0.1 * x, updates), [float(np.float32(0.9))] * 6, debias=True
  )
  assert_trees_close(od.ema_params(state.opt_state, state.params), reference[-1], rtol=2e-6)


class Affine(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.asarray(THETA0["w"], jnp.float32))
    self.b = nnx.Param(jnp.asarray(THETA0["b"], jnp.float32))


def test_nnx_optimizer_with_plain_params_and_evaluation_with_the_average():
  model = Affine()
  optimizer = nnx.Optimizer(
    model, optax.chain(optax.sgd(0.1), od.param_ema(0.9)), wrt=nnx.Param
  )
  updates = random_updates(6, seed=4)

  @nnx.jit
  def train_step(model, optimizer, g):
    # The gradient of a loss linear in the params is the given tree.
    grads = nnx.grad(lambda m: jnp.sum(g["w"] * m.w[...]) + jnp.sum(g["b"] * m.b[...]))(model)
    optimizer.update(model, grads)

  for t in range(6):
    train_step(model, optimizer, jax.tree.map(lambda x, t=t: jnp.asarray(x[t]), updates))
  reference = np_ema(
    THETA0, jax.tree.map(lambda x: -0.1 * x, updates), [float(np.float32(0.9))] * 6, debias=True
  )[-1]
  opt_state = nnx.as_pure(optimizer.opt_state)
  # The params as pure arrays, or as the nnx.State of Variables that nnx.state returns.
  pure = od.ema_params(opt_state, nnx.as_pure(nnx.state(model, nnx.Param)))
  assert_trees_close(dict(pure), reference, rtol=2e-6)
  with_variables = od.ema_params(opt_state, nnx.state(model, nnx.Param))
  assert isinstance(with_variables["w"], nnx.Param)
  nnx.update(model, with_variables)
  assert_trees_close({"w": model.w[...], "b": model.b[...]}, reference, rtol=2e-6)


def test_state_round_trips_through_flax_serialization():
  tx = od.param_ema(0.9)
  params = params32()
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  restored = flax.serialization.from_bytes(tx.init(params), flax.serialization.to_bytes(state))
  assert type(restored) is od.ParamEmaState
  assert_trees_close(restored, state)


def test_sharded_params_give_a_sharded_average():
  mesh = jax.make_mesh((8,), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  params = jax.device_put({"w": jnp.arange(16.0).reshape(8, 2)}, sharding)
  for debias in (True, False):
    tx = od.param_ema(0.9, debias=debias)
    state = tx.init(params)
    assert state.ema["w"].sharding.is_equivalent_to(sharding, 2)
    _, state = jax.jit(tx.update)(params, state, params)
    assert state.ema["w"].sharding.is_equivalent_to(sharding, 2)
    expected = 2 * params["w"] if debias else 1.1 * params["w"]  # one update of +params
    np.testing.assert_allclose(od.ema_params(state, params)["w"], expected, rtol=1e-6)


def test_vmap_over_independent_runs_and_abstract_init():
  tx = od.param_ema(0.9)
  params = jnp.stack([jnp.array([1.0, -2.0]), jnp.array([0.5, 3.0])])
  updates = [0.3 * params + 0.1, -0.2 * params]
  state, batched = jax.vmap(tx.init)(params), params
  for u in updates:
    _, state = jax.jit(jax.vmap(tx.update))(u, state, batched)
    batched = optax.apply_updates(batched, u)
  out = jax.vmap(od.ema_params)(state, batched)
  for i in range(2):
    reference = np_ema(
      {"x": params[i]}, {"x": np.stack([u[i] for u in updates])}, [0.9] * 2, debias=True
    )
    np.testing.assert_allclose(out[i], reference[-1]["x"], rtol=1e-6)
  shapes = jax.eval_shape(tx.init, jax.ShapeDtypeStruct((4, 3), jnp.bfloat16))
  assert shapes.ema.shape == (4, 3) and shapes.ema.dtype == jnp.float32


def test_ema_params_reads_the_raw_nnx_opt_state():
  """Like has_updated and lookahead_params: the Variables nnx puts around the state's
  leaves are unwrapped."""
  model = Affine()
  optimizer = nnx.Optimizer(
    model, optax.chain(optax.sgd(0.1), od.param_ema(0.5)), wrt=nnx.Param
  )
  grads = nnx.grad(lambda m: jnp.sum(m.w[...]) + jnp.sum(m.b[...]))(model)
  optimizer.update(model, grads)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  raw = od.ema_params(optimizer.opt_state, params)
  assert_trees_close(dict(raw), dict(od.ema_params(nnx.as_pure(optimizer.opt_state), params)))
  assert_trees_close(dict(raw), dict(params))  # one update, debiased: the params themselves


def test_float64_averages_keep_float64_precision():
  """Under x64 the decay and the debiasing sum are float64 (they were float32: 1e-5 off)."""
  with jax.enable_x64(True):
    decay, steps = 0.9999, 300
    params = jnp.asarray([1.0, -2.0], jnp.float64)
    tx = od.param_ema(decay)
    state = tx.init(params)
    assert state.log_zero_weight.dtype == jnp.float64
    update = jax.jit(tx.update)
    m, p = np.zeros(2), np.asarray(params)
    for t in range(steps):
      u = jnp.asarray([1e-3 * np.sin(t), 2e-3 * np.cos(t)], jnp.float64)
      _, state = update(u, state, params)
      params = params + u
      p = p + np.asarray(u)
      m = decay * m + (1 - decay) * p
    got = od.ema_params(state, params)
    np.testing.assert_allclose(got, m / (1 - decay**steps), rtol=1e-12)
