"""od.dynamic_loss_scale and od.loss_scale against a NumPy float64 loop; float16 training."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_state_stable
from helpers import assert_trees_close
from helpers import run_scan

import optaxderived as od
from optaxderived._core.state import find_state
from optaxderived._transforms.loss_scale import LossScaleState
from optaxderived._transforms.loss_scale import dynamic_loss_scale
from optaxderived._transforms.loss_scale import loss_scale

PARAMS = {"w": jnp.array([1.0, -2.0, 0.5], jnp.float32), "b": {"k": jnp.ones((2, 2))}}
# Small numbers, so that every branch shows within 20 steps.
SMALL = dict(
  initial_scale=8.0,
  growth_interval=3,
  growth_factor=2.0,
  backoff_factor=0.5,
  min_scale=2.0,
  max_scale=32.0,
)
# Each step's gradient: finite ("ok") or with one entry set to NaN or ±Inf.
PATTERN = ["ok"] * 9 + ["nan", "ok", "ok", "inf", "ok", "-inf", "nan", "nan", "ok", "ok", "ok"]
# The scale after each step of PATTERN under SMALL, worked by hand: growth after 3 good
# steps, capped at 32 (steps 7-9); back-off on each non-finite step, floored at 2 (step 17);
# the good steps restart after a back-off (steps 11-12 do not grow at step 13).
EXPECTED_SCALES = [8, 8, 16, 16, 16, 32, 32, 32, 32, 16, 16, 16, 8, 8, 4, 2, 2, 2, 2, 4]
BAD = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _grads_seq(pattern, seed=0, tree=PARAMS, magnitude=10.0):
  """Stacked random gradients shaped like ``tree``, poisoned as ``pattern`` says."""
  rng = np.random.default_rng(seed)
  steps = len(pattern)
  grads = jax.tree.map(lambda p: magnitude * rng.normal(size=(steps, *p.shape)), tree)
  kernel = grads["b"]["k"]
  for i, kind in enumerate(pattern):
    if kind != "ok":
      kernel[i, 1, 0] = BAD[kind]
  return jax.tree.map(lambda x, p: jnp.asarray(x, p.dtype), grads, tree)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _at(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def _np_sgd(lr):
  def step(state, g, n):
    return -lr * g, state

  return step


def _np_adam(lr, b1=0.9, b2=0.999, eps=1e-8):
  """optax.adam on flat float64 vectors; ``n`` counts the steps taken so far."""

  def step(state, g, n):
    m, v = state if state is not None else (np.zeros_like(g), np.zeros_like(g))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    t = n + 1
    return -lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps), (m, v)

  return step


def _reference(inner_step, grads_seq, *, initial_scale, growth_interval, growth_factor,
               backoff_factor, min_scale, max_scale):  # fmt: skip
  """NumPy float64: per step, the update, scale, good steps and skipped count after it."""
  scale, good, skipped, state, n = float(initial_scale), 0, 0, None, 0
  out = []
  for i in range(jax.tree.leaves(grads_seq)[0].shape[0]):
    g = _flat(_at(grads_seq, i)) / scale
    if np.all(np.isfinite(g)):
      update, state = inner_step(state, g, n)
      n += 1
      good += 1
      if good >= growth_interval:
        scale, good = min(scale * growth_factor, max_scale), 0
    else:
      update = np.zeros_like(g)
      scale, good, skipped = max(scale * backoff_factor, min_scale), 0, skipped + 1
    out.append((update, scale, good, skipped, n))
  return out


def _run(tx, params, grads_seq):
  """``jit(lax.scan)`` over the steps, returning the per-step updates and loss-scale fields
  (and the final params and state)."""

  def step(carry, grads):
    params, state = carry
    updates, state = tx.update(grads, state, params)
    found = find_state(state, LossScaleState, accessor="test")
    fields = (loss_scale(state), found.good_steps, found.num_skipped)
    return (optax.apply_updates(params, updates), state), (updates, fields)

  (params, state), per_step = jax.jit(lambda c, g: jax.lax.scan(step, c, g))(
    (params, tx.init(params)), grads_seq
  )
  return params, state, per_step


def _check_against_reference(per_step, reference, rtol):
  updates, (scales, goods, skips) = per_step
  for i, (update, scale, good, skipped, _) in enumerate(reference):
    np.testing.assert_allclose(_flat(_at(updates, i)), update, rtol=rtol, atol=1e-7)
    assert float(scales[i]) == scale, (i, float(scales[i]), scale)
    assert int(goods[i]) == good and int(skips[i]) == skipped, i


# The scale's state machine and the updates, against the NumPy reference.


def test_every_branch_matches_the_numpy_reference_with_sgd():
  grads = _grads_seq(PATTERN)
  tx = dynamic_loss_scale(optax.sgd(0.1), **SMALL)
  _, _, per_step = _run(tx, PARAMS, grads)
  reference = _reference(_np_sgd(0.1), grads, **SMALL)
  assert [r[1] for r in reference] == EXPECTED_SCALES  # the reference agrees with the hand
  _check_against_reference(per_step, reference, rtol=1e-6)
  assert int(per_step[1][2][-1]) == len(PATTERN) - PATTERN.count("ok")


def test_adam_advances_on_finite_steps_only():
  """Adam's bias correction counts finite steps: skipped ones do not advance it."""
  grads = _grads_seq(PATTERN, seed=1)
  tx = dynamic_loss_scale(optax.adam(0.05), **SMALL)
  params, state, per_step = _run(tx, PARAMS, grads)
  reference = _reference(_np_adam(0.05), grads, **SMALL)
  # float32 Adam: 1 - 0.999**t loses about 1e-5 relative to float64 in the bias correction.
  _check_against_reference(per_step, reference, rtol=1e-4)
  assert int(state.inner_state[0].count) == reference[-1][4] == PATTERN.count("ok")
  theta = _flat(PARAMS) + sum(r[0] for r in reference)
  np.testing.assert_allclose(_flat(params), theta, rtol=1e-5, atol=1e-6)


