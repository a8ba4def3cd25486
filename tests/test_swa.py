"""od.swa and od.swa_params: against a float64 reference of training, the worked example, the
mean of the selected params (hypothesis), dtypes, sharding and composition with od.param_ema."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_keeps_dtype
from helpers import assert_state_stable
from helpers import assert_trees_close
from helpers import run_scan

import optaxderived as od

THETA0 = {"w": np.array([[1.0, -2.0, 0.5], [0.3, 1.2, -0.7]]), "b": np.array([0.5, -1.5])}
TARGET = {"w": np.array([[0.5, 1.0, -1.0], [2.0, -0.5, 0.0]]), "b": np.array([-1.0, 1.0])}


def params32():
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), THETA0)


def random_noise(steps, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: (0.1 * rng.standard_normal((steps,) + x.shape)).astype(np.float32), THETA0
  )


def np_adam(lr=0.05, b1=0.9, b2=0.999, eps=1e-8):
  """optax.adam from Kingma and Ba's formulas, in float64: gradient -> update."""
  m, v, k = {}, {}, [0]

  def step(g):
    k[0] += 1
    out = {}
    for key, x in g.items():
      m[key] = b1 * m.get(key, 0.0) + (1 - b1) * x
      v[key] = b2 * v.get(key, 0.0) + (1 - b2) * x**2
      m_hat, v_hat = m[key] / (1 - b1 ** k[0]), v[key] / (1 - b2 ** k[0])
      out[key] = -lr * m_hat / (np.sqrt(v_hat) + eps)
    return out

  return step


# (reference, transformation, atol): float32 Adam drifts from float64 Adam by ~1e-5 within 40
# steps near the optimum; a mean that takes or drops one call is off by 1e-3 or more.
OPTIMIZERS = {
  "sgd": (lambda: lambda g: {k: -0.1 * x for k, x in g.items()}, lambda: optax.sgd(0.1), 2e-6),
  "adam": (np_adam, lambda: optax.adam(0.05), 1e-4),
}


def np_swa_training(noise, optimizer, *, start_step=0, every=1, every_k=1):
  """float64 training on ``L = ½‖θ − target‖²`` with noisy gradients (``every_k``
  micro-batches, their mean gradient, per update) and the SWA mean from its definition, the
  plain mean of the params after the selected updates: ``(params, mean)`` after each one."""
  theta = {k: np.asarray(v, np.float64) for k, v in THETA0.items()}
  selected, history = [], []
  for t, start in enumerate(range(0, len(noise["w"]), every_k)):
    g = {
      k: theta[k]
      - TARGET[k]
      + np.asarray(noise[k][start : start + every_k], np.float64).mean(0)
      for k in theta
    }
    update = optimizer(g)
    theta = {k: theta[k] + update[k] for k in theta}
    if t >= start_step and (t - start_step) % every == 0:
      selected.append(theta)
    mean = {k: np.mean([s[k] for s in selected], axis=0) for k in theta} if selected else theta
    history.append((theta, mean))
  return history


