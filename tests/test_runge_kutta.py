"""ODE steppers: od.ode.runge_kutta and friends against diffrax, SciPy, NumPy float64 and a
worked example."""

import functools
import math

import diffrax
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
from flax import nnx
from flax.training import train_state
from helpers import assert_keeps_dtype
from helpers import assert_state_stable
from helpers import assert_trees_close
from helpers import run_scan
from scipy.integrate import RK23
from scipy.integrate import RK45

import optaxderived as od

TABLEAUS = {
  "euler": od.ode.EULER,
  "heun": od.ode.HEUN,
  "midpoint": od.ode.MIDPOINT,
  "ralston": od.ode.RALSTON,
  "rk4": od.ode.RK4,
  "bosh3": od.ode.BOSH3,
  "dopri5": od.ode.DOPRI5,
}
# diffrax's Dopri5 embeds another 4th-order solution (b̂ = [1951/21600, ..., 1/60]) than
# Hairer's DOPRI5 and SciPy's RK45 (b̂ = [5179/57600, ..., 1/40], ours): its error
# estimate is exactly 2/3 of ours.
DIFFRAX_ERROR_SCALE = {"dopri5": 1.5}
DIFFRAX = {
  "euler": diffrax.Euler,
  "heun": diffrax.Heun,
  "midpoint": diffrax.Midpoint,
  "ralston": diffrax.Ralston,
  "bosh3": diffrax.Bosh3,
  "dopri5": diffrax.Dopri5,
}


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


# A smooth, non-quadratic loss over a two-leaf tree, with its gradient written in NumPy.
TARGET = np.array([0.3, -0.2, 0.5])


def loss_fn(p):
  a, b = p["a"], p["b"]
  # The target is converted at trace time: a NumPy float64 constant captured by jit would be
  # cached across the x64 tests and mixed with float32 (a JAX quirk of toggling x64).
  return (
    jnp.sum(jnp.log(jnp.cosh(a - jnp.asarray(TARGET, a.dtype))))
    + 0.25 * jnp.sum(b**4)
    + 0.5 * jnp.sum(a) * jnp.sum(b)
  )


def numpy_grad(p):
  a, b = p["a"], p["b"]
  return {"a": np.tanh(a - TARGET) + 0.5 * b.sum(), "b": b**3 + 0.5 * a.sum()}


def make_params(dtype=jnp.float32):
  return {
    "a": jnp.asarray([1.0, -0.5, 0.25], dtype),
    "b": jnp.asarray([[0.8, -0.3], [0.1, 0.6]], dtype),
  }


def to_numpy(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# ------------------------------------------------------------------------------------------
# Tableaus


@pytest.mark.parametrize("name", DIFFRAX)
def test_tableaus_equal_diffrax(name):
  ours, theirs = TABLEAUS[name], DIFFRAX[name].tableau if name != "euler" else None
  if theirs is None:
    assert (ours.c, ours.a, ours.b, ours.b_error) == ((0.0,), (), (1.0,), None)
    return
  np.testing.assert_allclose(ours.c[1:], theirs.c, rtol=1e-15)
  for row, their_row in zip(ours.a, theirs.a_lower, strict=True):
    np.testing.assert_allclose(row, their_row, rtol=1e-15, atol=1e-16)
  np.testing.assert_allclose(ours.b, theirs.b_sol, rtol=1e-15, atol=1e-16)
  # diffrax stores b̂ − b for some methods and b − b̂ for others: the sign is irrelevant.
  sign = np.sign(np.dot(ours.b_error, theirs.b_error))
  scale = DIFFRAX_ERROR_SCALE.get(name, 1.0)
  np.testing.assert_allclose(
    ours.b_error, sign * scale * theirs.b_error, rtol=1e-13, atol=1e-16
  )
  assert ours.fsal == theirs.fsal
  assert ours.order == DIFFRAX[name]().order(None)


def test_embedded_pairs_equal_scipy():
  """Hairer's and SciPy's embedded solutions: SciPy stores E = b̂ − b."""
  np.testing.assert_allclose(od.ode.BOSH3.b_error, -RK23.E, rtol=1e-14)
  np.testing.assert_allclose(od.ode.DOPRI5.b_error, -RK45.E, rtol=1e-14, atol=1e-17)
  for i, row in enumerate(od.ode.DOPRI5.a[:-1]):
    np.testing.assert_allclose(row, RK45.A[i + 1, : i + 1], rtol=1e-15)
  np.testing.assert_allclose(od.ode.DOPRI5.b[:-1], RK45.B, rtol=1e-15)


def test_tableau_properties():
  assert [t.num_stages for t in TABLEAUS.values()] == [1, 2, 2, 2, 4, 4, 7]
  assert [t.fsal for t in TABLEAUS.values()] == [False] * 5 + [True, True]
  assert [t.error_order for t in (od.ode.HEUN, od.ode.BOSH3, od.ode.DOPRI5)] == [2, 3, 5]
  assert od.ode.RALSTON.c == (0.0, 2 / 3) and od.ode.RALSTON.b == (0.25, 0.75)
  assert od.ode.RK4.b_error is None and od.ode.EULER.b_error is None
  # A user tableau: an embedded pair of higher order (local extrapolation turned off).
  fehlberg_like = od.ode.ButcherTableau(
    [0, 1], [[1]], [1, 0], 1, [1 / 2, -1 / 2], embedded_order=2
  )
  assert fehlberg_like.error_order == 2


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(c=[0.5, 1], a=[[1]], b=[0.5, 0.5], order=2), "c must be a non-empty"),
    (dict(c=[], a=[], b=[], order=1), "c must be a non-empty"),
    (dict(c=[0, 1], a=[[0.5, 0.5]], b=[0.5, 0.5], order=2), "a must hold s - 1 = 1 rows"),
    (dict(c=[0, 1], a=[], b=[0.5, 0.5], order=2), "a must hold"),
    (dict(c=[0, 1], a=[[0.9]], b=[0.5, 0.5], order=2), "row 1 of a must sum to c"),
    (dict(c=[0, 1], a=[[1]], b=[0.5, 0.6], order=2), "b must hold s = 2 weights summing to 1"),
    (dict(c=[0, 1], a=[[1]], b=[1.0], order=2), "b must hold"),
    (dict(c=[0, 1], a=[[1]], b=[0.5, 0.5], order=0), "order must be an integer >= 1"),
    (dict(c=[0, 1], a=[[1]], b=[0.5, 0.5], order=2.0), "order must be an integer"),
    (dict(c=[0, 1], a=[[1]], b=[0.5, 0.5], order=2, b_error=[1, 1]), "b_error must hold"),
    (dict(c=[0, "x"], a=[[1]], b=[0.5, 0.5], order=2), "c must be a sequence of numbers"),
    (dict(c=[0, math.nan], a=[[1]], b=[0.5, 0.5], order=2), "c must hold finite"),
    (dict(c=[0, 1], a=[[1]], b=[0.5, 0.5], order=2, embedded_order=1), "needs b_error"),
  ],
)
def test_tableau_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    od.ode.ButcherTableau(**kwargs)


