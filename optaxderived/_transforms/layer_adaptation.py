"""Layer adaptation: the LAMB trust ratio, without a clamp, with path exclusions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import checks
from optaxderived._core import numerics
from optaxderived._core import paths


def layer_adaptation(
  *, exclude: paths.Patterns = (), strict: bool = False
) -> optax.GradientTransformationExtraArgs:
  r"""Layer adaptation: rescales each leaf's update to the norm of its parameter.

  Per leaf (a "layer" is one parameter tensor), with Frobenius norms:

  .. math::

    u \leftarrow \frac{\lVert\theta\rVert}{\lVert u\rVert}\, u
    \qquad (\text{ratio } 1 \text{ when } \lVert\theta\rVert = 0 \text{ or } \lVert u\rVert = 0)

  so after the learning-rate scaling each layer moves by :math:`\eta\lVert\theta\rVert`: only
  the direction comes from the base optimizer. This is LAMB's trust ratio without a clamp
  (``optax.scale_by_trust_ratio()``, with the norms in at least float32, each reduced once),
  with what ``optax.lamb`` lacks:
  ``exclude`` patterns for the leaves (LayerNorm scales, biases) that pass unchanged. Place it
  after the base optimizer and weight decay, before the learning rate. As in optax, the
  norms are plain float32 (or wider) sums of squares: a leaf whose squares overflow (entries
  beyond about 1e19) gets a ratio of 0, and one whose squares all underflow a ratio of 1.

  Args:
    exclude: patterns of leaves left unchanged: regexes searched in the leaf paths, or a
      predicate ``(path, leaf) -> bool`` such as ``lambda path, p: p.ndim < 2``.
    strict: raise ``ValueError`` at ``init`` instead of warning when a pattern of
      ``exclude`` matches no leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> params = {"w": jnp.array([3.0, 4.0]), "bias": jnp.array([1.0])}
    >>> tx = optax.chain(od.layer_adaptation(exclude="bias"), optax.sgd(0.01))
    >>> grads = {"w": jnp.array([0.1, -0.2]), "bias": jnp.array([0.5])}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"].round(4)  # moved by 0.01 * ||w|| = 0.05
    Array([2.9776, 4.0447], dtype=float32)

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in 76 minutes
    <https://arxiv.org/abs/1904.00962>`_, 2020.
  """
  checks.check_bool("od.layer_adaptation", "strict", strict)
  excluded = paths.selector(exclude, argname="od.layer_adaptation: exclude", strict=strict)

  def scale(u, p):
    # Plain norms rather than optax.safe_norm (which scale_by_trust_ratio uses): safe_norm
    # reduces each array twice, through a materialised copy, to keep its *gradient* finite at
    # 0, and nothing differentiates an optimizer step (it made od.derive 3.2x adamw, not 2.3x).
    p_norm = jnp.sqrt(numerics.sum_of_squares(p))
    u_norm = jnp.sqrt(numerics.sum_of_squares(u))
    ratio = jnp.where((p_norm == 0) | (u_norm == 0), 1, p_norm / u_norm)
    return (ratio * u).astype(u.dtype)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    checks.require_params(params, "od.layer_adaptation")
    checks.check_same_tree("od.layer_adaptation", updates, params, "params")
    updates = jax.tree.map(
      lambda u, p, skip: u if skip else scale(u, p), updates, params, excluded.mask(updates)
    )
    return updates, state

  def init_fn(params):
    excluded.check_used(params)
    return optax.EmptyState()

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
