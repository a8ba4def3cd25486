"""od.lookahead and od.lookahead_params: against NumPy, optax.lookahead, and in Flax."""

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

# A quadratic loss with a different curvature per coordinate, so the gradient depends on
# where it is taken (the fast params) and a wrong point shows.
A = {"w": np.array([[1.0, 0.5, 2.0], [0.3, 1.5, 0.8]]), "b": np.array([0.7, 2.5])}
B = {"w": np.array([[0.2, -0.4, 1.0], [0.5, 0.1, -0.3]]), "b": np.array([-1.0, 0.4])}
THETA0 = {"w": np.array([[1.0, -2.0, 0.5], [0.3, 1.2, -0.7]]), "b": np.array([0.5, -1.5])}


def loss(params):
  return sum(0.5 * jnp.sum(A[k] * (params[k] - B[k]) ** 2) for k in params)


def np_grad(theta):
  return {k: A[k] * (theta[k] - B[k]) for k in theta}


def params32():
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), THETA0)


class NpMomentum:
  """optax.sgd(lr, momentum=beta) in float64 NumPy: trace = g + beta·trace, u = -lr·trace."""

  def __init__(self, lr, beta=0.9):
    self.lr, self.beta = lr, beta

  def init(self, theta):
    return {k: np.zeros_like(v) for k, v in theta.items()}

  def update(self, g, trace):
    trace = {k: g[k] + self.beta * trace[k] for k in g}
    return {k: -self.lr * trace[k] for k in g}, trace


def np_lookahead(inner, k, alpha, steps, *, reset=False, alpha_schedule=None):
  """The paper's loop in float64: returns the params and slow weights after each call."""
  theta = {key: v.copy() for key, v in THETA0.items()}
  slow = {key: v.copy() for key, v in THETA0.items()}
  state = inner.init(theta)
  history = []
  for t in range(steps):
    u, state = inner.update(np_grad(theta), state)
    theta = {key: theta[key] + u[key] for key in theta}
    if (t + 1) % k == 0:
      a = alpha_schedule(t) if alpha_schedule else alpha
      slow = {key: slow[key] + a * (theta[key] - slow[key]) for key in theta}
      theta = {key: v.copy() for key, v in slow.items()}
      if reset:
        state = inner.init(theta)
    history.append((theta, slow))
  return history


def run_jax(tx, steps):
  """jit(lax.scan) of ``steps`` calls with the gradient of ``loss`` at the params."""

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), (params, od.lookahead_params(state))

  params = params32()
  _, history = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(
    (params, tx.init(params))
  )
  return history


@pytest.mark.parametrize("k, alpha", [(1, 0.5), (2, 0.5), (3, 0.8), (5, 0.5), (4, 0.25)])
def test_matches_a_numpy_loop(k, alpha):
  steps = 3 * k + 2
  params, slow = run_jax(od.lookahead(optax.sgd(0.05, momentum=0.9), k, alpha), steps)
  reference = np_lookahead(NpMomentum(0.05), k, alpha, steps)
  for t, (theta_ref, slow_ref) in enumerate(reference):
    at_t = lambda tree, t=t: jax.tree.map(lambda x: x[t], tree)
    assert_trees_close(at_t(params), theta_ref, rtol=2e-5, atol=1e-6)
    assert_trees_close(at_t(slow), slow_ref, rtol=2e-5, atol=1e-6)


def test_reset_inner_state_matches_a_numpy_loop():
  params, slow = run_jax(
    od.lookahead(optax.sgd(0.05, momentum=0.9), 3, 0.5, reset_inner_state=True), 10
  )
  reference = np_lookahead(NpMomentum(0.05), 3, 0.5, 10, reset=True)
  assert_trees_close(jax.tree.map(lambda x: x[-1], params), reference[-1][0], rtol=2e-5)
  assert_trees_close(jax.tree.map(lambda x: x[-1], slow), reference[-1][1], rtol=2e-5)
  # And the reset matters: without it the run differs.
  no_reset = np_lookahead(NpMomentum(0.05), 3, 0.5, 10)
  assert not np.allclose(no_reset[-1][0]["w"], reference[-1][0]["w"], rtol=1e-3)


def test_the_worked_example_paper_semantics():
  """Worked example: L = θ²/2, SGD 0.1, k = 2, α = 0.5, θ0 = 1 (bert4keras gives 0.45 first)."""
  tx = od.lookahead(optax.sgd(0.1), 2, 0.5)
  params = jnp.array(1.0)
  state = tx.init(params)
  seen = []
  for _ in range(5):
    updates, state = tx.update(params, state, params)
    params = optax.apply_updates(params, updates)
    seen.append(float(params))
  np.testing.assert_allclose(seen, [0.9, 0.905, 0.8145, 0.819025, 0.7371225], rtol=1e-6)
  np.testing.assert_allclose(od.lookahead_params(state), 0.819025, rtol=1e-6)


