r"""Loss-side regularizers from the posts: gradient penalties and virtual adversarial training.

These are not gradient transformations: they are pure, ``jit``-able functions that a loss
calls. Each takes the function to regularise (a closure over the params, e.g.
``lambda x: model.apply(params, x)``), the point ``x`` (an array or a pytree of arrays: an
input batch or an embedding matrix) and, where it draws noise, a PRNG key.

Post 7466 ("泛化性乱弹") derives them from input noise: training on ``x + ε`` is, to
second order, a penalty :math:`\tfrac{\sigma^2}{2} \sum_i \lambda_i \|\nabla_x f_i(x)\|^2`
on the model's input gradients (:func:`gradient_penalty`, estimated with one backward pass by
:func:`rademacher_gradient_penalty`), and its worst case is virtual adversarial training
(:func:`vat_perturbation`, :func:`vat_loss`).
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import checks

_FN = "od.regularizers"  # TODO(split): name each public function

_Fn = Callable[[Any], Any]
_Weights = Any  # None, an array (pytree) broadcastable to the outputs, or outputs -> weights


def _wide(x: jax.Array) -> jax.Array:
  """``x`` in at least float32 (sums of squares of bf16 values lose too much)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _sum_squares(tree: Any) -> jax.Array:
  return sum((jnp.sum(jnp.square(_wide(v))) for v in jax.tree.leaves(tree)), jnp.float32(0))


def _output_weights(weights: _Weights, out: Any) -> Any:
  """The weights λ_i as a pytree like ``out``, without a derivative in ``x`` (see below)."""
  if weights is None:
    return None
  w = weights(out) if callable(weights) else weights
  if not isinstance(w, dict | list | tuple) and jax.tree.structure(out).num_leaves > 1:
    w = jax.tree.map(lambda _: w, out)
  return jax.tree.map(lambda o, wi: jnp.broadcast_to(_wide(jnp.asarray(wi)), o.shape), out, w)


def _check_weights(weights: _Weights) -> None:
  if weights is None or callable(weights):
    return
  for w in jax.tree.leaves(weights):
    if isinstance(w, jax.core.Tracer):
      continue
    if jnp.any(jnp.asarray(w) < 0):
      raise ValueError(f"weights must be >= 0 (they are a Hessian's diagonal), got {weights!r}")


