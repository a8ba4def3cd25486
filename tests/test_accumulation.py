"""od.accumulate and od.has_updated against NumPy float64 loops, optax and worked examples."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_keeps_dtype
from helpers import assert_state_stable
from helpers import assert_trees_close
from helpers import run_scan
from helpers import shapes_and_dtypes
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optaxderived as od

PARAMS = {"w": jnp.array([1.0, -2.0, 0.5], jnp.float32), "b": {"k": jnp.ones((2, 2))}}


def _grads_seq(steps, seed=0, tree=PARAMS):
  """Stacked random gradients shaped like ``tree`` (leading axis = micro steps)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(steps, *p.shape)), p.dtype), tree)


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _flat(tree):
  """A tree as one float64 vector (global norms in the references)."""
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(_np(tree))])


def _reference_run(inner_step, params, grads_seq, ks, weights=None, reduction="mean"):
  """NumPy float64: the window means, the inner step on each, zeros on holding calls.

  ``inner_step(state, mean, params, n) -> (update, state)`` works on flat float64 vectors;
  ``n`` counts real updates (0 at the first). ``ks`` gives the window sizes in order.
  ``reduction="sum"``: the inner step gets the weighted sums instead of the means.
  Returns the final params and the stacked per-call updates (as flat vectors).
  """
  theta = _flat(params)
  calls = jax.tree.leaves(grads_seq)[0].shape[0]
  gs = [_flat(jax.tree.map(lambda x, i=i: x[i], grads_seq)) for i in range(calls)]
  ws = np.ones(calls) if weights is None else np.asarray(weights, np.float64)
  updates, state, n, start = [], None, 0, 0
  while start < calls:
    end = start + ks[n]
    if end > calls:  # an unfinished window emits nothing
      updates.extend(np.zeros_like(theta) for _ in range(calls - start))
      break
    updates.extend(np.zeros_like(theta) for _ in range(end - start - 1))
    mean = sum(ws[i] * gs[i] for i in range(start, end))
    if reduction == "mean":
      mean = mean / sum(ws[start:end])
    update, state = inner_step(state, mean, theta, n)
    updates.append(update)
    theta = theta + update
    n += 1
    start = end
  return theta, np.stack(updates)


def _np_sgd(lr):
  def step(state, g, theta, n):
    return -lr * g, state

  return step


def _np_adam(lr, b1=0.9, b2=0.999, eps=1e-8, clip=None, weight_decay=0.0):
  """Adam (optax.adam) or AdamW (optax.adamw) on flat vectors; ``lr`` a float or n -> lr."""

  def step(state, g, theta, n):
    if clip is not None:
      norm = np.linalg.norm(g)
      g = g if norm < clip else g / norm * clip
    m, v = state if state is not None else (np.zeros_like(g), np.zeros_like(g))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    t = n + 1
    direction = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + weight_decay * theta
    rate = lr(n) if callable(lr) else lr
    return -rate * direction, (m, v)

  return step


def _as_flat_updates(updates):
  calls = jax.tree.leaves(updates)[0].shape[0]
  return np.stack([_flat(jax.tree.map(lambda x, i=i: x[i], updates)) for i in range(calls)])


# The worked example and the docstring's numbers.


def test_the_worked_example_sgd_k2():
  """k = 2, lr = 0.1, gradients 1, 3, 5, 7, 9: θ = 1, 0.8, 0.8, 0.2, 0.2 (no phantom step)."""
  tx = od.accumulate(optax.sgd(0.1), 2)
  params = jnp.array([1.0])
  grads = jnp.array([[1.0], [3.0], [5.0], [7.0], [9.0]])
  state = tx.init(params)
  thetas, sums, updated = [], [], []
  update = jax.jit(tx.update)
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    thetas.append(float(params[0]))
    sums.append(float(state.acc_grads[0]))
    updated.append(bool(od.has_updated(state)))
  np.testing.assert_allclose(thetas, [1.0, 0.8, 0.8, 0.2, 0.2], rtol=1e-6)
  assert sums == [1.0, 0.0, 5.0, 0.0, 9.0]
  assert updated == [False, True, False, True, False]
  assert int(state.step) == 2 and int(state.micro_step) == 1


def test_first_real_adam_step_moves_by_the_learning_rate():
  """The worked Adam example (lr 0.1, gradients 1, 3, 5, 7, k = 2): the first real step is a
  true large-batch Adam step of size lr (bert4keras moves by 0.064, to 0.9361187)."""
  tx = od.accumulate(optax.adam(0.1), 2)
  params = jnp.array([1.0])
  grads = jnp.array([[1.0], [3.0], [5.0], [7.0]])
  params, _, updates = run_scan(tx, params, grads)
  np.testing.assert_allclose(updates[:2, 0], [0.0, -0.1], rtol=1e-5)
  theta, ref_updates = _reference_run(_np_adam(0.1), jnp.array([1.0]), grads, [2, 2])
  # float32 Adam: 1 - 0.999**t loses about 1e-5 relative to float64 in the bias correction.
  np.testing.assert_allclose(updates, ref_updates, rtol=1e-4)
  np.testing.assert_allclose(params, theta, rtol=1e-5)


# Equivalence with the inner optimizer on the window means.


