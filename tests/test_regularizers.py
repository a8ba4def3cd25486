"""Gradient penalties (exact and Rademacher) and virtual adversarial training.

References: a worked example (f(x) = [2x, 3x] gives 2² + 3² = 13), Jacobians written out
in NumPy float64 from the formulas, and power iteration / eigenvectors in NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optaxderived as od

RNG = np.random.default_rng(0)
W = RNG.normal(size=(5, 3))  # x (5,) -> logits (3,)
B = RNG.normal(size=(3,))
W3 = np.random.default_rng(21).normal(size=(5, 3))
X = RNG.normal(size=(5,))


def tanh_model(w, b):
  return lambda x: jnp.tanh(x @ w + b)


def np_tanh_penalty(w, b, x, weights=1.0):
  """Σ_i λ_i ‖∇_x tanh(x·w_i + b_i)‖² = Σ_i λ_i (1 − t_i²)² ‖w_{:, i}‖²."""
  t = np.tanh(x @ w + b)
  return float(np.sum(weights * (1 - t**2) ** 2 * np.sum(w**2, axis=0)))


def f32(a):
  return jnp.asarray(a, jnp.float32)


# ---------------------------------------------------------------- gradient penalty (exact)


def test_worked_example_exact():
  f = lambda x: jnp.stack([2.0 * x, 3.0 * x])  # noqa: E731
  assert float(od.regularizers.gradient_penalty(f, jnp.float32(0.7))) == pytest.approx(13.0)
  assert float(
    od.regularizers.gradient_penalty(f, jnp.float32(0.7), weights=2.0)
  ) == pytest.approx(26.0)
  assert float(
    od.regularizers.gradient_penalty(f, jnp.float32(0.7), weights=jnp.array([1.0, 0.0]))
  ) == pytest.approx(4.0)


def test_exact_matches_numpy_jacobian():
  got = od.regularizers.gradient_penalty(tanh_model(f32(W), f32(B)), f32(X))
  np.testing.assert_allclose(got, np_tanh_penalty(W, B, X), rtol=1e-5)
  lam = np.array([2.0, 0.5, 1.0])
  got = od.regularizers.gradient_penalty(tanh_model(f32(W), f32(B)), f32(X), weights=f32(lam))
  np.testing.assert_allclose(got, np_tanh_penalty(W, B, X, lam), rtol=1e-5)


def test_exact_on_a_batch_is_the_sum_of_per_sample_penalties():
  rng = np.random.default_rng(11)
  xs = rng.normal(size=(4, 5))
  got = od.regularizers.gradient_penalty(tanh_model(f32(W), f32(B)), f32(xs))
  want = sum(np_tanh_penalty(W, B, x) for x in xs)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_exact_on_pytrees():
  rng = np.random.default_rng(12)
  a, c = rng.normal(size=(2, 3)), rng.normal(size=(3, 3))

  def fn(x):
    h = x["a"] @ a + x["c"] @ c
    return {"lin": h, "sq": jnp.sum(x["a"] ** 2)[None]}

  x = {"a": rng.normal(size=(2,)), "c": rng.normal(size=(3,))}
  # Jacobian rows: lin_i -> (a[:, i], c[:, i]); sq -> (2 x_a, 0).
  want = np.sum(a**2) + np.sum(c**2) + np.sum((2 * x["a"]) ** 2)
  got = od.regularizers.gradient_penalty(fn, jax.tree.map(f32, x))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  got = od.regularizers.gradient_penalty(
    fn, jax.tree.map(f32, x), weights={"lin": 1.0, "sq": 3.0}
  )
  np.testing.assert_allclose(got, want + 2 * np.sum((2 * x["a"]) ** 2), rtol=1e-5)


def test_kl_weights_give_the_posts_softmax_penalty():
  """λ_i = 1/p_i (KL) turns Σ λ_i ‖∇p_i‖² into Σ_i p_i ‖∇ log p_i‖²."""
  rng = np.random.default_rng(13)
  w = rng.normal(size=(5, 4))
  logits = X @ w
  p = np.exp(logits - logits.max())
  p /= p.sum()
  grad_log_p = w - (w @ p)[:, None]  # ∂ log p_i / ∂x = w_i − Σ_j p_j w_j (columns i)
  want = np.sum(p * np.sum(grad_log_p**2, axis=0))
  fn = lambda x: jax.nn.softmax(x @ f32(w))  # noqa: E731
  got = od.regularizers.gradient_penalty(fn, f32(X), weights=lambda q: 1 / q)
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_exact_is_twice_differentiable_against_numpy_finite_differences():
  def penalty(w):
    return od.regularizers.gradient_penalty(tanh_model(w, f32(B)), f32(X))

  got = np.asarray(jax.grad(penalty)(f32(W)))
  want = np.zeros_like(W)
  h = 1e-6
  for idx in np.ndindex(*W.shape):
    dw = np.zeros_like(W)
    dw[idx] = h
    want[idx] = (np_tanh_penalty(W + dw, B, X) - np_tanh_penalty(W - dw, B, X)) / (2 * h)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
  st.lists(st.floats(-3, 3), min_size=6, max_size=6),
  st.lists(st.floats(0, 2), min_size=3, max_size=3),
  st.integers(0, 2**31 - 1),
)
def test_linear_maps_property(m, lam, seed):
  """f(x) = x M: exact penalty Σ_i λ_i ‖M_{:, i}‖²; with one column every draw is exact."""
  mat = np.array(m).reshape(2, 3)
  fn = lambda x: x @ f32(mat)  # noqa: E731
  want = float(np.sum(np.array(lam) * np.sum(mat**2, axis=0)))
  got = od.regularizers.gradient_penalty(fn, jnp.ones(2), weights=f32(lam))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  col = lambda x: x @ f32(mat[:, :1])  # noqa: E731
  est = od.regularizers.rademacher_gradient_penalty(col, jnp.ones(2), jax.random.key(seed))
  np.testing.assert_allclose(est, np.sum(mat[:, 0] ** 2), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------- gradient penalty (Rademacher estimate)


def test_worked_example_rademacher():
  f = lambda x: jnp.stack([2.0 * x, 3.0 * x])  # noqa: E731
  draws = {
    float(od.regularizers.rademacher_gradient_penalty(f, jnp.float32(0.7), jax.random.key(s)))
    for s in range(16)
  }
  assert draws == {1.0, 25.0}  # (2η₁ + 3η₂)² with η = ±1, equally likely: mean 13
  many = od.regularizers.rademacher_gradient_penalty(
    f, jnp.float32(0.7), jax.random.key(0), num_samples=4000
  )
  # One draw has variance 2·Σ_{i≠j}(g_i g_j)² = 144, so the mean of 4000 has σ = 0.19.
  assert abs(float(many) - 13.0) < 5 * 0.19


def test_rademacher_is_exact_for_one_output():
  fn = lambda x: jnp.sum(jnp.sin(x) * jnp.arange(5.0))[None]  # noqa: E731
  exact = od.regularizers.gradient_penalty(fn, f32(X))
  for s in range(3):
    est = od.regularizers.rademacher_gradient_penalty(fn, f32(X), jax.random.key(s))
    np.testing.assert_allclose(est, exact, rtol=1e-6)
  # ... and so is its gradient with respect to the params (double backward).
  g_exact = jax.grad(
    lambda w: od.regularizers.gradient_penalty(tanh_model(w, f32(B[:1])), f32(X))
  )
  g_est = jax.grad(
    lambda w: od.regularizers.rademacher_gradient_penalty(
      tanh_model(w, f32(B[:1])), f32(X), jax.random.key(3)
    )
  )
  np.testing.assert_allclose(g_est(f32(W[:, :1])), g_exact(f32(W[:, :1])), rtol=1e-5)


def test_rademacher_is_unbiased_with_the_predicted_variance():
  """Mean over many draws → Σ‖∇f_i‖², within 5σ of Hutchinson's variance (NumPy)."""
  rng = np.random.default_rng(14)
  xs = rng.normal(size=(3, 5))  # a batch: the sum of the per-sample penalties
  lam = np.array([2.0, 0.5, 1.0])
  t = np.tanh(xs @ W + B)
  grads = (1 - t**2)[:, :, None] * W.T[None]  # (batch, output i, input): ∇_x f_{b,i}
  want = sum(np_tanh_penalty(W, B, x, lam) for x in xs)
  gram = np.einsum("bid,bjd->bij", grads, grads) * np.sqrt(lam[:, None] * lam[None, :])
  off = gram * (1 - np.eye(3))
  var = 2 * np.sum(off**2)
  n = 4000
  got = od.regularizers.rademacher_gradient_penalty(
    tanh_model(f32(W), f32(B)), f32(xs), jax.random.key(1), num_samples=n, weights=f32(lam)
  )
  assert abs(float(got) - want) < 5 * np.sqrt(var / n), (float(got), want, np.sqrt(var / n))