def gradient_penalty(fn: _Fn, x: Any, *, weights: _Weights = None) -> jax.Array:
  r"""The exact gradient penalty :math:`\sum_i \lambda_i \|\nabla_x f_i(x)\|^2`.

  With :math:`f = \texttt{fn}` and :math:`i` running over every element of every output
  leaf, and :math:`\nabla_x` over every element of every leaf of ``x``:

  .. math::

    P(x) = \sum_i \lambda_i \, \|\nabla_x f_i(x)\|_2^2 = \|\operatorname{diag}(\lambda)^{1/2}
    J_f(x)\|_F^2 .

  Post 7466 obtains it as the Gaussian-noise smoothness term
  :math:`\mathbb{E}_\varepsilon\, l(f(x + \varepsilon), f(x)) \approx \tfrac{\sigma^2}{2} P(x)`,
  with :math:`\lambda_i` the diagonal of the Hessian of the loss :math:`l` in its first
  argument: :math:`\lambda_i = 2` for the squared error, :math:`1/f_i` for the KL divergence
  on probabilities. The term needs no labels. This form builds the whole Jacobian (one
  backward pass per output element): use it for small outputs and as the reference of
  :func:`rademacher_gradient_penalty`, which estimates the same quantity with one backward
  pass. It is differentiable (``jax.grad`` of a loss that adds it differentiates twice).

  For a batch, ``fn`` maps the batch to the outputs row by row and the samples do not
  interact (no batch statistics), so :math:`P` is the *sum* over samples of each sample's
  penalty; divide by the batch size for a mean.

  Args:
    fn: the function to penalise, ``x -> outputs`` (an array or a pytree of arrays); close
      over the params (``lambda x: model.apply(params, x)``).
    x: the point, an array or a pytree of arrays.
    weights: :math:`\lambda_i`: ``None`` (all 1), non-negative numbers or arrays
      broadcastable to the outputs (a pytree like them), or a callable ``outputs ->
      weights`` (e.g. ``lambda p: 1 / p`` for the KL divergence). :math:`\nabla_x` acts on
      :math:`f` only; an outer ``jax.grad`` also differentiates the weights.

  Returns:
    The penalty, a float32 (or wider) scalar.

  Example:
    >>> f = lambda x: jnp.stack([2.0 * x, 3.0 * x])  # the spec's example: 2² + 3² = 13
    >>> float(od.regularizers.gradient_penalty(f, jnp.float32(0.5)))
    13.0
    >>> float(od.regularizers.gradient_penalty(f, jnp.float32(0.5), weights=2.0))  # λ = 2 (squared error)
    26.0

  References:
    Su, "泛化性乱弹：从随机噪声、梯度惩罚到虚拟对抗训练", https://kexue.fm/archives/7466 (2020).
    Gulrajani et al., "Improved Training of Wasserstein GANs", arXiv:1704.00028 (the critic's
    penalty there is :math:`(\|\nabla_x D\|-1)^2`; this one is the post's :math:`\|\nabla_x
    f\|^2`).
  """
  _check_weights(weights)
  out, vjp_fn = jax.vjp(fn, x)
  w = _output_weights(weights, out)
  leaves, treedef = jax.tree.flatten(out)
  sizes = [leaf.size for leaf in leaves]
  n = sum(sizes)

  def row(k: jax.Array) -> jax.Array:
    onehot = jnp.arange(n) == k
    parts, start = [], 0
    for leaf, size in zip(leaves, sizes, strict=True):
      parts.append(onehot[start : start + size].reshape(leaf.shape).astype(leaf.dtype))
      start += size
    (grad,) = vjp_fn(jax.tree.unflatten(treedef, parts))
    return _sum_squares(grad)

  # ‖∇_x f_i‖² for each output element i, 64 backward passes at a time.
  norms = jax.lax.map(row, jnp.arange(n), batch_size=min(n, 64))
  if w is None:
    return jnp.sum(norms)
  flat_w = jnp.concatenate([jnp.ravel(wi) for wi in jax.tree.leaves(w)])
  return jnp.sum(flat_w * norms)


def rademacher_gradient_penalty(
  fn: _Fn, x: Any, key: jax.Array, *, num_samples: int = 1, weights: _Weights = None
) -> jax.Array:
  r"""An unbiased one-backward-pass estimate of :math:`\sum_i \lambda_i \|\nabla_x f_i(x)\|^2`.

  With :math:`\eta` iid Rademacher signs (±1 with probability ½, so mean 0 and variance 1),
  one per output element, and :math:`S` = ``num_samples`` draws:

  .. math::

    \sum_i \lambda_i \|\nabla_x f_i\|^2
    = \mathbb{E}_\eta \Big\| \nabla_x \sum_i \eta_i \sqrt{\lambda_i}\, f_i(x) \Big\|^2
    \approx \frac{1}{S} \sum_{s=1}^{S} \big\| J_f(x)^\top (\eta^{(s)} \odot
    \sqrt{\lambda}) \big\|^2 ,

  since :math:`\mathbb{E}[\eta_i \eta_j] = \delta_{ij}`. Each draw is one vector-Jacobian
  product (the :math:`S` draws share one forward pass), instead of one backward pass per
  output element for :func:`gradient_penalty`. Rademacher signs give the smallest variance
  among such estimators, :math:`2\sum_{i \neq j} \lambda_i \lambda_j (\nabla f_i \cdot
  \nabla f_j)^2 / S` (Hutchinson). The estimate and its gradient with respect to the params
  are unbiased, so it can be added to a loss as it is (post 7466's cheap gradient penalty).

  For a batch whose samples do not interact, one draw covers the whole batch and estimates
  the *sum* over samples of each sample's penalty; divide by the batch size for a mean.

  Args:
    fn: the function to penalise, ``x -> outputs`` (an array or a pytree of arrays).
    x: the point, an array or a pytree of arrays.
    key: a PRNG key for the signs.
    num_samples: the number of sign vectors averaged, an int >= 1.
    weights: :math:`\lambda_i`, as in :func:`gradient_penalty`.

  Returns:
    The estimate, a float32 (or wider) scalar.

  Example:
    >>> f = lambda x: jnp.stack([2.0 * x, 3.0 * x])  # exact value 2² + 3² = 13
    >>> est = od.regularizers.rademacher_gradient_penalty(f, jnp.float32(0.5), jax.random.key(0))
    >>> float(est) in (1.0, 25.0)  # (2η₁ + 3η₂)² for signs η, whose mean over signs is 13
    True

  References:
    Su, "泛化性乱弹：从随机噪声、梯度惩罚到虚拟对抗训练", https://kexue.fm/archives/7466 (2020).
    Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines" (1989).
  """
  checks.check_int(_FN, "num_samples", num_samples, low=1)
  _check_weights(weights)
  out, vjp_fn = jax.vjp(fn, x)
  w = _output_weights(weights, out)
  leaves, treedef = jax.tree.flatten(out)

  def draw(key_s: jax.Array) -> jax.Array:
    keys = jax.random.split(key_s, len(leaves))
    signs = [
      jax.random.rademacher(k, leaf.shape, jnp.float32)
      for k, leaf in zip(keys, leaves, strict=True)
    ]
    if w is not None:
      # sqrt(w) with a finite gradient at w = 0 (a masked-out output), where sqrt's is inf
      root = lambda wi: jnp.where(wi > 0, jnp.sqrt(jnp.where(wi > 0, wi, 1)), 0)  # noqa: E731
      signs = [s * root(wi) for s, wi in zip(signs, jax.tree.leaves(w), strict=True)]
    cotangent = [s.astype(leaf.dtype) for s, leaf in zip(signs, leaves, strict=True)]
    (grad,) = vjp_fn(jax.tree.unflatten(treedef, cotangent))
    return _sum_squares(grad)

  return jnp.mean(jax.vmap(draw)(jax.random.split(key, num_samples)))