# ------------------------------------------------------------------------------------------
# One step against diffrax (float64) and a NumPy classical RK4


@functools.partial(jax.jit, static_argnums=0)
def diffrax_step(solver, params, h):
  term = diffrax.ODETerm(lambda t, y, args: jax.tree.map(jnp.negative, jax.grad(loss_fn)(y)))
  solver_state = solver.init(term, 0.0, h, params, None)
  y1, y_error, _, _, _ = solver.step(term, 0.0, h, params, None, solver_state, made_jump=False)
  return y1, y_error


@pytest.mark.parametrize("name", DIFFRAX)
def test_one_step_equals_diffrax(name, x64):
  h, rtol, atol = 0.1, 1e-3, 1e-6
  params = make_params(jnp.float64)
  stepper = od.ode.runge_kutta(TABLEAUS[name], h, rtol=rtol, atol=atol)
  new_params, state, info = jax.jit(functools.partial(stepper.step, loss_fn))(
    params, stepper.init(params)
  )
  y1, y_error = diffrax_step(DIFFRAX[name](), params, h)
  y_error = jax.tree.map(lambda e: DIFFRAX_ERROR_SCALE.get(name, 1.0) * e, y_error)
  assert_trees_close(new_params, y1, rtol=1e-13, atol=1e-15)
  assert new_params["a"].dtype == jnp.float64
  np.testing.assert_allclose(info.loss, loss_fn(params), rtol=1e-14)
  if y_error is None:
    assert np.isnan(info.error)
    return
  # Our scaled RMS error from diffrax's error estimate, in NumPy.
  y0, y1, y_error = to_numpy(params), to_numpy(y1), to_numpy(y_error)
  ratios = [y_error[k] / (atol + rtol * np.maximum(np.abs(y0[k]), np.abs(y1[k]))) for k in y0]
  expected = np.sqrt(np.mean(np.concatenate([r.ravel() for r in ratios]) ** 2))
  np.testing.assert_allclose(info.error, expected, rtol=1e-10)
  assert state.error == info.error


def test_one_step_rk4_equals_numpy_float64(x64):
  h = 0.1
  params = make_params(jnp.float64)
  stepper = od.ode.rk4(h)
  new_params, _, info = stepper.step(loss_fn, params, stepper.init(params))

  def add(p, k, c):
    return {key: p[key] + c * k[key] for key in p}

  p0 = to_numpy(params)
  k1 = {k: -v for k, v in numpy_grad(p0).items()}
  k2 = {k: -v for k, v in numpy_grad(add(p0, k1, h / 2)).items()}
  k3 = {k: -v for k, v in numpy_grad(add(p0, k2, h / 2)).items()}
  k4 = {k: -v for k, v in numpy_grad(add(p0, k3, h)).items()}
  expected = {
    key: p0[key] + h / 6 * (k1[key] + 2 * k2[key] + 2 * k3[key] + k4[key]) for key in p0
  }
  assert_trees_close(new_params, expected, rtol=1e-14, atol=1e-16)
  assert int(info.grad_evals) == 4 and np.isnan(info.error)