def test_the_defaults_and_the_growth_at_the_interval():
  tx = dynamic_loss_scale(optax.sgd(1.0))
  state = tx.init(PARAMS)
  assert float(loss_scale(state)) == 2.0**15
  assert state.scale.dtype == jnp.float32 and state.good_steps.dtype == jnp.int32
  # growth_interval - 1 finite steps keep the scale, the next one doubles it.
  state = state._replace(good_steps=jnp.asarray(1998, jnp.int32))
  update = jax.jit(tx.update)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  _, state = update(grads, state, PARAMS)
  assert float(loss_scale(state)) == 2.0**15 and int(state.good_steps) == 1999
  _, state = update(grads, state, PARAMS)
  assert float(loss_scale(state)) == 2.0**16 and int(state.good_steps) == 0
  # At the cap (2**24) a growth keeps it; a back-off halves it.
  state = state._replace(scale=jnp.float32(2.0**24), good_steps=jnp.asarray(1999, jnp.int32))
  _, state = update(grads, state, PARAMS)
  assert float(loss_scale(state)) == 2.0**24
  _, state = update(jax.tree.map(lambda g: g * jnp.nan, grads), state, PARAMS)
  assert float(loss_scale(state)) == 2.0**23 and int(state.num_skipped) == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_finite_steps_are_the_inner_update_of_the_unscaled_gradients(dtype):
  """With finite gradients the wrapper is ``inner`` on ``g / scale``, in the gradients'
  dtype (float32, bfloat16, float16)."""
  params = jax.tree.map(lambda p: p.astype(dtype), PARAMS)
  grads = jax.tree.map(lambda p: (p * 300 + 7).astype(dtype), params)
  inner = optax.adam(1e-2)
  tx = dynamic_loss_scale(inner, initial_scale=2.0**10)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  unscaled = jax.tree.map(lambda g: (g.astype(jnp.float32) / 2.0**10).astype(dtype), grads)
  want, want_state = jax.jit(inner.update)(unscaled, inner.init(params), params)
  assert_trees_close(updates, want, rtol=1e-6)
  assert_trees_close(state.inner_state, want_state, rtol=1e-6)
  for u in jax.tree.leaves(updates):
    assert u.dtype == dtype