def test_rademacher_on_pytrees_and_under_jit():
  def fn(x):
    return (x["a"] * 2.0, jnp.sum(x["b"])[None])

  x = {"a": jnp.ones(3), "b": jnp.ones(2)}
  # f_i = 2 a_i (‖∇‖² = 4 each, 3 of them) and Σ b (‖∇‖² = 2): exact 14; the cross terms
  # vanish since the gradients are orthogonal, so every draw is exact.
  est = jax.jit(
    lambda x, k: od.regularizers.rademacher_gradient_penalty(fn, x, k, num_samples=3)
  )(x, jax.random.key(0))
  assert float(est) == pytest.approx(14.0)
  assert float(od.regularizers.gradient_penalty(fn, x)) == pytest.approx(14.0)


def test_bf16_inputs():
  xb = f32(X).astype(jnp.bfloat16)
  fn = tanh_model(f32(W).astype(jnp.bfloat16), f32(B).astype(jnp.bfloat16))
  exact = od.regularizers.gradient_penalty(fn, xb)
  est = od.regularizers.rademacher_gradient_penalty(fn, xb, jax.random.key(0), num_samples=8)
  assert exact.dtype == jnp.float32 and est.dtype == jnp.float32
  np.testing.assert_allclose(exact, np_tanh_penalty(W, B, X), rtol=5e-2)
  assert np.isfinite(float(est))


