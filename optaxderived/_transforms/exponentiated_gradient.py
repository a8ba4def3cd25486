"""Exponentiated gradient (EGU) and normalised EG on the simplex: multiplicative updates.

``θ ← θ ⊙ exp(−η g)`` keeps positive parameters positive; normalised EG keeps them on the
probability simplex. Neither exists in optax, Keras, TF Addons or PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxderived._core import checks
from optaxderived._core import numerics
from optaxderived._core.paths import tree_paths


class ExponentiatedGradientState(NamedTuple):
  """State of :func:`exponentiated_gradient`.

  Attributes:
    count: number of update calls so far (int32), where a learning-rate schedule is read.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def _log_min_factor(*arrays: Any) -> float:
  """The log of the smallest per-step factor ``θ_new / θ`` that keeps ``θ + u`` positive.

  optax applies an update by addition, ``θ + u``, and the update has the gradient's dtype.
  When the exact factor ``exp(r)`` is below the resolution of either dtype, ``u = θ·exp(r) − θ``
  rounds to ``−θ`` and the sum to exactly 0, an absorbing state for a multiplicative method.
  A floor of ``4·eps`` of the less precise dtype leaves room for the roundings of the product,
  the difference and the cast: the new value is then at least about ``2·eps·θ > 0``. The floor
  is ``4.8e−7·θ`` per step in float32 (``θ/32`` in bfloat16).
  """
  eps = max(float(jnp.finfo(jnp.result_type(x)).eps) for x in arrays)
  return math.log(4.0 * eps)


def _normalize_axes(fn: str, simplex_axis: Any) -> tuple[int, ...] | None:
  """``simplex_axis`` as a tuple of ints (None stays None); ``ValueError`` otherwise."""
  if simplex_axis is None:
    return None
  if isinstance(simplex_axis, jax.core.Tracer):
    raise ValueError(
      f"{fn}: simplex_axis must be static: with optax.inject_hyperparams, pass "
      "static_args=('simplex_axis',)"
    )
  if isinstance(simplex_axis, np.ndarray | jax.Array) and simplex_axis.ndim == 0:
    simplex_axis = simplex_axis.item()  # a concrete 0-d array, as inject_hyperparams gives
  axes = (simplex_axis,) if isinstance(simplex_axis, int | np.integer) else simplex_axis
  try:
    axes = tuple(axes)
  except TypeError:
    axes = (simplex_axis,)
  if not axes or any(isinstance(a, bool) or not isinstance(a, int | np.integer) for a in axes):
    raise ValueError(
      f"{fn}: simplex_axis must be None, an int or a sequence of ints, got {simplex_axis!r}"
    )
  return tuple(int(a) for a in axes)


def _leaf_axes(fn: str, axes: tuple[int, ...], ndim: int, path: str) -> tuple[int, ...]:
  """``axes`` made non-negative for a leaf of ``ndim`` dimensions."""
  resolved = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
        f"{fn}: simplex_axis={a} is out of range for the leaf {path!r} with {ndim} dimension(s)"
      )
    resolved.append(a % ndim)
  if len(set(resolved)) != len(resolved):
    raise ValueError(f"{fn}: simplex_axis repeats an axis of the leaf {path!r}: {axes}")
  return tuple(resolved)


def _check_positive_params(fn: str, params: Any) -> None:
  """A clear error for params that are not strictly positive (concrete params only)."""
  for path, p in zip(jax.tree.leaves(tree_paths(params)), jax.tree.leaves(params), strict=True):
    if isinstance(p, jax.core.Tracer):
      continue
    bad = ~(jnp.asarray(p) > 0)
    if bool(jnp.any(bad)):
      raise ValueError(
        f"{fn}: params must be strictly positive (EG cannot leave zero): the leaf {path!r} "
        f"has {int(jnp.sum(bad))} entries <= 0 or NaN (min {float(jnp.min(p))})"
      )


