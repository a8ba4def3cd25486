"""adaptive_grad_clip: optax's unit-wise AGC on every leaf but the excluded ones."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_keeps_dtype
from helpers import assert_state_stable
from helpers import run_scan

import optaxderived as od
from optaxderived._transforms.adaptive_grad_clip import adaptive_grad_clip

# ---------------------------------------------------------------------------------------------
# The NumPy float64 reference, written from the rule (the units of optax.unitwise_norm).


def np_unit_axes(x: np.ndarray):
  if np.squeeze(x).ndim <= 1:
    return None
  return {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}[x.ndim]


def np_agc(grads, params, clipping, eps=1e-3, skip=lambda path: False):
  out = {}
  for path, g in grads.items():
    g64, p64 = np.asarray(g, np.float64), np.asarray(params[path], np.float64)
    if skip(path):
      out[path] = g64
      continue
    axes = np_unit_axes(g64)
    g_norm = np.sqrt(np.sum(g64**2, axis=axes, keepdims=True))
    p_norm = np.sqrt(np.sum(p64**2, axis=axes, keepdims=True))
    max_norm = clipping * np.maximum(p_norm, eps)
    out[path] = np.where(g_norm < max_norm, g64, g64 * max_norm / np.maximum(g_norm, 1e-6))
  return out


_rng = np.random.default_rng(0)
SHAPES = {
  "conv": (3, 3, 2, 4),
  "conv3d": (2, 2, 2, 1, 3),
  "dense/kernel": (5, 3),
  "dense/bias": (3,),
  "mha": (4, 2, 3),
  "scale": (),
  "head/kernel": (3, 2),
}


def make_tree(scale_by_unit=False, seed=0, zero_bias=True):
  """Flat dicts of params and grads; the grads' units span ratios on both sides of 0.01."""
  rng = np.random.default_rng(seed)
  params = {k: np.asarray(rng.normal(size=s), np.float32) for k, s in SHAPES.items()}
  if zero_bias:
    params["dense/bias"] = np.zeros(3, np.float32)  # eps keeps it from freezing
  grads = {}
  for k, s in SHAPES.items():
    g = rng.normal(size=s) * 0.02
    if len(s) >= 2:  # per-unit scales: the last axis indexes the units here
      g = g * np.geomspace(0.01, 10.0, s[-1])
    grads[k] = np.asarray(g, np.float32)
  return params, grads


def nest(flat):
  """``{"dense/kernel": x}`` → ``{"dense": {"kernel": x}}`` (so paths read as in a model)."""
  tree: dict = {}
  for path, x in flat.items():
    *heads, last = path.split("/")
    node = tree
    for h in heads:
      node = node.setdefault(h, {})
    node[last] = x
  return tree


def flat(tree):
  paths = jax.tree.leaves(od.tree_paths(tree))
  return dict(zip(paths, jax.tree.leaves(tree), strict=True))


def update(tx, grads, params, jit=True):
  grads, params = nest(grads), nest(params)
  return flat((jax.jit(tx.update) if jit else tx.update)(grads, tx.init(params), params)[0])


@pytest.mark.parametrize("clipping", [0.01, 0.1, 1.0])
def test_matches_the_numpy_reference(clipping):
  params, grads = make_tree()
  got = update(adaptive_grad_clip(clipping), grads, params)
  want = np_agc(grads, params, clipping)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k], rtol=1e-5, err_msg=k)
  # both branches are taken: some units are clipped, some are not
  ratios = [np.mean(np.asarray(got[k]) != grads[k]) for k in SHAPES]
  assert 0 < np.mean(ratios) < 1 or clipping == 1.0


def test_equals_optax_adaptive_grad_clip_when_nothing_is_excluded():
  params, grads = map(nest, make_tree())
  ours = adaptive_grad_clip(0.05, eps=1e-2)
  theirs = optax.adaptive_grad_clip(0.05, eps=1e-2)
  want = theirs.update(grads, theirs.init(params), params)[0]
  got = ours.update(grads, ours.init(params), params)[0]
  jax.tree.map(np.testing.assert_array_equal, got, want)  # eager: bit for bit
  got = jax.jit(ours.update)(grads, ours.init(params), params)[0]
  want = jax.jit(theirs.update)(grads, theirs.init(params), params)[0]
  # Under jit XLA fuses the two programs differently (ours broadcasts the unit norms by the
  # arithmetic, optax's with broadcast_to) and may sum the squares in another order: the norm
  # moves by an ulp, the clipped entries by up to a few.
  ulps = 4 * np.finfo(np.float32).eps
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=ulps), got, want)