def run_training(tx, noise, every_k=1, read=od.swa_params):
  """The same training with ``tx`` under ``jit(lax.scan)``: ``(params, read(state, params))``
  after each update (the last call of each window)."""
  target = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), TARGET)

  def step(carry, n):
    params, state = carry
    grads = jax.tree.map(lambda p, t, z: p - t + z, params, target, n)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), (params, read(state, params))

  params = params32()
  (_, state), (history, means) = jax.jit(lambda c, ns: jax.lax.scan(step, c, ns))(
    (params, tx.init(params)), jax.tree.map(jnp.asarray, noise)
  )
  pick = lambda tree, i: jax.tree.map(lambda x: x[(i + 1) * every_k - 1], tree)  # noqa: E731
  return state, [(pick(history, i), pick(means, i)) for i in range(len(noise["w"]) // every_k)]


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("start_step, every", [(0, 1), (10, 1), (5, 4), (0, 3)])
def test_matches_a_float64_reference_of_training(start_step, every, optimizer):
  np_optimizer, make_optimizer, atol = OPTIMIZERS[optimizer]
  noise = random_noise(40, seed=1)
  tx = optax.chain(make_optimizer(), od.swa(start_step=start_step, every=every))
  state, history = run_training(tx, noise)
  reference = np_swa_training(noise, np_optimizer(), start_step=start_step, every=every)
  for (params, mean), (want_params, want_mean) in zip(history, reference, strict=True):
    assert_trees_close(params, want_params, rtol=2e-5, atol=atol)
    assert_trees_close(mean, want_mean, rtol=2e-5, atol=atol)
  selected = [t for t in range(40) if t >= start_step and (t - start_step) % every == 0]
  assert (int(state[1].calls), int(state[1].count)) == (40, len(selected))


def test_inside_accumulate_it_counts_real_updates():
  noise = random_noise(3 * 30, seed=2)
  tx = od.accumulate(optax.chain(optax.adam(0.05), od.swa(start_step=4, every=3)), 3)
  state, history = run_training(tx, noise, every_k=3)
  reference = np_swa_training(noise, np_adam(), start_step=4, every=3, every_k=3)
  for (params, mean), (want_params, want_mean) in zip(history, reference, strict=True):
    assert_trees_close(params, want_params, rtol=2e-5, atol=1e-4)
    assert_trees_close(mean, want_mean, rtol=2e-5, atol=1e-4)
  swa_state = state.inner_state[1]
  assert (int(swa_state.calls), int(swa_state.count)) == (30, 9)  # real updates 4, 7, ..., 28


def test_the_worked_example():
  """SGD 0.1, g ≡ 1, θ0 = 1: params 0.9, 0.8, 0.7, their running means 0.9, 0.85, 0.8."""
  tx = optax.chain(optax.sgd(0.1), od.swa())
  params = jnp.array(1.0)
  state = tx.init(params)
  means = []
  for _ in range(3):
    updates, state = tx.update(jnp.array(1.0), state, params)
    params = optax.apply_updates(params, updates)
    means.append(float(od.swa_params(state, params)))
  np.testing.assert_allclose(means, [0.9, 0.85, 0.8], rtol=1e-6)


@hypothesis.settings(deadline=None, max_examples=30)
@hypothesis.given(
  thetas=st.lists(
    st.lists(st.floats(-100.0, 100.0, width=32), min_size=3, max_size=3),
    min_size=1,
    max_size=25,
  ),
  start_step=st.integers(0, 8),
  every=st.integers(1, 5),
)
def test_the_mean_is_np_mean_of_the_selected_params(thetas, start_step, every):
  thetas = np.asarray(thetas, np.float32)
  tx = od.swa(start_step=start_step, every=every)
  params = jnp.zeros(3)
  state = tx.init(params)
  for theta in thetas:
    theta = jnp.asarray(theta)
    _, state = tx.update(theta - params, state, params)  # the params after the update: theta
    params = theta
  selected = thetas[start_step::every]
  want = np.mean(selected.astype(np.float64), axis=0) if len(selected) else thetas[-1]
  np.testing.assert_allclose(od.swa_params(state, params), want, rtol=1e-5, atol=1e-4)
  assert int(state.count) == len(selected)


@hypothesis.settings(deadline=None, max_examples=30)
@hypothesis.given(
  # Normal floats only: XLA's CPU backend flushes subnormal results to zero (x / 1 included).
  value=st.floats(-(2.0**100), 2.0**100, width=32, allow_subnormal=False),
  steps=st.integers(1, 30),
  every=st.integers(1, 4),
)
def test_the_mean_of_constant_params_is_that_constant_exactly(value, steps, every):
  tx = od.swa(every=every)
  params = jnp.full(2, value, jnp.float32)
  state = tx.init(params)
  for _ in range(steps):
    _, state = tx.update(jnp.zeros(2), state, params)
  np.testing.assert_array_equal(od.swa_params(state, params), params)


def test_updates_pass_through_unchanged():
  adam = optax.adam(0.1)
  tx = optax.chain(adam, od.swa(start_step=1))
  params = params32()
  grads = jax.tree.map(jnp.ones_like, params)
  state, reference_state = tx.init(params), adam.init(params)
  for _ in range(3):
    ours, state = tx.update(grads, state, params)
    theirs, reference_state = adam.update(grads, reference_state, params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
      np.testing.assert_array_equal(a, b)


def test_before_any_average_the_params_are_returned_and_the_state_fields():
  tx = od.swa(start_step=3)
  params = params32()
  state = tx.init(params)
  assert state._fields == ("count", "mean", "calls")
  assert state.count.dtype == jnp.int32 and state.calls.dtype == jnp.int32
  assert_trees_close(state.mean, jax.tree.map(jnp.zeros_like, params))
  for _ in range(2):
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    out = jax.jit(od.swa_params)(state, params)
    assert_trees_close(out, params)
    assert out["w"].dtype == jnp.float32
  assert (int(state.calls), int(state.count)) == (2, 0)


def test_swa_and_ema_in_one_chain():
  ema, swa = od.param_ema(0.9), od.swa(start_step=2)
  noise = random_noise(12, seed=3)
  both = run_training(optax.chain(optax.sgd(0.1), ema, swa), noise, read=lambda s, p: s)
  state, history = both
  params = history[-1][0]
  for single, read in ((ema, od.ema_params), (swa, od.swa_params)):
    alone = run_training(optax.chain(optax.sgd(0.1), single), noise, read=read)[1]
    assert_trees_close(read(state, params), alone[-1][1])
  assert_trees_close(alone[-1][0], params)  # neither changes the updates


def test_two_swas_by_index_and_the_errors():
  tx = optax.chain(optax.sgd(0.1), od.swa(), od.swa(start_step=2))
  params = params32()
  state = tx.init(params)
  thetas = []
  for _ in range(4):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    params = optax.apply_updates(params, updates)
    thetas.append(params)
  mean = lambda ts: jax.tree.map(lambda *x: np.mean(np.stack(x), 0), *ts)  # noqa: E731
  assert_trees_close(od.swa_params(state, params), mean(thetas), rtol=1e-6)
  assert_trees_close(od.swa_params(state, params, index=1), mean(thetas[2:]), rtol=1e-6)
  with pytest.raises(ValueError, match=r"^od\.swa_params: index must be < 2.*, got 2"):
    od.swa_params(state, params, index=2)
  with pytest.raises(
    ValueError, match=r"^od\.swa_params: the optimizer state holds no SWAState"
  ):
    od.swa_params(optax.adam(0.1).init(params), params)
  with pytest.raises(
    ValueError, match=r"^od\.swa_params: params have 1 leaves, the mean has 2"
  ):
    od.swa_params(state, {"w": params["w"]})
  with pytest.raises(ValueError, match="swa needs the current params"):
    od.swa().update(params, od.swa().init(params))
  with pytest.raises(ValueError, match=r"^od\.swa: the updates, params and mean"):
    od.swa().update({**params, "c": jnp.ones(1)}, od.swa().init(params), params)


def test_bf16_params_get_a_float32_mean_of_the_values_they_hold():
  params = {"w": jnp.full((4,), 1.0, jnp.bfloat16)}
  grads = {"w": jnp.full((4,), -1.0, jnp.bfloat16)}
  tx = optax.chain(optax.sgd(0.01), od.swa(every=2))
  assert_state_stable(tx, params, grads)
  assert_keeps_dtype(tx, params, grads)
  step = jax.jit(
    lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(grads, s, p))
  )
  state, p, trajectory = tx.init(params), params, []
  for _ in range(40):
    p, state = step(p, state)
    trajectory.append(float(p["w"][0]))
  assert len(set(trajectory)) > 20  # the bf16 params do move
  assert state[1].mean["w"].dtype == jnp.float32
  np.testing.assert_allclose(float(state[1].mean["w"][0]), np.mean(trajectory[::2]), rtol=1e-6)
  assert od.swa_params(state, p)["w"].dtype == jnp.bfloat16
  final, scanned, _ = run_scan(tx, params, jax.tree.map(lambda g: jnp.stack([g] * 40), grads))
  assert_trees_close(scanned[1].mean, state[1].mean)  # the same under jit(lax.scan)
  assert_trees_close(final, p)


def test_float64_params_keep_a_float64_mean():
  with jax.enable_x64(True):
    params = jnp.asarray([1.0, -2.0], jnp.float64)
    tx = od.swa()
    state = tx.init(params)
    assert state.mean.dtype == jnp.float64
    thetas = [params + 1e-9 * t for t in range(1, 6)]
    for theta in thetas:
      _, state = tx.update(theta - params, state, params)
      params = theta
    np.testing.assert_allclose(od.swa_params(state, params), np.mean(thetas, 0), rtol=1e-15)


def test_sharded_params_give_a_sharded_mean():
  mesh = jax.make_mesh((8,), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  params = jax.device_put({"w": jnp.arange(16.0).reshape(8, 2)}, sharding)
  tx = od.swa()
  state = tx.init(params)
  assert state.mean["w"].sharding.is_equivalent_to(sharding, 2)
  _, state = jax.jit(tx.update)(params, state, params)
  assert state.mean["w"].sharding.is_equivalent_to(sharding, 2)
  np.testing.assert_allclose(od.swa_params(state, params)["w"], 2 * params["w"])


def test_nnx_optimizer_and_the_raw_opt_state():
  class Affine(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.asarray(THETA0["w"], jnp.float32))
      self.b = nnx.Param(jnp.asarray(THETA0["b"], jnp.float32))

  model = Affine()
  optimizer = nnx.Optimizer(model, optax.chain(optax.sgd(0.1), od.swa()), wrt=nnx.Param)
  seen = []
  for _ in range(3):
    grads = nnx.grad(lambda m: jnp.sum(m.w[...]) + jnp.sum(m.b[...]))(model)
    optimizer.update(model, grads)
    seen.append(nnx.as_pure(nnx.state(model, nnx.Param)))
  want = jax.tree.map(lambda *x: np.mean(np.stack(x), 0), *seen)
  params = nnx.state(model, nnx.Param)
  with_variables = od.swa_params(optimizer.opt_state, params)
  assert isinstance(with_variables["w"], nnx.Param)
  assert_trees_close(dict(nnx.as_pure(with_variables)), dict(want), rtol=1e-6)
  pure = od.swa_params(nnx.as_pure(optimizer.opt_state), nnx.as_pure(params))
  assert_trees_close(dict(pure), dict(want), rtol=1e-6)
