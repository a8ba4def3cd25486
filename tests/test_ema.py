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
  assert state._fields == (
    "count", "ema", "log_zero_weight", "log_zero_weight_compensation", "calls"
  )  # fmt: skip
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


# ---------------------------------------------------------------------------------------------
# Decay schedules, start_step, every, overwrite_every: against a float64 reference of training.

TARGET = {"w": np.array([[0.5, 1.0, -1.0], [2.0, -0.5, 0.0]]), "b": np.array([-1.0, 1.0])}


class NpSgd:
  def __call__(self, g):
    return {k: -0.1 * v for k, v in g.items()}


class NpAdam:
  """optax.adam(0.05) from Kingma and Ba's formulas."""

  def __init__(self, lr=0.05, b1=0.9, b2=0.999, eps=1e-8):
    self.lr, self.b1, self.b2, self.eps, self.k, self.m, self.v = lr, b1, b2, eps, 0, {}, {}

  def __call__(self, g):
    self.k += 1
    out = {}
    for key, x in g.items():
      self.m[key] = self.b1 * self.m.get(key, 0.0) + (1 - self.b1) * x
      self.v[key] = self.b2 * self.v.get(key, 0.0) + (1 - self.b2) * x**2
      m_hat = self.m[key] / (1 - self.b1**self.k)
      v_hat = self.v[key] / (1 - self.b2**self.k)
      out[key] = -self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
    return out


# (reference, transformation, atol): float32 Adam drifts from float64 Adam by ~1e-5 within 40
# steps near the optimum (its normalised step amplifies the rounding of small gradients); an
# averaging rule off by one call or one update is off by 2e-2 or more.
OPTIMIZERS = {
  "sgd": (NpSgd, lambda: optax.sgd(0.1), 2e-6),
  "adam": (NpAdam, lambda: optax.adam(0.05), 1e-4),
}


class NpParamEma:
  """od.param_ema from its definition, in float64: ``(params, new params) -> (the params
  after the call, the averaged params)``. Each decay is rounded to float32, the value the
  float32 computation sees."""

  def __init__(self, decay, *, debias=True, start_step=0, every=1, overwrite_every=None):
    self.decay = decay if callable(decay) else lambda n: decay
    self.debias, self.start_step, self.every = debias, start_step, every
    self.overwrite_every = overwrite_every
    self.t = self.n = 0
    self.zero_weight = 1.0
    self.m = None

  def __call__(self, old, new):
    if self.m is None:
      self.m = {k: np.zeros_like(v) if self.debias else v.copy() for k, v in old.items()}
    t = self.t
    self.t += 1
    if t >= self.start_step and (t - self.start_step) % self.every == 0:
      mu = float(np.float32(self.decay(self.n)))
      self.m = {k: mu * self.m[k] + (1 - mu) * new[k] for k in new}
      self.zero_weight *= mu
      self.n += 1
    elif t < self.start_step and not self.debias:
      self.m = {k: v.copy() for k, v in new.items()}
    if self.n == 0:
      averaged = new
    else:
      scale = 1 / (1 - self.zero_weight) if self.debias else 1.0
      averaged = {k: v * scale for k, v in self.m.items()}
    if self.overwrite_every is not None and (t + 1) % self.overwrite_every == 0:
      return averaged, averaged
    return new, averaged


def np_train(noise, optimizer, averager, every_k=1):
  """float64 training on ``L = ½‖θ − target‖²`` with noisy gradients, ``every_k``
  micro-batches (their mean gradient) per update: the params and the averaged params after
  each update."""
  theta = {k: np.asarray(v, np.float64) for k, v in THETA0.items()}
  history = []
  for start in range(0, len(noise["w"]), every_k):
    g = {
      k: theta[k]
      - TARGET[k]
      + np.asarray(noise[k][start : start + every_k], np.float64).mean(0)
      for k in theta
    }
    update = optimizer(g)
    theta, averaged = averager(theta, {k: theta[k] + update[k] for k in theta})
    history.append((theta, averaged))
  return history