@pytest.mark.parametrize(
  "name, expected",
  [
    ("euler", 0.9),
    ("heun", 0.905),
    ("midpoint", 0.905),
    ("rk4", 0.9048375),
    ("bosh3", 0.9048333),
    ("dopri5", 0.90483741833),
  ],
)
def test_worked_example(name, expected, x64):
  """L = θ²/2, θ₀ = 1, h = 0.1: values as printed, to their last digit."""
  digits = len(str(expected).split(".")[1])
  stepper = od.ode.runge_kutta(TABLEAUS[name], 0.1, rtol=0.0, atol=1.0)
  theta, _, info = stepper.step(lambda p: 0.5 * p**2, jnp.float64(1.0), stepper.init(1.0))
  assert abs(float(theta) - expected) <= 0.5 * 10.0**-digits
  # With atol = 1, rtol = 0 the error is |θ₁ − θ̂₁|: the embedded estimates.
  expected_error = {"heun": 5.0e-3, "midpoint": 5.0e-3, "bosh3": 1.875e-5, "dopri5": 8.4e-9}
  if name in expected_error:
    np.testing.assert_allclose(info.error, expected_error[name], rtol=0.01)


@pytest.mark.parametrize("controller, expected", [("i", 0.1981), ("pi", 0.1277)])
def test_worked_example_controller(controller, expected, x64):
  stepper = od.ode.rk23(0.1, rtol=1e-4, atol=1e-4, controller=controller)
  _, state, info = stepper.step(lambda p: 0.5 * p**2, jnp.float64(1.0), stepper.init(1.0))
  np.testing.assert_allclose(info.error, 0.09375, rtol=1e-4)
  assert bool(info.accepted) and float(info.step_size) == 0.1
  np.testing.assert_allclose(state.step_size, expected, atol=5e-5)
  # Independently, from the controller's formulas.
  if controller == "i":
    factor = 0.9 * 0.09375 ** (-1 / 3)
  else:
    factor = 0.9 * 0.09375 ** -(1 / 3 - 0.75 * 0.04) * 1e-4**0.04
  np.testing.assert_allclose(state.step_size, 0.1 * factor, rtol=1e-12)
  np.testing.assert_allclose(state.prev_error, 0.09375, rtol=1e-4)


def test_python_scalar_params():
  stepper = od.ode.heun(0.1)  # eager, where params stay Python floats
  theta, _, info = stepper.step(lambda p: 0.5 * p**2, 1.0, stepper.init(1.0))
  assert float(theta) == pytest.approx(0.905) and bool(info.accepted)
  tx = od.ode.as_transformation(od.ode.heun(0.1))
  update, _ = tx.update(1.0, tx.init(1.0), 1.0, grad_fn=lambda p: p)
  np.testing.assert_allclose(update, -0.095, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Order of convergence on a quadratic's gradient flow, and the linear stability polynomial

A_SPD = np.array([[1.5, 0.3, 0.0], [0.3, 1.0, -0.2], [0.0, -0.2, 0.6]])
THETA0 = np.array([1.0, -1.0, 0.5])


@functools.cache
def _integrate(tableau):
  def run(h, n):
    stepper = od.ode.runge_kutta(tableau, h)
    quadratic = lambda p: 0.5 * p @ (jnp.asarray(A_SPD) @ p)

    def body(_, carry):
      p, s = carry
      p, s, _ = stepper.step(quadratic, p, s)
      return p, s

    p = jnp.asarray(THETA0)
    return jax.lax.fori_loop(0, n, body, (p, stepper.init(p)))[0]

  return jax.jit(run)


@pytest.mark.parametrize("name", TABLEAUS)
def test_order_of_convergence(name, x64):
  tableau = TABLEAUS[name]
  exact = scipy.linalg.expm(-A_SPD) @ THETA0  # θ(T = 1)
  steps = np.array([4, 8, 16, 32])
  errors = [np.linalg.norm(np.asarray(_integrate(tableau)(1.0 / n, n)) - exact) for n in steps]
  assert min(errors) > 1e-14, errors  # above round-off, so the slope means something
  slope = np.polyfit(np.log(1.0 / steps), np.log(errors), 1)[0]
  assert abs(slope - tableau.order) <= 0.5, (name, slope, errors)


def _stability_polynomial(name):
  """R(z) with θ₁ = R(−hA) θ₀ for the linear flow θ' = −Aθ (Hairer–Wanner IV.2)."""
  taylor = lambda p: [1 / math.factorial(k) for k in range(p + 1)]
  return {
    "euler": taylor(1),
    "heun": taylor(2),
    "midpoint": taylor(2),
    "ralston": taylor(2),
    "rk4": taylor(4),
    "bosh3": taylor(3),
    "dopri5": taylor(5) + [1 / 600],
  }[name]


@functools.cache
def _one_linear_step(tableau):
  def one(a, theta, h):
    stepper = od.ode.runge_kutta(tableau, h)
    return stepper.step(lambda p: 0.5 * p @ (a @ p), theta, stepper.init(theta))[0]

  return jax.jit(one)


@pytest.mark.parametrize("name", TABLEAUS)
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
  seed=st.integers(0, 2**31 - 1),
  h=st.floats(0.01, 0.8),
)
def test_linear_flow_step_is_the_stability_polynomial(name, seed, h):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(3, 3))
  a = m @ m.T / 3 + 0.1 * np.eye(3)
  theta = rng.normal(size=3)
  z = -h * a
  expected, power = np.zeros(3), theta.copy()
  for coefficient in _stability_polynomial(name):
    expected += coefficient * power
    power = z @ power
  with jax.enable_x64(True):
    got = _one_linear_step(TABLEAUS[name])(a, theta, h)
  np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Gradient evaluations


