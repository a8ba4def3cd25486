"""zclip: clipping the global norm at a z-score of its moving statistics."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_keeps_dtype
from helpers import assert_state_stable
from helpers import make_seq
from helpers import np_norm
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optaxderived as od
from optaxderived._core.state import find_states
from optaxderived._transforms.zclip import ZClipState
from optaxderived._transforms.zclip import zclip

# ---------------------------------------------------------------------------------------------
# The NumPy float64 reference, written from the rule.


def np_zclip(seq, z_threshold=2.5, ema_decay=0.97, warmup_steps=25, reciprocal=False):
  """Per step: the clipped updates, the state (mean, var, count, norm, clipped) and the
  distance of the z-score to the threshold (inf during warmup and for non-finite norms)."""
  mean = var = 0.0
  count, warm = 0, []
  outs, states, margins = [], [], []
  for grads in seq:
    n = np_norm(grads)
    clipped, margin, out = False, math.inf, grads
    if not math.isfinite(n):
      pass  # passed unchanged, statistics untouched
    elif count < warmup_steps:
      warm.append(n)
      count += 1
      mean, var = float(np.mean(warm)), float(np.var(warm))  # population variance
    else:
      std = math.sqrt(var)
      z = (n - mean) / (std + 1e-6)
      margin = abs(z - z_threshold)
      post = n
      if z > z_threshold:
        post = mean + (z_threshold**2 / z if reciprocal else z_threshold) * std
        out = {k: np.asarray(x, np.float64) * (post / n) for k, x in grads.items()}
        clipped = True
      mean = ema_decay * mean + (1 - ema_decay) * post
      var = ema_decay * var + (1 - ema_decay) * (post - mean) ** 2
      count += 1
    outs.append(out)
    states.append(dict(mean=mean, var=var, count=count, norm=n, clipped=clipped))
    margins.append(margin)
  return outs, states, margins


def stack(seq):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *seq)


def run_steps(tx, seq):
  """Every step's updates and state, under jit(lax.scan)."""

  def step(state, g):
    u, state = tx.update(g, state)
    return state, (u, state)

  grads = stack(seq)
  state0 = tx.init(seq[0])
  _, (updates, states) = jax.jit(lambda s, g: jax.lax.scan(step, s, g))(state0, grads)
  return updates, states


def assert_matches_reference(updates, states, ref_outs, ref_states, rtol=1e-5):
  for t, (want, ws) in enumerate(zip(ref_outs, ref_states, strict=True)):
    for k in want:
      np.testing.assert_allclose(
        np.asarray(updates[k][t], np.float64), want[k], rtol=rtol, atol=1e-7, err_msg=(t, k)
      )
    scale = max(ws["mean"], 1.0) ** 2
    np.testing.assert_allclose(float(states.mean[t]), ws["mean"], rtol=rtol, err_msg=t)
    np.testing.assert_allclose(float(states.var[t]), ws["var"], rtol=1e-4, atol=1e-6 * scale)
    assert int(states.count[t]) == ws["count"], t
    np.testing.assert_allclose(float(states.norm[t]), ws["norm"], rtol=rtol)
    assert bool(states.clipped[t]) == ws["clipped"], t


# Warmup with a NaN inside it, spikes after it, non-finite steps after it, a zero gradient.
NORMS = [1.0, "nan", 1.2, 0.8, 1.1, 10.0, 1.0, "inf", 1.05, 3.0, 0.9, "-inf", 5.0, 0.0, 1.0]


@pytest.mark.parametrize("reciprocal", [False, True])
@pytest.mark.parametrize("warmup_steps", [1, 3])
def test_matches_the_numpy_reference(warmup_steps, reciprocal):
  seq = make_seq(NORMS)
  kw = dict(z_threshold=2.0, ema_decay=0.9, warmup_steps=warmup_steps, reciprocal=reciprocal)
  ref_outs, ref_states, margins = np_zclip(seq, **kw)
  assert min(margins) > 1e-2  # no decision sits on the threshold
  flags = [s["clipped"] for s in ref_states]
  assert any(flags) and not all(flags[warmup_steps + 2 :])  # both branches after warmup
  updates, states = run_steps(zclip(**kw), seq)
  assert_matches_reference(updates, states, ref_outs, ref_states)


