"""Skipping the update on a loss or gradient-norm spike, judged against a rolling window."""

from __future__ import annotations

from typing import Any
from typing import Literal
from typing import NamedTuple
from typing import get_args

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import checks
from optaxderived._core import numerics
from optaxderived._core.state import find_state

Metric = Literal["grad_norm", "loss", "both"]

_FN = "od.skip_spikes"


class SkipSpikesState(NamedTuple):
  """State of :func:`skip_spikes`.

  Attributes:
    history: the recorded values, a ring buffer (float32): ``[window]`` for
      ``metric="grad_norm"`` or ``"loss"``, ``[2, window]`` for ``"both"`` (row 0 the
      gradient norms, row 1 the losses). The value recorded ``i``-th (from 0) is at
      column ``i % window``; the columns not yet written are zeros.
    count: the values recorded so far (int32): the calls that were taken. The statistics
      use the last ``min(count, window)`` of them.
    num_skipped: the calls skipped so far (int32).
    consecutive: the calls skipped since the last one taken (int32, 0 after a taken call).
    skipped: whether the last call skipped its update (bool, False after ``init``); read
      it with :func:`has_skipped`.
    inner_state: the state of the wrapped transformation (it advances on taken calls only).
  """

  history: jax.Array
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  num_skipped: jax.Array
  consecutive: jax.Array
  skipped: jax.Array
  inner_state: Any