@pytest.mark.parametrize("k", [1, 3])
def test_sgd_equals_numpy_reference(k):
  grads = _grads_seq(4 * k + 1, seed=k)
  params, _, updates = run_scan(od.accumulate(optax.sgd(0.3, momentum=None), k), PARAMS, grads)
  theta, ref_updates = _reference_run(_np_sgd(0.3), PARAMS, grads, [k] * 10)
  np.testing.assert_allclose(_as_flat_updates(updates), ref_updates, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(_flat(params), theta, rtol=1e-5, atol=1e-7)


def test_adam_equals_numpy_reference_and_counts_real_updates():
  k = 3
  grads = _grads_seq(5 * k, seed=1)
  params, state, updates = run_scan(od.accumulate(optax.adam(0.05), k), PARAMS, grads)
  theta, ref_updates = _reference_run(_np_adam(0.05), PARAMS, grads, [k] * 5)
  np.testing.assert_allclose(_as_flat_updates(updates), ref_updates, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(_flat(params), theta, rtol=1e-5, atol=1e-6)
  assert int(state.step) == 5 and int(optax.tree.get(state, "count")) == 5


def test_clip_adamw_chain_with_schedule_sees_real_updates_only():
  """Clipping, weight decay and the learning-rate schedule inside all count real updates."""
  k = 2
  schedule = optax.linear_schedule(0.1, 0.01, transition_steps=4)
  inner = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(schedule, weight_decay=0.1))
  grads = _grads_seq(6 * k, seed=2)
  params, _, updates = run_scan(od.accumulate(inner, k), PARAMS, grads)
  ref_schedule = lambda n: 0.1 + (0.01 - 0.1) * min(n, 4) / 4
  reference = _np_adam(ref_schedule, clip=0.5, weight_decay=0.1)
  theta, ref_updates = _reference_run(reference, PARAMS, grads, [k] * 6)
  np.testing.assert_allclose(_as_flat_updates(updates), ref_updates, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(_flat(params), theta, rtol=1e-5, atol=1e-6)


def test_equals_the_inner_optimizer_run_on_window_means_with_optax():
  """optax as the reference: the inner chain itself, stepped once per window mean."""
  k = 4
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=1e-2))
  grads = _grads_seq(3 * k, seed=3)
  params, _, _ = run_scan(od.accumulate(inner, k), PARAMS, grads)
  ref_params, ref_state, ref_update = PARAMS, inner.init(PARAMS), jax.jit(inner.update)
  for window in range(3):
    mean = jax.tree.map(lambda g, w=window: g[w * k : (w + 1) * k].mean(0), grads)
    updates, ref_state = ref_update(mean, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
  assert_trees_close(params, ref_params, rtol=1e-5, atol=1e-6)


def test_equals_optax_multisteps_on_equal_weights():
  k = 3
  grads = _grads_seq(4 * k + 2, seed=4)
  ours, ours_state, _ = run_scan(od.accumulate(optax.adam(1e-2), k), PARAMS, grads)
  theirs, _, _ = run_scan(
    optax.MultiSteps(optax.adam(1e-2), k).gradient_transformation(), PARAMS, grads
  )
  assert_trees_close(ours, theirs, rtol=1e-5, atol=1e-7)
  assert int(ours_state.micro_step) == 2


def test_schedules_inside_count_real_updates_and_outside_count_micro_steps():
  """A schedule inside sees 0, 1, 2 (one per real update); chained outside it sees calls."""
  schedule = lambda count: 10.0**count
  inside = od.accumulate(optax.scale_by_schedule(schedule), 2)
  outside = optax.chain(optax.scale_by_schedule(schedule), od.accumulate(optax.identity(), 2))
  grads = jnp.ones((6, 1))
  _, _, up_in = run_scan(inside, jnp.zeros(1), grads)
  _, _, up_out = run_scan(outside, jnp.zeros(1), grads)
  np.testing.assert_allclose(up_in[:, 0], [0, 1, 0, 10, 0, 100])
  np.testing.assert_allclose(up_out[:, 0], [0, 5.5, 0, 550, 0, 55000])  # means of 10^t


def test_weight_decay_inside_applies_once_per_real_update():
  """With zero gradients, AdamW inside decays the params once per window, not per call."""
  tx = od.accumulate(optax.adamw(0.1, weight_decay=0.5), 3)
  params, _, updates = run_scan(tx, jnp.array([2.0]), jnp.zeros((6, 1)))
  np.testing.assert_allclose(updates[:, 0], [0, 0, -0.1, 0, 0, -0.095], rtol=1e-6)
  np.testing.assert_allclose(params, [2.0 * 0.95**2], rtol=1e-6)


def test_clipping_inside_clips_the_mean_outside_clips_each_micro_batch():
  grads = jnp.array([[3.0], [-1.0]])
  inside = od.accumulate(optax.chain(optax.clip(1.0), optax.sgd(1.0)), 2)
  outside = optax.chain(optax.clip(1.0), od.accumulate(optax.sgd(1.0), 2))
  _, _, up_in = run_scan(inside, jnp.zeros(1), grads)
  _, _, up_out = run_scan(outside, jnp.zeros(1), grads)
  np.testing.assert_allclose(up_in[:, 0], [0.0, -1.0])  # clip(mean 1.0) = 1.0
  np.testing.assert_allclose(up_out[:, 0], [0.0, 0.0])  # mean(clip 3, clip -1) = 0


def test_the_inner_update_runs_on_emitting_calls_only():
  """A callback inside the inner update fires 2 times in 8 calls with k = 4 (MultiSteps: 8)."""
  calls = []

  def counting(inner):
    def update(updates, state, params=None):
      jax.debug.callback(lambda: calls.append(1))
      return inner.update(updates, state, params)

    return optax.GradientTransformation(inner.init, update)

  grads = _grads_seq(8, seed=5)
  jax.block_until_ready(run_scan(od.accumulate(counting(optax.adam(1e-3)), 4), PARAMS, grads))
  assert len(calls) == 2
  calls.clear()
  multi = optax.MultiSteps(counting(optax.adam(1e-3)), 4).gradient_transformation()
  jax.block_until_ready(run_scan(multi, PARAMS, grads))
  assert len(calls) == 8


def _temp_bytes(tx, params, batch, grad_fn=None):
  """Compiled temp memory of a donated ``update`` + ``apply_updates`` step."""

  def step(carry, batch):
    params, state = carry
    grads = batch if grad_fn is None else jax.grad(grad_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(step, donate_argnums=0).lower((params, tx.init(params)), batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_temp_memory_is_at_most_multisteps():
  params = {f"l{i}": jnp.full((128, 256), 0.01) for i in range(4)}
  tree_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  ours, theirs = od.accumulate(optax.adam(1e-3), 4), optax.MultiSteps(optax.adam(1e-3), 4)
  # The gradients as an input (as the benchmark times it).
  grads = jax.tree.map(jnp.ones_like, params)
  ours_bytes, theirs_bytes = (
    _temp_bytes(ours, params, grads),
    _temp_bytes(theirs, params, grads),
  )
  assert ours_bytes <= theirs_bytes, (ours_bytes, theirs_bytes)
  assert ours_bytes <= 1.05 * tree_bytes, ours_bytes  # the emitted updates, no second acc
  # The gradients computed in the step, as users write it.

  def loss(params, x):
    for i in range(4):
      x = jnp.tanh(x @ params[f"l{i}"][:, :128])
    return jnp.mean(x**2)

  x = jnp.ones((32, 128))
  ours_bytes = _temp_bytes(ours, params, x, loss)
  theirs_bytes = _temp_bytes(theirs, params, x, loss)
  assert ours_bytes <= theirs_bytes, (ours_bytes, theirs_bytes)


# Weights.


def test_weighted_mean_equals_numpy_reference():
  k = 3
  grads = _grads_seq(3 * k, seed=6)
  weights = np.array([1.0, 5.0, 2.0, 0.5, 0.5, 7.0, 3.0, 1.0, 0.0])
  tx = od.accumulate(optax.adam(0.05), k)
  params, state = PARAMS, tx.init(PARAMS)
  update = jax.jit(tx.update)
  all_updates = []
  for i, w in enumerate(weights):
    updates, state = update(jax.tree.map(lambda g, i=i: g[i], grads), state, params, weight=w)
    params = optax.apply_updates(params, updates)
    all_updates.append(_flat(updates))
  theta, ref_updates = _reference_run(_np_adam(0.05), PARAMS, grads, [k] * 3, weights)
  np.testing.assert_allclose(np.stack(all_updates), ref_updates, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(_flat(params), theta, rtol=1e-5, atol=1e-6)


def test_micro_batches_of_different_sizes_equal_one_batch():
  """Least squares: batches of 3, 5 and 8 rows weighted by size give the 16-row gradient."""
  rng = np.random.default_rng(7)
  x, y = rng.normal(size=(16, 4)), rng.normal(size=16)
  w0 = rng.normal(size=4)
  grad = lambda w, x, y: 2 / len(y) * x.T @ (x @ w - y)  # of mean((x @ w - y) ** 2)
  tx = od.accumulate(optax.sgd(0.1), 3)
  update = jax.jit(tx.update)
  state, w = tx.init(jnp.asarray(w0, jnp.float32)), jnp.asarray(w0, jnp.float32)
  for lo, hi in [(0, 3), (3, 8), (8, 16)]:
    g = jnp.asarray(grad(w0, x[lo:hi], y[lo:hi]), jnp.float32)  # the params hold in-window
    updates, state = update(g, state, w, weight=hi - lo)
    w = optax.apply_updates(w, updates)
  expected = w0 - 0.1 * grad(w0, x, y)
  np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
  assert float(state.acc_weight) == 0.0


def test_a_window_of_zero_weights_emits_the_inner_update_of_zero():
  # adamw's update of a zero gradient is its weight decay alone: -lr * wd * params
  tx = od.accumulate(optax.adamw(0.1, weight_decay=0.5), 2)
  params = jnp.full(2, 2.0)
  state = tx.init(params)
  _, state = tx.update(jnp.ones(2), state, params, weight=0.0)
  updates, state = tx.update(jnp.ones(2), state, params, weight=0)
  np.testing.assert_allclose(updates, [-0.1, -0.1], rtol=1e-6)
  assert bool(od.has_updated(state))


@pytest.mark.parametrize(
  "weight, message", [(-1.0, "weight must be >= 0"), (jnp.ones(2), "weight must be a scalar")]
)
def test_bad_weight_raises(weight, message):
  tx = od.accumulate(optax.sgd(1.0), 2)
  with pytest.raises(ValueError, match=message):
    tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), weight=weight)


@functools.cache
def _jitted_sgd_update(k):
  tx = od.accumulate(optax.sgd(1.0), k)
  return tx, jax.jit(tx.update)


@settings(max_examples=30, deadline=None)
@given(
  k=st.integers(1, 4),
  data=st.lists(
    st.tuples(
      st.floats(-10, 10, width=32), st.floats(1 / 64, 64, width=32), st.floats(-5, 5, width=32)
    ),
    min_size=1,
    max_size=12,
  ),
)
def test_property_weighted_windows_match_numpy(k, data):
  tx, update = _jitted_sgd_update(k)
  params = jnp.zeros(2)
  state = tx.init(params)
  grads = np.array([[a, b] for a, _, b in data], np.float32)
  weights = np.array([w for _, w, _ in data], np.float32)
  got = []
  for g, w in zip(grads, weights, strict=True):
    updates, state = update(jnp.asarray(g), state, params, weight=w)
    got.append(np.asarray(updates, np.float64))
  grads_tree = jnp.asarray(grads)
  _, expected = _reference_run(_np_sgd(1.0), params, grads_tree, [k] * len(data), weights)
  np.testing.assert_allclose(np.stack(got), expected, rtol=1e-5, atol=1e-5)
  assert int(state.micro_step) == len(data) % k
  assert int(state.step) == len(data) // k


# Non-finite micro-batches.


def test_skip_nonfinite_drops_bad_micro_batches_and_counts_them():
  clean = _grads_seq(6, seed=8)
  bad = jax.tree.map(lambda g: g[:1] * jnp.nan, clean)
  inf = jax.tree.map(lambda g: g[:1].at[0].set(jnp.inf) if g.ndim == 2 else g[:1], clean)
  # Calls: c0 NaN c1 c2 Inf c3 c4 c5 -- the bad ones neither add nor count toward k = 3.
  pieces = [clean, bad, inf]
  order = [(0, 0), (1, 0), (0, 1), (0, 2), (2, 0), (0, 3), (0, 4), (0, 5)]
  grads = jax.tree.map(
    lambda *xs: jnp.concatenate([xs[p][i : i + 1] for p, i in order]), *pieces
  )
  tx = od.accumulate(optax.adam(0.05), 3, skip_nonfinite=True)
  params, state = PARAMS, tx.init(PARAMS)
  update = jax.jit(tx.update)
  got, updated = [], []
  for i in range(len(order)):
    updates, state = update(jax.tree.map(lambda g, i=i: g[i], grads), state, params)
    params = optax.apply_updates(params, updates)
    got.append(_flat(updates))
    updated.append(bool(od.has_updated(state)))
  assert updated == [False, False, False, True, False, False, False, True]
  assert int(state.num_skipped) == 2 and int(state.step) == 2
  theta, _ = _reference_run(_np_adam(0.05), PARAMS, clean, [3, 3])
  np.testing.assert_allclose(_flat(params), theta, rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(np.stack(got)))


def test_a_skipped_call_after_an_emit_is_not_an_update():
  tx = od.accumulate(optax.sgd(1.0), 1, skip_nonfinite=True)
  state = tx.init(jnp.zeros(1))
  _, state = tx.update(jnp.ones(1), state)
  assert bool(od.has_updated(state))
  updates, state = tx.update(jnp.array([jnp.nan]), state)
  assert not bool(od.has_updated(state)) and float(updates[0]) == 0.0
  _, state = tx.update(jnp.ones(1), state, weight=jnp.inf)  # a non-finite weight too
  assert int(state.num_skipped) == 2 and int(state.step) == 1


def test_without_skip_nonfinite_a_nan_reaches_the_update():
  tx = od.accumulate(optax.sgd(1.0), 2)
  _, _, updates = run_scan(tx, jnp.zeros(1), jnp.array([[jnp.nan], [1.0]]))
  assert np.isnan(updates[1, 0])


# dtypes and state stability.


def test_bf16_params_stay_bf16_and_accumulate_in_float32():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  grads = jax.tree.map(lambda p: p * 0.5, params)
  tx = od.accumulate(optax.adam(1e-2), 2)
  assert_keeps_dtype(tx, params, grads)
  state = tx.init(params)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.acc_grads))
  assert_state_stable(tx, params, grads)


