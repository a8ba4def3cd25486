"""Hard and soft norm clipping, over the whole tree, each leaf or each row."""

from __future__ import annotations

from typing import Literal
from typing import NamedTuple
from typing import get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxderived._core import checks
from optaxderived._core import numerics

Scope = Literal["global", "leaf", "row"]


class ClipNormState(NamedTuple):
  """State of :func:`clip_norm`, for logging (``optax.tree.get(state, "norm")``).

  Attributes:
    norm: the global L2 norm of the last incoming updates, before clipping, whatever the
      scope (float32: with float64 updates, a norm beyond the float32 range reads inf).
    clipped_fraction: the share of units (the tree, its leaves or its rows, per ``scope``)
      whose factor was < 1 at the last call (float32): the units with ``‖g‖ > γ`` for hard
      clipping, every non-zero unit for soft clipping.
    count: the number of update calls so far (int32); a ``max_norm`` schedule is evaluated
      at it.
  """

  norm: jax.Array
  clipped_fraction: jax.Array
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def clip_norm(
  max_norm: optax.ScalarOrSchedule,
  *,
  soft: bool = False,
  scope: Scope = "global",
) -> optax.GradientTransformationExtraArgs:
  r"""Clips updates by their L2 norm, hard or soft, over the tree, each leaf or each row.

  With :math:`\gamma` the ``max_norm`` and :math:`\|g\|` the L2 norm of a *unit* of the
  incoming updates (the whole tree, each leaf, or each row of axis 0 of each leaf):

  .. math::

    \text{hard:}\quad g \leftarrow g\,\min\Big(1, \frac{\gamma}{\|g\|}\Big), \qquad
    \text{soft:}\quad g \leftarrow g\,\frac{\gamma}{\|g\| + \gamma}.

  Both cap a unit's norm at :math:`\gamma` and bound each other,
  :math:`\tfrac12\min(1, \gamma/\|g\|) \le \gamma/(\|g\|+\gamma) \le \min(1, \gamma/\|g\|)`.
  The soft form is the optimal gradient step under :math:`(L_0, L_1)`-smoothness
  (:math:`\|\nabla^2 f\| \le L_0 + L_1\|\nabla f\|`): with a learning rate
  :math:`\eta = 1/L_0` after it and :math:`\gamma = L_0/L_1`, the step is
  :math:`\eta^* = 1/(L_0 + L_1\|\nabla f\|)`. Unlike the hard form, it also shrinks small
  gradients (by :math:`\gamma/(\|g\|+\gamma)`).

  ``scope="global"`` uses one norm over all leaves (hard global clipping is
  ``optax.clip_by_global_norm``); ``"leaf"`` each leaf's own L2 norm (Keras' ``clipnorm``;
  optax only has the RMS form, ``clip_by_block_rms``); ``"row"`` each row of axis 0 of each
  leaf (an embedding table row, a kernel's input unit), with leaves of ``ndim <= 1`` taken as
  a whole. Norms are accumulated in float32 (or wider) whatever the updates' dtype, and the
  updates keep their dtype.

  The state records, for logging, the global norm of the incoming updates and the share of
  units whose factor was < 1: read them with ``optax.tree.get(state, "norm")`` and
  ``optax.tree.get(state, "clipped_fraction")`` from any optimizer state that holds this
  one, instead of splitting the chain to compute the norm twice.

  Non-finite gradients are never silently zeroed. A NaN entry makes its unit's norm NaN, so
  the factor and the whole unit become NaN (the whole tree for ``scope="global"``, as in
  ``optax.clip_by_global_norm``). An infinite entry makes its unit's norm infinite and the
  factor 0, so the infinite entries become NaN (``inf·0``). Either way the updates are
  non-finite, which ``optax.apply_if_finite`` catches. Finite gradients whose sum of squares
  overflows float32 still get their exact (finite) norm: the norm is then recomputed from
  rescaled values. ``max_norm=inf`` disables clipping.

  Args:
    max_norm: :math:`\gamma > 0`, a float or a schedule of the number of update calls
      (0 at the first call).
    soft: soft clipping :math:`\gamma/(\|g\|+\gamma)` instead of hard
      :math:`\min(1, \gamma/\|g\|)`. A Python bool (static, also under
      ``optax.inject_hyperparams``), or a boolean array to choose at run time (an injected
      hyperparameter when passed as ``jnp.asarray(True)``).
    scope: ``"global"``, ``"leaf"`` or ``"row"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`ClipNormState`.

  Raises:
    ValueError: for ``max_norm <= 0`` (or NaN), an unknown ``scope``, or a ``soft`` that is
      not a bool.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> tx = od.clip_norm(1.0, soft=True)
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> updates["w"]
    Array([0.5      , 0.6666667], dtype=float32)
    >>> optax.tree.get(state, "norm"), optax.tree.get(state, "clipped_fraction")
    (Array(5., dtype=float32), Array(1., dtype=float32))
    >>> tx = optax.chain(od.clip_norm(1.0, scope="row"), optax.adam(1e-3))
    >>> rows = {"embed": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
    >>> updates, state = tx.update(rows, tx.init(rows))
    >>> optax.tree.get(state, "clipped_fraction")  # one of the two rows was clipped
    Array(0.5, dtype=float32)

  References:
    Su, `Gradient clipping: two forms and (L0, L1)-smoothness
    <https://kexue.fm/archives/7469>`_, 2020 (the soft form and its optimality).

    Zhang, He, Sra, Jadbabaie, `Why gradient clipping accelerates training: a theoretical
    justification for adaptivity <https://arxiv.org/abs/1905.11881>`_, ICLR 2020.

    Pascanu, Mikolov, Bengio, `On the difficulty of training recurrent neural networks
    <https://arxiv.org/abs/1211.5063>`_, 2013 (hard global clipping).
  """
  checks.check_positive("od.clip_norm", "max_norm", max_norm)
  checks.check_choice("od.clip_norm", "scope", scope, get_args(Scope))
  if not (isinstance(soft, jax.Array | np.ndarray) and np.shape(soft) == ()):
    checks.check_bool("od.clip_norm", "soft", soft)  # a 0-d array: optax.inject_hyperparams

  def init_fn(params):
    del params
    return ClipNormState(
      norm=jnp.zeros([], jnp.float32),
      clipped_fraction=jnp.zeros([], jnp.float32),
      count=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    gamma = numerics.value_at(max_norm, state.count)
    leaves, treedef = jax.tree.flatten(updates)
    if not leaves:  # nothing to clip: a zero norm
      return updates, init_fn(None)._replace(count=optax.safe_increment(state.count))
    norms, global_norm = numerics.unit_norms(leaves, scope)

    def factor_and_clipped(n):
      # One rounding each; a NaN norm gives a NaN factor and gamma = inf a factor of 1 (the
      # inner where never divides by a norm that is not clipped, such as 0).
      over = n > gamma
      hard = jnp.where(over, gamma / jnp.where(over, n, 1), 1), over
      soft_ = jnp.where(jnp.isinf(gamma), 1, gamma / (n + gamma)), (n > 0) & ~jnp.isinf(gamma)
      hard = jnp.where(jnp.isnan(n), n, hard[0]), hard[1]
      soft_ = jnp.where(jnp.isnan(n), n, soft_[0]), soft_[1]
      if isinstance(soft, bool | np.bool_):
        return soft_ if soft else hard
      flag = jnp.asarray(soft).astype(bool)
      return jnp.where(flag, soft_[0], hard[0]), jnp.where(flag, soft_[1], hard[1])

    factors, clipped = zip(*(factor_and_clipped(n) for n in norms), strict=True)
    if scope == "global":
      factors = factors * len(leaves)
    new_leaves = []
    for x, f in zip(leaves, factors, strict=True):
      if f.ndim:  # a vector of row factors
        f = f.reshape(f.shape + (1,) * (x.ndim - 1))
      new_leaves.append((numerics.wide(x) * f).astype(x.dtype))
    num_units = sum(int(np.prod(c.shape)) for c in clipped)
    fraction = sum(jnp.sum(c, dtype=jnp.float32) for c in clipped) / max(num_units, 1)
    new_state = ClipNormState(
      norm=global_norm.astype(jnp.float32),
      clipped_fraction=jnp.asarray(fraction, jnp.float32),
      count=optax.safe_increment(state.count),
    )
    return jax.tree.unflatten(treedef, new_leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