# ------------------------------------------------------------ virtual adversarial training


def mse(target, out):
  return jnp.sum((out - target) ** 2)


A = RNG.normal(size=(4, 3))  # a linear model x (4,) -> (3,): ∇_r ‖rA‖² = 2 r A Aᵀ exactly


def unit(v, axis=None):
  return v / np.linalg.norm(v, axis=axis, keepdims=axis is not None)


def test_power_iteration_matches_numpy_for_a_quadratic_divergence():
  rng = np.random.default_rng(15)
  fn = lambda x: x @ f32(A)  # noqa: E731
  x = f32(rng.normal(size=(4,)))
  key = jax.random.key(7)
  r0 = np.asarray(
    od.regularizers.vat_perturbation(fn, x, key, num_iters=0, divergence=mse, epsilon=2.0)
  )
  assert np.linalg.norm(r0) == pytest.approx(2.0, rel=1e-5)  # zero iterations: noise
  u0 = r0 / 2.0
  h = A @ A.T
  for k in (1, 2, 4):
    got = od.regularizers.vat_perturbation(
      fn, x, key, num_iters=k, divergence=mse, epsilon=2.0, xi=0.3
    )
    want = 2.0 * unit(np.linalg.matrix_power(h, k) @ u0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_per_example_norms_along_batch_axis():
  rng = np.random.default_rng(16)
  fn = lambda x: x @ f32(A)  # noqa: E731
  xs = f32(rng.normal(size=(5, 4)))
  key = jax.random.key(3)
  u0 = np.asarray(
    od.regularizers.vat_perturbation(fn, xs, key, num_iters=0, batch_axis=0, divergence=mse)
  )
  np.testing.assert_allclose(np.linalg.norm(u0, axis=1), 1.0, rtol=1e-5)
  got = od.regularizers.vat_perturbation(
    fn, xs, key, num_iters=1, batch_axis=0, divergence=mse, epsilon=3.0
  )
  want = 3.0 * unit(u0 @ (A @ A.T), axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The same along axis 1 of the transposed batch.
  got_t = od.regularizers.vat_perturbation(
    lambda x: x.T @ f32(A), xs.T, key, num_iters=0, batch_axis=1, divergence=mse
  )
  np.testing.assert_allclose(np.linalg.norm(np.asarray(got_t), axis=0), 1.0, rtol=1e-5)


def test_tiny_directions_still_get_norm_epsilon():
  """A confident classifier with a small xi gives directions of norm ~1e-22: divided by their
  largest entry first, they are not cut short by the floor that keeps zero directions zero."""
  w = f32(np.array([[1e-8, -2e-8], [3e-8, 0.0]]))
  fn = lambda x: x @ w  # noqa: E731  (outputs that barely move, as near-constant logits)
  xs = f32(np.random.default_rng(3).normal(size=(4, 2)))
  r = od.regularizers.vat_perturbation(
    fn, xs, jax.random.key(0), xi=1e-6, batch_axis=0, divergence=mse
  )
  np.testing.assert_allclose(np.linalg.norm(np.asarray(r), axis=1), 1.0, rtol=1e-5)
  r = od.regularizers.vat_perturbation(
    fn, xs, jax.random.key(0), xi=1e-6, epsilon=2.0, divergence=mse
  )
  np.testing.assert_allclose(np.linalg.norm(np.asarray(r)), 2.0, rtol=1e-5)


def test_rademacher_gradient_is_finite_where_a_weight_is_zero():
  """sqrt(λ) has an infinite derivative at 0: masked-out outputs must not make it NaN."""
  mask = jnp.array([1.0, 1.0, 0.0])
  fn = lambda x: jax.nn.softmax(x @ f32(W3))  # noqa: E731

  def penalty(x, estimate):
    if estimate:
      return od.regularizers.rademacher_gradient_penalty(
        fn, x, jax.random.key(0), num_samples=2000, weights=lambda q: mask / q
      )
    return od.regularizers.gradient_penalty(fn, x, weights=lambda q: mask / q)

  x = f32(X)
  grad = jax.grad(penalty)(x, True)
  assert bool(jnp.all(jnp.isfinite(grad)))
  np.testing.assert_allclose(grad, jax.grad(penalty)(x, False), rtol=0.2, atol=0.05)


def test_per_example_norm_spans_the_leaves_of_a_pytree():
  x = {"a": jnp.ones((3, 2)), "b": jnp.ones((3, 4, 2))}
  fn = lambda x: x["a"] + x["b"].sum(1)  # noqa: E731
  r = od.regularizers.vat_perturbation(fn, x, jax.random.key(0), batch_axis=0, epsilon=0.5)
  sq = np.sum(np.asarray(r["a"]) ** 2, axis=1) + np.sum(np.asarray(r["b"]) ** 2, axis=(1, 2))
  np.testing.assert_allclose(np.sqrt(sq), 0.5, rtol=1e-5)


def test_default_kl_converges_to_the_top_hessian_eigenvector():
  """H = Jᵀ (diag p − p pᵀ) J for softmax(x W + b), the KL's Hessian at r = 0 (NumPy)."""
  rng = np.random.default_rng(17)
  w, b = rng.normal(size=(4, 3)), rng.normal(size=(3,))
  x = rng.normal(size=(4,))
  z = x @ w + b
  p = np.exp(z - z.max())
  p /= p.sum()
  h = w @ (np.diag(p) - np.outer(p, p)) @ w.T
  vals, vecs = np.linalg.eigh(h)
  assert vals[-1] > 2 * abs(vals[-2])  # a clear gap, so 20 iterations converge
  r = od.regularizers.vat_perturbation(
    lambda x: x @ f32(w) + f32(b), f32(x), jax.random.key(0), num_iters=20, xi=1e-2
  )
  cos = abs(float(np.dot(np.asarray(r, np.float64), vecs[:, -1])))
  assert cos > 0.999


def test_embedding_matrix_like_the_reference_code():
  """One global norm over the matrix; rows that no token uses get no perturbation."""
  rng = np.random.default_rng(18)
  emb = f32(rng.normal(size=(10, 4)))
  tokens = jnp.array([[1, 2, 2], [5, 1, 0]])
  head = f32(rng.normal(size=(4, 3)))
  fn = lambda e: e[tokens].mean(1) @ head  # noqa: E731
  r = jax.jit(lambda e, k: od.regularizers.vat_perturbation(fn, e, k))(emb, jax.random.key(0))
  assert r.shape == emb.shape and r.dtype == emb.dtype
  assert float(jnp.linalg.norm(r)) == pytest.approx(1.0, rel=1e-5)  # epsilon = 1
  unused = np.setdiff1d(np.arange(10), np.asarray(tokens))
  np.testing.assert_array_equal(np.asarray(r)[unused], 0.0)


def test_a_flat_function_gives_a_zero_perturbation_not_nan():
  r = od.regularizers.vat_perturbation(
    lambda x: jnp.zeros(3) * x.sum(), jnp.ones(4), jax.random.key(0)
  )
  np.testing.assert_array_equal(np.asarray(r), 0.0)


def test_no_gradient_through_the_perturbation_and_vat_loss_gradient():
  rng = np.random.default_rng(19)
  x = f32(rng.normal(size=(6, 4)))
  key = jax.random.key(2)

  def r_of(w):
    return od.regularizers.vat_perturbation(lambda x: x @ w, x, key, batch_axis=0)

  np.testing.assert_array_equal(jax.grad(lambda w: jnp.sum(r_of(w)))(f32(A)), 0.0)

  def manual(w):
    r = r_of(w)
    target = jax.lax.stop_gradient(x @ w)
    logp, logt = jax.nn.log_softmax((x + r) @ w), jax.nn.log_softmax(target)
    return jnp.sum(jnp.exp(logt) * (logt - logp))

  loss = lambda w: od.regularizers.vat_loss(lambda x: x @ w, x, key, batch_axis=0)  # noqa: E731
  np.testing.assert_allclose(loss(f32(A)), manual(f32(A)), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(loss)(f32(A)), jax.grad(manual)(f32(A)), rtol=1e-4)
  assert float(loss(f32(A))) > 0


def test_bf16_perturbation_keeps_dtype():
  x = jnp.ones((2, 4), jnp.bfloat16)
  fn = lambda x: x @ f32(A).astype(jnp.bfloat16)  # noqa: E731
  r = od.regularizers.vat_perturbation(fn, x, jax.random.key(0), batch_axis=0, epsilon=0.5)
  assert r.dtype == jnp.bfloat16
  np.testing.assert_allclose(jnp.linalg.norm(r.astype(jnp.float32), axis=1), 0.5, rtol=2e-2)
  assert od.regularizers.vat_loss(fn, x, jax.random.key(0)).dtype == jnp.float32


def test_training_under_scan_with_both_regularizers():
  """A semi-supervised step (labelled CE + VAT + Rademacher penalty) inside jit + lax.scan."""
  rng = np.random.default_rng(20)
  xs = f32(rng.normal(size=(8, 4)))
  ys = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])
  params = {"w": f32(A), "b": jnp.zeros(3)}
  tx = optax.adam(1e-2)

  def loss(p, key):
    k1, k2 = jax.random.split(key)
    fn = lambda x: x @ p["w"] + p["b"]  # noqa: E731
    ce = optax.softmax_cross_entropy_with_integer_labels(fn(xs[:4]), ys[:4]).mean()
    vat = od.regularizers.vat_loss(fn, xs, k1, batch_axis=0, epsilon=0.5, xi=1e-2) / 8
    gp = (
      od.regularizers.rademacher_gradient_penalty(lambda x: jax.nn.softmax(fn(x)), xs, k2) / 8
    )
    return ce + vat + 0.1 * gp

  def step(carry, key):
    p, s = carry
    value, g = jax.value_and_grad(loss)(p, key)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), value

  (_, _), values = jax.jit(lambda c, k: jax.lax.scan(step, c, k))(
    (params, tx.init(params)), jax.random.split(jax.random.key(0), 30)
  )
  assert np.all(np.isfinite(values)) and values[-1] < values[0]


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": 1.5}, "num_samples"),
    ({"num_samples": True}, "num_samples"),
    ({"weights": -1.0}, "weights"),
  ],
)
def test_penalty_validation(kwargs, name):
  with pytest.raises(ValueError, match=name):
    od.regularizers.rademacher_gradient_penalty(
      jnp.sin, jnp.ones(2), jax.random.key(0), **kwargs
    )


