"""Exponentiated gradient: EG (EGU), normalised EG on the simplex, EG±, EG step-size adaptation.

Multiplicative updates ``θ ← θ ⊙ exp(−η g)`` keep positive parameters positive; normalised EG
keeps them on the probability simplex; EG± writes signed weights as a difference of two
positive ones. :func:`eg_step_size` learns multiplicative gains on any optimizer's updates with
the same rule. None of this exists in optax, Keras, TF Addons or PyTorch.
"""

import math
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxderived._core import checks
from optaxderived._core.paths import tree_paths

_FN = "od.exponentiated"  # TODO(split): name each public function

_GRANULARITIES = ("global", "leaf", "element")


class ExponentiatedGradientState(NamedTuple):
  """State of :func:`exponentiated_gradient`.

  Attributes:
    count: number of update calls so far (int32), where a learning-rate schedule is read.
  """

  count: jax.Array


class EGPlusMinusState(NamedTuple):
  """State of :func:`eg_plus_minus`: the signed weights are ``θ = u − v``.

  Attributes:
    count: number of update calls so far (int32), where a learning-rate schedule is read.
    u: the positive part, shaped like the params (at least float32).
    v: the negative part, shaped like the params (at least float32).
  """

  count: jax.Array
  u: Any
  v: Any


class EGStepSizeState(NamedTuple):
  """State of :func:`eg_step_size`.

  Attributes:
    count: number of update calls so far (int32), where a meta-learning-rate schedule is read.
    gains: the multiplicative gains (at least float32): one scalar (``"global"``), a scalar per
      leaf (``"leaf"``) or an array shaped like each leaf (``"element"``).
    prev_updates: the previous update emitted (the gains times the inner update; zeros at
      first). The inner update :math:`u_{t-1}` of the rule is ``prev_updates / gains``.
    inner_state: the inner optimizer's state.
  """

  count: jax.Array
  gains: Any
  prev_updates: Any
  inner_state: Any


# ---------------------------------------------------------------------------------------------
# Helpers.


def _value(hyper: Any, count: jax.Array) -> Any:
  """A hyperparameter at the current step: schedules are read at ``count``."""
  return hyper(count) if callable(hyper) else hyper


def _compute_dtype(*arrays: Any) -> Any:
  """The dtype EG computes in: the arrays' promoted dtype, at least float32."""
  return jnp.result_type(jnp.float32, *(jnp.result_type(x) for x in arrays))


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


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


def _normalize_axes(simplex_axis: Any) -> tuple[int, ...] | None:
  if simplex_axis is None:
    return None
  if isinstance(simplex_axis, jax.core.Tracer):
    raise ValueError(
      "simplex_axis must be static: with optax.inject_hyperparams, pass "
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
      f"simplex_axis must be None, an int or a sequence of ints, got {simplex_axis!r}"
    )
  return tuple(int(a) for a in axes)


def _leaf_axes(axes: tuple[int, ...], ndim: int, path: str) -> tuple[int, ...]:
  """``axes`` made non-negative for a leaf of ``ndim`` dimensions."""
  resolved = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
        f"simplex_axis={a} is out of range for the leaf {path!r} with {ndim} dimension(s)"
      )
    resolved.append(a % ndim)
  if len(set(resolved)) != len(resolved):
    raise ValueError(f"simplex_axis repeats an axis of the leaf {path!r}: {axes}")
  return tuple(resolved)


def _check_positive_params(params: Any, name: str) -> None:
  """A clear error for params that are not strictly positive (concrete params only)."""
  for path, p in zip(jax.tree.leaves(tree_paths(params)), jax.tree.leaves(params), strict=True):
    if not _is_concrete(p):
      continue
    bad = ~(jnp.asarray(p) > 0)
    if bool(jnp.any(bad)):
      raise ValueError(
        f"{name} needs strictly positive params (EG cannot leave zero): the leaf {path!r} "
        f"has {int(jnp.sum(bad))} entries <= 0 or NaN (min {float(jnp.min(p))})"
      )


