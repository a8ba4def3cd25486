"""od.scale_by_path (products of multipliers) and od.transform_by_path (first match)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen
from flax import nnx
from flax import serialization
from flax.core import FrozenDict
from flax.training import train_state
from helpers import assert_keeps_dtype
from helpers import assert_trees_close
from helpers import run_scan

import optaxderived as od


def make_params(seed: int = 0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {
    "encoder": {
      "layer_0": {"kernel": normal(3, 4), "bias": normal(4)},
      "layer_1": {"kernel": normal(4, 4), "bias": normal(4)},
      "norm": {"scale": normal(4)},
    },
    "head": {"kernel": normal(4, 2), "bias": normal(2)},
    "embed": normal(5, 3),
  }


def grad_steps(params, steps: int = 3, seed: int = 1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p: jnp.asarray(rng.normal(size=(steps, *p.shape)), jnp.float32), params
  )


def leafwise(tree, fn):
  """``fn(path, leaf)`` over a tree, with the library's path strings."""
  return jax.tree.map(fn, od.tree_paths(tree), tree)


# ---------------------------------------------------------------------------------------------
# scale_by_path


def test_the_worked_example():
  params = {"Transformer-0-FFN": {"kernel": jnp.ones(())}, "Transformer-1-FFN": {"bias": 1.0}}
  tx = optax.chain(optax.sgd(0.1), od.scale_by_path({"Transformer-0": 0.5, "kernel": 0.2}))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["Transformer-0-FFN"]["kernel"], 0.99, rtol=1e-6)  # 0.5 * 0.2
  np.testing.assert_allclose(new["Transformer-1-FFN"]["bias"], 0.9, rtol=1e-6)  # default 1


def np_multiplier(path: str, rules: dict, default: float) -> float:
  """The product of the multipliers of every rule with a regex that searches ``path``."""
  import re

  matched = [m for pattern, m in rules.items() if re.search(pattern, path)]
  return float(np.prod(matched)) if matched else default


def test_products_of_matching_rules_and_the_default_for_the_rest():
  rules = {"encoder": 0.5, "kernel": 0.2, r"layer_1/": 3.0, r"^head/bias$": 0.0}
  params = make_params()
  grads = grad_steps(params, steps=1)
  tx = od.scale_by_path(rules, default=7.0)
  grads = jax.tree.map(lambda g: g[0], grads)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params))
  expected = jax.tree.map(
    lambda path, g: np.asarray(g, np.float64) * np_multiplier(path, rules, 7.0),
    od.tree_paths(grads),
    grads,
  )
  assert_trees_close(updates, expected, rtol=1e-6)
  # Spot checks of the semantics: product, regex anchors, default only when nothing matched.
  np.testing.assert_allclose(
    updates["encoder"]["layer_1"]["kernel"],
    0.3 * grads["encoder"]["layer_1"]["kernel"],
    rtol=1e-6,
  )
  np.testing.assert_array_equal(updates["head"]["bias"], 0.0)
  np.testing.assert_allclose(updates["embed"], 7.0 * grads["embed"], rtol=1e-6)


def test_under_adam_it_is_a_per_leaf_learning_rate_and_leaves_the_moments_alone():
  rules = {"encoder": 0.1, "bias": 0.5}
  params = make_params()
  steps = grad_steps(params)
  tx = optax.chain(optax.adam(1e-2), od.scale_by_path(rules))
  final, state, _ = run_scan(tx, params, steps)
  # Reference: optax.adam with the leaf's own learning rate, run on each leaf alone.
  paths = od.tree_paths(params)

  def reference(path, p, gs):
    adam = optax.adam(1e-2 * np_multiplier(path, rules, 1.0))
    s = adam.init(p)
    for g in gs:
      u, s = adam.update(g, s, p)
      p = optax.apply_updates(p, u)
    return p

  expected = jax.tree.map(reference, paths, params, steps)
  assert_trees_close(final, expected, rtol=1e-5, atol=1e-7)
  _, plain_state, _ = run_scan(optax.adam(1e-2), params, steps)
  assert_trees_close(optax.tree.get(state, "mu"), optax.tree.get(plain_state, "mu"))