def test_the_two_forms_clip_to_their_targets():
  seq = make_seq([1.0, 1.2, 0.8, 10.0])
  (mean, var) = np.mean([1.0, 1.2, 0.8]), np.var([1.0, 1.2, 0.8])
  std = math.sqrt(var)
  z = (10.0 - mean) / (std + 1e-6)
  for reciprocal, target in ((False, mean + 2.5 * std), (True, mean + 2.5**2 / z * std)):
    updates, states = run_steps(zclip(warmup_steps=3, reciprocal=reciprocal), seq)
    norm = float(optax.tree.norm(jax.tree.map(lambda u: u[3], updates)))
    np.testing.assert_allclose(norm, target, rtol=1e-5)
    assert bool(states.clipped[3]) and not bool(jnp.any(states.clipped[:3]))


def test_warmup_does_not_clip_and_ends_with_the_mean_and_population_variance():
  norms = [1.0, 50.0, 0.01, 7.0, 3.0]
  updates, states = run_steps(zclip(0.1, warmup_steps=5), make_seq(norms))
  assert not bool(jnp.any(states.clipped))
  np.testing.assert_allclose(np.asarray(states.norm), norms, rtol=1e-6)
  np.testing.assert_allclose(float(states.mean[-1]), np.mean(norms), rtol=1e-6)
  np.testing.assert_allclose(float(states.var[-1]), np.var(norms), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(states.count), np.arange(1, 6))


def test_the_warmup_variance_does_not_cancel():
  """Norms 1e4 ± 1e-2: a float32 sum of squares would lose the variance entirely."""
  norms = [1e4 + d for d in (0.01, -0.01, 0.02, -0.02, 0.0)]
  _, states = run_steps(zclip(warmup_steps=5), make_seq(norms))
  norms32 = np.asarray(states.norm, np.float64)  # the float32 norms the rule saw
  np.testing.assert_allclose(float(states.var[-1]), np.var(norms32), rtol=0.05)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_a_non_finite_norm_passes_unchanged_and_leaves_the_statistics(bad):
  seq = make_seq([1.0, 1.2, 0.8, 1.1, bad])
  updates, states = run_steps(zclip(warmup_steps=3), seq)
  last = jax.tree.map(lambda u: u[-1], updates)
  for k in last:
    np.testing.assert_array_equal(np.asarray(last[k]), seq[-1][k])  # NaN where it was
  for field in ("mean", "var", "count"):
    assert getattr(states, field)[-1] == getattr(states, field)[-2], field
  assert not bool(states.clipped[-1]) and not np.isfinite(float(states.norm[-1]))


def test_apply_if_finite_skips_a_nan_step():
  tx = optax.apply_if_finite(optax.chain(zclip(warmup_steps=2), optax.sgd(0.1)), 3)
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


def test_inside_accumulate_it_counts_real_updates():
  k = 3
  seq = make_seq([1.0, 2.0, 0.5, 1.5, 1.0, 0.7, 90.0, 80.0, 70.0, 1.0, 1.0, 1.0])
  tx = od.accumulate(optax.chain(zclip(warmup_steps=2), optax.sgd(1.0)), k)
  step, state = jax.jit(tx.update), tx.init(seq[0])
  for g in seq:
    _, state = step(g, state)
  (zstate,) = find_states(state, ZClipState)
  means = [
    {n: np.mean([np.asarray(g[n], np.float64) for g in seq[i : i + k]], 0) for n in seq[0]}
    for i in range(0, len(seq), k)
  ]
  _, ref, margins = np_zclip(means, warmup_steps=2)
  assert min(margins) > 1e-2 and ref[2]["clipped"]  # the third window mean is clipped
  assert int(zstate.count) == len(seq) // k == ref[-1]["count"]
  np.testing.assert_allclose(float(zstate.mean), ref[-1]["mean"], rtol=1e-5)
  np.testing.assert_allclose(float(zstate.var), ref[-1]["var"], rtol=1e-4)


def test_finite_gradients_whose_squares_overflow_are_clipped_not_passed():
  seq = make_seq([1.0, 1.2, 0.8])
  huge = {k: np.full_like(v, 1e30) for k, v in seq[0].items()}  # sum of squares: inf
  updates, states = run_steps(zclip(warmup_steps=3), seq + [huge])
  want = 1e30 * math.sqrt(sum(v.size for v in huge.values()))
  np.testing.assert_allclose(float(states.norm[-1]), want, rtol=1e-6)
  assert bool(states.clipped[-1]) and int(states.count[-1]) == 4
  clipped = float(optax.tree.norm(jax.tree.map(lambda u: u[-1], updates)))
  np.testing.assert_allclose(clipped, 1.0 + 2.5 * math.sqrt(np.var([1.0, 1.2, 0.8])), 1e-5)