@pytest.mark.parametrize("k, alpha, reset", [(1, 0.5, False), (3, 0.8, False), (4, 0.5, True)])
def test_matches_optax_lookahead(k, alpha, reset):
  """optax's fast params are our params, its slow params our lookahead_params."""
  inner = optax.adam(0.05)
  ours = od.lookahead(inner, k, alpha, reset_inner_state=reset)
  theirs = optax.lookahead(inner, k, alpha, reset_state=reset)

  @jax.jit
  def step(params, state, lparams, lstate):
    updates, state = ours.update(jax.grad(loss)(params), state, params)
    lupdates, lstate = theirs.update(jax.grad(loss)(lparams.fast), lstate, lparams)
    return (
      optax.apply_updates(params, updates),
      state,
      optax.apply_updates(lparams, lupdates),
      lstate,
    )

  params = params32()
  lparams = optax.LookaheadParams.init_synced(params)
  state, lstate = ours.init(params), theirs.init(lparams)
  for _ in range(3 * k + 1):
    params, state, lparams, lstate = step(params, state, lparams, lstate)
    assert_trees_close(params, lparams.fast, rtol=1e-6, atol=1e-7)
    assert_trees_close(od.lookahead_params(state), lparams.slow, rtol=1e-6, atol=1e-7)


def test_alpha_one_is_the_inner_optimizer():
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05))
  params, _ = run_jax(od.lookahead(inner, 3, 1.0), 9)

  @jax.jit
  def step(p, state):
    updates, state = inner.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  p = params32()
  state = inner.init(p)
  for t in range(9):
    p, state = step(p, state)
    # exactly: on a sync the update is the fast step itself
    assert_trees_close(jax.tree.map(lambda x, t=t: x[t], params), p, rtol=0, atol=0)


@pytest.mark.parametrize(
  "param_dtype, grad_dtype",
  [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.bfloat16)],
)
def test_after_a_sync_the_params_are_the_slow_weights_exactly(param_dtype, grad_dtype):
  """The jump onto the new slow weights is rounded to the update's dtype and added to the
  params: the slow weights are where the params land, whatever the rounding."""
  keys = jax.random.split(jax.random.key(0), 3)
  params = jax.random.normal(keys[0], (1000,), param_dtype)
  tx = od.lookahead(optax.sgd(0.5), sync_period=2, slow_step_size=0.5)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for key in jax.random.split(keys[1], 6):
    grads = jax.random.normal(key, (1000,), grad_dtype)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params, od.lookahead_params(state))
  assert params.dtype == param_dtype


@hypothesis.settings(deadline=None, max_examples=25)
@hypothesis.given(
  alpha=st.floats(0.05, 1.0),
  grads=st.lists(st.floats(-3.0, 3.0), min_size=1, max_size=6),
)
def test_sync_every_step_scales_the_inner_update(alpha, grads):
  """k = 1: every step syncs from params = slow, so θ ← θ + α·u (u from the inner state)."""
  ours = od.lookahead(optax.adam(0.1), 1, alpha)
  scaled = optax.chain(optax.adam(0.1), optax.scale(alpha))
  params_a = params_b = jnp.array([0.3, -0.2])
  state_a, state_b = ours.init(params_a), scaled.init(params_b)
  for g in grads:
    g = jnp.array([g, -g])
    u_a, state_a = ours.update(g, state_a, params_a)
    u_b, state_b = scaled.update(g, state_b, params_b)
    params_a = optax.apply_updates(params_a, u_a)
    params_b = optax.apply_updates(params_b, u_b)
  np.testing.assert_allclose(params_a, params_b, rtol=1e-5, atol=1e-6)


def test_slow_step_size_schedule_is_read_at_the_call_count():
  schedule = lambda count: jnp.where(count < 4, 0.5, 0.9)
  params, slow = run_jax(od.lookahead(optax.sgd(0.05, momentum=0.9), 2, schedule), 8)
  reference = np_lookahead(
    NpMomentum(0.05), 2, None, 8, alpha_schedule=lambda t: 0.5 if t < 4 else 0.9
  )
  assert_trees_close(jax.tree.map(lambda x: x[-1], slow), reference[-1][1], rtol=2e-5)