def run_training(tx, noise, read, every_k=1):
  """The same training with ``tx`` under ``jit(lax.scan)``: the params and ``read(state,
  params)`` after each update (the last call of each window)."""
  target = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), TARGET)

  def step(carry, n):
    params, state = carry
    grads = jax.tree.map(lambda p, t, z: p - t + z, params, target, n)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), (params, read(state, params))

  params = params32()
  (_, state), (history, averaged) = jax.jit(lambda c, ns: jax.lax.scan(step, c, ns))(
    (params, tx.init(params)), jax.tree.map(jnp.asarray, noise)
  )
  pick = lambda tree, i: jax.tree.map(lambda x: x[(i + 1) * every_k - 1], tree)  # noqa: E731
  return state, [
    (pick(history, i), pick(averaged, i)) for i in range(len(noise["w"]) // every_k)
  ]


def timm_decay(step, max_decay=0.9999, gamma=1.0, power=2 / 3, min_decay=0.0):
  """timm ``ModelEmaV3.get_decay`` with warmup, as written there (``step`` after its
  ``max(0, step - update_after_step - 1)``)."""
  if step <= 0:
    return 0.0
  decay = 1 - (1 + step / gamma) ** -power
  decay = max(min(decay, max_decay), min_decay)
  return decay


def edm2_gamma(sigma_rel):
  """EDM2's ``std_to_exp`` (training/phema.py)."""
  t = sigma_rel**-2
  return np.roots([1, 7, 16 - t, 12 - t]).real.max()


def edm2_beta(sigma_rel, n):
  """EDM2's ``power_function_beta(std, t)`` at ``t = n + 1``, the update being made."""
  return (1 - 1 / (n + 1)) ** (edm2_gamma(sigma_rel) + 1)


EMA_OPTIONS = {
  "warmup_no_debias_start_every": (
    lambda: od.ema_warmup(0.99),
    lambda n: timm_decay(n, max_decay=0.99),
    dict(debias=False, start_step=5, every=3),
  ),
  "power_debias_every_overwrite": (
    lambda: od.power_ema_decay(0.1),
    lambda n: edm2_beta(0.1, n),
    dict(every=2, overwrite_every=7),
  ),
  "constant_start_overwrite": (
    lambda: 0.9,
    lambda n: 0.9,
    dict(start_step=4, overwrite_every=5),
  ),
  "constant_no_debias_all": (
    lambda: 0.8,
    lambda n: 0.8,
    dict(debias=False, start_step=3, every=2, overwrite_every=4),
  ),
  "custom_schedule": (
    lambda: lambda n: jnp.minimum(0.5 + 0.05 * n, 0.95),
    lambda n: min(0.5 + 0.05 * n, 0.95),
    dict(start_step=2, every=3),
  ),
  "defaults": (lambda: 0.9, lambda n: 0.9, dict()),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("options", list(EMA_OPTIONS))
def test_the_options_match_a_float64_reference_of_training(options, optimizer):
  make_decay, np_decay, kwargs = EMA_OPTIONS[options]
  np_optimizer, make_optimizer, atol = OPTIMIZERS[optimizer]
  noise = random_updates(40, seed=5)
  tx = optax.chain(make_optimizer(), od.param_ema(make_decay(), **kwargs))
  state, history = run_training(tx, noise, od.ema_params)
  averager = NpParamEma(np_decay, **kwargs)
  reference = np_train(noise, np_optimizer(), averager)
  for (params, averaged), (want_params, want_averaged) in zip(history, reference, strict=True):
    assert_trees_close(params, want_params, rtol=2e-5, atol=atol)
    assert_trees_close(averaged, want_averaged, rtol=2e-5, atol=atol)
  assert (int(state[1].calls), int(state[1].count)) == (40, averager.n)


@pytest.mark.parametrize(
  "options", ["warmup_no_debias_start_every", "power_debias_every_overwrite"]
)
def test_inside_accumulate_the_options_count_real_updates(options):
  make_decay, np_decay, kwargs = EMA_OPTIONS[options]
  noise = random_updates(3 * 30, seed=6)
  tx = od.accumulate(optax.chain(optax.adam(0.05), od.param_ema(make_decay(), **kwargs)), 3)
  state, history = run_training(tx, noise, od.ema_params, every_k=3)
  averager = NpParamEma(np_decay, **kwargs)
  reference = np_train(noise, NpAdam(), averager, every_k=3)
  atol = OPTIMIZERS["adam"][2]
  for (params, averaged), (want_params, want_averaged) in zip(history, reference, strict=True):
    assert_trees_close(params, want_params, rtol=2e-5, atol=atol)
    assert_trees_close(averaged, want_averaged, rtol=2e-5, atol=atol)
  ema_state = state.inner_state[1]
  assert (int(ema_state.calls), int(ema_state.count)) == (30, averager.n)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(),
    dict(max_decay=0.999),
    dict(max_decay=0.99, gamma=10.0, power=0.75, min_decay=0.5),
    dict(max_decay=0.9, gamma=0.5, power=2.0),
  ],
)
def test_ema_warmup_is_timms_formula(kwargs):
  schedule = od.ema_warmup(**kwargs)
  steps = [0, 1, 2, 3, 10, 57, 100, 1000, 31_622, 10**5, 10**6, 10**7]
  got = [float(schedule(n)) for n in steps]
  want = [timm_decay(n, **kwargs) for n in steps]
  np.testing.assert_allclose(got, want, rtol=2e-7)
  assert got[0] == 0.0  # the first update copies the params, whatever min_decay
  jitted = jax.jit(schedule)(jnp.asarray(steps, jnp.int32))
  np.testing.assert_allclose(jitted, want, rtol=2e-7)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.15, 0.25])