def counting_loss():
  calls = []

  def loss(p):
    jax.debug.callback(lambda: calls.append(1))
    return loss_fn(p)

  return loss, calls


@pytest.mark.parametrize(
  "stepper, per_step",
  [
    (od.ode.heun(0.1), [2, 2, 2]),
    (od.ode.rk4(0.1), [4, 4, 4]),
    (od.ode.rk23(0.1, fsal=True), [4, 3, 3]),
    (od.ode.rk45(30.0, fsal=True), [7, 6, 6]),  # the first steps are rejected: k₁ is reused
  ],
  ids=["heun", "rk4", "rk23-fsal", "rk45-fsal-rejects"],
)
def test_gradient_evaluations_per_step(stepper, per_step):
  loss, calls = counting_loss()
  step = jax.jit(functools.partial(stepper.step, loss))
  params = make_params()
  state = stepper.init(params)
  total = 0
  for expected in per_step:
    calls.clear()
    params, state, info = step(params, state)
    jax.effects_barrier()
    assert len(calls) == expected == int(info.grad_evals)
    total += expected
  assert int(state.num_grad_evals) == total
  if stepper.learning_rate == 30.0:
    assert int(state.num_rejected) >= 1


def test_fixed_steps_without_the_fsal_stage_save_a_gradient():
  """The recipe of the fsal docstring: the same params, one evaluation fewer, no estimate."""
  params = make_params()
  results = []
  for tableau in (od.ode.BOSH3, od.ode.DOPRI5):
    short = od.ode.ButcherTableau(
      c=tableau.c[:-1], a=tableau.a[:-1], b=tableau.b[:-1], order=tableau.order
    )
    for t in (tableau, short):
      stepper = od.ode.runge_kutta(t, 0.1)
      p, state = params, stepper.init(params)
      for _ in range(3):
        p, state, info = stepper.step(loss_fn, p, state)
      results.append((p, int(state.num_grad_evals), float(info.error)))
    (full, full_evals, full_error), (cut, cut_evals, cut_error) = results[-2:]
    assert_trees_close(cut, full, rtol=1e-6, atol=1e-7)
    assert cut_evals == full_evals - 3 and np.isnan(cut_error) and np.isfinite(full_error)


def test_transformation_calls_grad_fn_at_the_other_stages():
  for stepper, calls_per_step in (
    (od.ode.euler(0.1), 0),
    (od.ode.heun(0.1), 1),
    (od.ode.rk45(0.1), 6),
  ):
    points = []

    def grad_fn(p, points=points):
      points.append(p)
      return jax.grad(loss_fn)(p)

    tx = od.ode.as_transformation(stepper)
    params = make_params()
    update = functools.partial(tx.update, grad_fn=grad_fn)
    _, state = jax.eval_shape(update, jax.grad(loss_fn)(params), tx.init(params), params)
    assert len(points) == calls_per_step  # traced once: one call per stage point


# ------------------------------------------------------------------------------------------
# Adaptive steps: the controller against diffrax, rejection


@pytest.mark.parametrize(
  "name, h, accept",
  [
    ("heun", 0.02, True),
    ("heun", 0.05, False),
    ("bosh3", 0.1, True),
    ("bosh3", 0.5, False),
    ("dopri5", 0.2, True),
    ("dopri5", 0.8, False),
  ],
)
def test_i_controller_equals_diffrax_pid(name, h, accept, x64):
  rtol, atol = 1e-3, 1e-4
  params = make_params(jnp.float64)
  solver = DIFFRAX[name]()
  y1, y_error = diffrax_step(solver, params, h)
  y_error = jax.tree.map(lambda e: DIFFRAX_ERROR_SCALE.get(name, 1.0) * e, y_error)
  term = diffrax.ODETerm(lambda t, y, args: jax.tree.map(jnp.negative, jax.grad(loss_fn)(y)))
  controller = diffrax.PIDController(rtol=rtol, atol=atol)  # defaults: an I controller
  order = solver.error_order(term)
  _, controller_state = controller.init(term, 0.0, h, params, h, None, solver.func, order)
  keep, t0, t1, _, _, _ = controller.adapt_step_size(
    0.0, h, params, y1, None, y_error, order, controller_state
  )

  stepper = od.ode.runge_kutta(
    TABLEAUS[name], h, adaptive=True, rtol=rtol, atol=atol, controller="i"
  )
  new_params, state, info = stepper.step(loss_fn, params, stepper.init(params))
  assert bool(info.accepted) == bool(keep) == accept
  factor = float(t1 - t0) / h
  # Where diffrax and ours agree: growth when accepted, shrinking when rejected.
  assert (1.0 < factor < 10.0) if keep else (0.2 < factor < 0.9)
  np.testing.assert_allclose(state.step_size, t1 - t0, rtol=1e-10)
  expected_params = y1 if keep else params
  assert_trees_close(new_params, expected_params, rtol=1e-13, atol=1e-15)