def test_inject_hyperparams():
  factory = optax.inject_hyperparams(od.lookahead, static_args=("reset_inner_state",))
  tx = factory(optax.sgd(0.05, momentum=0.9), 3, 0.8)
  params, slow = run_jax(tx, 7)
  reference = np_lookahead(NpMomentum(0.05), 3, 0.8, 7)
  assert_trees_close(jax.tree.map(lambda x: x[-1], params), reference[-1][0], rtol=2e-5)
  # A changed hyperparameter in the state takes effect at the next sync.
  state = tx.init(params32())
  state.hyperparams["slow_step_size"] = jnp.asarray(1.0)
  p = params32()
  for _ in range(3):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    p = optax.apply_updates(p, updates)
  plain = optax.sgd(0.05, momentum=0.9)
  q, s = params32(), plain.init(params32())
  for _ in range(3):
    updates, s = plain.update(jax.grad(loss)(q), s, q)
    q = optax.apply_updates(q, updates)
  assert_trees_close(p, q, rtol=1e-6)


def test_state_is_stable_under_scan_and_keeps_bf16():
  params = {"w": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.zeros(2, jnp.bfloat16)}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  for tx in (
    od.lookahead(optax.adam(0.1), 2),
    od.lookahead(optax.sgd(0.1), 1, 0.5, reset_inner_state=True),
  ):
    assert_state_stable(tx, params, grads)
    assert_keeps_dtype(tx, params, grads)
    final, state, updates = run_scan(
      tx, params, jax.tree.map(lambda g: jnp.stack([g] * 5), grads)
    )
    assert jax.tree.map(lambda x: x.dtype, state.slow) == jax.tree.map(
      lambda x: x.dtype, params
    )
    assert int(state.step) == 5
  # bf16 params with float32 gradients: updates float32, params stay bf16.
  assert_keeps_dtype(od.lookahead(optax.sgd(0.1), 2), params, jax.tree.map(jnp.float32, grads))


def test_state_fields_and_accessor_inside_wrappers():
  params = params32()
  tx = od.lookahead(optax.adam(0.1), 5, 0.5)
  state = tx.init(params)
  assert state._fields == ("slow", "step", "inner_state")
  assert_trees_close(state.slow, params)
  assert state.step.dtype == jnp.int32
  assert optax.tree.get(state, "slow") is state.slow
  # Anywhere inside a chain or a wrapper state; the outermost one is read.
  chained = optax.chain(optax.clip(1.0), optax.inject_hyperparams(optax.scale)(1.0), tx)
  assert_trees_close(od.lookahead_params(chained.init(params)), params)
  inner = od.lookahead(optax.sgd(0.1), 2, 0.5)
  nested = od.lookahead(inner, 3, 0.5).init({"x": jnp.ones(1)})
  assert od.lookahead_params(nested) is nested.slow
  with pytest.raises(ValueError, match="lookahead_params: the optimizer state holds no"):
    od.lookahead_params(optax.adam(0.1).init(params))


def test_lookahead_chains_with_param_ema_after_it():
  tx = optax.chain(od.lookahead(optax.sgd(0.1), 2, 0.5), od.param_ema(0.0))
  params = jnp.array(1.0)
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(params, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params, 0.905, rtol=1e-6)
  np.testing.assert_allclose(od.ema_params(state, params), 0.905, rtol=1e-6)


def test_extra_args_reach_the_inner_optimizer():
  seen = {}

  def update(updates, state, params=None, *, token=None):
    seen["token"] = token
    return updates, state

  inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  tx = od.lookahead(inner, 2, 0.5)
  tx.update(jnp.ones(2), tx.init(jnp.ones(2)), jnp.ones(2), token=7)
  assert seen["token"] == 7
  # A plain GradientTransformation inside ignores extra arguments.
  plain = od.lookahead(optax.sgd(0.1), 2, 0.5)
  plain.update(jnp.ones(2), plain.init(jnp.ones(2)), jnp.ones(2), token=7)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"sync_period": 0}, "sync_period must be an integer >= 1, got 0"),
    ({"sync_period": -3}, "sync_period must be an integer >= 1, got -3"),
    ({"sync_period": 2.5}, "sync_period must be an integer >= 1, got 2.5"),
    ({"sync_period": True}, "sync_period must be an integer >= 1, got True"),
    ({"slow_step_size": 0.0}, r"slow_step_size must be in \(0.0, 1.0\], got 0.0"),
    ({"slow_step_size": 1.5}, r"slow_step_size must be in \(0.0, 1.0\], got 1.5"),
    ({"slow_step_size": -0.5}, r"slow_step_size must be in \(0.0, 1.0\], got -0.5"),
    ({"slow_step_size": float("nan")}, "slow_step_size must be in"),
  ],
)
def test_bad_hyperparameters_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    od.lookahead(optax.sgd(0.1), **kwargs)


def test_bad_inner_and_missing_params_and_mismatched_trees_raise():
  with pytest.raises(
    ValueError, match="od.lookahead: inner must be an optax.GradientTransformation"
  ):
    od.lookahead(0.1)
  tx = od.lookahead(optax.sgd(0.1), 2)
  state = tx.init({"a": jnp.ones(2)})
  with pytest.raises(ValueError, match="lookahead needs the current params"):
    tx.update({"a": jnp.ones(2)}, state)
  with pytest.raises(ValueError, match="lookahead: the updates do not have the tree structure"):
    tx.update({"a": jnp.ones(2)}, state, {"a": jnp.ones(2), "b": jnp.ones(1)})