def _kl_with_logits(target_logits: Any, logits: Any) -> jax.Array:
  """Σ KL(softmax(target) ‖ softmax(logits)) over the last axis, summed over everything else."""
  terms = jax.tree.map(
    lambda t, p: optax.losses.kl_divergence_with_log_targets(
      jax.nn.log_softmax(_wide(p)), jax.nn.log_softmax(_wide(t))
    ),
    target_logits,
    logits,
  )
  return sum((jnp.sum(v) for v in jax.tree.leaves(terms)), jnp.float32(0))


def _normalize(tree: Any, batch_axis: int | None) -> Any:
  """``tree / ‖tree‖`` in float32: one L2 norm over the whole tree, or one per example.

  Each direction is first divided by its largest entry (as Miyato et al.'s code does), so
  that tiny directions (a confident classifier's, with a small ``xi``) neither underflow
  their squares nor meet the floor that keeps a zero direction zero.
  """
  leaves = [_wide(v) for v in jax.tree.leaves(tree)]
  if batch_axis is None:
    peak = functools.reduce(jnp.maximum, (jnp.max(jnp.abs(v), initial=0.0) for v in leaves))
    leaves = [v / jnp.where(peak > 0, peak, 1) for v in leaves]
    sq = sum((jnp.sum(jnp.square(v)) for v in leaves), jnp.float32(0))
    scale = [jax.lax.rsqrt(jnp.maximum(sq, _TINY))] * len(leaves)
  else:

    def expand(x, v):  # a per-example vector as a view broadcasting against leaf v
      return jnp.expand_dims(x, [a for a in range(v.ndim) if a != batch_axis % v.ndim])

    def rows(v):  # (batch, everything else)
      return jnp.moveaxis(v, batch_axis, 0).reshape(v.shape[batch_axis], -1)

    peak = functools.reduce(
      jnp.maximum, (jnp.max(jnp.abs(rows(v)), axis=1, initial=0.0) for v in leaves)
    )
    leaves = [v / expand(jnp.where(peak > 0, peak, 1), v) for v in leaves]
    sq = sum(jnp.sum(jnp.square(rows(v)), axis=1) for v in leaves)
    scale = [expand(jax.lax.rsqrt(jnp.maximum(sq, _TINY)), v) for v in leaves]
  return jax.tree.unflatten(
    jax.tree.structure(tree), [v * s for v, s in zip(leaves, scale, strict=True)]
  )


_TINY = 1e-30  # a zero direction stays zero instead of becoming NaN


