"""autoclip: clipping the global norm at a percentile of its recent history."""

import collections
import functools
import math

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_keeps_dtype
from helpers import assert_state_stable
from helpers import make_seq
from helpers import np_norm
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import optaxderived as od
from optaxderived._core.state import find_states
from optaxderived._transforms.autoclip import AutoClipState
from optaxderived._transforms.autoclip import _percentile
from optaxderived._transforms.autoclip import autoclip

# ---------------------------------------------------------------------------------------------
# The NumPy float64 reference, written from the rule.


def np_autoclip(seq, percentile=10.0, window=1000):
  """Per step: the clipped updates, the threshold, the norm, whether it was clipped, and the
  recorded history (oldest first)."""
  history = collections.deque(maxlen=window)
  outs, thresholds, norms, flags, histories = [], [], [], [], []
  for grads in seq:
    n = np_norm(grads)
    out, threshold, clipped = grads, math.nan, False
    if math.isfinite(n):
      history.append(n)
      threshold = float(np.percentile(np.array(history), percentile))
      if n > threshold:
        out = {k: np.asarray(x, np.float64) * (threshold / n) for k, x in grads.items()}
        clipped = True
    outs.append(out)
    thresholds.append(threshold)
    norms.append(n)
    flags.append(clipped)
    histories.append(list(history))
  return outs, thresholds, norms, flags, histories


def run_steps(tx, seq):
  """Every step's updates and state, under jit(lax.scan)."""

  def step(state, g):
    u, state = tx.update(g, state)
    return state, (u, state)

  grads = jax.tree.map(lambda *xs: jnp.stack(xs), *seq)
  run = jax.jit(lambda s, g: jax.lax.scan(step, s, g))
  return run(tx.init(seq[0]), grads)[1]


def assert_matches_reference(updates, states, seq, percentile, window):
  outs, thresholds, norms, flags, histories = np_autoclip(seq, percentile, window)
  for t, want in enumerate(outs):
    for k in want:
      np.testing.assert_allclose(
        np.asarray(updates[k][t], np.float64), want[k], rtol=1e-5, atol=1e-7, err_msg=(t, k)
      )
    np.testing.assert_allclose(float(states.norm[t]), norms[t], rtol=1e-6)
    if math.isfinite(norms[t]) and abs(norms[t] - thresholds[t]) > 1e-5 * norms[t]:
      assert bool(states.clipped[t]) == flags[t], t  # (ties: the norm is the percentile)
    elif not math.isfinite(norms[t]):
      assert not bool(states.clipped[t])
    # The ring buffer holds the recorded norms, the i-th at i % window.
    count = int(states.count[t])
    hist = histories[t]
    assert count == sum(math.isfinite(n) for n in norms[: t + 1])
    ring = np.asarray(states.history[t], np.float64)
    expected = [ring[i % window] for i in range(max(count - window, 0), count)]
    np.testing.assert_allclose(expected, hist, rtol=1e-6)
  return flags


NORMS = [
  1.0,
  2.0,
  "nan",
  0.5,
  4.0,
  3.0,
  "inf",
  10.0,
  0.0,
  1.5,
  "-inf",
  2.5,
  6.0,
  0.7,
  1.0,
  30.0,
]


@pytest.mark.parametrize(
  "percentile, window",
  [(10.0, 1000), (10.0, 4), (50.0, 5), (37.5, 3), (0.0, 4), (100.0, 4), (90.0, 1)],
)
def test_matches_the_numpy_reference(percentile, window):
  seq = make_seq(NORMS)
  updates, states = run_steps(autoclip(percentile, window=window), seq)
  flags = assert_matches_reference(updates, states, seq, percentile, window)
  if percentile == 100.0 or window == 1:
    assert not any(flags)  # the norm is never above the largest recorded one
  else:
    assert any(flags) and not all(flags)


def test_the_ring_buffer_wraps_around():
  norms = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
  states = run_steps(autoclip(0.0, window=3), make_seq(norms))[1]
  np.testing.assert_allclose(np.asarray(states.history[-1]), [7.0, 5.0, 6.0], rtol=1e-6)
  assert int(states.count[-1]) == 7
  # percentile 0: every norm above the minimum of the last three is clipped to it
  outs = np_autoclip(make_seq(norms), 0.0, 3)[1]
  np.testing.assert_allclose(outs[3:], [2.0, 3.0, 4.0, 5.0])