# ---------------------------------------------------------------------------------------------
# EG and normalised EG.


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
  checks.check_positive(_FN, "learning_rate", learning_rate, finite=True)
  axes = _normalize_axes(simplex_axis)

  def init_fn(params):
    _check_positive_params(params, "exponentiated_gradient")
    if axes is not None:
      for path, p in zip(
        jax.tree.leaves(tree_paths(params)), jax.tree.leaves(params), strict=True
      ):
        _leaf_axes(axes, jnp.ndim(p), path)
    return ExponentiatedGradientState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    checks.require_params(params, "exponentiated_gradient")
    checks.check_same_tree("exponentiated_gradient", updates, params, "params")
    lr = _value(learning_rate, state.count)

    def leaf(g, p):
      dtype = _compute_dtype(g, p)
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


# ---------------------------------------------------------------------------------------------
# EG±.


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
  checks.check_positive(_FN, "learning_rate", learning_rate, finite=True)
  if total_mass is not None:
    checks.check_positive(_FN, "total_mass", total_mass, finite=True)
  checks.check_positive(_FN, "init_scale", init_scale, finite=True)
  if accumulator_dtype is not None:
    accumulator_dtype = checks.check_float_dtype(_FN, "accumulator_dtype", accumulator_dtype)

  def acc_dtype(p):
    if accumulator_dtype is not None:
      return jnp.dtype(accumulator_dtype)
    return _compute_dtype(p)

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    if total_mass is None:
      scale = init_scale
    else:
      l1 = sum(jnp.sum(jnp.abs(p.astype(acc_dtype(p)))) for p in leaves)
      n = sum(int(np.prod(jnp.shape(p))) for p in leaves)
      if _is_concrete(l1) and _is_concrete(total_mass) and not float(l1) < float(total_mass):
        raise ValueError(
          f"eg_plus_minus: the params' L1 norm {float(l1)} must be below "
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
    checks.require_params(params, "eg_plus_minus")
    checks.check_same_tree("eg_plus_minus", updates, params, "params")
    lr = _value(learning_rate, state.count)
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


# ---------------------------------------------------------------------------------------------
# EG step-size adaptation.


def _check_bounds(bounds: Any) -> tuple[float, float]:
  try:
    low, high = (float(b) for b in bounds)
  except (TypeError, ValueError):
    raise ValueError(f"bounds must be a pair (low, high) of floats, got {bounds!r}") from None
  if not 0 <= low <= high or math.isnan(high):
    raise ValueError(f"bounds must satisfy 0 <= low <= high, got {bounds!r}")
  return low, high


def eg_step_size(
  inner: optax.GradientTransformation,
  meta_learning_rate: optax.ScalarOrSchedule,
  *,
  granularity: str = "leaf",
  normalize: bool = True,
  max_exponent: float = 1.0,
  bounds: tuple[float, float] = (1e-3, 1e3),
) -> optax.GradientTransformationExtraArgs:
  r"""Step-size adaptation by exponentiated gradient: multiplicative gains on any optimizer.

  Let :math:`u_t` be the update of ``inner`` at step :math:`t` (before the gains),
  :math:`g_t` the incoming gradient, :math:`\gamma` = ``meta_learning_rate``, :math:`c` =
  ``max_exponent`` and :math:`[s_{\min}, s_{\max}]` = ``bounds``. Since
  :math:`\theta_t = \theta_{t-1} + s \odot u_{t-1}`, the gradient of the loss with respect
  to the gains is :math:`u_{t-1} \odot g_t`, and the gains take an EG step on it:

  .. math::

    e_t = \operatorname{clip}\!\left(\gamma\,
      \frac{R(u_{t-1} \odot (-g_t))}{\|u_{t-1}\|\,\|g_t\|}, -c, c\right), \qquad
    s_t = \operatorname{clip}\!\left(s_{t-1} \odot e^{e_t}, s_{\min}, s_{\max}\right), \qquad
    \Delta\theta_t = s_t \odot u_t,

  where :math:`R` sums over the ``granularity`` (``"global"``: all leaves, one gain;
  ``"leaf"``: each leaf, a gain per leaf; ``"element"``: nothing, a gain per entry) and the
  norms are taken over the same reduction, so the fraction is the cosine of the previous
  inner update and the current negative gradient (per element it is
  :math:`\operatorname{sign}(u_{t-1})\operatorname{sign}(-g_t)`). With ``normalize=False`` the
  fraction is the raw sum :math:`R(u_{t-1} \odot (-g_t))`. Gains start at 1; the first step
  (no previous update), a zero norm and a NaN exponent (from overflowing products) give
  :math:`e_t = 0`.

  With ``normalize=False, granularity="element"`` and ``inner = optax.sgd(η)`` this is the
  reference algorithm :math:`\nu_{t+1} = \nu_t \odot \exp(\gamma' g_{t-1} \odot g_t)`,
  :math:`\theta_{t+1} = \theta_t - \eta \nu_{t+1} \odot g_t` with :math:`\gamma' = \gamma\eta`
  (pass ``max_exponent=math.inf, bounds=(0, math.inf)`` to drop the safeguards too). The
  safeguards matter: the raw product has units of gradient², so one large gradient gives an
  exponent of −900 and the reference gain underflows to 0 for ever (the reference later
  turns it into NaN, 0·e^{+∞}; here a gain that reached 0 stays 0). The clipped exponent and
  the bounds keep every gain in :math:`[s_{\min}, s_{\max}]` whatever the gradients, even
  infinite or NaN ones.

  The state keeps the previous emitted update :math:`s_{t-1} \odot u_{t-1}` (one param-shaped
  tree, plus the gains for ``"element"``) and recovers :math:`u_{t-1}` by dividing by the
  gains; a step costs three reductions more than ``inner`` for ``"leaf"`` and ``"global"``.

  Gains compose by nesting: ``eg_step_size(eg_step_size(inner, γ, granularity="element"),
  γ, granularity="global")`` is the global × per-coordinate scheme of Amid et al. (the outer
  wrapper's previous update is the inner gains times the inner update, which is the exact
  meta-gradient of its scalar). The gains scale the inner *additive* update: around an
  optimizer that keeps params positive through the form of its update
  (:func:`exponentiated_gradient`), a gain above 1 can push a param below 0.

  Args:
    inner: the optimizer whose updates are scaled (its learning rate included).
    meta_learning_rate: :math:`\gamma \ge 0`, a float or a schedule of the number of update
      calls; 0 keeps the gains at 1 (the inner optimizer, clipped to ``bounds``).
    granularity: ``"global"``, ``"leaf"`` or ``"element"``.
    normalize: divide by the norms (the cosine); ``False`` is the unnormalised reference.
    max_exponent: :math:`c > 0` (``math.inf``: no clipping), the largest log-change of a
      gain in one step.
    bounds: :math:`(s_{\min}, s_{\max})` with :math:`0 \le s_{\min} \le s_{\max}`
      (``math.inf`` allowed).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra keyword arguments go to ``inner``.

  Example:
    >>> tx = od.eg_step_size(optax.sgd(0.1), 1.0, granularity="element")
    >>> params = jnp.array([1.0, 1.0])
    >>> state = tx.init(params)
    >>> for g in ([1.0, 1.0], [1.0, -1.0]):  # same sign, then opposite signs
    ...   updates, state = tx.update(jnp.array(g), state, params)
    >>> state.gains  # exp(+1), exp(-1)
    Array([2.7182817 , 0.36787945], dtype=float32)
    >>> updates
    Array([-0.27182817,  0.03678795], dtype=float32)

  References:
    Su, `Exponentiated gradient descent + meta-learning = adaptive learning rate
    <https://kexue.fm/archives/8968>`_, 2022 (the per-coordinate rule, unnormalised).

    Amid, Anil, Fifty and Warmuth, `Step-size Adaptation Using Exponentiated Gradient Updates
    <https://arxiv.org/abs/2202.00145>`_, 2022 (global and per-coordinate gains,
    normalised).

  Nothing like it ships in optax, Keras or PyTorch; the nearest are additive hypergradient
  methods (``SGDHD``, ``AdamHD``) and optax's learning-rate-free methods (``polyak_sgd``,
  ``contrib.prodigy``, ``contrib.dog``).
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise ValueError(f"inner must be an optax.GradientTransformation, got {inner!r}")
  checks.check_range(_FN, "meta_learning_rate", meta_learning_rate, low=0.0)
  checks.check_choice(_FN, "granularity", granularity, _GRANULARITIES)
  if not isinstance(normalize, bool | np.bool_):
    raise ValueError(f"normalize must be a bool, got {normalize!r}")
  checks.check_range(_FN, "max_exponent", max_exponent, low=0.0, low_open=True)
  low, high = _check_bounds(bounds)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    if granularity == "element":
      gains = jax.tree.map(lambda p: jnp.ones_like(p, dtype=_compute_dtype(p)), params)
    elif granularity == "leaf":
      gains = jax.tree.map(lambda p: jnp.ones([], _compute_dtype(p)), params)
    else:
      gains = jnp.ones([], _compute_dtype(*jax.tree.leaves(params)))
    return EGStepSizeState(
      count=jnp.zeros([], jnp.int32),
      gains=gains,
      prev_updates=optax.tree.zeros_like(params),
      inner_state=inner.init(params),
    )

  # The state keeps the previous *emitted* update d = s_prev * u_prev (what was added to the
  # params), not u_prev itself: then the new update is materialised once, as both the output
  # and the next state, and XLA needs no copy of the donated state buffer. The meta-gradient
  # needs u_prev = d / s_prev: a positive scalar gain cancels from the cosine, and the
  # unnormalised sum is divided by it (s_prev = 0, possible only with bounds[0] = 0, gives a
  # zero d, exponent 0, and the gain stays 0 as in the reference).

  def clip_exponent(e):
    e = jnp.where(jnp.isnan(e), 0, e)
    return jnp.clip(e, -jnp.asarray(max_exponent, e.dtype), jnp.asarray(max_exponent, e.dtype))

  def leaf_sums(d, g, dtype):
    """Σ d·(−g), Σ d², Σ g² over one leaf, accumulated in ``dtype``."""
    d = d.astype(dtype)
    # The barrier keeps XLA from sharing g² with the inner optimizer (Adam's second moment),
    # which made it materialise g² as an extra param-sized array on CPU.
    g = jax.lax.optimization_barrier(g).astype(dtype)
    dot = -jnp.sum(d * g)
    if not normalize:
      return dot, None, None
    return dot, jnp.sum(d * d), jnp.sum(g * g)

  def reduced_gain(gain, dot, dd, gg, gamma):
    if normalize:  # the cosine: s_prev cancels
      denom = jnp.sqrt(dd) * jnp.sqrt(gg)
      frac = jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1), 0)
    else:
      frac = dot / gain
    e = clip_exponent(jnp.asarray(gamma, gain.dtype) * frac)
    return jnp.clip(gain * jnp.exp(e), low, high)

  def element_gain(gain, d, g, gamma):
    d, ng = d.astype(gain.dtype), -g.astype(gain.dtype)
    if normalize:  # e = ±γ or 0 (the sign of the product), clipped: three possible factors
      c = clip_exponent(jnp.asarray(gamma, gain.dtype))
      product = d * ng
      factor = jnp.where(product > 0, jnp.exp(c), jnp.where(product < 0, jnp.exp(-c), 1))
      return jnp.clip(gain * factor, low, high)
    e = clip_exponent(jnp.asarray(gamma, gain.dtype) * (d / gain) * ng)
    return jnp.clip(gain * jnp.exp(e), low, high)

  def update_fn(updates, state, params=None, **extra_args):
    checks.check_same_tree("eg_step_size", updates, state.prev_updates, "params given to init")
    gamma = _value(meta_learning_rate, state.count)
    if granularity == "element":
      gains = jax.tree.map(
        lambda s, d, g: element_gain(s, d, g, gamma), state.gains, state.prev_updates, updates
      )
    elif granularity == "leaf":
      gains = jax.tree.map(
        lambda s, d, g: reduced_gain(s, *leaf_sums(d, g, s.dtype), gamma),
        state.gains,
        state.prev_updates,
        updates,
      )
    else:
      dtype = state.gains.dtype
      parts = [
        leaf_sums(d, g, dtype)
        for d, g in zip(
          jax.tree.leaves(state.prev_updates), jax.tree.leaves(updates), strict=True
        )
      ]
      if parts:
        totals = [None if parts[0][i] is None else sum(p[i] for p in parts) for i in range(3)]
        gains = reduced_gain(state.gains, *totals, gamma)
      else:  # an empty tree (e.g. an optax.masked branch that matched nothing)
        gains = state.gains

    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    if granularity == "global":
      scaled = jax.tree.map(lambda u: (gains * u).astype(u.dtype), inner_updates)
    else:
      scaled = jax.tree.map(lambda s, u: (s * u).astype(u.dtype), gains, inner_updates)
    return scaled, EGStepSizeState(
      count=optax.safe_increment(state.count),
      gains=gains,
      prev_updates=optax.tree.cast_like(scaled, state.prev_updates),
      inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