def quadratic(p):
  return 0.5 * jnp.sum(jnp.arange(1.0, 11.0) * p**2)


def test_rejection_keeps_params_and_shrinks_the_step():
  params = jnp.ones(10)
  stepper = od.ode.rk23(2.0, rtol=1e-3, atol=1e-3)
  step = jax.jit(functools.partial(stepper.step, quadratic))
  state = stepper.init(params)
  new_params, state, info = step(params, state)
  assert not bool(info.accepted) and float(info.error) > 1
  np.testing.assert_array_equal(new_params, params)
  expected_h = 2.0 * max(0.2, 0.9 * float(info.error) ** (-1 / 3))
  np.testing.assert_allclose(state.step_size, expected_h, rtol=1e-6)
  assert int(state.num_rejected) == 1 and not bool(state.accepted)
  # Retry until a step is accepted: the step after a rejection may not grow (f_max = 1).
  h_used = []
  while True:
    h_before = float(state.step_size)
    rejected_before = not bool(state.accepted)
    new_params, state, info = step(new_params, state)
    h_used.append(float(info.step_size))
    assert float(info.step_size) == pytest.approx(h_before)
    if bool(info.accepted):
      assert rejected_before and float(state.step_size) <= float(info.step_size)
      break
    assert len(h_used) < 20
  assert np.all(np.asarray(new_params) < 1.0)
  # Then steps grow again where the error allows it.
  for _ in range(3):
    new_params, state, info = step(new_params, state)
  assert float(state.step_size) > h_used[-1]


def test_accepted_step_may_shrink_the_step():
  """Error in (0.729, 1]: accepted, and the I controller gives 0.9·ε^(−1/3) < 1."""
  params = jnp.ones(10)

  @jax.jit
  @jax.vmap
  def one_step(h):
    stepper = od.ode.rk23(h, rtol=1e-3, atol=1e-3, controller="i")
    _, state, info = stepper.step(quadratic, params, stepper.init(params))
    return info.error, info.accepted, state.step_size

  hs = np.linspace(0.05, 1.0, 96, dtype=np.float32)
  errors, accepted, next_h = map(np.asarray, one_step(hs))
  chosen = (errors > 0.75) & (errors < 1.0)
  assert chosen.any()
  assert accepted[chosen].all() and (next_h[chosen] < hs[chosen]).all()
  np.testing.assert_allclose(
    next_h[chosen], hs[chosen] * 0.9 * errors[chosen] ** (-1 / 3), rtol=1e-6
  )
  assert not accepted[errors > 1].any() and accepted[errors <= 1].all()


def test_non_finite_step_is_rejected():
  loss = lambda p: jnp.sum(jnp.cosh(10.0 * p))
  params = jnp.ones(3)
  stepper = od.ode.rk45(10.0)
  new_params, state, info = jax.jit(functools.partial(stepper.step, loss))(
    params, stepper.init(params)
  )
  assert not bool(info.accepted) and np.isinf(info.error)
  np.testing.assert_array_equal(new_params, params)
  np.testing.assert_allclose(state.step_size, 10.0 * 0.2, rtol=1e-6)  # factor_min


def test_step_size_bounds():
  params = jnp.ones(10)
  # A step at min_step_size is accepted whatever its error; h never leaves the bounds.
  stepper = od.ode.rk23(1.5, rtol=1e-6, atol=1e-6, min_step_size=1.5, max_step_size=2.0)
  _, state, info = stepper.step(quadratic, params, stepper.init(params))
  assert bool(info.accepted) and float(info.error) > 1 and float(state.step_size) == 1.5
  stepper = od.ode.rk23(0.01, rtol=1e-1, atol=1e-1, max_step_size=0.02)
  state = stepper.init(params)
  _, state, info = stepper.step(quadratic, params, state)
  assert bool(info.accepted) and float(state.step_size) == pytest.approx(0.02)