def test_bf16_updates_stay_bf16_with_a_float32_norm_and_a_stable_state():
  w = np.random.default_rng(1).normal(size=4096)
  g = {"w": jnp.asarray(w, jnp.bfloat16), "b": jnp.ones(3, jnp.bfloat16)}
  tx = zclip(warmup_steps=1)
  assert_state_stable(tx, g, g)
  assert_keeps_dtype(tx, g, g)
  update = jax.jit(tx.update)
  _, state = update(g, tx.init(g))
  assert state.norm.dtype == jnp.float32 and state.mean.dtype == jnp.float32
  np.testing.assert_allclose(float(state.norm), np_norm(g), rtol=1e-6)
  spike = jax.tree.map(lambda x: x * 100, g)
  _, state = update(g, state)
  updates, state = update(spike, state)
  assert bool(state.clipped) and all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))


def test_chain_and_tree_get_and_a_single_compile():
  import chex

  tx = optax.chain(zclip(warmup_steps=2), optax.adam(1e-2))
  seq = make_seq([1.0, 1.1, 1.2, 30.0])
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(lambda g, s: tx.update(g, s), n=1))
  state = tx.init(seq[0])
  for g in seq:
    _, state = step(g, state)
  assert bool(optax.tree.get(state, "clipped"))
  np.testing.assert_allclose(float(optax.tree.get(state, "norm")), 30.0, rtol=1e-5)


def test_inject_hyperparams_gives_the_same_result():
  seq = make_seq(NORMS)
  kw = dict(z_threshold=2.0, ema_decay=0.9, warmup_steps=3)
  want, _ = run_steps(zclip(**kw), seq)
  got, _ = run_steps(optax.inject_hyperparams(zclip)(**kw, reciprocal=True), seq)
  recip, _ = run_steps(zclip(**kw, reciprocal=True), seq)
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(recip[k]), rtol=1e-6)
  assert not np.allclose(np.asarray(recip["w"]), np.asarray(want["w"]), equal_nan=True)


def test_an_empty_tree_passes():
  tx = zclip()
  updates, state = tx.update({}, tx.init({}))
  assert updates == {} and int(state.count) == 0


@functools.cache
def _property_run(reciprocal: bool):
  def run(norms, z_threshold):
    tx = zclip(z_threshold, ema_decay=0.8, warmup_steps=3, reciprocal=reciprocal)

    def step(state, n):
      u, state = tx.update({"g": jnp.stack([n, 0.0])}, state)
      return state, (u["g"][0], state)

    return jax.lax.scan(step, tx.init({"g": jnp.zeros(2)}), norms)[1]

  return jax.jit(run)


@settings(deadline=None, max_examples=25)
@given(
  norms=st.lists(st.floats(2.0**-6, 100.0, width=32), min_size=12, max_size=12),
  z_threshold=st.floats(0.5, 3.0),
  reciprocal=st.booleans(),
)
def test_property_matches_the_reference_on_random_histories(norms, z_threshold, reciprocal):
  seq = [{"g": np.array([n, 0.0])} for n in norms]
  kw = dict(z_threshold=z_threshold, ema_decay=0.8, warmup_steps=3, reciprocal=reciprocal)
  ref_outs, ref_states, margins = np_zclip(seq, **kw)
  assume(min(margins) > 1e-3)
  clipped_norms, states = _property_run(reciprocal)(
    jnp.asarray(norms, jnp.float32), z_threshold
  )
  want = [o["g"][0] for o in ref_outs]
  np.testing.assert_allclose(np.asarray(clipped_norms, np.float64), want, rtol=1e-4)
  assert [bool(c) for c in states.clipped] == [s["clipped"] for s in ref_states]
  assert np.all(np.asarray(clipped_norms) <= np.asarray(norms) * (1 + 1e-6))  # never grows


@pytest.mark.parametrize(
  "kwargs, argname",
  [
    (dict(z_threshold=0.0), "z_threshold"),
    (dict(z_threshold=-1.0), "z_threshold"),
    (dict(z_threshold=math.nan), "z_threshold"),
    (dict(z_threshold="2.5"), "z_threshold"),
    (dict(z_threshold=lambda count: 2.5), "z_threshold"),
    (dict(ema_decay=0.0), "ema_decay"),
    (dict(ema_decay=1.0), "ema_decay"),
    (dict(ema_decay=1.5), "ema_decay"),
    (dict(warmup_steps=0), "warmup_steps"),
    (dict(warmup_steps=2.5), "warmup_steps"),
    (dict(warmup_steps=True), "warmup_steps"),
    (dict(reciprocal="yes"), "reciprocal"),
    (dict(reciprocal=1), "reciprocal"),
  ],
)
def test_bad_arguments_raise_value_error(kwargs, argname):
  with pytest.raises(ValueError, match=rf"^od\.zclip: {argname} "):
    zclip(**kwargs)
