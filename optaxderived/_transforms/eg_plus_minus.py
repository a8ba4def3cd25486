"""EG± for signed weights: the params are the difference ``u − v`` of two positive parts.

Both parts take exponentiated gradient steps in the optimizer state, optionally normalised to
a fixed total mass (Kivinen and Warmuth). Not in optax, Keras, TF Addons or PyTorch.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxderived._core import checks
from optaxderived._core import numerics


class EGPlusMinusState(NamedTuple):
  """State of :func:`eg_plus_minus`: the signed weights are ``θ = u − v``.

  Attributes:
    count: number of update calls so far (int32), where a learning-rate schedule is read.
    u: the positive part, shaped like the params (at least float32).
    v: the negative part, shaped like the params (at least float32).
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  u: Any
  v: Any


def eg_plus_minus(
  learning_rate: optax.ScalarOrSchedule,
  *,
  total_mass: float | None = None,
  init_scale: float = 1e-2,
  accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""EG± for signed weights: :math:`\theta = u - v` with :math:`u, v > 0` in the state.

  Let :math:`\eta_t` be ``learning_rate`` and :math:`g_t` the gradient with respect to
  :math:`\theta`. Unnormalised (``total_mass=None``):

  .. math::

    u_{t+1} = u_t \odot e^{-\eta_t g_t}, \qquad v_{t+1} = v_t \odot e^{+\eta_t g_t},
    \qquad u_0 = \max(\theta_0, 0) + s, \quad v_0 = \max(-\theta_0, 0) + s,

  with :math:`s` = ``init_scale``. Kivinen–Warmuth normalised to the total mass :math:`U`
  (``total_mass``) over the whole tree, with :math:`r = e^{-\eta_t g_t}`:

  .. math::

    Z = \sum_j \left(u_j r_j + v_j / r_j\right), \qquad
    u_{t+1} = U\, u_t \odot r / Z, \qquad v_{t+1} = U\, v_t / (r Z),

  computed in log space, so :math:`\sum (u + v) = U` at every step, up to rounding (and
  :math:`\|\theta\|_1 < U`). There :math:`s = (U - \|\theta_0\|_1) / (2n)` (:math:`n` the
  number of entries) makes :math:`\sum(u_0 + v_0) = U`, and ``init_scale`` is not used.

  The emitted update moves the params to :math:`u_{t+1} - v_{t+1}`
  (``u_new − v_new − params``), so params in a low-precision dtype do not drift from the
  state: use it as the complete optimizer, with only gradient transformations before it.

  Args:
    learning_rate: :math:`\eta > 0`, a float or a schedule of the number of update calls.
    total_mass: ``None`` (unnormalised) or :math:`U > 0`; ``init`` raises ``ValueError``
      when :math:`\|\theta_0\|_1 \ge U` (for concrete params).
    init_scale: :math:`s > 0`, the mass added to both parts at ``init`` (unnormalised only).
    accumulator_dtype: dtype of ``u`` and ``v`` (default: the param dtype promoted to at
      least float32, since :math:`\theta = u - v` cancels).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> tx = od.eg_plus_minus(0.1, init_scale=1.0)
    >>> params = jnp.zeros(2)
    >>> updates, state = tx.update(jnp.array([0.5, -0.5]), tx.init(params), params)
    >>> optax.apply_updates(params, updates)
    Array([-0.100042,  0.100042], dtype=float32)
    >>> state.u
    Array([0.95122945, 1.0512711 ], dtype=float32)

  References:
    Kivinen and Warmuth, `Exponentiated Gradient versus Gradient Descent for Linear
    Predictors <https://doi.org/10.1006/inco.1996.2612>`_, 1997 (EG± and its normalised
    form).

  Not in optax, Keras or PyTorch. The third-party PyTorch ``EGPM`` keeps the pair as the
  model's weights; here params stay one plain signed array and the pair lives in the state.
  """
  fn = "od.eg_plus_minus"
  checks.check_positive(fn, "learning_rate", learning_rate, finite=True)
  if total_mass is not None:
    checks.check_positive(fn, "total_mass", total_mass, finite=True)
  checks.check_positive(fn, "init_scale", init_scale, finite=True)
  if accumulator_dtype is not None:
    accumulator_dtype = checks.check_float_dtype(fn, "accumulator_dtype", accumulator_dtype)

  def acc_dtype(p):
    if accumulator_dtype is not None:
      return jnp.dtype(accumulator_dtype)
    return numerics.wide_dtype(jnp.result_type(p))

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    if total_mass is None:
      scale: Any = init_scale
    else:
      l1 = sum(jnp.sum(jnp.abs(p.astype(acc_dtype(p)))) for p in leaves)
      n = sum(int(np.prod(jnp.shape(p))) for p in leaves)
      traced = isinstance(l1, jax.core.Tracer) or isinstance(total_mass, jax.core.Tracer)
      if not traced and not float(l1) < float(total_mass):
        raise ValueError(
          f"{fn}: the params' L1 norm {float(l1)} must be below "
          f"total_mass={total_mass!r} (Σ(u + v) = total_mass and |θ| ≤ u + v)"
        )
      scale = (total_mass - l1) / (2 * max(n, 1))
      scale = jnp.where(scale > 0, scale, jnp.nan)  # under jit: NaN instead of a ValueError
    # Widened before adding the scale, so that u0 - v0 is exactly the params (bf16 included).
    u = jax.tree.map(lambda p: jnp.maximum(p.astype(acc_dtype(p)), 0) + scale, params)
    v = jax.tree.map(lambda p: jnp.maximum(-p.astype(acc_dtype(p)), 0) + scale, params)
    return EGPlusMinusState(count=jnp.zeros([], jnp.int32), u=u, v=v)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    checks.require_params(params, fn)
    checks.check_same_tree(fn, updates, params, "params")
    lr = numerics.value_at(learning_rate, state.count)
    exponent = jax.tree.map(
      lambda g, u: jnp.asarray(lr, u.dtype) * g.astype(u.dtype), updates, state.u
    )
    if total_mass is None or not jax.tree.leaves(state.u):  # (an empty tree: nothing to do)
      u = jax.tree.map(lambda u, e: u * jnp.exp(-e), state.u, exponent)
      v = jax.tree.map(lambda v, e: v * jnp.exp(e), state.v, exponent)
    else:
      log_u = jax.tree.map(lambda u, e: jnp.log(u) - e, state.u, exponent)
      log_v = jax.tree.map(lambda v, e: jnp.log(v) + e, state.v, exponent)
      per_leaf = [jax.nn.logsumexp(x) for x in jax.tree.leaves((log_u, log_v))]
      log_z = jax.nn.logsumexp(jnp.stack(per_leaf))
      shift = jnp.log(jnp.asarray(total_mass, log_z.dtype)) - log_z
      u = jax.tree.map(lambda x, u: jnp.exp(x + shift.astype(u.dtype)), log_u, state.u)
      v = jax.tree.map(lambda x, v: jnp.exp(x + shift.astype(v.dtype)), log_v, state.v)
    new_updates = jax.tree.map(
      lambda g, p, u, v: (u - v - p.astype(u.dtype)).astype(g.dtype), updates, params, u, v
    )
    return new_updates, EGPlusMinusState(count=optax.safe_increment(state.count), u=u, v=v)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