def test_float32_accumulator_keeps_a_long_bf16_window_exact():
  """300 bf16 ones: a bf16 sum sticks at 256, the float32 accumulator gives mean 1."""
  grads = jnp.ones((300, 1), jnp.bfloat16)
  _, _, updates = run_scan(
    od.accumulate(optax.sgd(1.0), 300), jnp.zeros(1, jnp.bfloat16), grads
  )
  assert updates.dtype == jnp.bfloat16 and float(updates[-1, 0]) == -1.0
  low = od.accumulate(optax.sgd(1.0), 300, accumulator_dtype=jnp.bfloat16)
  _, _, updates = run_scan(low, jnp.zeros(1, jnp.bfloat16), grads)
  assert float(updates[-1, 0]) > -0.9  # the defect the default avoids


@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    {"skip_nonfinite": True},
    {"accumulator_dtype": jnp.bfloat16},
  ],
)
def test_state_is_stable_under_scan(kwargs):
  tx = od.accumulate(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)), 3, **kwargs)
  grads = _grads_seq(7, seed=9)
  _, state, _ = run_scan(tx, PARAMS, grads)
  assert int(state.step) == 2 and int(state.micro_step) == 1
  assert_state_stable(tx, PARAMS, jax.tree.map(lambda g: g[0], grads), weight=2.0)