def _check_vat(epsilon: Any, xi: Any, num_iters: Any, batch_axis: Any) -> None:
  checks.check_positive(_FN, "epsilon", epsilon)
  checks.check_positive(_FN, "xi", xi)
  checks.check_int(_FN, "num_iters", num_iters, low=0)
  if batch_axis is not None and (
    isinstance(batch_axis, bool) or not isinstance(batch_axis, int)
  ):
    raise ValueError(f"batch_axis must be None or an int, got {batch_axis!r}")


def vat_perturbation(
  fn: _Fn,
  x: Any,
  key: jax.Array,
  *,
  epsilon: float = 1.0,
  xi: float = 10.0,
  num_iters: int = 1,
  divergence: Callable[[Any, Any], jax.Array] | None = None,
  batch_axis: int | None = None,
) -> Any:
  r"""The virtual adversarial perturbation :math:`r` of ``x`` (norm ``epsilon``), a constant.

  Virtual adversarial training (VAT) trains on :math:`D(f_{ng}(x), f(x + r))` with the
  perturbation :math:`r`, :math:`\|r\| = \epsilon`, that increases it most, and
  :math:`f_{ng}` the outputs without gradient. The first-order term vanishes at
  :math:`r = 0`, so :math:`r` is the dominant eigenvector of the Hessian
  :math:`H = \nabla_r^2 D(f_{ng}(x), f(x + r))|_{r=0}`, found by power iteration with
  finite-difference Hessian-vector products (:math:`\nabla_r D|_{\xi u} \approx \xi H u`):

  .. math::

    u_0 \sim \mathcal{N}(0, I), \qquad
    u_{k+1} = \nabla_r D\big(f_{ng}(x), f(x + r)\big)\big|_{r = \xi\, u_k / \|u_k\|}
    \quad (k < \texttt{num\_iters}), \qquad
    r = \epsilon\, \frac{u_K}{\|u_K\|} .

  One iteration is usually enough; zero iterations gives a random direction (Gaussian
  noise training). The norm is taken over the whole pytree ``x`` (``batch_axis=None``: the
  reference Keras code, which perturbs the whole embedding matrix) or per example along
  ``batch_axis`` (Miyato et al., for input batches). The result carries no gradient
  (``stop_gradient``), as in both: the training loss differentiates through
  :math:`f(x + r)` only (see :func:`vat_loss`).

  Args:
    fn: ``x -> outputs`` (logits by default), a closure over the params, e.g.
      ``lambda emb: model.apply({"params": {**p, "embed": emb}}, tokens)`` to perturb an
      embedding matrix, or ``lambda x: model.apply(params, x)`` for inputs.
    x: the point to perturb, an array or a pytree of arrays (an embedding matrix, an input
      batch).
    key: a PRNG key for :math:`u_0`.
    epsilon: the norm of the perturbation, > 0 (default 1, as the reference Keras code).
    xi: the finite-difference step, > 0 (default 10, as the reference Keras code for an
      embedding matrix; Miyato et al. use 1e-6 on raw inputs).
    num_iters: power iterations, an int >= 0.
    divergence: ``(target_outputs, outputs) -> scalar``; by default the KL divergence
      :math:`\sum \mathrm{KL}(\mathrm{softmax}(t) \,\|\, \mathrm{softmax}(o))` over the last
      axis, summed over the rest, for logits. Pass your own for probabilities or regression.
    batch_axis: ``None`` for one norm over the whole ``x``, or the axis of the examples
      (every leaf must have it) for one norm per example.

  Returns:
    :math:`r`, a pytree like ``x`` (same dtypes) with no gradient.

  Example:
    >>> w = jnp.array([[1.0, 0.0], [0.0, 3.0]])
    >>> f = lambda x: x @ w  # logits; at x = 0 the KL Hessian in x is ¼ [[1, -3], [-3, 9]]
    >>> r = od.regularizers.vat_perturbation(f, jnp.zeros((1, 2)), jax.random.key(0), num_iters=5, xi=1e-2)
    >>> print(jnp.round(jnp.abs(r), 3))  # its top eigenvector, ± (1, -3) / √10
    [[0.316 0.949]]

  References:
    Miyato et al., "Virtual Adversarial Training: a Regularization Method for Supervised and
    Semi-supervised Learning", arXiv:1704.03976.
    Su, "泛化性乱弹：从随机噪声、梯度惩罚到虚拟对抗训练", https://kexue.fm/archives/7466 (2020),
    and bert4keras' ``examples/task_sentiment_virtual_adversarial_training.py``.
  """
  _check_vat(epsilon, xi, num_iters, batch_axis)
  divergence = _kl_with_logits if divergence is None else divergence
  x = jax.lax.stop_gradient(x)
  target = jax.lax.stop_gradient(fn(x))
  leaves, treedef = jax.tree.flatten(x)
  keys = jax.random.split(key, len(leaves))
  u = jax.tree.unflatten(
    treedef,
    [
      jax.random.normal(k, v.shape, jnp.promote_types(v.dtype, jnp.float32))
      for k, v in zip(keys, leaves, strict=True)
    ],
  )

  def perturbed(r: Any) -> jax.Array:
    return divergence(target, fn(jax.tree.map(lambda v, d: v + d.astype(v.dtype), x, r)))

  def power_step(_, u):
    r = jax.tree.map(lambda d: xi * d, _normalize(u, batch_axis))
    return jax.tree.map(_wide, jax.grad(perturbed)(r))

  u = jax.lax.fori_loop(0, num_iters, power_step, u)
  r = jax.tree.map(lambda d, v: (epsilon * d).astype(v.dtype), _normalize(u, batch_axis), x)
  return jax.lax.stop_gradient(r)