def test_schedules_are_evaluated_at_the_number_of_calls():
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  tx = od.scale_by_path({"a": lambda t: 1.0 + t}, default=lambda t: 10.0 * (t + 1))
  _, state, updates = run_scan(tx, params, {"a": jnp.ones((3, 2)), "b": jnp.ones((3, 2))})
  np.testing.assert_allclose(updates["a"][:, 0], [1.0, 2.0, 3.0])
  np.testing.assert_allclose(updates["b"][:, 0], [10.0, 20.0, 30.0])
  assert int(state.count) == 3


def test_inject_hyperparams_injects_the_default():
  params = make_params()
  grads = jax.tree.map(jnp.ones_like, params)
  injected = optax.inject_hyperparams(od.scale_by_path)({"kernel": 2.0}, default=0.5)
  state = injected.init(params)
  state.hyperparams["default"] = jnp.asarray(0.25)
  updates, _ = jax.jit(injected.update)(grads, state, params)
  assert float(updates["encoder"]["layer_0"]["kernel"][0, 0]) == 2.0
  assert float(updates["embed"][0, 0]) == 0.25


def test_bf16_stays_bf16_and_multiplies_in_float32():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), make_params())
  tx = od.scale_by_path({"kernel": 0.1, "bias": 3.0})
  assert_keeps_dtype(tx, params, params)
  updates, _ = jax.jit(tx.update)(params, tx.init(params))
  expected = jax.tree.map(
    lambda path, g: (
      np.asarray(g, np.float32) * np_multiplier(path, {"kernel": 0.1, "bias": 3.0}, 1.0)
    ).astype(jnp.bfloat16),
    od.tree_paths(params),
    params,
  )  # one rounding of the float32 product
  assert_trees_close(updates, expected)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"rules": {"kernel": float("nan")}}, "multiplier of rule 'kernel' must be finite"),
    ({"rules": {"kernel": float("inf")}}, "multiplier of rule 'kernel' must be finite"),
    ({"rules": {"kernel": "0.1"}}, "must be a real number or a schedule, got '0.1'"),
    ({"rules": {"kernel": None}}, "must be a real number or a schedule, got None"),
    ({"rules": {"kernel": True}}, "must be a real number or a schedule, got True"),
    ({"rules": {"(": 1.0}}, "invalid regex"),
    ({"rules": {(): 1.0}}, "names no pattern"),
    ({"rules": ["kernel"]}, "must map patterns to values"),
    ({"rules": 0.1}, "must be a mapping"),
    ({"rules": {}, "default": float("nan")}, "default must be finite"),
    ({"rules": {"kernel": jnp.ones(3)}}, "must be a real number or a schedule, got Array"),
  ],
)
def test_scale_by_path_rejects_bad_rules(kwargs, message):
  with pytest.raises(ValueError, match=message):
    od.scale_by_path(**kwargs)


def test_rules_may_be_pairs_and_tuples_of_patterns():
  params = make_params()
  grads = jax.tree.map(jnp.ones_like, params)
  tx = od.scale_by_path([(("embed", "head/bias"), 0.5), ("embed", 3.0)])
  updates, _ = tx.update(grads, tx.init(params))
  assert float(updates["embed"][0, 0]) == 1.5
  assert float(updates["head"]["bias"][0]) == 0.5
  assert float(updates["head"]["kernel"][0, 0]) == 1.0


# ---------------------------------------------------------------------------------------------
# Unmatched patterns: warn at init, naming the argument, or raise with strict=True.


