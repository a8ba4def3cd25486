"""Exponentiated gradient: EG against optax.sgd, EG step-size adaptation against optax.adam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxderived as od
from benchmarks.harness import Case
from benchmarks.harness import make_params
from benchmarks.harness import tx_subject


def _positive_params(scale: float):
  """The harness's params made strictly positive (EG needs them so): ``exp(x / 2)``."""
  return jax.tree.map(lambda x: jnp.exp(0.5 * x), make_params(scale))


def _simplex_params(scale: float):
  """Positive params whose rows (last axis) sum to one, as a model's mixture weights would."""
  return jax.tree.map(lambda x: jax.nn.softmax(0.5 * x, axis=-1), make_params(scale))


def _check_eg(params, grads):
  """One EG step is ``θ·exp(−0.1 g)`` (NumPy float64 reference)."""
  tx = od.exponentiated_gradient(0.1)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  leaves = zip(*(jax.tree.leaves(t) for t in (new, params, grads)), strict=True)
  for n, p, g in leaves:
    expected = np.asarray(p, np.float64) * np.exp(-0.1 * np.asarray(g, np.float64))
    np.testing.assert_allclose(n, expected, rtol=2e-6)


def _check_eg_simplex(params, grads):
  """One simplex step is ``softmax(log θ − 0.1 g)`` over the last axis (NumPy float64)."""
  tx = od.exponentiated_gradient(0.1, simplex_axis=-1)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  leaves = zip(*(jax.tree.leaves(t) for t in (new, params, grads)), strict=True)
  for n, p, g in leaves:
    z = np.log(np.asarray(p, np.float64)) - 0.1 * np.asarray(g, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(n, z / z.sum(-1, keepdims=True), rtol=1e-5, atol=1e-12)


def _check_eg_step_size(granularity: str):
  """Two steps of ``eg_step_size(adam)`` on the same gradient against a NumPy reference.

  The inner Adam updates come from optax (trusted); the gains are recomputed in float64 from
  the formula: gain = exp(clip(γ·cos(u₁, −g))) on the second step (1 on the first).
  """

  def check(params, grads):
    gamma = 0.05
    tx = od.eg_step_size(optax.adam(1e-3), gamma, granularity=granularity)
    adam = optax.adam(1e-3)
    state, adam_state, p, ref = tx.init(params), adam.init(params), params, params
    update, adam_update = jax.jit(tx.update), jax.jit(adam.update)
    prev = None
    for _ in range(2):
      updates, state = update(grads, state, p)
      p = optax.apply_updates(p, updates)
      u, adam_state = adam_update(grads, adam_state, ref)
      u = jax.tree.map(lambda x: np.asarray(x, np.float64), u)
      g = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
      if prev is None:
        gains = jax.tree.map(lambda x: 1.0, u)
      elif granularity == "leaf":
        gains = jax.tree.map(
          lambda a, b: np.exp(
            np.clip(gamma * np.sum(-a * b) / np.linalg.norm(a) / np.linalg.norm(b), -1, 1)
          ),
          prev,
          g,
        )
      else:  # element
        gains = jax.tree.map(lambda a, b: np.exp(gamma * np.sign(a) * np.sign(-b)), prev, g)
      ref = jax.tree.map(lambda r, s, x: np.asarray(r, np.float64) + s * x, ref, gains, u)
      prev = u
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)

  return check


def cases() -> list[Case]:
  return [
    Case(
      "exponentiated_gradient",
      tx_subject("od.exponentiated_gradient(0.1)", od.exponentiated_gradient(0.1)),
      tx_subject("optax.sgd(0.1)", optax.sgd(0.1)),
      target=1.3,
      check=_check_eg,
      params=_positive_params,
    ),
    Case(
      "exponentiated_gradient simplex",
      tx_subject(
        "od.exponentiated_gradient(0.1, simplex_axis=-1)",
        od.exponentiated_gradient(0.1, simplex_axis=-1),
      ),
      tx_subject("optax.sgd(0.1)", optax.sgd(0.1)),
      check=_check_eg_simplex,
      params=_simplex_params,
    ),
    Case(
      "eg_step_size(adam)",
      tx_subject(
        "od.eg_step_size(optax.adam(1e-3), 0.05)", od.eg_step_size(optax.adam(1e-3), 0.05)
      ),
      tx_subject("optax.adam(1e-3)", optax.adam(1e-3)),
      target=1.3,
      check=_check_eg_step_size("leaf"),
    ),
    Case(
      "eg_step_size(adam) element",
      tx_subject(
        'od.eg_step_size(optax.adam(1e-3), 0.05, granularity="element")',
        od.eg_step_size(optax.adam(1e-3), 0.05, granularity="element"),
      ),
      tx_subject("optax.adam(1e-3)", optax.adam(1e-3)),
      check=_check_eg_step_size("element"),
    ),
  ]