def test_fsal_equals_no_fsal_on_a_deterministic_loss():
  params = make_params()
  results = []
  for fsal in (False, True):
    stepper = od.ode.rk23(1.0, fsal=fsal)
    step = jax.jit(functools.partial(stepper.step, loss_fn))
    p, state = params, stepper.init(params)
    losses = []
    for _ in range(6):
      p, state, info = step(p, state)
      losses.append(float(info.loss))
    results.append((p, losses, int(state.num_grad_evals), int(state.num_rejected)))
  (p0, l0, n0, r0), (p1, l1, n1, r1) = results
  assert_trees_close(p1, p0, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  assert r0 == r1 > 0  # rejections included
  assert n1 == n0 - 5  # one evaluation saved on every step after the first


def test_has_aux():
  def loss(p, x):
    value = loss_fn(p) + jnp.sum(x)
    return value, {"value": value, "x": x}

  stepper = od.ode.heun(0.1)
  params = make_params()
  new_params, _, info = stepper.step(
    loss, params, stepper.init(params), jnp.ones(2), has_aux=True
  )
  np.testing.assert_allclose(info.aux["value"], loss_fn(params) + 2.0, rtol=1e-6)
  np.testing.assert_allclose(info.loss, info.aux["value"])
  reference, _, _ = stepper.step(loss_fn, params, stepper.init(params))
  assert_trees_close(new_params, reference)


def test_args_and_kwargs_reach_every_stage():
  loss = lambda p, x, *, scale: scale * 0.5 * jnp.sum((p - x) ** 2)
  stepper = od.ode.rk4(0.1)
  theta, _, _ = stepper.step(
    loss, jnp.ones(2), stepper.init(jnp.ones(2)), jnp.zeros(2), scale=2.0
  )
  # Gradient flow θ' = −2θ: RK4 gives the 4th-order Taylor polynomial of exp(−0.2).
  np.testing.assert_allclose(theta, sum((-0.2) ** k / math.factorial(k) for k in range(5)))


# ------------------------------------------------------------------------------------------
# as_transformation: equals step, in chains, nnx.Optimizer, TrainState, inject_hyperparams


def run_transformation(tx, params, n):
  def body(carry, _):
    p, s = carry
    updates, s = tx.update(jax.grad(loss_fn)(p), s, p, grad_fn=jax.grad(loss_fn))
    return (optax.apply_updates(p, updates), s), None

  return jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=n)[0])(params)


def run_stepper(stepper, params, n):
  def body(carry, _):
    p, s = carry
    p, s, info = stepper.step(loss_fn, p, s)
    return (p, s), info

  return jax.jit(lambda p: jax.lax.scan(body, (p, stepper.init(p)), None, length=n))(params)


@pytest.mark.parametrize(
  "stepper",
  [od.ode.euler(0.1), od.ode.heun(0.3), od.ode.rk23(3.0), od.ode.rk23(0.2, controller="i")],
  ids=["euler", "heun", "rk23-rejects", "rk23-i"],
)
def test_as_transformation_equals_step(stepper, x64):
  # In float64: float32 round-off differences between two compilations of the same maths
  # grow through the step-size controller (ε^(−1/(q+1)) of a cancelling sum).
  params = make_params(jnp.float64)
  p_tx, s_tx = run_transformation(od.ode.as_transformation(stepper), params, 8)
  (p_st, s_st), infos = run_stepper(stepper, params, 8)
  assert_trees_close(p_tx, p_st, rtol=1e-12, atol=1e-14)
  assert_trees_close(s_tx, s_st, rtol=1e-10, atol=1e-14)
  if stepper.learning_rate == 3.0:
    assert 0 < int(s_st.num_rejected) < 8  # the comparison covers rejected steps


def test_euler_transformation_equals_optax_sgd():
  schedule = optax.linear_schedule(0.2, 0.05, 5)
  params = make_params()
  grads = jax.tree.map(lambda x: jnp.stack([x * (i + 1.0) for i in range(6)]), params)
  ours, _, _ = run_scan(od.ode.as_transformation(od.ode.euler(schedule)), params, grads)
  theirs, _, _ = run_scan(optax.sgd(schedule), params, grads)
  assert_trees_close(ours, theirs, rtol=1e-6)


def test_schedule_is_evaluated_at_the_step_count():
  schedule = lambda count: 0.1 / (1.0 + count)
  (_, state), infos = run_stepper(od.ode.heun(schedule), make_params(), 4)
  np.testing.assert_allclose(infos.step_size, [0.1, 0.05, 0.1 / 3, 0.025], rtol=1e-6)
  np.testing.assert_allclose(state.step_size, 0.02, rtol=1e-6)


def test_chain_and_inject_hyperparams():
  params = make_params()
  reference, _ = run_transformation(od.ode.as_transformation(od.ode.heun(0.1)), params, 3)
  chained = optax.chain(od.ode.as_transformation(od.ode.heun(0.1)), optax.scale(1.0))
  ours, _ = run_transformation(chained, params, 3)
  assert_trees_close(ours, reference, rtol=1e-6)
  injected = optax.inject_hyperparams(
    lambda learning_rate: od.ode.as_transformation(od.ode.heun(learning_rate))
  )(learning_rate=0.1)
  ours, state = run_transformation(injected, params, 3)
  assert_trees_close(ours, reference, rtol=1e-6)
  assert float(optax.tree.get(state, "learning_rate")) == pytest.approx(0.1)