def exponentiated_gradient(
  learning_rate: optax.ScalarOrSchedule,
  *,
  simplex_axis: int | Sequence[int] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Exponentiated gradient (EGU), or normalised EG on the simplex: a complete optimizer.

  Let :math:`\eta_t` be ``learning_rate`` at step :math:`t` and :math:`g_t` the gradient. For
  positive parameters, EGU is gradient descent on :math:`\phi = \log\theta` with the factor
  :math:`e^{\phi}` dropped (mirror descent with the unnormalised entropy):

  .. math::

    \theta_{t+1} = \theta_t \odot \exp(-\eta_t g_t).

  With ``simplex_axis``, each slice along those axes is kept on the probability simplex
  (mirror descent with the negative entropy, a KL-proximal step), a softmax:

  .. math::

    \theta_{t+1} = \operatorname{softmax}(\log\theta_t - \eta_t g_t)
    = \frac{\theta_t \odot e^{-\eta_t g_t - m}}{\sum_j \theta_{t,j} e^{-\eta_t g_{t,j} - m}},

  with :math:`m` the slice's largest :math:`-\eta_t g_t`, so no exponential overflows and the
  denominator is at least the parameter where that exponent is largest.

  The emitted update is :math:`\theta_t \odot e^{r_t} - \theta_t` with
  :math:`r_t = \log\theta_{t+1} - \log\theta_t` (``-η g`` minus the log-normaliser); as
  with any additive update, the new params carry an absolute rounding error of about
  ``eps·θ_t``, a relative one of ``eps·e^{-r_t}`` where a step shrinks a parameter a lot.

  Params must be strictly positive (zero is absorbing): ``init`` raises ``ValueError`` for a
  leaf with an entry :math:`\le 0` (when the params are concrete, i.e. not under ``jit``).
  With ``simplex_axis`` the first step normalises the slices, so they need not sum to one at
  ``init``. Because optax adds updates, ``θ + u`` cannot represent a factor below the
  resolution of the dtypes; the factor :math:`e^{r}` is therefore floored at ``4·eps`` of the
  less precise of the param and gradient dtypes (4.8e-7 in float32, 1/32 in bfloat16), so
  that one huge step cannot round a parameter to exactly 0, and the new params are floored at
  the smallest normal number of their dtype, so that many steps cannot underflow to 0. The
  first step from slices summing to much more than ``1/(4·eps)`` (32 in bfloat16) shrinks
  some entries by more than the floor allows and can still round them to 0: normalise such
  params before training.

  Args:
    learning_rate: :math:`\eta > 0`, a float or a schedule of the number of update calls.
    simplex_axis: ``None`` (EGU), or an axis or axes of every leaf along which the params
      are a probability vector (``-1``: each row of a matrix sums to one; ``(0, 1)``: the
      whole matrix does). Apply it to some leaves only with ``od.transform_by_path`` or
      ``optax.partition``. It is static: under ``optax.inject_hyperparams`` pass
      ``static_args=("simplex_axis",)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> tx = od.exponentiated_gradient(0.1)
    >>> params = jnp.array([0.5, 2.0])
    >>> updates, state = tx.update(jnp.array([1.0, -1.0]), tx.init(params), params)
    >>> optax.apply_updates(params, updates)
    Array([0.4524187, 2.210342 ], dtype=float32)
    >>> tx = od.exponentiated_gradient(0.1, simplex_axis=-1)
    >>> params = jnp.array([0.5, 0.5])
    >>> updates, state = tx.update(jnp.array([1.0, 0.0]), tx.init(params), params)
    >>> optax.apply_updates(params, updates)
    Array([0.4750208, 0.5249792], dtype=float32)

  References:
    Kivinen and Warmuth, `Exponentiated Gradient versus Gradient Descent for Linear
    Predictors <https://doi.org/10.1006/inco.1996.2612>`_, 1997 (EGU and normalised EG).

    Su, `Exponentiated gradient descent + meta-learning = adaptive learning rate
    <https://kexue.fm/archives/8968>`_, 2022 (EGU as descent on :math:`\log\theta`).

  Neither optax nor Keras nor PyTorch ships EG; the nearest optax tools are
  ``optax.keep_params_nonnegative`` and ``optax.projections.projection_simplex`` (projected
  gradient descent, which lands on the simplex's faces where EG stays inside).
  """
  fn = "od.exponentiated_gradient"
  checks.check_positive(fn, "learning_rate", learning_rate, finite=True)
  axes = _normalize_axes(fn, simplex_axis)

  def init_fn(params):
    _check_positive_params(fn, params)
    if axes is not None:
      for path, p in zip(
        jax.tree.leaves(tree_paths(params)), jax.tree.leaves(params), strict=True
      ):
        _leaf_axes(fn, axes, jnp.ndim(p), path)
    return ExponentiatedGradientState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    checks.require_params(params, fn)
    checks.check_same_tree(fn, updates, params, "params")
    lr = numerics.value_at(learning_rate, state.count)

    def leaf(g, p):
      dtype = numerics.wide_dtype(jnp.result_type(g), jnp.result_type(p))
      p32 = p.astype(dtype)
      r = -jnp.asarray(lr, dtype) * g.astype(dtype)
      r_min = _log_min_factor(g, p)
      if axes is not None:
        # softmax(log θ + r) = θ·e^{r−m} / Σ θ·e^{r−m}, with m the slice's largest r: no exp
        # overflows, the sum is at least the θ at the largest r, and one exp per entry
        # instead of the four (a log and three exps) of the log-space form.
        leaf_axes = tuple(a % p.ndim for a in axes)

        def normalise(x):  # the floor keeps 0/0 out when every product underflows
          total = jnp.sum(p32 * x, axis=leaf_axes, keepdims=True)
          return x / jnp.maximum(total, jnp.finfo(dtype).tiny)

        e = jnp.exp(r - jnp.max(r, axis=leaf_axes, keepdims=True, initial=-jnp.inf))
        factor = jnp.maximum(normalise(e), math.exp(r_min))
        # the floor may add mass: normalise once more so the slices stay on the simplex
        factor = normalise(factor)
      else:
        # exp, not expm1: the params get the same rounding (θ + u is rounded at θ's scale)
        # and XLA's expm1 on CPU is twice as slow, which made the step compute-bound.
        factor = jnp.exp(jnp.maximum(r, r_min))
      # The relative floor cannot stop underflow: after many shrinking steps the product
      # would reach 0, absorbing (and 0/0 on the simplex); the params' smallest normal can't.
      new = jnp.maximum(p32 * factor, jnp.finfo(p.dtype).tiny)
      return (new - p32).astype(g.dtype)

    updates = jax.tree.map(leaf, updates, params)
    return updates, ExponentiatedGradientState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
