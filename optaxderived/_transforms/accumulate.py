"""Gradient accumulation (soft batch): k micro-batches act like one batch k times larger."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxderived._core import checks
from optaxderived._core import numerics
from optaxderived._core.state import find_state


class AccumulateState(NamedTuple):
  """State of :func:`accumulate`.

  Attributes:
    micro_step: micro-batches accumulated in the current window (int32, 0 right after a real
      update); skipped micro-batches do not count.
    step: real updates emitted so far (int32); ``every_k`` schedules are evaluated at it.
    acc_grads: the weighted sum ``Σ w·g`` of the window's gradients, shaped like the params,
      each leaf in ``accumulator_dtype`` promoted with its param's dtype.
    acc_weight: the window's ``Σ w`` (a scalar, float32 or wider).
    num_skipped: micro-batches dropped for a non-finite gradient or weight or by ``skip_if``
      (int32; stays 0 unless ``skip_nonfinite=True`` or ``skip_if`` is given).
    inner_state: the state of the wrapped transformation (it advances on real updates only).
    emitted: whether the last call emitted a real update (bool); read it with
      :func:`has_updated`.
    acc_extra: the window's ``Σ w·v`` of each extra argument named in ``mean_extra_args``,
      a dict name → scalar in ``acc_weight``'s dtype (empty without ``mean_extra_args``; it
      is the last field and defaults to ``{}``, so a state built positionally from the
      seven others stays valid).
  """

  micro_step: jax.Array
  step: jax.Array
  acc_grads: Any
  acc_weight: jax.Array
  num_skipped: jax.Array
  inner_state: Any
  emitted: jax.Array
  acc_extra: Any = {}  # (never mutated: the update builds a new dict)

  @property
  def micro_steps(self) -> bool:
    """A marker (not a field): the inner update runs on some calls only (see
    ``optaxderived._core.state.holds_micro_steps``)."""
    return True


def accumulate(
  inner: optax.GradientTransformation,
  every_k: int | optax.Schedule,
  *,
  accumulator_dtype: Any = jnp.float32,
  skip_nonfinite: bool = False,
  skip_if: Callable[[Any, Any], Any] | None = None,
  reduction: str = "mean",
  mean_extra_args: Sequence[str] = (),
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient accumulation: runs ``inner`` once per ``every_k`` micro-batches on their mean.

  With micro-batch gradients :math:`g_1, \dots, g_k` and weights :math:`w_i` (default 1) of
  a window, the ``k``-th call emits

  .. math::

    u = \mathrm{inner}\Big(\bar g\Big), \qquad
    \bar g = \frac{\sum_{i=1}^{k} w_i\, g_i}{\sum_{i=1}^{k} w_i},

  and the other ``k - 1`` calls emit zeros. With equal micro-batch sizes and a loss that is
  a mean over examples, :math:`\bar g` is the gradient of the batch of ``k`` micro-batches,
  so the run equals training on batches ``k`` times larger (BatchNorm statistics excepted).
  When micro-batches hold different numbers of examples (or tokens), pass that number as
  ``weight=`` so the mean is taken over examples, not over micro-batches. With
  ``reduction="sum"`` the inner update receives :math:`\sum_i w_i\, g_i` instead (the
  gradient of the window's total loss when each micro-batch loss is a sum). A scalar extra
  argument named in ``mean_extra_args`` (a loss ``value`` for
  ``optax.contrib.reduce_on_plateau`` or a line search) reaches the inner update as the
  window's weighted mean :math:`\bar v = \sum_i w_i v_i / \sum_i w_i`, whatever the
  reduction.

  The inner update runs on the emitting call only (``lax.cond``; under ``jax.vmap`` the
  condition becomes a select, so both branches are computed, with the same results). Its
  state, its step count and every schedule inside it advance once per real update: Adam's
  bias correction, a learning-rate schedule, weight decay, clipping, Lookahead's sync and an
  EMA wrapped *inside* see real updates only. Chained *outside* ``accumulate`` they would run
  on every micro step: ``optax.chain(optax.clip_by_global_norm(1.0), accumulate(adam, 4))``
  clips each micro-batch gradient before averaging, whereas ``accumulate(optax.chain(
  optax.clip_by_global_norm(1.0), adam), 4)`` clips the window mean, as a large batch would;
  a schedule or ``add_decayed_weights`` outside would count (or decay on) micro steps.

  Differences from ``optax.MultiSteps``: this is a ``GradientTransformationExtraArgs``;
  the inner update is not computed (and thrown away) on the ``k - 1`` holding calls; the
  mean is weighted; ``has_updated`` reads the state (also inside a chain), so it works with
  Flax ``TrainState`` and ``nnx.Optimizer``. Differences from the reference Keras code
  (bert4keras ``extend_with_gradient_accumulation``): no phantom zero update on the first
  call, no one-window delay (the ``k``-th call applies its own window), and schedules and
  bias correction count real updates, not micro steps.

  Args:
    inner: the transformation to run on the window means (any optax transformation or
      chain; extra keyword arguments of ``update`` other than ``weight`` reach it on the
      emitting calls).
    every_k: micro-batches per real update, an int >= 1, or a schedule ``step -> int`` of
      the number of real updates so far (a value below 1 counts as 1). Under
      ``optax.inject_hyperparams`` give a number: it would evaluate a schedule at its own
      count of calls, i.e. micro steps.
    accumulator_dtype: the narrowest floating dtype of the accumulator: each leaf sums in
      it promoted with its param's dtype (float32 by default, so bf16 gradients are summed
      in float32 and float64 ones in float64; None means the same); the window mean reaches
      ``inner`` in the gradients' dtype.
    skip_nonfinite: drop a micro-batch whose gradient or weight holds a NaN or an Inf: it
      is neither added nor counted toward ``every_k``, the call emits zeros and
      ``num_skipped`` counts it. Without it a NaN reaches the window mean, as in optax.
    skip_if: None (never), or ``skip_if(updates, params) -> bool scalar`` evaluated on each
      micro-batch's gradient (``params`` as given to ``update``, possibly None): a
      micro-batch for which it is True is dropped exactly as a non-finite one is (neither
      it, its weight nor its ``mean_extra_args`` values are added, it does not count toward
      ``every_k``, the call emits zeros and ``num_skipped`` counts it), with
      ``skip_nonfinite`` True or False; e.g. ``lambda g, p: optax.tree.norm(g) > 100.0``,
      as ``optax.MultiSteps``' ``should_skip_update_fn``. Under ``optax.inject_hyperparams``
      name it in ``static_args`` (a callable would be taken for a schedule).
    reduction: ``"mean"`` (the weighted mean :math:`\bar g` reaches ``inner``) or ``"sum"``
      (the weighted sum :math:`\sum_i w_i g_i` does, in the gradients' dtype).
    mean_extra_args: names of scalar keyword arguments of ``update`` averaged over the
      window with the same weights: ``inner`` receives their weighted mean instead of the
      last micro-batch's value (with either reduction; a mean of zero for a window whose
      weights sum to zero). Every call must pass each of them. Other extra arguments reach
      ``inner`` as given on the emitting call.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
    params=None, *, weight=None, **extra)`` accumulates ``weight * updates`` (``weight``: a
    non-negative scalar, default 1, e.g. the micro-batch's example or token count). A window
    whose weights sum to zero emits the inner update of a zero gradient.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> tx = od.accumulate(optax.sgd(0.1), 2)
    >>> params = jnp.array([1.0])
    >>> state = tx.init(params)
    >>> for g in [1.0, 3.0, 5.0, 7.0]:
    ...   updates, state = tx.update(jnp.array([g]), state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(f"{params[0]:.1f}", bool(od.has_updated(state)))
    1.0 False
    0.8 True
    0.8 False
    0.2 True

    Weighted micro-batches: 3 examples with mean gradient 1, then 1 example with gradient 5,
    average like one batch of 4 examples (mean gradient 2):

    >>> tx = od.accumulate(optax.sgd(1.0), 2)
    >>> state = tx.init(jnp.zeros(1))
    >>> _, state = tx.update(jnp.array([1.0]), state, weight=3)
    >>> updates, state = tx.update(jnp.array([5.0]), state, weight=1)
    >>> print(updates)
    [-2.]

    Clipping inside clips the window mean, as one large batch would; chained outside, it
    clips every micro-batch before the mean:

    >>> inside = od.accumulate(optax.chain(optax.clip(1.0), optax.sgd(1.0)), 2)
    >>> outside = optax.chain(optax.clip(1.0), od.accumulate(optax.sgd(1.0), 2))
    >>> for tx in (inside, outside):
    ...   state = tx.init(jnp.zeros(1))
    ...   for g in (3.0, -1.0):
    ...     updates, state = tx.update(jnp.array([g]), state)
    ...   print(updates)
    [-1.]
    [-0.]

    ``skip_if`` drops a micro-batch (here a gradient spike) as if it had not been given;
    ``mean_extra_args`` averages a scalar argument over the window with the same weights
    (this inner transformation emits the ``value`` it receives):

    >>> import jax
    >>> def emit_value(updates, state, params=None, *, value, **extra):
    ...   return jax.tree.map(lambda u: jnp.full_like(u, value), updates), state
    >>> tx = od.accumulate(
    ...   optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), emit_value),
    ...   2,
    ...   skip_if=lambda g, p: optax.tree.norm(g) > 10.0,
    ...   mean_extra_args=("value",),
    ... )
    >>> state = tx.init(jnp.zeros(1))
    >>> for g, loss in [(1.0, 0.5), (100.0, 9.0), (3.0, 1.5)]:
    ...   updates, state = tx.update(jnp.array([g]), state, value=loss)
    >>> print(updates, int(state.num_skipped))
    [1.] 1

  References:
    Su Jianlin, gradient accumulation, https://kexue.fm/archives/6794, and soft batch,
    https://kexue.fm/archives/5879; bert4keras ``extend_with_gradient_accumulation``;
    ``optax.MultiSteps``.
  """
  fn = "od.accumulate"
  checks.check_transformation(fn, "inner", inner)
  checks.check_int(fn, "every_k", every_k, low=1)
  checks.check_bool(fn, "skip_nonfinite", skip_nonfinite)
  if skip_if is not None and not callable(skip_if):
    raise ValueError(
      f"{fn}: skip_if must be None or a callable (updates, params) -> bool, got {skip_if!r}"
    )
  checks.check_choice(fn, "reduction", reduction, ("mean", "sum"))
  mean_names = _check_names(fn, mean_extra_args)
  if accumulator_dtype is None:  # as in param_ema: the params' dtypes, at least float32
    accumulator_dtype = jnp.float32
  if isinstance(accumulator_dtype, jax.Array | np.ndarray):
    # optax.inject_hyperparams takes the (callable) dtype for a schedule and passes its value.
    accumulator_dtype = accumulator_dtype.dtype
  acc_dtype = checks.check_float_dtype(fn, "accumulator_dtype", accumulator_dtype)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    # Each leaf sums in the wider of accumulator_dtype and its own dtype (float64 stays
    # float64 under x64); the weights in the widest of them, at least float32. zeros_like
    # keeps each param's sharding.
    acc_grads = jax.tree.map(
      lambda p: jnp.zeros_like(p, jnp.promote_types(jnp.result_type(p), acc_dtype)),
      params,
    )
    weight_dtype = jnp.result_type(
      jnp.float32, acc_dtype, *(jnp.finfo(a.dtype).dtype for a in jax.tree.leaves(acc_grads))
    )
    return AccumulateState(
      micro_step=jnp.zeros([], jnp.int32),
      step=jnp.zeros([], jnp.int32),
      acc_grads=acc_grads,
      acc_weight=jnp.zeros([], weight_dtype),
      num_skipped=jnp.zeros([], jnp.int32),
      inner_state=inner.init(params),
      emitted=jnp.zeros([], jnp.bool_),
      acc_extra={name: jnp.zeros([], weight_dtype) for name in mean_names},
    )

  def update_fn(updates, state, params=None, *, weight=None, **extra_args):
    checks.check_same_tree(fn, updates, state.acc_grads, "params given to init")
    weight_dtype = jnp.result_type(state.acc_weight)
    if weight is None:
      weight = jnp.ones([], weight_dtype)
    else:
      if jnp.ndim(weight) != 0:
        raise ValueError(f"{fn}: weight must be a scalar, got shape {jnp.shape(weight)}")
      if not isinstance(weight, jax.core.Tracer) and np.asarray(weight) < 0:
        raise ValueError(f"{fn}: weight must be >= 0, got {weight!r}")
      weight = jnp.asarray(weight, weight_dtype)

    values = {name: _extra_value(fn, name, extra_args) for name in mean_names}

    # keep: the micro-batch is added (not dropped as non-finite or by skip_if).
    if skip_nonfinite:
      keep = jnp.isfinite(weight)
      for g in jax.tree.leaves(updates):
        keep &= jnp.all(jnp.isfinite(g))
    else:
      keep = jnp.ones([], jnp.bool_)
    if skip_if is not None:
      keep &= ~_skip_flag(fn, skip_if(updates, params))

    k = numerics.value_at(every_k, state.step)
    emit = keep & (state.micro_step + 1 >= k)
    total_weight = state.acc_weight + jnp.where(keep, weight, 0)
    extra_sums = {
      name: state.acc_extra[name] + jnp.where(keep, weight * v.astype(weight_dtype), 0)
      for name, v in values.items()
    }

    # Memory: the gradients are folded into the accumulator first (one fused pass, in place),
    # so they are dead before the cond and the emitted updates can reuse their buffers. The
    # cond returns no accumulator (XLA would copy it): it is zeroed after the cond, ordered by
    # ``emitted``. Compiled temp memory is then one param-sized tree, the emitted updates.
    acc_grads = jax.tree.map(
      lambda a, g: jnp.where(keep, a + weight.astype(a.dtype) * g.astype(a.dtype), a),
      state.acc_grads,
      updates,
    )

    def emit_branch(acc_grads, inner_state, params):
      # A zero total weight means a zero sum (of finite gradients): the mean is then zero.
      total = jnp.where(total_weight > 0, total_weight, 1)
      # (``updates`` gives the dtypes only: no gradient buffer is kept alive into the cond.)
      if reduction == "sum":
        reduced = jax.tree.map(lambda a, g: a.astype(g.dtype), acc_grads, updates)
      else:
        reduced = jax.tree.map(
          lambda a, g: (a / total.astype(a.dtype)).astype(g.dtype), acc_grads, updates
        )
      means = {
        name: (extra_sums[name] / total).astype(_mean_dtype(values[name], weight_dtype))
        for name in mean_names
      }
      new_updates, new_inner_state = inner.update(
        reduced, inner_state, params, **{**extra_args, **means}
      )
      new_inner_state = jax.tree.map(
        lambda new, old: jnp.asarray(new, jnp.result_type(old)), new_inner_state, inner_state
      )
      return new_updates, jnp.ones([], jnp.bool_), new_inner_state

    def hold_branch(acc_grads, inner_state, params):
      del params
      return optax.tree.zeros_like(zeros_shape), jnp.zeros([], jnp.bool_), inner_state

    zeros_shape, _, _ = jax.eval_shape(emit_branch, acc_grads, state.inner_state, params)
    new_updates, emitted, inner_state = jax.lax.cond(
      emit, emit_branch, hold_branch, acc_grads, state.inner_state, params
    )
    acc_grads = jax.tree.map(lambda a: jnp.where(emitted, jnp.zeros([], a.dtype), a), acc_grads)
    if mean_names:
      acc_extra = {
        name: jnp.where(emit, jnp.zeros([], weight_dtype), s) for name, s in extra_sums.items()
      }
    else:
      acc_extra = state.acc_extra  # as given ({} from init)
    new_state = AccumulateState(
      micro_step=jnp.where(emit, 0, state.micro_step + keep.astype(jnp.int32)),
      step=jnp.where(emit, optax.safe_increment(state.step), state.step),
      acc_grads=acc_grads,
      acc_weight=jnp.where(emit, jnp.zeros([], weight_dtype), total_weight),
      num_skipped=jnp.where(keep, state.num_skipped, optax.safe_increment(state.num_skipped)),
      inner_state=inner_state,
      emitted=emitted,
      acc_extra=acc_extra,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_names(fn: str, names: Any) -> tuple[str, ...]:
  """``mean_extra_args`` as a tuple of distinct keyword names other than ``weight``."""
  if isinstance(names, str):
    raise ValueError(
      f"{fn}: mean_extra_args must be a sequence of names, not a string "
      f"(write ({names!r},)), got {names!r}"
    )
  if not isinstance(names, Sequence) or not all(
    isinstance(n, str) and n.isidentifier() for n in names
  ):
    raise ValueError(
      f"{fn}: mean_extra_args must be a sequence of keyword argument names, got {names!r}"
    )
  if len(set(names)) != len(names):
    raise ValueError(f"{fn}: mean_extra_args must not repeat a name, got {names!r}")
  if "weight" in names:
    raise ValueError(
      f"{fn}: mean_extra_args must not name 'weight' (the weight of the mean itself), "
      f"got {names!r}"
    )
  return tuple(names)


def _extra_value(fn: str, name: str, extra_args: dict[str, Any]) -> jax.Array:
  """The real scalar extra argument ``name`` of one call (named in ``mean_extra_args``)."""
  if name not in extra_args:
    raise ValueError(
      f"{fn}: mean_extra_args names {name!r}, but update got no {name}= argument "
      f"(got {sorted(extra_args)})"
    )
  value = extra_args[name]
  if jnp.ndim(value) != 0:
    raise ValueError(
      f"{fn}: {name}= (in mean_extra_args) must be a scalar, got shape {jnp.shape(value)}"
    )
  try:
    value = jnp.asarray(value)
  except (TypeError, ValueError):
    value = None
  if value is None or not (
    jnp.issubdtype(value.dtype, jnp.floating)
    or jnp.issubdtype(value.dtype, jnp.integer)
    or value.dtype == jnp.bool_
  ):
    raise ValueError(
      f"{fn}: {name}= (in mean_extra_args) must be a real scalar, got {extra_args[name]!r}"
    )
  return value


def _mean_dtype(value: jax.Array, weight_dtype: Any) -> Any:
  """The dtype a mean of ``value`` reaches ``inner`` in: a float keeps its own dtype (as the
  gradients' mean does), an integer or a bool gets the weights' dtype."""
  return value.dtype if jnp.issubdtype(value.dtype, jnp.floating) else weight_dtype


def _skip_flag(fn: str, result: Any) -> jax.Array:
  """The result of ``skip_if`` as a bool scalar (a bool, integer or float scalar)."""
  try:
    flag = jnp.asarray(result)
  except (TypeError, ValueError):
    raise ValueError(
      f"{fn}: skip_if must return a bool scalar, got {type(result).__name__} {result!r}"
    ) from None
  if flag.ndim != 0:
    raise ValueError(f"{fn}: skip_if must return a bool scalar, got shape {flag.shape}")
  if not (
    flag.dtype == jnp.bool_
    or jnp.issubdtype(flag.dtype, jnp.integer)
    or jnp.issubdtype(flag.dtype, jnp.floating)
  ):
    raise ValueError(f"{fn}: skip_if must return a bool scalar, got dtype {flag.dtype}")
  return flag.astype(jnp.bool_)


def has_updated(state: Any) -> jax.Array:
  """Whether the last call of an :func:`accumulate` emitted a real update (a bool array).

  ``state`` is the :class:`AccumulateState` or any optimizer state that holds one (a chain,
  a wrapper, ``nnx.Optimizer.opt_state``, a ``TrainState.opt_state``); the outermost one is
  read. False after ``init``, on holding calls and after a skipped micro-batch.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> tx = optax.chain(optax.clip(1.0), od.accumulate(optax.adam(1e-3), 2))
    >>> state = tx.init(jnp.zeros(3))
    >>> _, state = tx.update(jnp.ones(3), state)
    >>> bool(od.has_updated(state))
    False
    >>> _, state = tx.update(jnp.ones(3), state)
    >>> bool(od.has_updated(state))
    True
  """
  # jnp.asarray unwraps the Variables that nnx.Optimizer puts around state leaves.
  return jnp.asarray(find_state(state, AccumulateState, accessor="od.has_updated").emitted)