def test_nnx_optimizer():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
      return jnp.tanh(self.dense(x))

  x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
  y = jnp.asarray([[0.5, -0.5]] * 4)
  model_loss = lambda m: jnp.mean((m(x) - y) ** 2)
  model = Model(nnx.Rngs(0))
  graphdef, params0, rest = nnx.split(model, nnx.Param, ...)
  stepper = od.ode.rk23(1.0, rtol=1e-2, atol=1e-2)
  optimizer = nnx.Optimizer(model, od.ode.as_transformation(stepper), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(model_loss)(model)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def grad_fn(p):
      return jax.grad(lambda p: model_loss(nnx.merge(graphdef, p, rest)))(p)

    optimizer.update(model, grads, grad_fn=grad_fn)

  pure_loss = lambda p: model_loss(nnx.merge(graphdef, p, rest))
  params = nnx.as_pure(params0)  # a copy: the model's variables change in place
  initial_loss = float(pure_loss(params))
  state = stepper.init(params)
  step = jax.jit(functools.partial(stepper.step, pure_loss))
  for _ in range(4):
    train_step(model, optimizer)
    params, state, _ = step(params, state)
  assert_trees_close(nnx.as_pure(nnx.state(model, nnx.Param)), params, rtol=1e-6, atol=1e-7)
  assert float(pure_loss(params)) < initial_loss / 10
  opt_state = nnx.as_pure(optimizer.opt_state)
  np.testing.assert_allclose(optax.tree.get(opt_state, "step_size"), state.step_size, rtol=1e-6)


def test_train_state_helper():
  stepper = od.ode.rk4(0.2)
  params = make_params()
  ts = train_state.TrainState.create(
    apply_fn=None, params=params, tx=od.ode.as_transformation(stepper)
  )

  @jax.jit
  def train_step(ts):
    return od.ode.apply_gradients(
      ts, grads=jax.grad(loss_fn)(ts.params), grad_fn=jax.grad(loss_fn)
    )

  for _ in range(3):
    ts = train_step(ts)
  (reference, _), _ = run_stepper(stepper, params, 3)
  assert_trees_close(ts.params, reference, rtol=1e-6)
  assert int(ts.step) == 3


# ------------------------------------------------------------------------------------------
# jit, scan, dtypes, abstract init


@pytest.mark.parametrize(
  "stepper", [od.ode.heun(0.1), od.ode.rk45(0.1, fsal=True)], ids=["heun", "rk45-fsal"]
)
def test_state_is_stable_under_scan(stepper):
  (params, state), infos = run_stepper(stepper, make_params(), 5)
  initial = stepper.init(make_params())
  assert jax.tree.structure(state) == jax.tree.structure(initial)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
    lambda x: (x.shape, x.dtype), initial
  )
  assert infos.loss.shape == (5,) and infos.grad_evals.dtype == jnp.int32


def test_transformation_state_is_stable_and_keeps_bf16():
  params = make_params(jnp.bfloat16)
  grads = jax.grad(loss_fn)(params)
  bound = lambda tx: optax.GradientTransformationExtraArgs(
    tx.init, functools.partial(tx.update, grad_fn=jax.grad(loss_fn))
  )
  tx = bound(od.ode.as_transformation(od.ode.rk23(0.1)))
  assert_state_stable(tx, params, grads)
  assert_keeps_dtype(tx, params, grads)
  assert tx.init(params).step_size.dtype == jnp.float32


def test_bf16_params_are_stepped_in_float32_and_rounded_once():
  """L = Σθ²/2 has ∇L = θ exactly, so Heun is emulated exactly in NumPy float32."""
  import ml_dtypes

  theta = jnp.asarray(np.random.default_rng(0).normal(size=256), jnp.bfloat16)
  loss = lambda p: 0.5 * jnp.sum(p.astype(jnp.float32) ** 2)
  h = np.float32(0.3)
  g0 = np.asarray(theta, np.float32)
  stage = (g0 - h * g0).astype(ml_dtypes.bfloat16).astype(np.float32)
  expected = (g0 + -(h * (np.float32(0.5) * g0 + np.float32(0.5) * stage))).astype(
    ml_dtypes.bfloat16
  )
  stepper = od.ode.heun(0.3)
  new, state, _ = jax.jit(functools.partial(stepper.step, loss))(theta, stepper.init(theta))
  assert new.dtype == jnp.bfloat16 and state.step_size.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(new), expected)
  # In bf16 arithmetic (accumulator_dtype=None) the result is rounded at every operation.
  stepper = od.ode.heun(0.3, accumulator_dtype=None)
  low, _, _ = jax.jit(functools.partial(stepper.step, loss))(theta, stepper.init(theta))
  assert low.dtype == jnp.bfloat16
  exact = np.asarray(theta, np.float64) * (1 - 0.3 + 0.3**2 / 2)
  error = lambda x: np.abs(np.asarray(x, np.float64) - exact).mean()
  assert error(new) <= error(low)


def test_abstract_init():
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_params())
  state = jax.eval_shape(od.ode.rk45(0.1, fsal=True).init, shapes)
  assert state.fsal_grads["b"].shape == (2, 2) and state.step_size.dtype == jnp.float32