# Skipped steps.


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_skipped_step_emits_zeros_and_keeps_the_inner_state_bit_for_bit(bad):
  tx = dynamic_loss_scale(optax.adam(0.1), initial_scale=4.0)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  update = jax.jit(tx.update)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
  for _ in range(2):
    _, state = update(grads, state, params)
  poisoned = {**grads, "w": grads["w"].at[1].set(bad)}
  updates, new_state = update(poisoned, state, params)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
    assert u.dtype == g.dtype and not np.any(np.asarray(u, np.float32))
  for new, old in zip(
    *map(jax.tree.leaves, (new_state.inner_state, state.inner_state)), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
  assert int(new_state.inner_state[0].count) == 2
  assert float(loss_scale(new_state)) == 2.0 and int(new_state.num_skipped) == 1
  assert int(new_state.good_steps) == 0


def test_a_finite_gradient_whose_sum_overflows_is_not_skipped():
  """The fast check sums the gradients; an overflowing sum of finite ones is told apart."""
  tx = dynamic_loss_scale(optax.sgd(1.0), initial_scale=1.0)
  big = jnp.full((4,), 3e38, jnp.float32)
  updates, state = jax.jit(tx.update)(big, tx.init(big), big)
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(updates, -big)


def test_a_gradient_that_overflows_once_unscaled_is_skipped():
  """With a scale below 1 the division can overflow float16: that counts as non-finite."""
  tx = dynamic_loss_scale(optax.sgd(1.0), initial_scale=0.5, min_scale=0.25)
  grads = jnp.array([6e4, 1.0], jnp.float16)
  updates, state = jax.jit(tx.update)(grads, tx.init(grads), grads)
  assert int(state.num_skipped) == 1 and float(loss_scale(state)) == 0.25
  np.testing.assert_array_equal(updates, jnp.zeros(2, jnp.float16))
  updates, state = jax.jit(tx.update)(jnp.array([1e4, 1.0], jnp.float16), state, grads)
  np.testing.assert_array_equal(updates, jnp.array([-4e4, -4.0], jnp.float16))


# Composition: chains, accumulation, extra arguments, state stability.


def test_loss_scale_is_found_in_chains_and_wrappers_and_names_itself_otherwise():
  chain = optax.chain(optax.clip(1.0), dynamic_loss_scale(optax.adam(1e-3), initial_scale=64.0))
  assert float(loss_scale(chain.init(PARAMS))) == 64.0
  wrapped = od.accumulate(dynamic_loss_scale(optax.sgd(1.0), initial_scale=16.0), 2)
  scale = loss_scale(wrapped.init(PARAMS))
  assert scale.dtype == jnp.float32 and scale.shape == () and float(scale) == 16.0
  with pytest.raises(ValueError, match=r"^od\.loss_scale: .*LossScaleState"):
    loss_scale(optax.adam(1e-3).init(PARAMS))


def test_around_accumulate_an_overflowing_micro_batch_is_dropped_from_its_window():
  tx = dynamic_loss_scale(od.accumulate(optax.sgd(1.0), 2), initial_scale=4.0)
  params = jnp.zeros(2)
  grads = jnp.array([[4.0, 8.0], [jnp.inf, 0.0], [12.0, 0.0], [2.0, 2.0], [2.0, 2.0]])
  _, state, updates = run_scan(tx, params, grads)
  # the window holds micro-batches 1 and 3, unscaled by 4 and by 2 (the scale halved after
  # the overflow): the mean of [1, 2] and [6, 0]
  np.testing.assert_allclose(updates, [[0, 0], [0, 0], [-3.5, -1.0], [0, 0], [-1, -1]])
  assert int(state.num_skipped) == 1 and float(loss_scale(state)) == 2.0
  assert int(state.inner_state.num_skipped) == 0  # accumulate never saw the overflow


def test_inside_accumulate_an_overflow_skips_the_window():
  tx = od.accumulate(dynamic_loss_scale(optax.sgd(1.0), initial_scale=4.0), 2)
  params = jnp.zeros(2)
  grads = jnp.array([[4.0, 8.0], [jnp.nan, 0.0], [4.0, 4.0], [4.0, 0.0]])
  _, state, updates = run_scan(tx, params, grads)
  # window 1 is skipped (the scale halves to 2), window 2 is unscaled by 2
  np.testing.assert_allclose(updates, [[0, 0], [0, 0], [0, 0], [-2.0, -1.0]])
  assert float(loss_scale(state)) == 2.0 and int(state.inner_state.num_skipped) == 1
  assert int(state.step) == 2


def test_extra_arguments_reach_the_inner_transformation():
  seen = []

  def update(updates, state, params=None, *, tag=None):
    seen.append(tag)
    return updates, state

  inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  tx = dynamic_loss_scale(inner, initial_scale=2.0)
  updates, _ = tx.update(jnp.array([4.0]), tx.init(jnp.zeros(1)), tag="x")
  assert seen and set(seen) == {"x"} and float(updates[0]) == 2.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_state_is_stable_and_dtypes_are_kept(dtype):
  params = jax.tree.map(lambda p: p.astype(dtype), PARAMS)
  # (a small scale: float16 Adam itself overflows on gradients whose squares underflow)
  inner = optax.adam(1e-2)
  tx = optax.chain(
    dynamic_loss_scale(inner, initial_scale=4.0, growth_interval=1), optax.scale(1)
  )
  assert_state_stable(tx, params, jax.tree.map(lambda p: p * jnp.nan, params))
  # lax.scan fails when a dtype or shape changes between steps (finite and skipped ones)
  seq = _grads_seq(PATTERN, tree=params)
  new_params, state, updates = run_scan(tx, params, seq)
  assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))
  for p, q, u in zip(*map(jax.tree.leaves, (new_params, params, updates)), strict=True):
    assert p.dtype == q.dtype == u.dtype and bool(jnp.all(jnp.isfinite(p)))
  assert int(state[0].num_skipped) == len(PATTERN) - PATTERN.count("ok")