@pytest.mark.parametrize(
  "exclude, excluded",
  [
    ("head", {"head/kernel"}),
    (["head", "^scale$"], {"head/kernel", "scale"}),
    (lambda path, p: p.ndim < 2, {"dense/bias", "scale"}),
    (re.compile(r"conv"), {"conv", "conv3d"}),
  ],
  ids=["regex", "regexes", "predicate", "compiled"],
)
def test_excluded_leaves_pass_and_the_others_are_optax_bit_for_bit(exclude, excluded):
  params, grads = make_tree()
  got = update(adaptive_grad_clip(0.01, exclude=exclude), grads, params, jit=False)
  theirs = optax.adaptive_grad_clip(0.01)
  want = flat(theirs.update(nest(grads), theirs.init(nest(params)), nest(params))[0])
  for k in SHAPES:
    if k in excluded:
      np.testing.assert_array_equal(np.asarray(got[k]), grads[k], err_msg=k)
    else:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
  assert any(not np.array_equal(got[k], grads[k]) for k in SHAPES if k not in excluded)
  assert any(not np.array_equal(want[k], grads[k]) for k in excluded)  # they would be clipped


def test_eps_keeps_zero_params_from_freezing():
  params, grads = make_tree(zero_bias=True)
  got = update(adaptive_grad_clip(0.1, eps=1e-3), grads, params)["dense/bias"]
  np.testing.assert_allclose(np.linalg.norm(np.asarray(got, np.float64)), 1e-4, rtol=1e-5)
  got = update(adaptive_grad_clip(0.1, eps=0.0), grads, params)["dense/bias"]
  np.testing.assert_array_equal(np.asarray(got), 0.0)  # eps = 0: a zero param is frozen


def test_bf16_is_clipped_in_float32_and_stays_bf16():
  params, grads = make_tree()
  p16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in params.items()}
  g16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in grads.items()}
  got = update(adaptive_grad_clip(0.01, exclude="head"), g16, p16)
  theirs = optax.adaptive_grad_clip(0.01)
  wide = lambda t: nest({k: v.astype(jnp.float32) for k, v in t.items()})  # noqa: E731
  want = flat(jax.jit(theirs.update)(wide(g16), optax.EmptyState(), wide(p16))[0])
  for k in SHAPES:
    assert got[k].dtype == jnp.bfloat16, k
    expected = g16[k] if k == "head/kernel" else want[k].astype(jnp.bfloat16)
    np.testing.assert_array_equal(
      np.asarray(got[k], np.float32), np.asarray(expected, np.float32)
    )
  tx = adaptive_grad_clip(0.01)
  assert_state_stable(tx, nest(p16), nest(g16))
  assert_keeps_dtype(tx, nest(p16), nest(g16))
  # float32 updates of bf16 params stay float32
  mixed = update(tx, grads, p16)
  assert all(v.dtype == jnp.float32 for v in mixed.values())


def test_a_nan_or_an_inf_makes_its_unit_non_finite_and_apply_if_finite_skips_it():
  params, grads = make_tree()
  for bad in (math.nan, math.inf):
    poisoned = {**grads, "dense/kernel": grads["dense/kernel"].copy()}
    poisoned["dense/kernel"][1, 2] = bad
    got = update(adaptive_grad_clip(0.01), poisoned, params)
    col = np.asarray(got["dense/kernel"])
    assert not np.all(np.isfinite(col[:, 2]))  # the unit (column 2) is non-finite
    assert np.all(np.isnan(col[:, 2])) or bad == math.inf  # a NaN spreads over its unit
    assert np.all(np.isfinite(col[:, :2]))  # the other units are not touched by it
  tx = optax.apply_if_finite(optax.chain(adaptive_grad_clip(0.01), optax.sgd(0.1)), 3)
  p, g = nest(params), nest(grads)
  state = tx.init(p)
  step = jax.jit(tx.update)
  updates, state = step(g, state, p)
  p = optax.apply_updates(p, updates)
  bad = jax.tree.map(lambda x: x * np.nan, g)
  updates, new_state = step(bad, state, p)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  assert int(new_state.notfinite_count) == 1