def test_the_first_call_is_not_clipped_and_unwritten_slots_are_ignored():
  seq = make_seq([5.0, 1.0, 1.0])
  updates, states = run_steps(autoclip(10.0), seq)
  assert not bool(states.clipped[0])
  np.testing.assert_array_equal(np.asarray(states.history[0, 1:]), 0.0)
  # the zeros of the unwritten slots are not a history of zero norms: nothing is zeroed
  flat = np.concatenate([np.reshape(u, (3, -1)) for u in updates.values()], axis=1)
  assert np.all(np.linalg.norm(flat.astype(np.float64), axis=1)[1:] > 0.9)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_a_non_finite_norm_passes_unchanged_and_is_not_recorded(bad):
  seq = make_seq([1.0, 2.0, bad])
  updates, states = run_steps(autoclip(10.0, window=4), seq)
  for k in seq[-1]:
    np.testing.assert_array_equal(np.asarray(updates[k][-1]), seq[-1][k])
  np.testing.assert_array_equal(np.asarray(states.history[-1]), np.asarray(states.history[-2]))
  assert int(states.count[-1]) == 2 and not bool(states.clipped[-1])


def test_apply_if_finite_skips_a_nan_step():
  tx = optax.apply_if_finite(optax.chain(autoclip(), optax.sgd(0.1)), 3)
  params = {k: jnp.zeros_like(v) for k, v in make_seq([1.0])[0].items()}
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  state = tx.init(params)
  for g in make_seq([1.0, 1.1, 1.2]):
    updates, state = step(g, state, params)
    params = optax.apply_updates(params, updates)
  for bad in make_seq(["nan", "inf"]):
    updates, new_state = step(bad, state, params)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    jax.tree.map(np.testing.assert_array_equal, new_state.inner_state, state.inner_state)
    assert int(new_state.notfinite_count) == 1


def test_inside_accumulate_it_records_real_updates():
  k = 2
  seq = make_seq([1.0, 2.0, 0.5, 1.5, 9.0, 8.0, 1.0, 1.0])
  tx = od.accumulate(optax.chain(autoclip(50.0, window=3), optax.sgd(1.0)), k)
  step, state = jax.jit(tx.update), tx.init(seq[0])
  for g in seq:
    _, state = step(g, state)
  (astate,) = find_states(state, AutoClipState)
  means = [
    {n: np.mean([np.asarray(g[n], np.float64) for g in seq[i : i + k]], 0) for n in seq[0]}
    for i in range(0, len(seq), k)
  ]
  histories = np_autoclip(means, 50.0, 3)[4]
  assert int(astate.count) == len(seq) // k
  ring = np.asarray(astate.history, np.float64)
  np.testing.assert_allclose([ring[i % 3] for i in range(1, 4)], histories[-1], rtol=1e-6)


def test_finite_gradients_whose_squares_overflow_are_recorded_and_clipped():
  seq = make_seq([1.0, 2.0, 3.0])
  huge = {k: np.full_like(v, 1e30) for k, v in seq[0].items()}  # sum of squares: inf
  updates, states = run_steps(autoclip(50.0), seq + [huge])
  want = 1e30 * math.sqrt(sum(v.size for v in huge.values()))
  np.testing.assert_allclose(float(states.norm[-1]), want, rtol=1e-6)
  assert bool(states.clipped[-1]) and int(states.count[-1]) == 4
  clipped = float(optax.tree.norm(jax.tree.map(lambda u: u[-1], updates)))
  np.testing.assert_allclose(clipped, 2.5, rtol=1e-5)  # the median of 1, 2, 3, huge


def test_bf16_updates_stay_bf16_with_a_float32_norm_and_a_stable_state():
  w = np.random.default_rng(1).normal(size=4096)
  g = {"w": jnp.asarray(w, jnp.bfloat16), "b": jnp.ones(3, jnp.bfloat16)}
  tx = autoclip(10.0, window=8)
  assert_state_stable(tx, g, g)
  assert_keeps_dtype(tx, g, g)
  update = jax.jit(tx.update)
  _, state = update(g, tx.init(g))
  assert state.norm.dtype == jnp.float32 and state.history.dtype == jnp.float32
  np.testing.assert_allclose(float(state.norm), np_norm(g), rtol=1e-6)
  updates, state = update(jax.tree.map(lambda x: x * 4, g), state)
  assert bool(state.clipped) and all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))