def test_mismatched_trees_raise_an_error_naming_the_transformation():
  tx = dynamic_loss_scale(optax.adam(1e-2))
  with pytest.raises(ValueError, match="od.dynamic_loss_scale"):
    tx.update({"w": PARAMS["w"]}, tx.init(PARAMS), PARAMS)


# Hyperparameters.


@pytest.mark.parametrize(
  "kwargs, argname",
  [
    (dict(inner=optax.adam), "inner"),
    (dict(inner="adam"), "inner"),
    (dict(initial_scale=0.0), "initial_scale"),
    (dict(initial_scale=-1.0), "initial_scale"),
    (dict(initial_scale=math.inf), "initial_scale"),
    (dict(initial_scale=math.nan), "initial_scale"),
    (dict(initial_scale="1024"), "initial_scale"),
    (dict(initial_scale=lambda count: 2.0), "initial_scale"),
    (dict(initial_scale=2.0**30), "initial_scale"),  # above max_scale
    (dict(initial_scale=0.5), "initial_scale"),  # below min_scale
    (dict(min_scale=0.0), "min_scale"),
    (dict(min_scale=math.inf), "min_scale"),
    (dict(max_scale=math.inf), "max_scale"),
    (dict(max_scale=-2.0), "max_scale"),
    (dict(initial_scale=3.0, min_scale=4.0, max_scale=2.0), "min_scale"),
    (dict(growth_interval=0), "growth_interval"),
    (dict(growth_interval=1.5), "growth_interval"),
    (dict(growth_interval=True), "growth_interval"),
    (dict(growth_interval="2000"), "growth_interval"),
    (dict(growth_factor=0.5), "growth_factor"),
    (dict(growth_factor=math.inf), "growth_factor"),
    (dict(growth_factor=math.nan), "growth_factor"),
    (dict(backoff_factor=0.0), "backoff_factor"),
    (dict(backoff_factor=1.5), "backoff_factor"),
    (dict(backoff_factor=-0.5), "backoff_factor"),
  ],
)
def test_invalid_arguments_raise_value_error_naming_the_argument(kwargs, argname):
  kwargs = {"inner": optax.sgd(1.0), **kwargs}
  with pytest.raises(ValueError, match=rf"^od\.dynamic_loss_scale: {argname} "):
    dynamic_loss_scale(**kwargs)