@pytest.mark.parametrize(
  "make",
  [
    lambda strict: od.scale_by_path({"kernal": 0.1}, strict=strict),
    lambda strict: od.transform_by_path({"kernal": optax.sgd(0.1)}, strict=strict),
  ],
  ids=["scale_by_path", "transform_by_path"],
)
def test_a_pattern_that_matches_nothing_warns_at_init_or_raises(make):
  params = make_params()
  with pytest.warns(
    UserWarning, match=r"rule 'kernal': pattern 'kernal' matches no parameter.*encoder/"
  ):
    state = make(False).init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    make(False).update(params, state, params)  # the tree was checked at init
  with pytest.raises(ValueError, match="'kernal' matches no parameter"):
    make(True).init(params)


def test_a_rule_shadowed_by_earlier_rules_warns_or_raises():
  params = make_params()
  rules = {"encoder": optax.sgd(0.1), "encoder/layer_0": optax.adam(0.1)}
  with pytest.warns(UserWarning, match=r"'encoder/layer_0' selects no parameter.*earlier"):
    od.transform_by_path(rules).init(params)
  with pytest.raises(ValueError, match="'encoder/layer_0' selects no parameter"):
    od.transform_by_path(rules, strict=True).init(params)


# ---------------------------------------------------------------------------------------------
# transform_by_path


RULES = {
  "encoder/layer_0": optax.sgd(0.5),  # first: takes encoder/layer_0/kernel too
  "kernel": optax.adam(0.1),
  ("norm", "embed"): optax.set_to_zero(),
}


def first_match_reference(params, steps, rules, default):
  """Each transformation run alone on a flat dict of the leaves it owns (no partition)."""
  import re

  paths = jax.tree.leaves(od.tree_paths(params))
  flat_params = dict(zip(paths, jax.tree.leaves(params), strict=True))
  flat_steps = dict(zip(paths, jax.tree.leaves(steps), strict=True))

  def owner(path):
    for i, key in enumerate(rules):
      if any(re.search(p, path) for p in ((key,) if isinstance(key, str) else key)):
        return i
    return len(rules)

  out = {}
  for i, tx in enumerate([*rules.values(), default]):
    sub = {path: flat_params[path] for path in paths if owner(path) == i}
    state = tx.init(sub)
    for t in range(len(jax.tree.leaves(steps)[0])):
      updates, state = tx.update({k: flat_steps[k][t] for k in sub}, state, sub)
      sub = optax.apply_updates(sub, updates)
    out.update(sub)
  return jax.tree.map(lambda path: out[path], od.tree_paths(params))


@pytest.mark.parametrize(
  "default", [None, optax.sgd(0.1, momentum=0.9)], ids=["identity", "sgd"]
)
def test_first_match_with_its_own_state_against_separate_runs(default):
  params = make_params()
  steps = grad_steps(params)
  tx = od.transform_by_path(RULES, default=default)
  final, state, _ = run_scan(tx, params, steps)
  reference = first_match_reference(params, steps, RULES, default or optax.identity())
  assert_trees_close(final, reference, rtol=1e-6, atol=1e-7)
  assert sorted(state.inner_states) == ["default", "rule_0", "rule_1", "rule_2"]
  adam_state = state.inner_states["rule_1"].inner_state[0]
  assert int(adam_state.count) == 3
  owned = jax.tree.leaves(adam_state.mu)  # only the leaves adam owns have moments
  assert [x.shape for x in owned] == [(4, 4), (4, 2)]  # encoder/layer_1/kernel, head/kernel