def test_flax_train_state_with_plain_params():
  tx = od.lookahead(optax.sgd(0.05, momentum=0.9), 3, 0.5)
  state = train_state.TrainState.create(apply_fn=None, params=params32(), tx=tx)

  @jax.jit
  def train_step(state):
    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  for _ in range(7):
    state = train_step(state)
  reference = np_lookahead(NpMomentum(0.05), 3, 0.5, 7)
  assert isinstance(state.params, dict) and set(state.params) == {"w", "b"}
  assert_trees_close(state.params, reference[-1][0], rtol=2e-5)
  assert_trees_close(od.lookahead_params(state.opt_state), reference[-1][1], rtol=2e-5)


class Affine(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.asarray(THETA0["w"], jnp.float32))
    self.b = nnx.Param(jnp.asarray(THETA0["b"], jnp.float32))


def test_nnx_optimizer_with_plain_params():
  model = Affine()
  optimizer = nnx.Optimizer(
    model, od.lookahead(optax.sgd(0.05, momentum=0.9), 3, 0.5), wrt=nnx.Param
  )

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(lambda m: loss({"w": m.w[...], "b": m.b[...]}))(model)
    optimizer.update(model, grads)

  for _ in range(7):
    train_step(model, optimizer)
  theta, slow = np_lookahead(NpMomentum(0.05), 3, 0.5, 7)[-1]
  assert_trees_close({"w": model.w[...], "b": model.b[...]}, theta, rtol=2e-5)
  pure_slow = od.lookahead_params(nnx.as_pure(optimizer.opt_state))
  assert_trees_close(dict(pure_slow), slow, rtol=2e-5)
  # Evaluate with the slow weights: write them into the model.
  nnx.update(model, pure_slow)
  assert_trees_close({"w": model.w[...], "b": model.b[...]}, slow, rtol=2e-5)


def test_state_round_trips_through_flax_serialization():
  tx = od.lookahead(optax.adam(0.05), 3, 0.5)
  params = params32()
  state = tx.init(params)
  updates, state = tx.update(jax.grad(loss)(params), state, params)
  restored = flax.serialization.from_bytes(tx.init(params), flax.serialization.to_bytes(state))
  assert type(restored) is od.LookaheadState
  assert_trees_close(restored, state)


def test_sharded_params_give_sharded_slow_weights_and_the_same_result():
  mesh = jax.make_mesh((8,), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  params = {"w": jnp.arange(16.0).reshape(8, 2) / 10}
  grads = {"w": jnp.linspace(-1.0, 1.0, 16).reshape(8, 2)}
  tx = od.lookahead(optax.adam(0.1), 2, 0.5)
  sharded = jax.device_put(params, sharding)
  state = tx.init(sharded)
  assert state.slow["w"].sharding.is_equivalent_to(sharding, 2)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  expected_params, expected_state = params, tx.init(params)
  for _ in range(3):
    updates, state = step(sharded, state, jax.device_put(grads, sharding))
    sharded = optax.apply_updates(sharded, updates)
    u, expected_state = step(expected_params, expected_state, grads)
    expected_params = optax.apply_updates(expected_params, u)
  assert state.slow["w"].sharding.is_equivalent_to(sharding, 2)
  assert_trees_close(sharded, expected_params, rtol=1e-6)
  assert_trees_close(state.slow, expected_state.slow, rtol=1e-6)


def test_vmap_over_independent_runs_and_abstract_init():
  """A batch of runs (an ensemble) under jax.vmap equals the runs one by one."""
  tx = od.lookahead(optax.sgd(0.05, momentum=0.9), 2, 0.5)
  params = jnp.stack([jnp.array([1.0, -2.0]), jnp.array([0.5, 3.0]), jnp.array([0.0, 1.0])])
  grads = [0.3 * params + 0.1, -0.2 * params]
  state = jax.vmap(tx.init)(params)
  batched = params
  for g in grads:
    updates, state = jax.jit(jax.vmap(tx.update))(g, state, batched)
    batched = optax.apply_updates(batched, updates)
  for i in range(3):
    p, s = params[i], tx.init(params[i])
    for g in grads:
      updates, s = tx.update(g[i], s, p)
      p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(batched[i], p, rtol=1e-6)
    np.testing.assert_allclose(state.slow[i], s.slow, rtol=1e-6)
  shapes = jax.eval_shape(tx.init, jax.ShapeDtypeStruct((4, 3), jnp.bfloat16))
  assert shapes.slow.shape == (4, 3) and shapes.slow.dtype == jnp.bfloat16
