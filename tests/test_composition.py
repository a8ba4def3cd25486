"""Wrappers inside od.accumulate see real updates only: lookahead syncs and the parameter EMA
count emitted updates, not micro-batches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import assert_trees_close

import optaxderived as od


def _run(tx, params, grads):
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_lookahead_inside_accumulate_counts_real_updates():
  micro = list(jax.random.normal(jax.random.key(0), (8, 3)))
  means = [(micro[i] + micro[i + 1]) / 2 for i in range(0, 8, 2)]
  params = jnp.array([1.0, -1.0, 0.5])
  inside, inside_state = _run(
    od.accumulate(od.lookahead(optax.sgd(0.1), 2, 0.5), 2), params, micro
  )
  plain, plain_state = _run(od.lookahead(optax.sgd(0.1), 2, 0.5), params, means)
  assert_trees_close(inside, plain, rtol=1e-6)
  assert_trees_close(od.lookahead_params(inside_state), od.lookahead_params(plain_state))
  assert int(inside_state.inner_state.step) == 4  # lookahead saw 4 real updates, not 8


def test_param_ema_inside_accumulate_counts_real_updates():
  tx = od.accumulate(optax.chain(optax.sgd(0.1), od.param_ema(0.9)), 2)
  params, state = _run(tx, jnp.array(1.0), [jnp.array(1.0)] * 4)
  np.testing.assert_allclose(params, 0.8, rtol=1e-6)
  # zero-initialised, debiased by its own count of 2 real updates: params 0.9 then 0.8
  ema = 0.9 * (0.1 * 0.9) + 0.1 * 0.8
  np.testing.assert_allclose(od.ema_params(state, params), ema / (1 - 0.9**2), rtol=1e-6)
  assert int(optax.tree.get(state, "count")) == 2