def test_abstract_init():
  shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.bfloat16), PARAMS)
  state = jax.eval_shape(od.accumulate(optax.adam(1e-3), 2).init, shapes)
  assert state.acc_grads["w"].dtype == jnp.float32
  assert state.inner_state[0].mu["w"].dtype == jnp.bfloat16


# every_k schedules, extra arguments, inject_hyperparams, vmap.


def test_every_k_schedule_of_real_updates():
  """k = 1 for the first two real updates, then 3: emits at calls 0, 1, 4, 7."""
  every_k = lambda step: jnp.where(step < 2, 1, 3)
  grads = _grads_seq(9, seed=10)
  tx = od.accumulate(optax.sgd(0.5), every_k)
  params, state, updates = run_scan(tx, PARAMS, grads)
  theta, ref_updates = _reference_run(_np_sgd(0.5), PARAMS, grads, [1, 1, 3, 3, 3])
  np.testing.assert_allclose(_as_flat_updates(updates), ref_updates, rtol=1e-5, atol=1e-7)
  emitted = np.flatnonzero(np.any(_as_flat_updates(updates) != 0, axis=1))
  assert list(emitted) == [0, 1, 4, 7]
  assert int(state.step) == 4 and int(state.micro_step) == 1


def test_extra_arguments_reach_the_inner_update_but_weight_does_not():
  seen = []

  def init(params):
    return optax.EmptyState()

  def update(updates, state, params=None, **extra):
    seen.append(sorted(extra))
    return jax.tree.map(lambda u: u * extra["factor"], updates), state

  tx = od.accumulate(optax.GradientTransformationExtraArgs(init, update), 2)
  state = tx.init(jnp.zeros(1))
  _, state = tx.update(jnp.array([1.0]), state, factor=3.0, weight=1.0)
  updates, state = tx.update(jnp.array([3.0]), state, factor=3.0, weight=1.0)
  np.testing.assert_allclose(updates, [6.0])
  assert all(names == ["factor"] for names in seen)


def test_plain_gradient_transformations_ignore_extra_arguments():
  tx = od.accumulate(optax.sgd(1.0), 1)
  updates, _ = tx.update(jnp.ones(1), tx.init(jnp.zeros(1)), unused=5)
  np.testing.assert_allclose(updates, [-1.0])


def test_inject_hyperparams():
  tx = optax.inject_hyperparams(od.accumulate)(optax.sgd(0.1), every_k=2)
  _, state, updates = run_scan(tx, jnp.zeros(1), jnp.array([[1.0], [3.0], [5.0], [7.0]]))
  np.testing.assert_allclose(updates[:, 0], [0.0, -0.2, 0.0, -0.6], rtol=1e-6)
  assert bool(od.has_updated(state)) and int(optax.tree.get(state, "step")) == 2


def test_vmap_gives_the_unbatched_results():
  tx = od.accumulate(optax.adam(0.1), 2)
  params = jnp.arange(6.0).reshape(3, 2)
  grads = _grads_seq(4, seed=11, tree=params)  # [4, 3, 2]
  state = jax.vmap(tx.init)(params)
  batched_update, update = jax.jit(jax.vmap(tx.update)), jax.jit(tx.update)
  batched = []
  for i in range(4):
    updates, state = batched_update(grads[i], state, params)
    batched.append(updates)
  for row in range(3):
    row_state = tx.init(params[row])
    for i in range(4):
      expected, row_state = update(grads[i, row], row_state, params[row])
      np.testing.assert_allclose(batched[i][row], expected, rtol=1e-6)
  assert bool(jnp.all(od.has_updated(state)))


# has_updated and the Flax integrations.


def test_has_updated_inside_a_chain_and_without_an_accumulate_state():
  tx = optax.chain(optax.clip(1.0), od.accumulate(optax.adam(1e-3), 2), optax.scale(2.0))
  state = tx.init(PARAMS)
  assert not bool(od.has_updated(state))
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  flags = []
  for _ in range(4):
    _, state = jax.jit(tx.update)(grads, state, PARAMS)
    flags.append(bool(jax.jit(od.has_updated)(state)))
  assert flags == [False, True, False, True]
  with pytest.raises(ValueError, match="has_updated.*AccumulateState"):
    od.has_updated(optax.adam(1e-3).init(PARAMS))


def test_flax_train_state():
  from flax.training import train_state

  tx = od.accumulate(optax.adam(0.1), 2)
  state = train_state.TrainState.create(apply_fn=None, params=PARAMS, tx=tx)
  grads = _grads_seq(4, seed=12)
  apply = jax.jit(lambda s, g: s.apply_gradients(grads=g))
  flags = []
  for i in range(4):
    state = apply(state, jax.tree.map(lambda g, i=i: g[i], grads))
    flags.append(bool(od.has_updated(state.opt_state)))
  assert flags == [False, True, False, True]
  assert int(state.step) == 4 and int(state.opt_state.step) == 2  # calls vs real updates
  expected, _ = _reference_run(_np_adam(0.1), PARAMS, grads, [2, 2])
  np.testing.assert_allclose(_flat(state.params), expected, rtol=1e-5, atol=1e-7)


