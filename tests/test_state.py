import jax.numpy as jnp
import optax
import pytest

from optaxderived._core.state import find_state
from optaxderived._core.state import find_states


def test_finds_states_inside_chains_and_partitions():
  params = {"a": jnp.ones(2), "b": jnp.ones(3)}
  tx = optax.chain(
    optax.clip(1.0),
    optax.partition({"x": optax.adam(1e-3), "y": optax.sgd(0.1)}, {"a": "x", "b": "y"}),
  )
  state = tx.init(params)
  assert len(find_states(state, optax.ScaleByAdamState)) == 1
  assert find_state(state, optax.ScaleByAdamState, accessor="t").mu["a"].shape == (2,)


def test_missing_state_names_the_accessor():
  with pytest.raises(ValueError, match="my_accessor.*ScaleByAdamState"):
    find_state(optax.sgd(0.1).init(jnp.ones(1)), optax.ScaleByAdamState, accessor="my_accessor")
