r"""Virtual adversarial training: the worst-case perturbation of ``x`` and its loss.

Pure, ``jit``-able functions that a loss calls, not gradient transformations. Each takes the
function to regularise (a closure over the params, e.g. ``lambda x: model.apply(params, x)``),
the point ``x`` (an array or a pytree of arrays: an input batch or an embedding matrix) and a
PRNG key. Post 7466 ("泛化性乱弹") derives virtual adversarial training as the worst case of
training on input noise (:func:`vat_perturbation`, :func:`vat_loss`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import checks
from optaxderived._core import numerics

_TINY = 1e-30  # a zero direction stays zero instead of becoming NaN


def _kl_with_logits(target_logits: Any, logits: Any) -> jax.Array:
  """Σ KL(softmax(target) ‖ softmax(logits)) over the last axis, summed over everything else."""
  terms = jax.tree.map(
    lambda t, p: optax.losses.kl_divergence_with_log_targets(
      jax.nn.log_softmax(numerics.wide(p)), jax.nn.log_softmax(numerics.wide(t))
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
  leaves = [numerics.wide(v) for v in jax.tree.leaves(tree)]
  if batch_axis is None:
    peak = functools.reduce(jnp.maximum, (jnp.max(jnp.abs(v), initial=0.0) for v in leaves))
    leaves = [v / jnp.where(peak > 0, peak, 1) for v in leaves]
    sq = sum((numerics.sum_of_squares(v) for v in leaves), jnp.float32(0))
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
    sq = sum(numerics.sum_of_squares(rows(v), axes=(1,)) for v in leaves)
    scale = [expand(jax.lax.rsqrt(jnp.maximum(sq, _TINY)), v) for v in leaves]
  return jax.tree.unflatten(
    jax.tree.structure(tree), [v * s for v, s in zip(leaves, scale, strict=True)]
  )


def _check_vat(caller: str, epsilon: Any, xi: Any, num_iters: Any, batch_axis: Any) -> None:
  """Raises ``ValueError`` naming ``caller`` for a bad hyperparameter of VAT."""
  checks.check_positive(caller, "epsilon", epsilon)
  checks.check_positive(caller, "xi", xi)
  checks.check_int(caller, "num_iters", num_iters, low=0)
  if batch_axis is not None and (
    isinstance(batch_axis, bool) or not isinstance(batch_axis, int)
  ):
    raise ValueError(f"{caller}: batch_axis must be None or an int, got {batch_axis!r}")


def vat_perturbation(
  fn: Callable[[Any], Any],
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
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> w = jnp.array([[1.0, 0.0], [0.0, 3.0]])
    >>> f = lambda x: x @ w  # logits; at x = 0 the KL Hessian in x is ¼ [[1, -3], [-3, 9]]
    >>> x, key = jnp.zeros((1, 2)), jax.random.key(0)
    >>> r = od.regularizers.vat_perturbation(f, x, key, num_iters=5, xi=1e-2)
    >>> print(jnp.round(jnp.abs(r), 3))  # its top eigenvector, ± (1, -3) / √10
    [[0.316 0.949]]

  References:
    Miyato et al., "Virtual Adversarial Training: a Regularization Method for Supervised and
    Semi-supervised Learning", arXiv:1704.03976.
    Su, "泛化性乱弹：从随机噪声、梯度惩罚到虚拟对抗训练", https://kexue.fm/archives/7466 (2020),
    and the virtual adversarial training example of bert4keras (sentiment classification).
  """
  _check_vat("od.regularizers.vat_perturbation", epsilon, xi, num_iters, batch_axis)
  divergence = _kl_with_logits if divergence is None else divergence
  x = jax.lax.stop_gradient(x)
  target = jax.lax.stop_gradient(fn(x))
  leaves, treedef = jax.tree.flatten(x)
  keys = jax.random.split(key, len(leaves))
  u = jax.tree.unflatten(
    treedef,
    [
      jax.random.normal(k, v.shape, numerics.wide_dtype(v.dtype))
      for k, v in zip(keys, leaves, strict=True)
    ],
  )

  def perturbed(r: Any) -> jax.Array:
    return divergence(target, fn(jax.tree.map(lambda v, d: v + d.astype(v.dtype), x, r)))

  def power_step(_, u):
    r = jax.tree.map(lambda d: xi * d, _normalize(u, batch_axis))
    return jax.tree.map(numerics.wide, jax.grad(perturbed)(r))

  u = jax.lax.fori_loop(0, num_iters, power_step, u)
  r = jax.tree.map(lambda d, v: (epsilon * d).astype(v.dtype), _normalize(u, batch_axis), x)
  return jax.lax.stop_gradient(r)


def vat_loss(
  fn: Callable[[Any], Any],
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
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> w = jnp.array([[1.0, -1.0], [2.0, 0.5]])
    >>> key = jax.random.key(0)
    >>> loss = lambda w, x: od.regularizers.vat_loss(lambda x: x @ w, x, key, batch_axis=0)
    >>> x = jnp.ones((4, 2))
    >>> bool(loss(w, x) > 0), jax.grad(loss)(w, x).shape
    (True, (2, 2))

  References:
    Miyato et al., "Virtual Adversarial Training: a Regularization Method for Supervised and
    Semi-supervised Learning", arXiv:1704.03976.
    Su, "泛化性乱弹：从随机噪声、梯度惩罚到虚拟对抗训练", https://kexue.fm/archives/7466 (2020).
  """
  _check_vat("od.regularizers.vat_loss", epsilon, xi, num_iters, batch_axis)
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