def test_nnx_optimizer_with_weights():
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.array([1.0, -1.0]))

    def __call__(self, x):
      return x @ self.w

  rng = np.random.default_rng(13)
  x, y = rng.normal(size=(10, 2)).astype(np.float32), rng.normal(size=10).astype(np.float32)
  model = Model()
  optimizer = nnx.Optimizer(model, od.accumulate(optax.sgd(0.1), 2), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y, weight):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads, weight=weight)
    return od.has_updated(optimizer.opt_state)

  assert not bool(train_step(model, optimizer, x[:3], y[:3], 3.0))
  assert bool(train_step(model, optimizer, x[3:], y[3:], 7.0))
  assert bool(od.has_updated(optimizer.opt_state))
  w0 = jnp.array([1.0, -1.0])
  full = jax.grad(lambda w: jnp.mean((x @ w - y) ** 2))(w0)
  np.testing.assert_allclose(model.w[...], w0 - 0.1 * full, rtol=1e-5)


def test_checkpoint_round_trip_mid_window():
  from flax import serialization

  tx = od.accumulate(optax.adam(1e-2), 3)
  grads = _grads_seq(6, seed=14)
  update = jax.jit(tx.update)
  params, state = PARAMS, tx.init(PARAMS)
  for i in range(4):
    updates, state = update(jax.tree.map(lambda g, i=i: g[i], grads), state, params)
    params = optax.apply_updates(params, updates)
  restored = serialization.from_bytes(tx.init(PARAMS), serialization.to_bytes(state))
  assert_trees_close(restored, state, rtol=0)
  for i in range(4, 6):
    updates, restored = update(jax.tree.map(lambda g, i=i: g[i], grads), restored, params)
    params = optax.apply_updates(params, updates)
  expected, _, _ = run_scan(tx, PARAMS, grads)
  assert_trees_close(params, expected, rtol=1e-6)