def test_edge_arguments_are_valid():
  grads = jnp.ones(2)
  for kwargs in (
    dict(growth_factor=1.0, backoff_factor=1.0),
    dict(initial_scale=1.0, min_scale=1.0, max_scale=1.0),
    dict(growth_interval=2**40),  # more than int32 counts: it never grows
    dict(growth_interval=np.int64(3), initial_scale=np.float32(4.0)),
  ):
    tx = dynamic_loss_scale(optax.sgd(1.0), **kwargs)
    _, state = jax.jit(tx.update)(grads, tx.init(grads), grads)
    assert int(state.num_skipped) == 0


# Float16 training: the initial scale overflows, backs off, and the run converges.

_rng = np.random.default_rng(0)
_X = jnp.asarray(_rng.normal(size=(64, 8)), jnp.float16)
_Y = jnp.asarray(np.asarray(_X, np.float64) @ (4 * _rng.normal(size=8)) + 1.0, jnp.float16)


def _mse(w, b):
  r = _X @ w + b - _Y  # float16 throughout
  return jnp.mean(r * r)


def test_float16_linear_regression_backs_off_and_converges():
  tx = dynamic_loss_scale(optax.adam(0.1), growth_interval=25)
  params = {"w": jnp.zeros(8, jnp.float16), "b": jnp.zeros((), jnp.float16)}
  loss = lambda p: _mse(p["w"], p["b"])  # noqa: E731

  def step(carry, _):
    params, state = carry
    scale = loss_scale(state).astype(jnp.float16)
    grads = jax.grad(lambda p: loss(p) * scale)(params)  # float16 gradients of the scaled loss
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), (loss(params), finite, scale)

  run = jax.jit(lambda c: jax.lax.scan(step, c, None, length=200))
  (params, state), (losses, finite, scales) = run((params, tx.init(params)))
  assert all(g.dtype == jnp.float16 for g in jax.tree.leaves(params))
  assert not bool(finite[0])  # 2**15 overflows float16 at the start
  first_good = int(np.argmax(np.asarray(finite)))
  assert first_good >= 2 and float(scales[first_good]) < 2.0**15  # it backed off to fit
  assert float(losses[first_good]) == float(losses[0])  # the skipped steps did not move
  assert int(state.num_skipped) >= first_good and int(state.inner_state[0].count) > 150
  final = float(loss(params))
  assert final < 1e-2 * float(losses[0]), (final, float(losses[0]))
  assert float(jnp.max(scales[first_good:])) > float(scales[first_good])  # and grew again


def test_float16_nnx_optimizer_backs_off_and_converges():
  from flax import nnx

  class Linear(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros(8, jnp.float16))
      self.b = nnx.Param(jnp.zeros((), jnp.float16))

  model = Linear()
  tx = dynamic_loss_scale(optax.adam(0.1), growth_interval=25)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  loss = lambda m: _mse(m.w[...], m.b[...])  # noqa: E731

  @nnx.jit
  def train_step(model, optimizer):
    scale = loss_scale(optimizer.opt_state).astype(jnp.float16)
    optimizer.update(model, nnx.grad(lambda m: loss(m) * scale)(model))

  start = float(loss(model))
  scales = []
  for _ in range(120):
    train_step(model, optimizer)
    scales.append(float(loss_scale(optimizer.opt_state)))
  assert scales[0] == 2.0**14 and min(scales) < 2.0**14
  assert model.w[...].dtype == jnp.float16
  assert float(loss(model)) < 0.1 * start