def test_power_ema_decay_solves_karras_cubic(sigma_rel):
  with jax.enable_x64(True):
    schedule = od.power_ema_decay(sigma_rel)
    gamma = -np.log2(float(schedule(1))) - 1  # beta(1) = (1/2)^(gamma + 1)
    t = sigma_rel**-2
    residual = gamma**3 + 7 * gamma**2 + (16 - t) * gamma + (12 - t)
    assert abs(residual) <= 1e-9 * (gamma**3 + t * gamma)
    assert gamma == pytest.approx(edm2_gamma(sigma_rel), rel=1e-12)
    # The profile's relative width is sigma_rel (EDM2's exp_to_std, equation 123).
    width = np.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3))
    assert width == pytest.approx(sigma_rel, rel=1e-12)
    steps = [0, 1, 2, 5, 100, 10**4, 10**6]
    np.testing.assert_allclose(
      [float(schedule(n)) for n in steps], [edm2_beta(sigma_rel, n) for n in steps], rtol=1e-12
    )
  # float32 without x64, to its precision: a decay enters as mu m + (1 - mu) theta, so its
  # absolute error is what counts (the tiny decays of a large gamma are 1e-6 off relatively).
  np.testing.assert_allclose(
    [float(od.power_ema_decay(sigma_rel)(n)) for n in steps],
    [edm2_beta(sigma_rel, n) for n in steps],
    rtol=1e-6,
    atol=1e-7,
  )


def test_the_edm2_paper_s_gammas():
  """Karras et al. 2024, section 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94."""
  with jax.enable_x64(True):
    for sigma_rel, gamma in ((0.05, 16.97), (0.10, 6.94)):
      beta1 = float(od.power_ema_decay(sigma_rel)(1))
      assert round(-np.log2(beta1) - 1, 2) == gamma


@pytest.mark.parametrize("debias", [False, True])
def test_power_ema_is_the_power_function_average(debias):
  """With beta_n = (1 - 1/(n+1))^(gamma+1) the weights telescope: after N updates
  m_N = sum_i (i^(gamma+1) - (i-1)^(gamma+1)) theta_i / N^(gamma+1) exactly (about
  proportional to i^gamma); debiasing changes nothing, as beta_0 = 0."""
  sigma_rel, steps = 0.15, 50
  gamma = edm2_gamma(sigma_rel)
  rng = np.random.default_rng(7)
  thetas = rng.standard_normal((steps, 4)).astype(np.float32)
  tx = od.param_ema(od.power_ema_decay(sigma_rel), debias=debias)
  params = jnp.zeros(4)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for n in range(1, steps + 1):
    theta = jnp.asarray(thetas[n - 1])
    _, state = update(theta - params, state, params)  # the params after the update: theta
    params = theta
    i = np.arange(1, n + 1, dtype=np.float64)[:, None]
    weights = (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / n ** (gamma + 1)
    want = np.sum(weights * thetas[:n], axis=0)
    np.testing.assert_allclose(od.ema_params(state, params), want, rtol=2e-5, atol=2e-6)


def test_a_power_ema_is_the_same_with_and_without_debiasing():
  updates = random_updates(30, seed=8)
  runs = [
    run_ema(od.param_ema(od.power_ema_decay(0.1), debias=debias), updates)[2]
    for debias in (True, False)
  ]
  for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_the_call_counter_and_the_count():
  tx = od.param_ema(0.9, start_step=2, every=3)
  params = params32()
  state = tx.init(params)
  assert state.calls.dtype == jnp.int32 and int(state.calls) == 0
  counts = []
  for _ in range(10):
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    counts.append(int(state.count))
  assert int(state.calls) == 10
  assert counts == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]  # calls 2, 5 and 8 are averaged