def test_sharded_state_follows_the_params_and_matches_one_device():
  devices = np.array(jax.devices()[:8])
  if devices.size < 8:
    pytest.skip("needs the 8 host devices of conftest.py")
  mesh = jax.sharding.Mesh(devices, ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  params = {"a": jnp.arange(16.0), "b": jnp.ones((8, 3))}
  grads = _grads_seq(4, seed=15, tree=params)
  sharded = jax.device_put(params, sharding)
  tx = od.accumulate(optax.adam(1e-2), 2)
  state = tx.init(sharded)
  for acc, p in zip(jax.tree.leaves(state.acc_grads), jax.tree.leaves(sharded), strict=True):
    assert acc.sharding.is_equivalent_to(p.sharding, p.ndim)
  update = jax.jit(tx.update)
  p = sharded
  for i in range(4):
    updates, state = update(jax.tree.map(lambda g, i=i: g[i], grads), state, p)
    p = optax.apply_updates(p, updates)
  for acc, q in zip(jax.tree.leaves(state.acc_grads), jax.tree.leaves(sharded), strict=True):
    assert acc.sharding.is_equivalent_to(q.sharding, q.ndim)
  expected, _, _ = run_scan(tx, params, grads)
  assert_trees_close(p, expected, rtol=1e-6)


# Validation.


@pytest.mark.parametrize("every_k", [0, -2, 2.5, True, "4", None])
def test_bad_every_k_raises(every_k):
  with pytest.raises(ValueError, match=f"every_k must be an integer >= 1, got {every_k!r}"):
    od.accumulate(optax.sgd(0.1), every_k)


@pytest.mark.parametrize("dtype", [jnp.int32, "not a dtype", jnp.bool_])
def test_bad_accumulator_dtype_raises(dtype):
  with pytest.raises(ValueError, match="accumulator_dtype must be a floating dtype"):
    od.accumulate(optax.sgd(0.1), 2, accumulator_dtype=dtype)


def test_inner_must_be_a_transformation():
  with pytest.raises(
    ValueError, match="od.accumulate: inner must be an optax.GradientTransformation"
  ):
    od.accumulate(0.1, 2)


def test_float64_gradients_accumulate_in_float64():
  """accumulator_dtype is a minimum: float64 gradients are not narrowed to float32."""
  with jax.enable_x64(True):
    params = {"w": jnp.asarray([1.0, 2.0], jnp.float64), "h": jnp.ones(2, jnp.bfloat16)}
    tx = od.accumulate(optax.sgd(1.0), 2)
    state = tx.init(params)
    assert state.acc_grads["w"].dtype == jnp.float64
    assert state.acc_grads["h"].dtype == jnp.float32
    g1 = {"w": jnp.asarray([1 / 3, 1e-9], jnp.float64), "h": jnp.ones(2, jnp.bfloat16)}
    g2 = {"w": jnp.asarray([1 / 7, 1.0], jnp.float64), "h": jnp.ones(2, jnp.bfloat16)}
    _, state = tx.update(g1, state, params)
    updates, state = tx.update(g2, state, params)
    np.testing.assert_allclose(
      updates["w"], -np.array([1 / 3 + 1 / 7, 1 + 1e-9]) / 2, rtol=1e-15
    )
    assert updates["h"].dtype == jnp.bfloat16


# Window-aware options: skip_if, reduction="sum", mean_extra_args.

_SPIKE = lambda g, p: optax.tree.norm(g) > 100.0


def _calls(tx, grads_seq, params=PARAMS, **per_call):
  """``update`` + ``apply_updates`` (jitted) once per call; ``per_call``: a sequence of values
  of each extra keyword argument. Returns the params, the state, the per-call flat updates
  and the per-call states."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  calls = jax.tree.leaves(grads_seq)[0].shape[0]
  got, states = [], []
  for i in range(calls):
    extra = {name: values[i] for name, values in per_call.items()}
    updates, state = update(
      jax.tree.map(lambda g, i=i: g[i], grads_seq), state, params, **extra
    )
    params = optax.apply_updates(params, updates)
    got.append(_flat(updates))
    states.append(state)
  return params, state, np.stack(got), states


def _insert(grads_seq, position, bad):
  """``grads_seq`` with the single gradient tree ``bad`` inserted as call ``position``."""
  return jax.tree.map(
    lambda g, b: jnp.concatenate([g[:position], b[None], g[position:]]), grads_seq, bad
  )


def _recorder(calls=8):
  """An inner transformation that records the ``value`` (and ``tag``) it receives in its
  state and emits minus the gradient it receives (sgd(1))."""

  def init(params):
    del params
    return {"value": jnp.zeros(calls), "tag": jnp.zeros(calls), "n": jnp.zeros([], jnp.int32)}

  def update(updates, state, params=None, *, value, tag=0.0, **extra):
    n = state["n"]
    return jax.tree.map(jnp.negative, updates), {
      "value": state["value"].at[n].set(value),
      "tag": state["tag"].at[n].set(tag),
      "n": n + 1,
    }

  return optax.GradientTransformationExtraArgs(init, update)


def _np_windows(ks, keep, weights, values):
  """NumPy float64: the weighted mean of ``values`` of each completed window (dropped calls,
  ``keep[i]`` False, neither added nor counted) and the calls that emit."""
  means, emits, n, acc, total, count = [], [], 0, 0.0, 0.0, 0
  for i, (kept, w, v) in enumerate(zip(keep, weights, values, strict=True)):
    if not kept or n == len(ks):
      continue
    acc, total, count = acc + w * v, total + w, count + 1
    if count == ks[n]:
      means.append(acc / total if total > 0 else 0.0)
      emits.append(i)
      acc, total, count, n = 0.0, 0.0, 0, n + 1
  return np.array(means), emits


def test_skip_if_drops_a_micro_batch_exactly_as_a_nonfinite_one():
  """A spike dropped by skip_if and a NaN dropped by skip_nonfinite at the same call (with a
  weight of its own) give the same updates and states at every call, and both equal the
  NumPy run without that micro-batch."""
  clean = _grads_seq(6, seed=20)
  weights = np.array([1.0, 2.0, 5.0, 0.5, 3.0, 1.0, 2.0], np.float32)  # 5.0: the dropped one
  kept_weights = np.delete(weights, 2)
  spike = jax.tree.map(lambda g: g[0] * 1e4, clean)
  nan = jax.tree.map(lambda g: g[0] * jnp.nan, clean)
  skipped_by_if = _calls(
    od.accumulate(optax.adam(0.05), 3, skip_if=_SPIKE), _insert(clean, 2, spike), weight=weights
  )
  skipped_as_nan = _calls(
    od.accumulate(optax.adam(0.05), 3, skip_nonfinite=True),
    _insert(clean, 2, nan),
    weight=weights,
  )
  for a, b in zip(skipped_by_if[3], skipped_as_nan[3], strict=True):
    assert_trees_close(a, b, rtol=0)
  np.testing.assert_array_equal(skipped_by_if[2], skipped_as_nan[2])
  state = skipped_by_if[1]
  assert int(state.num_skipped) == 1 and int(state.step) == 2 and int(state.micro_step) == 0
  assert [bool(s.emitted) for s in skipped_by_if[3]] == [False] * 3 + [True] + [False] * 2 + [
    True
  ]
  theta, ref_updates = _reference_run(_np_adam(0.05), PARAMS, clean, [3, 3], kept_weights)
  np.testing.assert_allclose(_flat(skipped_by_if[0]), theta, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    np.delete(skipped_by_if[2], 2, 0), ref_updates, rtol=1e-4, atol=1e-7
  )
  assert not np.any(skipped_by_if[2][2])  # the skipped call emits zeros


def test_skip_if_and_skip_nonfinite_together_drop_both():
  clean = _grads_seq(4, seed=21)
  spike = jax.tree.map(lambda g: g[0] * 1e4, clean)
  nan = jax.tree.map(lambda g: g[1] * jnp.nan, clean)
  grads = _insert(_insert(clean, 1, spike), 4, nan)  # c0 spike c1 c2 NaN c3
  tx = od.accumulate(optax.sgd(0.5), 2, skip_nonfinite=True, skip_if=_SPIKE)
  params, state, updates, _ = _calls(tx, grads)
  assert int(state.num_skipped) == 2 and int(state.step) == 2
  theta, ref_updates = _reference_run(_np_sgd(0.5), PARAMS, clean, [2, 2])
  np.testing.assert_allclose(_flat(params), theta, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates[[0, 2, 3, 5]], ref_updates, rtol=1e-5, atol=1e-7)
  # Without skip_nonfinite, skip_if alone lets the NaN through (its norm is not > 100).
  _, _, updates, _ = _calls(od.accumulate(optax.sgd(0.5), 2, skip_if=_SPIKE), grads)
  assert np.all(np.isnan(updates[4]))


def test_skip_if_sees_the_params():
  """skip_if(updates, params) gets the params given to update: here it skips while w[0] > 0."""
  tx = od.accumulate(optax.sgd(1.0), 1, skip_if=lambda g, p: p[0] > 0)
  state = tx.init(jnp.zeros(1))
  updates, state = tx.update(jnp.ones(1), state, jnp.array([1.0]))
  assert float(updates[0]) == 0.0 and int(state.num_skipped) == 1
  updates, state = tx.update(jnp.ones(1), state, jnp.array([-1.0]))
  assert float(updates[0]) == -1.0 and int(state.num_skipped) == 1


@pytest.mark.parametrize("k", [1, 3])
def test_reduction_sum_equals_numpy_reference(k):
  grads = _grads_seq(3 * k + 1, seed=22)
  weights = np.linspace(0.5, 3.0, 3 * k + 1).astype(np.float32)
  tx = od.accumulate(optax.sgd(0.1), k, reduction="sum")
  params, state, updates, _ = _calls(tx, grads, weight=weights)
  theta, ref_updates = _reference_run(_np_sgd(0.1), PARAMS, grads, [k] * 4, weights, "sum")
  np.testing.assert_allclose(updates, ref_updates, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_flat(params), theta, rtol=1e-5, atol=1e-6)
  # With weights 1 the sum is k times the mean.
  _, _, mean_updates = run_scan(od.accumulate(optax.sgd(0.1), k), PARAMS, grads)
  _, _, sum_updates = run_scan(tx, PARAMS, grads)
  np.testing.assert_allclose(
    _as_flat_updates(sum_updates), k * _as_flat_updates(mean_updates), rtol=1e-5, atol=1e-6
  )


def test_reduction_sum_keeps_the_gradient_dtype():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  grads = jax.tree.map(lambda p: p * 0.5, params)
  tx = od.accumulate(optax.adam(1e-2), 2, reduction="sum")
  assert_keeps_dtype(tx, params, grads)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tx.init(params).acc_grads))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mean_extra_args_reach_the_inner_update_as_the_weighted_window_mean(reduction):
  """The recorder sees each window's weighted mean of value (the skipped call's value, 1e6,
  is not added) with either reduction; tag, not named, is the emitting call's value."""
  grads = _grads_seq(7, seed=23)
  grads = jax.tree.map(lambda g: g.at[3].mul(1e4), grads)  # call 3 spikes: skipped
  weights = np.array([1.0, 3.0, 2.0, 7.0, 0.5, 4.0, 1.5], np.float32)
  values = np.array([2.0, 1.0, 5.0, 1e6, 3.0, -1.0, 8.0], np.float32)
  tags = np.arange(7, dtype=np.float32)
  tx = od.accumulate(
    _recorder(), 3, skip_if=_SPIKE, reduction=reduction, mean_extra_args=("value",)
  )
  _, state, updates, _ = _calls(tx, grads, weight=weights, value=values, tag=tags)
  keep = [i != 3 for i in range(7)]
  means, emits = _np_windows([3, 3], keep, weights.astype(np.float64), values)
  assert emits == [2, 6]
  recorded = state.inner_state
  assert int(recorded["n"]) == 2
  np.testing.assert_allclose(recorded["value"][:2], means, rtol=1e-6)
  np.testing.assert_array_equal(recorded["tag"][:2], tags[emits])
  assert state.acc_extra["value"].dtype == jnp.float32
  assert float(state.acc_extra["value"]) == 0.0  # zeroed by the emit
  # The gradients: the same windows, summed or averaged.
  kept = jax.tree.map(lambda g: jnp.delete(g, 3, axis=0), grads)
  kept_weights = np.delete(weights, 3)
  _, ref_updates = _reference_run(_np_sgd(1.0), PARAMS, kept, [3, 3], kept_weights, reduction)
  np.testing.assert_allclose(np.delete(updates, 3, 0), ref_updates, rtol=1e-5, atol=1e-5)