def test_nested_transformations_see_the_original_paths():
  params = make_params()
  grads = jax.tree.map(lambda p: 10 * jnp.ones_like(p), params)
  tx = od.transform_by_path(
    {"embed": od.clip_norm(1.0, scope="row"), "encoder": od.scale_by_path({"bias": 0.5})}
  )
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(np.linalg.norm(updates["embed"], axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(updates["encoder"]["layer_0"]["bias"], 5.0)
  np.testing.assert_allclose(updates["encoder"]["layer_0"]["kernel"], 10.0)
  np.testing.assert_allclose(updates["head"]["kernel"], 10.0)  # default: identity
  np.testing.assert_allclose(optax.tree.get(state, "norm"), np.sqrt(15 * 100), rtol=1e-6)


def test_bf16_stays_bf16_and_the_state_survives_a_checkpoint():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), make_params())
  tx = od.transform_by_path(RULES, default=optax.sgd(0.1, momentum=0.9))
  assert_keeps_dtype(tx, params, params)
  state = tx.init(params)
  _, state = jax.jit(tx.update)(params, state, params)
  restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert_trees_close(restored, state)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"rules": {"kernel": optax.adam}}, "value of rule 'kernel' must be an optax.Gradient"),
    ({"rules": {"kernel": 0.1}}, "value of rule 'kernel' must be an optax.Gradient"),
    ({"rules": {}, "default": "sgd"}, "default must be an optax.GradientTransformation"),
    ({"rules": {"[": optax.sgd(0.1)}}, "invalid regex"),
  ],
)
def test_transform_by_path_rejects_bad_rules(kwargs, message):
  with pytest.raises(ValueError, match=message):
    od.transform_by_path(**kwargs)


# ---------------------------------------------------------------------------------------------
# Paths on dicts, FrozenDicts, linen params and nnx.State.


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(3, 4, rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(self.norm(self.dense(x)))


def _nnx_tx():
  return optax.chain(
    od.transform_by_path(
      {"dense/kernel": optax.adam(0.1), "norm": optax.set_to_zero()},
      default=optax.sgd(0.1, momentum=0.9),
    ),
    od.scale_by_path({"out": 0.5}),
  )


def test_nnx_optimizer_init_gets_variables_and_update_plain_arrays():
  model = _Net(nnx.Rngs(0))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(model, _nnx_tx(), wrt=nnx.Param)
  x = jnp.linspace(-1, 1, 15).reshape(5, 3)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)

  for _ in range(3):
    step(model, optimizer)
  # Reference: the same transformation on the plain arrays, gradients from nnx.merge.
  graphdef, _ = nnx.split(_Net(nnx.Rngs(0)))
  tx = _nnx_tx()
  p, state = params, tx.init(params)
  for _ in range(3):
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2))(p)
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
  assert_trees_close(nnx.as_pure(nnx.state(model, nnx.Param)), p, rtol=1e-5, atol=1e-6)
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  assert_trees_close(after["norm"], params["norm"])  # frozen by set_to_zero


def test_linen_params_in_a_train_state_and_frozen_dicts():
  model = linen.Sequential([linen.Dense(4), linen.LayerNorm(), linen.Dense(2)])
  params = model.init(jax.random.key(0), jnp.ones((1, 3)))
  tx = od.transform_by_path(
    {"layers_0/kernel": optax.adam(0.1), "layers_1": optax.set_to_zero()},
    default=optax.chain(optax.sgd(0.1), od.scale_by_path({"bias": 0.0})),
  )
  grads = jax.tree.map(jnp.ones_like, params)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  state = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)
  new, old = state.params["params"], params["params"]
  np.testing.assert_allclose(
    new["layers_0"]["kernel"], old["layers_0"]["kernel"] - 0.1, atol=1e-6
  )
  np.testing.assert_allclose(new["layers_0"]["bias"], old["layers_0"]["bias"])  # 0 x sgd
  np.testing.assert_allclose(
    new["layers_2"]["kernel"], old["layers_2"]["kernel"] - 0.1, rtol=1e-6
  )
  assert_trees_close(new["layers_1"], old["layers_1"])
  frozen, frozen_grads = FrozenDict(params), FrozenDict(grads)
  updates, _ = jax.jit(tx.update)(frozen_grads, tx.init(frozen), frozen)
  assert isinstance(updates, FrozenDict)
  expected = FrozenDict(jax.tree.map(lambda p, n: n - p, params, state.params))
  assert_trees_close(updates, expected, atol=1e-7)