def test_the_percentile_sorts_the_history_not_the_params():
  tx = autoclip(10.0, window=1000)
  g = {"w": jnp.ones((64, 64)), "b": jnp.ones(1000)}  # a leaf the size of the window, too
  jaxpr = jax.make_jaxpr(tx.update)(g, tx.init(g)).jaxpr

  def sorts(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "sort":
        yield eqn
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from sorts(sub)

  found = list(sorts(jaxpr))
  assert len(found) == 1 and found[0].invars[0].aval.shape == (1000,)
  # the sorted operand is the history, not the gradient of the same size
  np.testing.assert_array_equal(np.asarray(jax.jit(tx.update)(g, tx.init(g))[0]["b"]), 1.0)


def test_chain_tree_get_a_single_compile_and_inject_hyperparams():
  tx = optax.chain(autoclip(50.0, window=4), optax.adam(1e-2))
  seq = make_seq([1.0, 1.1, 1.2, 30.0])
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(lambda g, s: tx.update(g, s), n=1))
  state = tx.init(seq[0])
  for g in seq:
    _, state = step(g, state)
  assert bool(optax.tree.get(state, "clipped"))
  np.testing.assert_allclose(float(optax.tree.get(state, "norm")), 30.0, rtol=1e-5)
  # the window is read from the state's shape in update, so an injected one works
  want = run_steps(autoclip(37.5, window=3), make_seq(NORMS))
  got = run_steps(optax.inject_hyperparams(autoclip)(37.5, window=3), make_seq(NORMS))
  for k in want[0]:
    np.testing.assert_allclose(np.asarray(got[0][k]), np.asarray(want[0][k]), rtol=1e-6)


def test_an_empty_tree_passes():
  tx = autoclip()
  updates, state = tx.update({}, tx.init({}))
  assert updates == {} and int(state.count) == 0


# ---------------------------------------------------------------------------------------------
# Properties: the percentile against numpy.percentile, the whole rule on random histories.

_percentile_jit = jax.jit(_percentile)


@settings(deadline=None, max_examples=50)
@given(
  history=hnp.arrays(
    np.float32, 16, elements=st.floats(0.0, 1e3, width=32, allow_subnormal=False)
  ),
  size=st.integers(1, 16),
  q=st.one_of(st.sampled_from([0.0, 10.0, 25.0, 50.0, 99.0, 100.0]), st.floats(0.0, 100.0)),
)
def test_property_the_percentile_is_numpys(history, size, q):
  got = float(_percentile_jit(jnp.asarray(history), jnp.asarray(size), q))
  want = float(np.percentile(history[:size].astype(np.float64), q))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.max(history[:size])))


@functools.cache
def _property_run(window: int):
  def run(norms, percentile):
    tx = autoclip(percentile, window=window)

    def step(state, n):
      u, state = tx.update({"g": jnp.stack([n, 0.0])}, state)
      return state, u["g"][0]

    return jax.lax.scan(step, tx.init({"g": jnp.zeros(2)}), norms)[1]

  return jax.jit(run)


@settings(deadline=None, max_examples=25)
@given(
  norms=st.lists(
    st.one_of(
      st.floats(0.0, 100.0, width=32, allow_subnormal=False),
      st.just(math.nan),
      st.just(math.inf),
    ),
    min_size=12,
    max_size=12,
  ),
  percentile=st.floats(0.0, 100.0),
  window=st.sampled_from([1, 5]),
)
def test_property_matches_the_reference_on_random_histories(norms, percentile, window):
  got = _property_run(window)(jnp.asarray(norms, jnp.float32), percentile)
  outs = np_autoclip([{"g": np.array([n, 0.0])} for n in norms], percentile, window)[0]
  want = [o["g"][0] for o in outs]
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "kwargs, argname",
  [
    (dict(percentile=-1.0), "percentile"),
    (dict(percentile=100.5), "percentile"),
    (dict(percentile=math.nan), "percentile"),
    (dict(percentile="10"), "percentile"),
    (dict(percentile=lambda count: 10.0), "percentile"),
    (dict(window=0), "window"),
    (dict(window=2.0), "window"),
    (dict(window=True), "window"),
  ],
)
def test_bad_arguments_raise_value_error(kwargs, argname):
  with pytest.raises(ValueError, match=rf"^od\.autoclip: {argname} "):
    autoclip(**kwargs)