def test_overwrite_lands_the_params_on_the_average_and_passes_other_updates():
  grads = random_updates(12, seed=9)
  tx = optax.chain(optax.adam(0.05), od.param_ema(0.8, overwrite_every=4))
  plain = optax.chain(optax.adam(0.05), od.param_ema(0.8))
  params, state = params32(), tx.init(params32())
  plain_state = plain.init(params)
  for t in range(12):
    g = jax.tree.map(lambda x, t=t: jnp.asarray(x[t]), grads)
    updates, state = tx.update(g, state, params)
    plain_updates, plain_state = plain.update(g, plain_state, params)
    new_params = optax.apply_updates(params, updates)
    if (t + 1) % 4 == 0:
      assert_trees_close(new_params, od.ema_params(state, new_params), rtol=1e-6, atol=1e-7)
    else:
      for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(plain_updates), strict=True):
        np.testing.assert_array_equal(a, b)
    params = new_params
    plain_state = state  # the same averages and Adam moments from here


def test_overwrite_before_any_average_passes_the_update():
  tx = od.param_ema(0.9, start_step=5, overwrite_every=2)
  params = params32()
  state = tx.init(params)
  updates = jax.tree.map(lambda p: 0.1 * p, params)
  for _ in range(4):
    out, state = tx.update(updates, state, params)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(updates), strict=True):
      np.testing.assert_array_equal(a, b)
  assert int(state.count) == 0


def test_two_emas_in_one_chain_are_read_by_index():
  fast, slow = od.param_ema(0.5), od.param_ema(od.ema_warmup(0.99), debias=False, every=2)
  updates = random_updates(10, seed=10)
  params, state, _ = run_ema(optax.chain(fast, slow), updates)
  for index, single in enumerate((fast, slow)):
    params_single, state_single, _ = run_ema(single, updates)
    assert_trees_close(
      od.ema_params(state, params, index=index), od.ema_params(state_single, params_single)
    )
  assert_trees_close(od.ema_params(state, params), od.ema_params(state, params, index=0))
  with pytest.raises(ValueError, match=r"^od\.ema_params: index must be < 2.*, got 2"):
    od.ema_params(state, params, index=2)
  with pytest.raises(ValueError, match=r"^od\.ema_params: index must be an integer >= 0"):
    od.ema_params(state, params, index=-1)


def test_bf16_params_keep_float32_averages_with_every_option():
  params = {"w": jnp.full((4,), 1.0, jnp.bfloat16)}
  grads = {"w": jnp.full((4,), -1.0, jnp.bfloat16)}
  ema = od.param_ema(od.power_ema_decay(0.1), debias=False, start_step=1, every=2)
  tx = optax.chain(optax.sgd(0.01), ema, od.param_ema(0.99, overwrite_every=3))
  assert_state_stable(tx, params, grads)
  assert_keeps_dtype(tx, params, grads)
  final, state, _ = run_scan(tx, params, jax.tree.map(lambda g: jnp.stack([g] * 9), grads))
  assert state[1].ema["w"].dtype == jnp.float32 and state[2].ema["w"].dtype == jnp.float32
  assert od.ema_params(state, final, index=1)["w"].dtype == jnp.bfloat16


def test_inject_hyperparams_of_the_options_under_jit():
  """inject_hyperparams passes start_step, every and overwrite_every as arrays (traced under
  jit): the same results as the plain transformation."""
  kwargs = dict(start_step=3, every=2, overwrite_every=5)
  injected = optax.inject_hyperparams(od.param_ema, static_args=("debias", "accumulator_dtype"))
  updates = random_updates(12, seed=11)
  want = run_ema(optax.chain(optax.identity(), od.param_ema(0.9, **kwargs)), updates)
  got = run_ema(optax.chain(optax.identity(), injected(0.9, **kwargs)), updates)
  assert_trees_close(got[0], want[0], rtol=1e-6)
  assert_trees_close(got[2], want[2], rtol=1e-6)


@hypothesis.settings(deadline=None, max_examples=25)
@hypothesis.given(
  value=st.floats(-100.0, 100.0),
  start_step=st.integers(0, 6),
  every=st.integers(1, 4),
  debias=st.booleans(),
  steps=st.integers(1, 20),
)
def test_any_average_of_constant_params_is_that_constant(
  value, start_step, every, debias, steps
):
  tx = od.param_ema(od.ema_warmup(0.99), debias=debias, start_step=start_step, every=every)
  params = jnp.array([value], jnp.float32)
  state = tx.init(params)
  for _ in range(steps):
    _, state = tx.update(jnp.zeros(1), state, params)
  np.testing.assert_allclose(od.ema_params(state, params), params, rtol=2e-6, atol=1e-30)