def vat_loss(
  fn: _Fn,
  x: Any,
  key: jax.Array,
  *,
  epsilon: float = 1.0,
  xi: float = 10.0,
  num_iters: int = 1,
  divergence: Callable[[Any, Any], jax.Array] | None = None,
  batch_axis: int | None = None,
) -> jax.Array:
  r"""The virtual adversarial loss :math:`D(f_{ng}(x), f(x + r))` with :math:`r` from VAT.

  .. math::

    L_{\text{vat}} = D\big(\operatorname{sg}(f(x)),\, f(x + \operatorname{sg}(r))\big),
    \qquad r = \texttt{vat\_perturbation}(f, x, \ldots),

  where :math:`\operatorname{sg}` stops the gradient. It needs no labels (semi-supervised
  training adds it, weighted, to the supervised loss on all data). The gradient reaches the
  params through :math:`f(x + r)` only: stopping it through the target
  :math:`f_{ng}(x)` is the approximation of the reference Keras code, which post 7466 notes
  differs from exact VAT only at second order.

  Args:
    fn: ``x -> outputs`` (logits by default), a closure over the params.
    x: the point to perturb, an array or a pytree of arrays.
    key: a PRNG key for the power iteration's start.
    epsilon: the norm of the perturbation, > 0.
    xi: the finite-difference step, > 0.
    num_iters: power iterations, an int >= 0.
    divergence: ``(target_outputs, outputs) -> scalar``, by default the KL divergence on
      logits (see :func:`vat_perturbation`).
    batch_axis: ``None`` for one norm over the whole ``x``, or the axis of the examples.

  Returns:
    The loss, a float32 (or wider) scalar: with the default divergence, the KL divergence
    summed over the examples (divide by the batch size for a mean).

  Example:
    >>> w = jnp.array([[1.0, -1.0], [2.0, 0.5]])
    >>> loss = lambda w, x: od.regularizers.vat_loss(lambda x: x @ w, x, jax.random.key(0), batch_axis=0)
    >>> x = jnp.ones((4, 2))
    >>> bool(loss(w, x) > 0), jax.grad(loss)(w, x).shape
    (True, (2, 2))

  References:
    Miyato et al., "Virtual Adversarial Training: a Regularization Method for Supervised and
    Semi-supervised Learning", arXiv:1704.03976.
    Su, "泛化性乱弹：从随机噪声、梯度惩罚到虚拟对抗训练", https://kexue.fm/archives/7466 (2020).
  """
  r = vat_perturbation(
    fn,
    x,
    key,
    epsilon=epsilon,
    xi=xi,
    num_iters=num_iters,
    divergence=divergence,
    batch_axis=batch_axis,
  )
  divergence = _kl_with_logits if divergence is None else divergence
  target = jax.lax.stop_gradient(fn(x))
  return divergence(target, fn(jax.tree.map(lambda v, d: v + d, x, r)))