def test_needs_params_and_the_params_tree():
  params, grads = map(nest, make_tree())
  tx = adaptive_grad_clip(0.01)
  state = tx.init(params)
  with pytest.raises(ValueError, match="od.adaptive_grad_clip needs the current params"):
    tx.update(grads, state)
  with pytest.raises(ValueError, match="^od.adaptive_grad_clip: the updates do not have"):
    tx.update({**grads, "extra": jnp.ones(2)}, state, params)


def test_an_unused_pattern_warns_and_raises_with_strict():
  params = nest(make_tree()[0])
  with pytest.warns(UserWarning, match="od.adaptive_grad_clip: exclude: pattern 'haed'"):
    adaptive_grad_clip(0.01, exclude="haed").init(params)
  with pytest.raises(ValueError, match="od.adaptive_grad_clip: exclude: pattern 'haed'"):
    adaptive_grad_clip(0.01, exclude="haed", strict=True).init(params)


def test_a_leaf_of_six_dimensions_must_be_excluded():
  x = {"big": jnp.ones((2, 2, 2, 2, 2, 2)), "w": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match=r"^od.adaptive_grad_clip: 'big' has shape"):
    adaptive_grad_clip(0.01).update(x, optax.EmptyState(), x)
  updates, _ = adaptive_grad_clip(0.01, exclude="big").update(x, optax.EmptyState(), x)
  np.testing.assert_array_equal(updates["big"], 1.0)


def test_scan_chain_accumulate_and_inject_hyperparams():
  params, grads = map(nest, make_tree())
  seq = jax.tree.map(lambda g: jnp.stack([g, -g, 2 * g]), grads)
  tx = optax.chain(adaptive_grad_clip(0.01, exclude="head"), optax.adam(1e-2))
  final, state, _ = run_scan(tx, params, seq)  # a stable state
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(final))
  # inside accumulate: the window mean is clipped against the params
  acc = od.accumulate(optax.chain(adaptive_grad_clip(0.01), optax.sgd(1.0)), 2)
  s = acc.init(params)
  _, s = acc.update(grads, s, params)
  got, _ = acc.update(jax.tree.map(lambda g: 3 * g, grads), s, params)
  want = np_agc(flat(jax.tree.map(lambda g: -2 * g, grads)), flat(params), 0.01)
  for k, v in flat(got).items():
    np.testing.assert_allclose(np.asarray(v, np.float64), want[k], rtol=1e-5, err_msg=k)
  injected = optax.inject_hyperparams(adaptive_grad_clip)(0.01, eps=1e-3)
  a = flat(jax.jit(injected.update)(grads, injected.init(params), params)[0])
  b = update(adaptive_grad_clip(0.01), flat(grads), flat(params))
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)


@pytest.mark.parametrize(
  "kwargs, argname",
  [
    (dict(clipping=0.0), "clipping"),
    (dict(clipping=-0.01), "clipping"),
    (dict(clipping=math.nan), "clipping"),
    (dict(clipping="0.01"), "clipping"),
    (dict(clipping=lambda count: 0.01), "clipping"),
    (dict(clipping=0.01, eps=-1e-3), "eps"),
    (dict(clipping=0.01, eps=math.nan), "eps"),
    (dict(clipping=0.01, exclude="("), "exclude"),
    (dict(clipping=0.01, exclude=5), "exclude"),
    (dict(clipping=0.01, exclude={"head": 1}), "exclude"),
    (dict(clipping=0.01, strict="yes"), "strict"),
  ],
)
def test_bad_arguments_raise_value_error(kwargs, argname):
  with pytest.raises(ValueError, match=rf"^od\.adaptive_grad_clip: {argname}"):
    adaptive_grad_clip(**kwargs)
