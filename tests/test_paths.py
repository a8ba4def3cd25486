"""The path convention on dicts, FrozenDicts, Flax linen params and nnx.State."""

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import linen
from flax import nnx
from flax.core import FrozenDict

import optaxderived as od


def test_paths_of_nested_dicts_and_sequences():
  tree = {"a": {"b": jnp.ones(1)}, "layers": [jnp.ones(1), (jnp.ones(1),)]}
  assert od.tree_paths(tree) == {
    "a": {"b": "a/b"},
    "layers": ["layers/0", ("layers/1/0",)],
  }


def test_paths_of_frozendict_and_linen_params():
  model = linen.Sequential([linen.Dense(3), linen.LayerNorm()])
  params = model.init(jax.random.key(0), jnp.ones((1, 2)))
  paths = sorted(jax.tree.leaves(od.tree_paths(params)))
  assert paths == [
    "params/layers_0/bias",
    "params/layers_0/kernel",
    "params/layers_1/bias",
    "params/layers_1/scale",
  ]
  frozen = FrozenDict({"x": {"y": jnp.ones(2)}})
  assert jax.tree.leaves(od.tree_paths(frozen)) == ["x/y"]


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(2, 3, rngs=rngs)
    self.norm = nnx.LayerNorm(3, rngs=rngs)


def test_nnx_state_and_its_plain_arrays_have_the_same_paths():
  state = nnx.state(_Net(nnx.Rngs(0)), nnx.Param)
  with_variables = jax.tree.leaves(od.tree_paths(state))
  plain = jax.tree.leaves(od.tree_paths(nnx.as_pure(state)))
  assert with_variables == plain == ["dense/bias", "dense/kernel", "norm/bias", "norm/scale"]


def test_a_field_named_value_keeps_its_name_outside_nnx():
  """Only an nnx Variable's value drops its ".value": a NamedTuple's field does not."""

  class QKV(NamedTuple):
    query: jax.Array
    value: jax.Array

  tree = {"attn": QKV(jnp.ones(1), jnp.ones(1))}
  assert od.tree_paths(tree) == {"attn": QKV("attn/query", "attn/value")}
  mask = od.path_mask("attn/value")(tree)
  assert mask == {"attn": QKV(False, True)}


def test_path_mask_is_an_optax_mask_under_nnx_optimizer():
  model = _Net(nnx.Rngs(0))
  tx = optax.add_decayed_weights(1.0, mask=od.path_mask("kernel"))
  optimizer = nnx.Optimizer(model, optax.chain(tx, optax.scale(-1.0)), wrt=nnx.Param)
  before = nnx.as_pure(nnx.state(model, nnx.Param))
  zero_grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  optimizer.update(model, zero_grads)
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  assert jnp.all(after["dense"]["kernel"] == 0)  # decayed by 1 * params
  assert jnp.all(after["norm"]["scale"] == before["norm"]["scale"])


def test_any_pattern_matches_by_search():
  params = {"enc": {"kernel": 1.0, "bias": 2.0}, "dec": {"Norm": {"scale": 3.0}}}
  mask = od.path_mask(["bias", r"Norm/"])(params)
  assert mask == {
    "enc": {"kernel": False, "bias": True},
    "dec": {"Norm": {"scale": True}},
  }


def test_unmatched_pattern_warns_naming_the_argument_or_raises_when_strict():
  params = {"dense": {"kernel": 1.0}}
  match = r"od.path_mask: patterns: pattern 'kernal' matches no parameter.*dense/kernel"
  with pytest.warns(UserWarning, match=match):
    od.path_mask("kernal")(params)
  with pytest.raises(ValueError, match=match):
    od.path_mask("kernal", strict=True)(params)


def test_an_empty_sequence_of_patterns_matches_nothing():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing to warn about: no pattern
    assert od.path_mask(())(params) == {"dense": {"kernel": False, "bias": False}}


def test_a_predicate_selects_by_path_and_leaf():
  params = {"ln1": {"scale": jnp.ones(4)}, "dense": {"kernel": jnp.ones((4, 4))}}
  mask = od.path_mask(lambda path, p: p.ndim < 2)(params)
  assert mask == {"ln1": {"scale": True}, "dense": {"kernel": False}}
  by_path = od.path_mask(lambda path, p: path.startswith("dense"))(params)
  assert by_path == {"ln1": {"scale": False}, "dense": {"kernel": True}}
  with pytest.raises(ValueError, match="od.path_mask: patterns: the predicate must decide"):
    jax.jit(lambda p: od.path_mask(lambda path, x: x.sum() > 0)(p)["dense"]["kernel"])(params)


@pytest.mark.parametrize("bad", ["(", ["ok", 3], 5, {"kernel": 1}])
def test_bad_patterns_raise_value_error(bad):
  with pytest.raises(ValueError, match="patterns"):
    od.path_mask(bad)