def test_a_window_of_zero_weights_gives_a_zero_mean_value():
  tx = od.accumulate(_recorder(), 2, mean_extra_args=("value",))
  state = tx.init(jnp.zeros(1))
  for v in (3.0, 5.0):
    _, state = tx.update(jnp.ones(1), state, weight=0.0, value=v)
  assert float(state.inner_state["value"][0]) == 0.0


def test_reduce_on_plateau_sees_the_window_mean_of_the_loss():
  """optax.contrib.reduce_on_plateau inside: its best value is the window's weighted mean of
  the losses (1.5), not the last micro-batch's loss (1.0)."""
  inner = optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=1))
  params = jnp.zeros(2)
  for names, best in (((), 1.0), (("value",), 1.5)):
    tx = od.accumulate(inner, 2, mean_extra_args=names)
    state = tx.init(params)
    for loss, weight in ((3.0, 1.0), (1.0, 3.0)):
      _, state = tx.update(jnp.ones(2), state, params, value=loss, weight=weight)
    plateau = state.inner_state[1]
    np.testing.assert_allclose(plateau.best_value, best, rtol=1e-6)
    assert int(plateau.plateau_count) == 0


def test_mean_extra_args_of_integer_and_bool_values_are_floats():
  tx = od.accumulate(_recorder(), 2, mean_extra_args=("value",))
  state = tx.init(jnp.zeros(1))
  _, state = tx.update(jnp.ones(1), state, value=1)
  _, state = tx.update(jnp.ones(1), state, value=jnp.array(True))
  assert float(state.inner_state["value"][0]) == 1.0
  state = tx.init(jnp.zeros(1))
  _, state = tx.update(jnp.ones(1), state, value=1)
  _, state = tx.update(jnp.ones(1), state, value=2)
  assert float(state.inner_state["value"][0]) == 1.5


def test_every_k_schedule_with_the_window_options():
  """k = 1 for two real updates, then 3, with a skipped spike, sums and a mean value."""
  every_k = lambda step: jnp.where(step < 2, 1, 3)
  clean = _grads_seq(8, seed=24)
  grads = _insert(clean, 3, jax.tree.map(lambda g: g[0] * 1e4, clean))
  values = np.arange(9, dtype=np.float32)
  weights = np.array([1.0, 2.0, 1.0, 9.0, 3.0, 0.5, 1.0, 2.0, 4.0], np.float32)
  tx = od.accumulate(
    _recorder(), every_k, skip_if=_SPIKE, reduction="sum", mean_extra_args=("value",)
  )
  params, state, updates, states = _calls(tx, grads, weight=weights, value=values)
  keep = [i != 3 for i in range(9)]
  means, emits = _np_windows([1, 1, 3, 3], keep, weights.astype(np.float64), values)
  assert emits == [0, 1, 5, 8]
  assert [i for i, s in enumerate(states) if bool(s.emitted)] == emits
  np.testing.assert_allclose(state.inner_state["value"][:4], means, rtol=1e-6)
  assert int(state.step) == 4 and int(state.micro_step) == 0 and int(state.num_skipped) == 1
  kept_weights = np.delete(weights, 3)
  theta, ref_updates = _reference_run(
    _np_sgd(1.0), PARAMS, clean, [1, 1, 3, 3], kept_weights, "sum"
  )
  np.testing.assert_allclose(np.delete(updates, 3, 0), ref_updates, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_flat(params), theta, rtol=1e-5, atol=1e-5)


def test_the_window_options_are_stable_under_jit_and_scan():
  """The new state field keeps its structure and dtypes through lax.scan (values per step)."""
  tx = od.accumulate(
    optax.chain(optax.clip_by_global_norm(1.0), _recorder(16)),
    3,
    skip_if=_SPIKE,
    reduction="sum",
    mean_extra_args=("value", "lr_scale"),
  )
  grads = _grads_seq(10, seed=25)
  values = jnp.linspace(1.0, 10.0, 10)

  def step(carry, xs):
    params, state = carry
    g, v = xs
    updates, state = tx.update(g, state, params, value=v, lr_scale=2 * v, weight=v)
    return (optax.apply_updates(params, updates), state), updates

  init = (PARAMS, tx.init(PARAMS))
  (_, state), _ = jax.jit(lambda c, xs: jax.lax.scan(step, c, xs))(init, (grads, values))
  assert jax.tree.structure(state) == jax.tree.structure(init[1])
  assert sorted(state.acc_extra) == ["lr_scale", "value"]
  assert shapes_and_dtypes(state) == shapes_and_dtypes(init[1])
  assert int(state.step) == 3 and int(state.micro_step) == 1
  np.testing.assert_allclose(state.acc_extra["value"], 10.0 * 10.0, rtol=1e-6)  # w = v = 10
  means, _ = _np_windows([3] * 3, [True] * 10, np.linspace(1, 10, 10), np.linspace(1, 10, 10))
  np.testing.assert_allclose(state.inner_state[1]["value"][:3], means, rtol=1e-6)
  assert_state_stable(
    tx, PARAMS, jax.tree.map(lambda g: g[0], grads), value=1.0, lr_scale=2.0, weight=2.0
  )


def test_the_extra_sums_widen_with_the_weights_under_x64():
  with jax.enable_x64(True):
    params = {"w": jnp.zeros(2, jnp.float64)}
    tx = od.accumulate(_recorder(), 2, mean_extra_args=("value",))
    state = tx.init(params)
    assert state.acc_extra["value"].dtype == jnp.float64 == state.acc_weight.dtype
    _, state = tx.update({"w": jnp.ones(2, jnp.float64)}, state, value=jnp.float64(1 / 3))
    _, state = tx.update({"w": jnp.ones(2, jnp.float64)}, state, value=jnp.float64(1 / 7))
    # the float64 mean, exact to float64 rounding
    np.testing.assert_allclose(state.inner_state["value"][0], (1 / 3 + 1 / 7) / 2, rtol=1e-15)
    bf16 = {"w": jnp.zeros(2, jnp.bfloat16)}
    state = tx.init(bf16)
    assert state.acc_extra["value"].dtype == jnp.float32


