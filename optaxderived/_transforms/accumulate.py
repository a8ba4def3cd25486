"""Gradient accumulation (soft batch): k micro-batches act like one batch k times larger."""

from __future__ import annotations

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
    num_skipped: micro-batches dropped for a non-finite gradient or weight (int32; stays 0
      unless ``skip_nonfinite=True``).
    inner_state: the state of the wrapped transformation (it advances on real updates only).
    emitted: whether the last call emitted a real update (bool); read it with
      :func:`has_updated`.
  """

  micro_step: jax.Array
  step: jax.Array
  acc_grads: Any
  acc_weight: jax.Array
  num_skipped: jax.Array
  inner_state: Any
  emitted: jax.Array

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
  ``weight=`` so the mean is taken over examples, not over micro-batches.

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

  References:
    Su Jianlin, gradient accumulation, https://kexue.fm/archives/6794, and soft batch,
    https://kexue.fm/archives/5879; bert4keras ``extend_with_gradient_accumulation``;
    ``optax.MultiSteps``.
  """
  fn = "od.accumulate"
  checks.check_transformation(fn, "inner", inner)
  checks.check_int(fn, "every_k", every_k, low=1)
  checks.check_bool(fn, "skip_nonfinite", skip_nonfinite)
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

    if skip_nonfinite:
      finite = jnp.isfinite(weight)
      for g in jax.tree.leaves(updates):
        finite &= jnp.all(jnp.isfinite(g))
    else:
      finite = jnp.ones([], jnp.bool_)

    k = numerics.value_at(every_k, state.step)
    emit = finite & (state.micro_step + 1 >= k)
    total_weight = state.acc_weight + jnp.where(finite, weight, 0)

    # Memory: the gradients are folded into the accumulator first (one fused pass, in place),
    # so they are dead before the cond and the emitted updates can reuse their buffers. The
    # cond returns no accumulator (XLA would copy it): it is zeroed after the cond, ordered by
    # ``emitted``. Compiled temp memory is then one param-sized tree, the emitted updates.
    acc_grads = jax.tree.map(
      lambda a, g: jnp.where(finite, a + weight.astype(a.dtype) * g.astype(a.dtype), a),
      state.acc_grads,
      updates,
    )

    def emit_branch(acc_grads, inner_state, params):
      # A zero total weight means a zero sum (of finite gradients): the mean is then zero.
      total = jnp.where(total_weight > 0, total_weight, 1)
      # (``updates`` gives the dtypes only: no gradient buffer is kept alive into the cond.)
      mean = jax.tree.map(
        lambda a, g: (a / total.astype(a.dtype)).astype(g.dtype), acc_grads, updates
      )
      new_updates, new_inner_state = inner.update(mean, inner_state, params, **extra_args)
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
    new_state = AccumulateState(
      micro_step=jnp.where(emit, 0, state.micro_step + finite.astype(jnp.int32)),
      step=jnp.where(emit, optax.safe_increment(state.step), state.step),
      acc_grads=acc_grads,
      acc_weight=jnp.where(emit, jnp.zeros([], weight_dtype), total_weight),
      num_skipped=jnp.where(finite, state.num_skipped, optax.safe_increment(state.num_skipped)),
      inner_state=inner_state,
      emitted=emitted,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
