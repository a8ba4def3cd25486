"""Adaptive gradient clipping (NFNets), unit-wise relative to the params, with exclusions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import checks
from optaxderived._core import numerics
from optaxderived._core import paths


def adaptive_grad_clip(
  clipping: float,
  *,
  eps: float = 1e-3,
  exclude: paths.Patterns = (),
  strict: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Adaptive gradient clipping (AGC): clips each unit's update relative to its param norm.

  For each *unit* :math:`i` of a leaf, with :math:`\lambda` the ``clipping`` and
  :math:`\epsilon` the ``eps``:

  .. math::

    G_i \leftarrow \begin{cases}
      \lambda\,\dfrac{\max(\|W_i\|, \epsilon)}{\|G_i\|}\,G_i
        & \text{if } \|G_i\| \ge \lambda \max(\|W_i\|, \epsilon), \\
      G_i & \text{otherwise.}
    \end{cases}

  The units are those of ``optax.adaptive_grad_clip``: a vector or a scalar as a whole, the
  slices along axis 0 of a 2-D or 3-D leaf (the output units of an ``(in, out)`` kernel),
  and each entry of the last axis of a 4-D (``HWIO``) or 5-D conv kernel. The ratio of an
  update to its weights, not the update's own norm, decides: a unit whose
  weights are large may take a large step. :math:`\epsilon` keeps zero-initialised params
  (biases) from freezing. NFNets clip every layer but the final classifier, which is
  what ``exclude`` is for: leaves whose path matches it pass unchanged, bit for bit.

  The clipping of the other leaves is ``optax.adaptive_grad_clip``'s, applied to them in
  float32 or wider (bf16 updates and params are widened first, so the norms are float32,
  and the updates keep their dtype); for float32 leaves it is bit-identical to it (to a few
  ulps under ``jit``, where XLA may fuse it differently). Unlike optax's, it keeps working on
  leaves sharded over an explicit mesh. A NaN or an Inf entry makes its unit non-finite (NaN),
  which ``optax.apply_if_finite`` catches. Place it first in a chain, on the raw gradients.

  Args:
    clipping: :math:`\lambda > 0`, the largest ratio of a unit's update norm to its param
      norm (NFNets use 0.01 to 0.16, smaller for larger batches).
    eps: :math:`\epsilon \ge 0`, the floor of the param norm.
    exclude: patterns of leaves not to clip: regexes searched in the leaf paths, or a
      predicate ``(path, leaf) -> bool`` (``"head"``: the final layer).
    strict: raise ``ValueError`` at ``init`` instead of warning when a pattern of
      ``exclude`` matches no leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with an ``optax.EmptyState``; its
    ``update`` needs ``params``.

  Raises:
    ValueError: for ``clipping <= 0``, ``eps < 0`` (or NaN), an invalid ``exclude`` or a
      ``strict`` that is not a bool; in ``update``, without params, for updates whose tree is
      not the params', or for a clipped leaf of more than 5 (non-unit) dimensions.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> params = {"body": jnp.array([[3.0, 0.1], [4.0, 0.1]]), "head": jnp.array([1.0])}
    >>> grads = {"body": jnp.array([[0.03, 1.0], [0.04, 1.0]]), "head": jnp.array([5.0])}
    >>> tx = od.adaptive_grad_clip(0.1, exclude="head")
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates["body"]  # column 0 is within 0.1 of its weights' norm, column 1 is cut to it
    Array([[0.03, 0.01],
           [0.04, 0.01]], dtype=float32)
    >>> updates["head"]  # the final layer is not clipped
    Array([5.], dtype=float32)

  References:
    Brock, De, Smith, Simonyan, `High-Performance Large-Scale Image Recognition Without
    Normalization <https://arxiv.org/abs/2102.06171>`_, ICML 2021.
  """
  fn = "od.adaptive_grad_clip"
  checks.check_range(fn, "clipping", clipping, low=0.0, low_open=True, schedule=False)
  checks.check_range(fn, "eps", eps, low=0.0, schedule=False)
  checks.check_bool(fn, "strict", strict)
  excluded = paths.selector(exclude, argname=f"{fn}: exclude", strict=strict)

  def init_fn(params):
    excluded.check_used(params)
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    checks.require_params(params, fn)
    checks.check_same_tree(fn, updates, params, "params")
    leaves, treedef = jax.tree.flatten(updates)
    param_leaves = jax.tree.leaves(params)
    skip = jax.tree.leaves(excluded.mask(updates))
    chosen = [i for i, s in enumerate(skip) if not s]
    for i in chosen:
      shape = jnp.shape(leaves[i])
      if len(shape) > 5 and sum(d != 1 for d in shape) > 1:  # optax's rule, from the shape
        path = jax.tree.leaves(paths.tree_paths(updates))[i]
        raise ValueError(
          f"{fn}: {path!r} has shape {shape}: units are defined for leaves of "
          "up to 5 dimensions; exclude it"
        )
    dtypes = [
      numerics.wide_dtype(jnp.result_type(leaves[i]), jnp.result_type(param_leaves[i]))
      for i in chosen
    ]
    new_leaves = list(leaves)
    for i, d in zip(chosen, dtypes, strict=True):
      g, p = jnp.asarray(leaves[i], d), jnp.asarray(param_leaves[i], d)
      new_leaves[i] = _unitwise_clip(g, p, clipping, eps).astype(jnp.result_type(leaves[i]))
    return jax.tree.unflatten(treedef, new_leaves), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# optax.adaptive_grad_clip's formulas, op for op (so bit-identical), with the unit norms kept
# in their reduced shape and broadcast by the arithmetic: optax's `jnp.broadcast_to` of the
# norms drops a leaf's sharding under an explicit mesh, and its `jnp.where` then fails.
def _unit_norm(x: jax.Array) -> jax.Array:
  """The norm of each unit of ``x`` (optax's ``unitwise_norm``), ``keepdims``."""
  if jnp.squeeze(x).ndim <= 1:
    axes = None
  else:
    axes = {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}[x.ndim]
  return jnp.sqrt(jnp.sum((x.conj() * x).real, axis=axes, keepdims=True))


def _unitwise_clip(g: jax.Array, p: jax.Array, clipping: float, eps: float) -> jax.Array:
  g_norm = _unit_norm(g)
  max_norm = clipping * jnp.maximum(_unit_norm(p), eps)
  clipped = g * (max_norm / jnp.maximum(g_norm, 1e-6))  # optax's division guard
  return jnp.where(g_norm < max_norm, g, clipped)