def test_a_state_built_positionally_from_the_seven_fields_still_works():
  tx = od.accumulate(optax.adam(1e-2), 2)
  state = od.AccumulateState(*tx.init(PARAMS)[:7])
  assert state.acc_extra == {}
  assert jax.tree.structure(state) == jax.tree.structure(tx.init(PARAMS))
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  _, state = jax.jit(tx.update)(grads, state, PARAMS)
  updates, state = jax.jit(tx.update)(grads, state, PARAMS)
  assert bool(od.has_updated(state)) and state.acc_extra == {}


def test_checkpoint_round_trip_with_mean_extra_args():
  from flax import serialization

  tx = od.accumulate(optax.adam(1e-2), 3, mean_extra_args=("value",))
  state = tx.init(PARAMS)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  _, state = tx.update(grads, state, PARAMS, value=2.0, weight=3.0)
  restored = serialization.from_bytes(tx.init(PARAMS), serialization.to_bytes(state))
  assert_trees_close(restored, state, rtol=0)
  assert float(restored.acc_extra["value"]) == 6.0


def test_inject_hyperparams_with_skip_if_as_a_static_arg():
  tx = optax.inject_hyperparams(od.accumulate, static_args=("skip_if",))(
    optax.sgd(1.0), every_k=2, skip_if=_SPIKE, mean_extra_args=("value",), reduction="sum"
  )
  _, state, updates = run_scan(
    tx, jnp.zeros(1), jnp.array([[1.0], [1e4], [3.0], [5.0], [7.0]]), value=1.0
  )
  np.testing.assert_allclose(updates[:, 0], [0.0, 0.0, -4.0, 0.0, -12.0])
  assert int(optax.tree.get(state, "num_skipped")) == 1


def test_vmap_with_the_window_options_gives_the_unbatched_results():
  tx = od.accumulate(_recorder(), 2, skip_if=_SPIKE, mean_extra_args=("value",))
  params = jnp.zeros((3, 2))
  grads = jnp.asarray(np.random.default_rng(26).normal(size=(4, 3, 2)), jnp.float32)
  grads = grads.at[1, 0].set(1e4)  # row 0 skips its second call
  values = jnp.arange(12.0).reshape(4, 3)
  state = jax.vmap(tx.init)(params)
  update = jax.jit(jax.vmap(lambda g, s, p, v: tx.update(g, s, p, value=v)))
  for i in range(4):
    _, state = update(grads[i], state, params, values[i])
  np.testing.assert_array_equal(state.num_skipped, [1, 0, 0])
  for row in range(3):
    row_state = tx.init(params[row])
    for i in range(4):
      _, row_state = tx.update(grads[i, row], row_state, params[row], value=values[i, row])
    assert_trees_close(jax.tree.map(lambda x, r=row: x[r], state), row_state, rtol=1e-6)


# The window options: validation.


@pytest.mark.parametrize("skip_if", [3, "norm > 100", True])
def test_bad_skip_if_raises(skip_if):
  with pytest.raises(ValueError, match=r"^od\.accumulate: skip_if must be None or a callable"):
    od.accumulate(optax.sgd(0.1), 2, skip_if=skip_if)


@pytest.mark.parametrize("reduction", ["max", "MEAN", None, 1])
def test_bad_reduction_raises(reduction):
  with pytest.raises(
    ValueError, match=r"^od\.accumulate: reduction must be one of \('mean', 'sum'\), got"
  ):
    od.accumulate(optax.sgd(0.1), 2, reduction=reduction)


@pytest.mark.parametrize(
  "names, message",
  [
    ("value", "must be a sequence of names, not a string"),
    (None, "must be a sequence of keyword argument names"),
    ((1,), "must be a sequence of keyword argument names"),
    (("value", ""), "must be a sequence of keyword argument names"),
    ({"value"}, "must be a sequence of keyword argument names"),
    (("value", "value"), "must not repeat a name"),
    (("weight",), "must not name 'weight'"),
  ],
)
def test_bad_mean_extra_args_raise(names, message):
  with pytest.raises(ValueError, match=rf"^od\.accumulate: mean_extra_args {message}"):
    od.accumulate(optax.sgd(0.1), 2, mean_extra_args=names)


@pytest.mark.parametrize(
  "result, message",
  [
    (lambda g: jnp.ones(2, jnp.bool_), r"got shape \(2,\)"),
    (lambda g: "yes", "got str 'yes'"),
    (lambda g: None, "got NoneType None"),
    (lambda g: jnp.array(1j), "got dtype complex64"),
  ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_a_bad_skip_if_result_raises_at_trace_time(result, message, jit):
  tx = od.accumulate(optax.sgd(0.1), 2, skip_if=lambda g, p: result(g))
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(
    ValueError, match=rf"^od\.accumulate: skip_if must return a bool scalar, {message}"
  ):
    update(jnp.ones(2), tx.init(jnp.zeros(2)))


def test_number_results_of_skip_if_are_truth_values():
  for result, skipped in ((0, 0), (1, 1), (0.0, 0), (2.5, 1)):
    tx = od.accumulate(optax.sgd(0.1), 1, skip_if=lambda g, p, r=result: r)
    _, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
    assert int(state.num_skipped) == skipped, result


@pytest.mark.parametrize(
  "extra, message",
  [
    ({}, r"mean_extra_args names 'value', but update got no value= argument"),
    ({"loss": 1.0}, r"mean_extra_args names 'value', .* \(got \['loss'\]\)"),
    (
      {"value": jnp.ones(2)},
      r"value= \(in mean_extra_args\) must be a scalar, got shape \(2,\)",
    ),
    ({"value": "low"}, r"value= \(in mean_extra_args\) must be a real scalar, got 'low'"),
    ({"value": 1j}, r"value= \(in mean_extra_args\) must be a real scalar"),
  ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_a_missing_or_bad_mean_extra_arg_raises(extra, message, jit):
  tx = od.accumulate(optax.sgd(0.1), 2, mean_extra_args=("value",))
  if jit and isinstance(extra.get("value"), str):
    pytest.skip("a string is no jit argument")
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(ValueError, match=rf"^od\.accumulate: {message}"):
    update(jnp.ones(2), tx.init(jnp.zeros(2)), **extra)
