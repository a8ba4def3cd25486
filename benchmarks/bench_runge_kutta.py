"""ODE steppers: a jitted ``od.ode.heun`` / ``od.ode.rk4`` step against one jitted SGD step.

The loss is a small MLP (2 layers, 256 hidden, batch 512 at ``scale=1``), so a step costs
what its gradient evaluations cost: Heun makes 2 per step, RK4 makes 4. The baseline is
``value_and_grad`` + ``optax.sgd(0.1)`` update + apply, side by side.
"""

import jax
import jax.numpy as jnp
import optax

import optaxderived as od
from benchmarks.harness import Case
from benchmarks.harness import Subject
from benchmarks.harness import check_close

LEARNING_RATE = 0.1
CLASSES = 10


def mlp_params(scale: float = 1.0):
  """``w1: [inputs, hidden]``, ``b1``, ``w2: [hidden, 10]``, ``b2`` (256 hidden at scale 1)."""
  hidden = max(8, round(256 * scale))
  inputs = max(8, round(128 * scale))
  k1, k2 = jax.random.split(jax.random.key(1))
  return {
    "w1": jax.random.normal(k1, (inputs, hidden), jnp.float32) / inputs**0.5,
    "b1": jnp.full((hidden,), 0.01, jnp.float32),
    "w2": jax.random.normal(k2, (hidden, CLASSES), jnp.float32) / hidden**0.5,
    "b2": jnp.full((CLASSES,), 0.01, jnp.float32),
  }


def mlp_batch(params, key):
  """Random inputs and labels: batch 2 × hidden (512 at scale 1)."""
  inputs, hidden = params["w1"].shape
  kx, ky = jax.random.split(key)
  x = jax.random.normal(kx, (2 * hidden, inputs), jnp.float32)
  y = jax.random.randint(ky, (2 * hidden,), 0, CLASSES)
  return x, y


def mlp_loss(params, batch):
  x, y = batch
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  logits = hidden @ params["w2"] + params["b2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def stepper_subject(name: str, stepper: od.ode.Stepper) -> Subject:
  def step(carry, batch):
    params, state = carry
    params, state, _ = stepper.step(mlp_loss, params, state, batch)
    return params, state

  return Subject(name, lambda params: (params, stepper.init(params)), step)


def sgd_subject() -> Subject:
  tx = optax.sgd(LEARNING_RATE)

  def step(carry, batch):
    params, state = carry
    _, grads = jax.value_and_grad(mlp_loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return Subject(
    f"value_and_grad + optax.sgd({LEARNING_RATE})", lambda p: (p, tx.init(p)), step
  )


def _by_hand(tableau_step) -> Subject:
  """A reference written from the formulas with ``jax.grad`` (checks, never timed)."""
  grad = jax.grad(mlp_loss)

  def step(carry, batch):
    params, _ = carry
    g = lambda p: grad(p, batch)
    return tableau_step(params, g), None

  return Subject("by hand", lambda params: (params, None), step)


def _heun_by_hand(p, g):
  h = LEARNING_RATE
  g0 = g(p)
  g1 = g(jax.tree.map(lambda x, d: x - h * d, p, g0))
  return jax.tree.map(lambda x, a, b: x - h / 2 * (a + b), p, g0, g1)


def _rk4_by_hand(p, g):
  h = LEARNING_RATE
  move = lambda c, k: jax.tree.map(lambda x, d: x - c * d, p, k)
  k1 = g(p)
  k2 = g(move(h / 2, k1))
  k3 = g(move(h / 2, k2))
  k4 = g(move(h, k3))
  return jax.tree.map(
    lambda x, a, b, c, d: x - h / 6 * (a + 2 * b + 2 * c + d), p, k1, k2, k3, k4
  )


def cases() -> list[Case]:
  heun = stepper_subject(f"od.ode.heun({LEARNING_RATE}).step", od.ode.heun(LEARNING_RATE))
  rk4 = stepper_subject(f"od.ode.rk4({LEARNING_RATE}).step", od.ode.rk4(LEARNING_RATE))
  return [
    Case(
      "runge_kutta_heun_mlp",
      heun,
      sgd_subject(),
      target=2.2,
      check=check_close(heun, _by_hand(_heun_by_hand), cycle=3),
      params=mlp_params,
      batch=mlp_batch,
    ),
    Case(
      "runge_kutta_rk4_mlp",
      rk4,
      sgd_subject(),
      target=4.4,
      check=check_close(rk4, _by_hand(_rk4_by_hand), cycle=3),
      params=mlp_params,
      batch=mlp_batch,
    ),
  ]