# ------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
  "make, message",
  [
    (lambda: od.ode.heun(0.0), "learning_rate must be > 0, got 0.0"),
    (lambda: od.ode.heun(-1.0), "learning_rate must be > 0"),
    (lambda: od.ode.runge_kutta("heun", 0.1), "tableau must be an od.ode.ButcherTableau"),
    (lambda: od.ode.rk23(lambda c: 0.1), "learning_rate must be a number when adaptive"),
    (
      lambda: od.ode.runge_kutta(od.ode.RK4, 0.1, adaptive=True),
      "needs a tableau with an embedded",
    ),
    (lambda: od.ode.euler(0.1, adaptive=True), "needs a tableau with an embedded"),
    (lambda: od.ode.rk23(0.1, rtol=-1e-3), r"rtol must be in \[0.0, inf\], got -0.001"),
    (lambda: od.ode.rk23(0.1, atol=-1.0), "atol must be in"),
    (lambda: od.ode.rk23(0.1, rtol=0.0, atol=0.0), "rtol and atol cannot both be 0"),
    (lambda: od.ode.rk23(0.1, controller="pid"), "controller must be one of"),
    (lambda: od.ode.rk23(0.1, safety=0.0), "safety must be in"),
    (lambda: od.ode.rk23(0.1, safety=1.5), "safety must be in"),
    (lambda: od.ode.rk23(0.1, factor_min=0.0), "factor_min must be in"),
    (lambda: od.ode.rk23(0.1, factor_min=2.0), "factor_min must be in"),
    (lambda: od.ode.rk23(0.1, factor_max=0.5), "factor_max must be in"),
    (lambda: od.ode.rk23(0.1, min_step_size=-1.0), "min_step_size must be in"),
    (lambda: od.ode.rk23(0.1, max_step_size=0.0), "max_step_size must be > 0"),
    (
      lambda: od.ode.rk23(0.1, min_step_size=1.0, max_step_size=0.5),
      "max_step_size must be >=",
    ),
    (lambda: od.ode.heun(0.1, max_step_size=1.0), "bound adaptive steps"),
    (lambda: od.ode.heun(0.1, fsal=True), "fsal=True needs a tableau"),
    (lambda: od.ode.as_transformation(optax.sgd(0.1)), "stepper must be an od.ode.Stepper"),
  ],
)
def test_invalid_hyperparameters(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_invalid_calls():
  params = make_params()
  tx = od.ode.as_transformation(od.ode.heun(0.1))
  grads = jax.grad(loss_fn)(params)
  with pytest.raises(ValueError, match="as_transformation needs the current params"):
    tx.update(grads, tx.init(params), None, grad_fn=jax.grad(loss_fn))
  with pytest.raises(ValueError, match="as_transformation needs grad_fn="):
    tx.update(grads, tx.init(params), params)
  stepper = od.ode.rk23(0.1, fsal=True)
  with pytest.raises(ValueError, match="cannot keep aux"):
    stepper.step(lambda p: (loss_fn(p), 0.0), params, stepper.init(params), has_aux=True)


def test_a_non_finite_step_is_rejected_even_at_min_step_size():
  loss = lambda p: jnp.sum(jnp.cosh(10.0 * p))
  stepper = od.ode.rk45(10.0, min_step_size=10.0)
  new, state, info = stepper.step(loss, jnp.ones(3), stepper.init(jnp.ones(3)))
  assert not bool(info.accepted)
  np.testing.assert_array_equal(new, jnp.ones(3))
  assert np.isfinite(state.prev_error) and np.isfinite(state.step_size)


def test_as_transformation_refuses_fsal():
  with pytest.raises(ValueError, match="cannot reuse the last stage"):
    od.ode.as_transformation(od.ode.rk45(0.1, fsal=True))


@pytest.mark.parametrize("make, scipy_cls", [(od.ode.rk23, RK23), (od.ode.rk45, RK45)])
def test_the_i_controller_equals_scipy_over_many_steps(make, scipy_cls, x64):
  """Accepted steps and step sizes, rejections included, against scipy.integrate."""

  def unflatten(y):
    return {"a": jnp.asarray(y[:3]), "b": jnp.asarray(y[3:]).reshape(2, 2)}

  def flatten(tree):
    return np.concatenate([np.ravel(v) for v in to_numpy(tree).values()])

  y0 = flatten(make_params())
  flow = lambda t, y: -flatten(numpy_grad(to_numpy(unflatten(y))))
  reference = scipy_cls(flow, 0.0, y0, t_bound=1e9, first_step=3.0, rtol=1e-3, atol=1e-4)
  stepper = make(3.0, rtol=1e-3, atol=1e-4, controller="i")
  step = jax.jit(functools.partial(stepper.step, loss_fn))
  params, state = unflatten(y0), stepper.init(unflatten(y0))
  for _ in range(8):
    reference.step()
    params, state, info = step(params, state)
    while not bool(info.accepted):
      params, state, info = step(params, state)
    np.testing.assert_allclose(flatten(params), reference.y, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(state.step_size, reference.h_abs, rtol=1e-12)
  assert int(state.num_rejected) > 0