def _avals(tree: Any) -> Any:
  """The structure, shapes and dtypes of a tree (of arrays or ``ShapeDtypeStruct``)."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, [(jnp.shape(x), jnp.result_type(x)) for x in leaves]


def _spikes(
  values: jax.Array, history: jax.Array, count: jax.Array, min_history: int, threshold: Any
) -> jax.Array:
  """Which of ``values`` (``[rows]``) are spikes against ``history`` (``[rows, window]``).

  The mean and the population standard deviation are taken over the recorded columns
  (the first ``count`` before the ring wraps, all after), in units of the largest recorded
  magnitude: the statistics of finite float32 values then never overflow, and a limit
  beyond the float32 range compares as such.
  """
  window = history.shape[-1]
  recorded = jnp.arange(window) < count
  n = jnp.maximum(jnp.minimum(count, window), 1).astype(jnp.float32)
  scale = jnp.max(jnp.where(recorded, jnp.abs(history), 0), axis=-1, keepdims=True)
  scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
  h = jnp.where(recorded, history / scale, 0)
  mean = jnp.sum(h, axis=-1, keepdims=True) / n
  var = jnp.sum(jnp.where(recorded, jnp.square(h - mean), 0), axis=-1, keepdims=True) / n
  limit = (mean + jnp.asarray(threshold, jnp.float32) * jnp.sqrt(var))[:, 0]
  over = (count >= min_history) & (values / scale[:, 0] > limit)
  return ~jnp.isfinite(values) | over


def skip_spikes(
  inner: optax.GradientTransformation,
  *,
  window: int = 128,
  threshold: float = 6.0,
  metric: Metric = "grad_norm",
  min_history: int | None = None,
  max_consecutive: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Skips the update of a call whose loss or gradient norm spikes: ``inner`` does not run.

  Each call observes a value :math:`x_t`: the global L2 norm of the incoming updates
  (``metric="grad_norm"``), the ``loss=`` passed to ``update`` (``"loss"``), or both
  (``"both"``, a spike when either is). With :math:`\mu_t` and :math:`\sigma_t` the mean
  and the population standard deviation of the last :math:`\min(n_t, W)` recorded values
  (:math:`n_t` of them recorded so far, :math:`W` the ``window``), the call is a *spike* when

  .. math::

    \neg\,\mathrm{finite}(x_t) \;\lor\;
    \big(n_t \ge m \;\land\; x_t > \mu_t + \tau\,\sigma_t\big),
    \qquad
    \sigma_t = \sqrt{\tfrac{1}{N}\textstyle\sum_{i} (x_i - \mu_t)^2},\quad
    N = \min(n_t, W),

  with :math:`\tau` the ``threshold`` and :math:`m` the ``min_history``. A spike emits
  zeros: the inner update does not run (``lax.cond``), so its state, its step count and the
  schedules inside it stay (Adam's bias correction does not advance), and the value is not
  recorded. Any other call runs the inner update and records its value(s), so the window
  holds the values of the calls that were taken. A NaN or an infinite value is always a
  spike, also while the window fills; a finite value is judged once :math:`m` values are
  recorded. The test is one-sided: an unusually *low* loss or norm is taken.

  ``max_consecutive`` bounds the skips in a row: after that many consecutive spikes, the
  next call whose values are finite is taken and recorded whatever they are, so a lasting
  change of level (a new data mixture, a learning-rate jump) enters the window instead of
  stopping training. Without it (``None``) a lasting rise above the limit skips every call
  from then on. A constant history (:math:`\sigma = 0`) makes any larger value a spike: for
  a loss that can plateau exactly, set ``max_consecutive``.

  The statistics cost a few operations on ``window`` scalars; ``"grad_norm"`` adds one
  reduction over the updates (in float32, or wider for float64 updates, without overflow
  for finite updates). Values are judged and recorded in float32: a float64 norm or loss
  beyond the float32 range counts as non-finite. The updates keep their dtype (bf16 stays
  bf16) and the zeros of a skipped call have the inner updates' dtypes. The state holds
  ``window`` (``2 · window``) floats and four scalars besides the inner state. The updates
  and the inner state pass through the ``lax.cond`` in place, so a compiled step keeps no
  param-sized buffer beyond the gradients themselves (which the decision needs whole before
  the inner update runs, as global-norm clipping does).

  Placement: chained after a clipping transformation, the norm is the clipped one; put
  clipping inside (``skip_spikes(optax.chain(clip, adam))``) to judge the raw gradient.
  Inside ``od.accumulate`` it judges each window mean, and ``od.accumulate`` forwards
  ``loss=`` on the emitting call only, so pass the window's mean loss on every call (the
  last one is the one read). Around ``od.accumulate`` a spiking micro-batch is dropped before
  it reaches the accumulator (it does not count toward ``every_k``), and ``od.has_updated``
  keeps its previous value on a skipped call: read :func:`has_skipped` first. Row-sparse
  gradients (``od.sparse.RowSparse``) must not reach it (their indices would count in the
  norm); put it around dense gradients.

  Differences from OLMo-core's ``SkipStepOptimizer`` (same defaults, 128 and 6): a skipped
  value is not recorded, so a spike does not inflate the statistics that judge the next
  calls; the test is one-sided; the standard deviation is the population one; the window
  fills for ``min_history`` calls (not ``max(20, window // 2)``) and ``max_consecutive``
  bounds the skips; the history lives in the optimizer state, so it is checkpointed and
  runs under ``jit`` and ``lax.scan``.
  Differences from ``optax.apply_if_finite``: finite spikes are skipped too, and a
  non-finite update is never applied (``max_consecutive`` takes a *finite* call, where
  ``apply_if_finite`` lets the NaN through after ``max_consecutive_errors``).

  Args:
    inner: the transformation to guard (any optax transformation or chain); extra keyword
      arguments of ``update`` other than ``loss`` reach it on the taken calls.
    window: :math:`W`, the number of recorded values the statistics use, an int >= 1.
    threshold: :math:`\tau`, the number of standard deviations above the mean that makes a
      spike, a finite float > 0 (0 is refused: it would skip every value above the mean).
      A 0-d array too, so ``optax.inject_hyperparams`` can inject it when the other
      arguments are static.
    metric: ``"grad_norm"`` (the global L2 norm of the incoming updates), ``"loss"`` (the
      scalar ``loss=`` keyword argument of ``update``, then required) or ``"both"``.
    min_history: :math:`m`, the values to record before a finite value can be a spike, an
      int in ``[1, window]``; ``None`` means ``window``.
    max_consecutive: the consecutive spikes after which the next call with finite values
      is taken whatever its values, an int >= 1; ``None``: no limit.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
    params=None, *, loss=None, **extra)`` reads ``loss`` (a scalar) when ``metric`` is
    ``"loss"`` or ``"both"`` and ignores it otherwise; its state is a
    :class:`SkipSpikesState`.

  Raises:
    ValueError: at construction for an ``inner`` that is not a transformation, a
      ``window``, ``min_history`` or ``max_consecutive`` that is not an integer in its
      range, a ``threshold`` that is not a finite number > 0, or an unknown ``metric``; in
      ``update`` for a missing or non-scalar ``loss`` when the metric needs it, and for
      updates whose tree structure differs from the params'.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> tx = od.skip_spikes(optax.sgd(0.1), window=4, threshold=3.0)
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> step = jax.jit(tx.update)
    >>> for g in [1.0, 1.2, 0.8, 1.0, 50.0, jnp.nan, 1.1]:
    ...   updates, state = step(jnp.array([g, 0.0]), state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(g, bool(od.has_skipped(state)), int(state.count), int(state.num_skipped))
    1.0 False 1 0
    1.2 False 2 0
    0.8 False 3 0
    1.0 False 4 0
    50.0 True 4 1
    nan True 4 2
    1.1 False 5 2
    >>> params  # the sum of the taken steps only: -0.1 * (1 + 1.2 + 0.8 + 1 + 1.1)
    Array([-0.51,  0.  ], dtype=float32)

    On the loss, with a limit on the skips in a row: after two spikes the new level is
    taken, and once it is in the window the next calls at that level are taken too.

    >>> tx = od.skip_spikes(optax.adam(1e-3), window=3, metric="loss", max_consecutive=2)
    >>> state = tx.init(params)
    >>> step = jax.jit(tx.update)
    >>> for loss in [2.0, 2.1, 1.9, 9.0, 9.1, 9.0, 9.2]:
    ...   _, state = step(jnp.ones(2), state, params, loss=loss)
    ...   print(loss, bool(od.has_skipped(state)), int(state.consecutive))
    2.0 False 0
    2.1 False 0
    1.9 False 0
    9.0 True 1
    9.1 True 2
    9.0 False 0
    9.2 False 0

  References:
    OLMo-core, ``SkipStepOptimizer`` (skip a step whose loss or gradient norm is more than
    6 standard deviations from the mean of the last 128),
    https://github.com/allenai/OLMo-core.

    Chowdhery et al., `PaLM: Scaling language modeling with pathways
    <https://arxiv.org/abs/2204.02311>`_, 2022 (loss spikes, handled by skipping the
    data batches around them).

    Kumar, Owen, Roy Chowdhury, Güra, `ZClip: Adaptive spike mitigation for LLM
    pre-training <https://arxiv.org/abs/2504.02507>`_, 2025 (z-scores of the gradient norm
    to detect spikes).

    Takase, Kiyono, Kobayashi, Suzuki, `Spike no more: Stabilizing the pre-training of
    large language models <https://arxiv.org/abs/2312.16903>`_, 2023.
  """
  checks.check_transformation(_FN, "inner", inner)
  checks.check_int(_FN, "window", window, low=1, schedule=False)
  checks.check_range(
    _FN, "threshold", threshold, low=0.0, low_open=True, high_open=True, schedule=False
  )
  checks.check_choice(_FN, "metric", metric, get_args(Metric))
  window = int(window)
  if min_history is not None:
    checks.check_int(_FN, "min_history", min_history, low=1, schedule=False)
    if int(min_history) > window:
      raise ValueError(
        f"{_FN}: min_history must be an integer in [1, window={window}], got {min_history!r}"
      )
  if max_consecutive is not None:
    checks.check_int(_FN, "max_consecutive", max_consecutive, low=1, schedule=False)
  min_seen = window if min_history is None else int(min_history)
  max_skips = None if max_consecutive is None else int(max_consecutive)
  rows = 2 if metric == "both" else 1
  shape = (2, window) if metric == "both" else (window,)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return SkipSpikesState(
      history=jnp.zeros(shape, jnp.float32),
      count=jnp.zeros([], jnp.int32),
      num_skipped=jnp.zeros([], jnp.int32),
      consecutive=jnp.zeros([], jnp.int32),
      skipped=jnp.zeros([], jnp.bool_),
      inner_state=inner.init(params),
    )

  def observe(updates, loss):
    """The call's values as a float32 ``[rows]`` vector (norm first, then loss)."""
    values = []
    if metric in ("grad_norm", "both"):
      values.append(numerics.global_norm(jax.tree.leaves(updates)))
    if metric in ("loss", "both"):
      if loss is None:
        raise ValueError(
          f"{_FN}: metric={metric!r} needs the loss: call "
          "update(updates, state, params, loss=loss)"
        )
      if jnp.ndim(loss) != 0:
        raise ValueError(f"{_FN}: loss must be a scalar, got shape {jnp.shape(loss)}")
      values.append(jnp.asarray(loss))
    # A value beyond the float32 range becomes inf here: non-finite, a spike.
    return jnp.stack([jnp.real(v).astype(jnp.float32) for v in values])

  def update_fn(updates, state, params=None, *, loss=None, **extra_args):
    if params is not None:
      checks.check_same_tree(_FN, updates, params, "params")
    values = observe(updates, loss)
    history = state.history.reshape(rows, window)
    take = ~jnp.any(_spikes(values, history, state.count, min_seen, threshold))
    if max_skips is not None:
      take |= jnp.all(jnp.isfinite(values)) & (state.consecutive >= max_skips)

    def take_branch(updates, inner_state, params):
      new_updates, new_inner_state = inner.update(updates, inner_state, params, **extra_args)
      # Same dtypes (and weak types) as the skip branch's state, which is the input one.
      new_inner_state = jax.tree.map(
        lambda new, old: jnp.asarray(new, jnp.result_type(old)), new_inner_state, inner_state
      )
      return new_updates, new_inner_state

    # Memory: the inner state passes through the cond in place (in and out once, as in
    # od.accumulate), and so do the updates when the inner updates have their shapes and
    # dtypes (always, but for an inner that changes them): the skip branch returns the
    # incoming updates, zeroed after the cond by a select that fuses with what follows. Then
    # no branch writes a fresh param-sized buffer and the inner update can reuse the
    # gradients' buffers, as it does unwrapped. The statistics stay outside the cond.
    out_avals, _ = jax.eval_shape(take_branch, updates, state.inner_state, params)
    pass_through = _avals(out_avals) == _avals(updates)

    def skip_branch(updates, inner_state, params):
      del params
      if pass_through:
        return updates, inner_state
      return optax.tree.zeros_like(out_avals), inner_state

    new_updates, inner_state = jax.lax.cond(
      take, take_branch, skip_branch, updates, state.inner_state, params
    )
    if pass_through:
      new_updates = jax.tree.map(
        lambda u: jnp.where(take, u, jnp.zeros([], u.dtype)), new_updates
      )

    slot = state.count % window
    column = jax.lax.dynamic_slice_in_dim(history, slot, 1, axis=1)
    column = jnp.where(take, values[:, None], column)
    history = jax.lax.dynamic_update_slice_in_dim(history, column, slot, axis=1)
    new_state = SkipSpikesState(
      history=history.reshape(shape),
      count=jnp.where(take, optax.safe_increment(state.count), state.count),
      num_skipped=jnp.where(take, state.num_skipped, optax.safe_increment(state.num_skipped)),
      consecutive=jnp.where(
        take, jnp.zeros([], jnp.int32), optax.safe_increment(state.consecutive)
      ),
      skipped=~take,
      inner_state=inner_state,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def has_skipped(state: Any) -> jax.Array:
  """Whether the last call of a :func:`skip_spikes` skipped its update (a bool array).

  ``state`` is the :class:`SkipSpikesState` or any optimizer state that holds one (a chain,
  a wrapper, ``nnx.Optimizer.opt_state``, a ``TrainState.opt_state``); the outermost one is
  read. False after ``init``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> tx = optax.chain(optax.clip(1.0), od.skip_spikes(optax.adam(1e-3)))
    >>> state = tx.init(jnp.zeros(3))
    >>> step = jax.jit(tx.update)
    >>> _, state = step(jnp.ones(3), state)
    >>> bool(od.has_skipped(state))
    False
    >>> _, state = step(jnp.full(3, jnp.nan), state)
    >>> bool(od.has_skipped(state))
    True
  """
  # jnp.asarray unwraps the Variables that nnx.Optimizer puts around state leaves.
  return jnp.asarray(find_state(state, SkipSpikesState, accessor="od.has_skipped").skipped)