def test_exact_penalty_validation():
  with pytest.raises(ValueError, match="weights"):
    od.regularizers.gradient_penalty(jnp.sin, jnp.ones(2), weights=jnp.array([1.0, -2.0]))


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    ({"epsilon": 0.0}, "epsilon"),
    ({"epsilon": -1.0}, "epsilon"),
    ({"xi": 0.0}, "xi"),
    ({"xi": float("nan")}, "xi"),
    ({"num_iters": -1}, "num_iters"),
    ({"num_iters": 1.5}, "num_iters"),
    ({"batch_axis": "0"}, "batch_axis"),
  ],
)
@pytest.mark.parametrize("fn", [od.regularizers.vat_perturbation, od.regularizers.vat_loss])
def test_vat_validation(fn, kwargs, name):
  with pytest.raises(ValueError, match=f"{name}.*{kwargs[name]!r}"):
    fn(jnp.sin, jnp.ones(2), jax.random.key(0), **kwargs)


def test_traced_hyperparameters_are_accepted():
  fn = lambda x: x @ f32(A)  # noqa: E731
  r = jax.jit(
    lambda eps, xi: od.regularizers.vat_perturbation(
      fn, jnp.ones(4), jax.random.key(0), epsilon=eps, xi=xi
    )
  )(2.0, 1.0)
  assert float(jnp.linalg.norm(r)) == pytest.approx(2.0, rel=1e-5)
