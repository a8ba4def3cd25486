"""Step-size adaptation by exponentiated gradient: multiplicative gains on any optimizer.

The gains take exponentiated gradient steps on their meta-gradient, the product of the
previous inner update and the current gradient (Amid et al.). Nothing like it ships in optax,
Keras, TF Addons or PyTorch.
"""

from __future__ import annotations

import math
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import checks
from optaxderived._core import numerics

_GRANULARITIES = ("global", "leaf", "element")


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

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  gains: Any
  prev_updates: Any
  inner_state: Any


def _check_bounds(fn: str, bounds: Any) -> tuple[float, float]:
  """``bounds`` as a pair of floats ``0 <= low <= high``; ``ValueError`` otherwise."""
  try:
    low, high = (float(b) for b in bounds)
  except (TypeError, ValueError):
    raise ValueError(
      f"{fn}: bounds must be a pair (low, high) of floats, got {bounds!r}"
    ) from None
  if not 0 <= low <= high or math.isnan(high):
    raise ValueError(f"{fn}: bounds must satisfy 0 <= low <= high, got {bounds!r}")
  return low, high


def _wide_dtype(*arrays: Any) -> Any:
  """The arrays' promoted dtype, at least float32: the dtype of the gains."""
  return numerics.wide_dtype(*(jnp.result_type(x) for x in arrays))


def eg_step_size(
  inner: optax.GradientTransformation,
  meta_learning_rate: optax.ScalarOrSchedule,
  *,
  granularity: Literal["global", "leaf", "element"] = "leaf",
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
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
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
  fn = "od.eg_step_size"
  checks.check_transformation(fn, "inner", inner)
  checks.check_range(fn, "meta_learning_rate", meta_learning_rate, low=0.0)
  checks.check_choice(fn, "granularity", granularity, _GRANULARITIES)
  checks.check_bool(fn, "normalize", normalize)
  checks.check_range(fn, "max_exponent", max_exponent, low=0.0, low_open=True)
  low, high = _check_bounds(fn, bounds)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    if granularity == "element":
      gains = jax.tree.map(lambda p: jnp.ones_like(p, dtype=_wide_dtype(p)), params)
    elif granularity == "leaf":
      gains = jax.tree.map(lambda p: jnp.ones([], _wide_dtype(p)), params)
    else:
      gains = jnp.ones([], _wide_dtype(*jax.tree.leaves(params)))
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

  def leaf_sums(d: Any, g: Any, dtype: Any) -> tuple[Any, Any, Any]:
    """Σ d·(−g), Σ d², Σ g² over one leaf, accumulated in ``dtype``."""
    d = d.astype(dtype)
    # The barrier keeps XLA from sharing g² with the inner optimizer (Adam's second moment),
    # which made it materialise g² as an extra param-sized array on CPU.
    g = jax.lax.optimization_barrier(g).astype(dtype)
    dot = -jnp.sum(d * g)
    if not normalize:
      return dot, None, None
    return dot, jnp.sum(d * d), jnp.sum(g * g)

  def reduced_gain(gain: Any, dot: Any, dd: Any, gg: Any, gamma: Any) -> Any:
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
    checks.check_same_tree(fn, updates, state.prev_updates, "params given to init")
    gamma = numerics.value_at(meta_learning_rate, state.count)
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
        dot, dd, gg = (
          None if parts[0][i] is None else sum(p[i] for p in parts) for i in range(3)
        )
        gains = reduced_gain(state.gains, dot, dd, gg, gamma)
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
