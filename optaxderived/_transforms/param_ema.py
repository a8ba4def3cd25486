"""An exponential moving average of the parameters, kept in the optimizer state."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import checks
from optaxderived._core import numerics
from optaxderived._core.state import find_state


class ParamEmaState(NamedTuple):
  """State of :func:`param_ema`.

  Attributes:
    count: updates averaged so far, :math:`n` (int32); a ``decay`` schedule is evaluated
      at it.
    ema: the moving average of the params after each averaged update, shaped like the
      params, in the accumulator dtype (zeros at ``init`` when ``debias=True``, the params
      otherwise).
    log_zero_weight: the log of the weight the zero initialisation still holds in ``ema``
      (a float32 scalar, float64 when an average is float64): the sum of the log-decays so
      far, :math:`\\sum_i \\log\\mu_i`, when ``debias=True``; ``-inf`` when ``debias=False``.
      :func:`ema_params` divides ``ema`` by :math:`1 - \\prod_i \\mu_i`, computed as
      ``-expm1(log_zero_weight + log_zero_weight_compensation)``.
    log_zero_weight_compensation: the rounding error of that sum (compensated summation),
      so :math:`1 - \\prod_i \\mu_i` keeps its dtype's precision after many updates.
    calls: update calls seen, :math:`t` (int32); ``start_step``, ``every`` and
      ``overwrite_every`` count them.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  ema: Any
  log_zero_weight: jax.Array
  log_zero_weight_compensation: jax.Array
  calls: jax.Array


def _accumulator_dtype(dtype: Any, accumulator_dtype: Any) -> Any:
  if accumulator_dtype is not None:
    return accumulator_dtype
  return numerics.wide_dtype(dtype)  # at least float32: bf16 would stall the EMA


def param_ema(
  decay: optax.ScalarOrSchedule = 0.999,
  *,
  debias: bool = True,
  start_step: int = 0,
  every: int = 1,
  overwrite_every: int | None = None,
  accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""An exponential moving average of the params, for evaluation; updates pass unchanged.

  On the update calls :math:`t = 0, 1, \dots` with :math:`t \ge` ``start_step`` and
  :math:`t -` ``start_step`` a multiple of ``every`` (every call, by default) it averages
  the new params :math:`\theta = \theta_{\rm old} + u`. After :math:`n` such updates, of
  params :math:`\theta_1, \dots, \theta_n`:

  .. math::

    m_n = \mu_{n-1}\, m_{n-1} + (1 - \mu_{n-1})\, \theta_n, \qquad
    \hat\theta_n = \frac{m_n}{1 - \prod_{i<n} \mu_i} \quad (\text{debias}), \qquad
    \hat\theta_n = m_n \quad (\text{no debias}),

  with :math:`\mu_i` = ``decay`` (a constant, or a schedule evaluated at :math:`i`, the
  number of updates already averaged), :math:`m_0 = 0` when ``debias=True`` and
  :math:`m_0` = the params otherwise (the params of call ``start_step``: until then the
  average follows them). Read :math:`\hat\theta_n` with :func:`ema_params` (the params
  themselves before the first update). Debiasing weighs every update seen as a
  zero-initialised average would, without the pull toward the initial params that
  :math:`m_0 = \theta_0` gives for the first :math:`\sim 1/(1-\mu)` updates.
  :func:`ema_warmup` and :func:`power_ema_decay` are decay schedules that do without it.

  Put it last in a chain: it averages ``params + updates`` for the updates it receives, so
  it must see the final ones. It counts the updates it sees: inside ``od.accumulate`` that
  is the real updates only, and the debiasing and the schedules use that count.

  Differences from ``optax.ema``: that averages the *updates*; this averages the params.
  Differences from the reference Keras code (bert4keras
  ``extend_with_exponential_moving_average``): inside gradient accumulation the debiasing
  there uses the micro-step count, which makes the average far too small; here it uses
  the EMA's own count. Before any update the params are returned (no division by zero).

  Args:
    decay: :math:`\mu \in [0, 1)`, or a schedule of the number of updates already averaged
      (:func:`ema_warmup`, :func:`power_ema_decay`).
    debias: zero-initialise and divide by :math:`1 - \prod_i \mu_i` (as ``optax.ema``), or
      start from the params and do not divide.
    start_step: the first call that is averaged (an integer >= 0); calls before it are not.
    every: average every ``every``-th call from ``start_step`` on (an integer >= 1).
    overwrite_every: when an integer :math:`N \ge 1`, on every :math:`N`-th call (those
      with :math:`(t + 1) \bmod N = 0`) the update moves the params onto the averaged
      params, after the average is updated: it is :math:`\hat\theta_n - \theta_{\rm old}`,
      in the updates' dtype (Keras ``ema_overwrite_frequency``). None: never.
    accumulator_dtype: the dtype of the average (None: the params' dtype promoted to at
      least float32, so bf16 params get a float32 average; a bf16 average would stop
      moving when the update :math:`(1-\mu)(\theta - m)` is below half a bf16 step).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` that returns its updates unchanged (but on
    the overwriting calls); ``update`` needs ``params``.

  Example:
    A worked example: SGD with learning rate 0.1 on gradients 1, :math:`\mu = 0.9`,
    :math:`\theta_0 = 1`:

    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> tx = optax.chain(optax.sgd(0.1), od.param_ema(0.9))
    >>> params = jnp.array(1.0)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jnp.array(1.0), state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(f"{params:.1f} ema {od.ema_params(state, params):.7f}")
    0.9 ema 0.9000000
    0.8 ema 0.8473684
    0.7 ema 0.7929889

    With ``overwrite_every=3`` the third call lands the params on the average instead:

    >>> tx = optax.chain(optax.sgd(0.1), od.param_ema(0.9, overwrite_every=3))
    >>> params = jnp.array(1.0)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jnp.array(1.0), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{params:.7f}")
    0.7929889

  References:
    Polyak and Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J.
    Control Optim. 30(4), 1992. Kingma and Ba, "Adam: A Method for Stochastic
    Optimization", ICLR 2015, https://arxiv.org/abs/1412.6980 (zero-initialisation and
    debiasing, section 3). bert4keras ``extend_with_exponential_moving_average``,
    https://github.com/bojone/bert4keras/blob/master/bert4keras/optimizers.py. Keras
    ``Optimizer(use_ema=True, ema_overwrite_frequency=...)``,
    https://keras.io/api/optimizers/.
  """
  fn = "od.param_ema"
  checks.check_range(fn, "decay", decay, low=0.0, high=1.0, high_open=True)
  checks.check_bool(fn, "debias", debias)
  checks.check_int(fn, "start_step", start_step, low=0, schedule=False)
  checks.check_int(fn, "every", every, low=1, schedule=False)
  if overwrite_every is not None:
    checks.check_int(fn, "overwrite_every", overwrite_every, low=1, schedule=False)
  if accumulator_dtype is not None:
    accumulator_dtype = checks.check_float_dtype(fn, "accumulator_dtype", accumulator_dtype)
  # When every call is averaged (the default, not injected), the condition is a Python True
  # and the call counter a plain t + 1: the step then compiles as it did before the counter
  # existed. A traced condition, or a counter updated as the count is, changes how XLA fuses
  # the rest of the step (Adam's bias correction) and its results by an ulp.
  every_call = (
    isinstance(start_step, int) and isinstance(every, int) and (start_step, every) == (0, 1)
  )

  def init_fn(params):
    def leaf(p):
      dtype = _accumulator_dtype(jnp.result_type(p), accumulator_dtype)
      return jnp.zeros_like(p, dtype=dtype) if debias else jnp.array(p, dtype=dtype, copy=True)

    ema = jax.tree.map(leaf, params)
    # The debiasing sum's dtype: float32, or float64 when an average is float64 (x64).
    dtype = jnp.result_type(
      jnp.float32, *(jnp.finfo(m.dtype).dtype for m in jax.tree.leaves(ema))
    )
    return ParamEmaState(
      count=jnp.zeros([], jnp.int32),
      ema=ema,
      log_zero_weight=jnp.asarray(0.0 if debias else -jnp.inf, dtype),
      log_zero_weight_compensation=jnp.zeros([], dtype),
      calls=jnp.zeros([], jnp.int32),
    )

  def _average(m, p, mu, averaged, following):
    # Computed with the decay that the debiasing uses (rounded to its float32 or float64
    # dtype), stored in the average's dtype: a decay rounded to a narrow accumulator (0.999
    # is 1.0 in bf16) would disagree with the divisor 1 - mu**n, biasing the average or
    # freezing it at 0.
    wide = jnp.promote_types(m.dtype, mu.dtype)
    mu = mu.astype(wide)
    theta = numerics.widen_stored(p, wide)
    kept = m.astype(wide) if debias else jnp.where(following, theta, m.astype(wide))
    return jnp.where(averaged, mu * m.astype(wide) + (1 - mu) * theta, kept).astype(m.dtype)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    checks.require_params(params, fn)
    t = state.calls
    averaged = True if every_call else (t >= start_step) & ((t - start_step) % every == 0)
    mu = jnp.asarray(numerics.value_at(decay, state.count), state.log_zero_weight.dtype)
    try:
      new_params = optax.apply_updates(params, updates)
      ema = jax.tree.map(
        lambda m, p: _average(m, p, mu, averaged, t < start_step), state.ema, new_params
      )
    except ValueError as error:
      raise ValueError(
        f"{fn}: the updates, params and average must have the same tree structure: {error}"
      ) from None
    log_zero_weight, compensation = state.log_zero_weight, state.log_zero_weight_compensation
    if debias:
      # The log of the product of the decays, summed (not decay**count), is right when decay
      # changes between calls (a schedule, optax.inject_hyperparams); 1 - decay**n =
      # -expm1(sum) keeps its precision when decay**n is close to 1 (1 - 0.9999**10 in
      # float32 loses 4 digits), and the compensated (Neumaier) sum keeps the sum's (a plain
      # float32 sum puts 1 - decay**n off by up to 3e-5 relative within 1e4 updates at decay
      # 0.9999). The floor at -100 (a weight of 4e-44) keeps decay = 0 finite.
      term = jnp.where(averaged, jnp.maximum(jnp.log1p(mu - 1), -100.0), 0.0)
      total = log_zero_weight + term
      compensation = compensation + jnp.where(
        jnp.abs(log_zero_weight) >= jnp.abs(term),
        (log_zero_weight - total) + term,
        (term - total) + log_zero_weight,
      )
      log_zero_weight = total
    new_state = ParamEmaState(
      count=jnp.where(averaged, optax.safe_increment(state.count), state.count),
      ema=ema,
      log_zero_weight=log_zero_weight,
      log_zero_weight_compensation=compensation,
      calls=t + 1,
    )
    if overwrite_every is not None:
      overwrite = ((t + 1) % overwrite_every == 0) & (new_state.count > 0)
      leaves, treedef = jax.tree.flatten(new_params)
      target = jax.tree.unflatten(treedef, _averaged_params(new_state, leaves))
      updates = jax.tree.map(
        lambda u, p, a: jnp.where(overwrite, a - p, u).astype(u.dtype), updates, params, target
      )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _averaged_params(state: ParamEmaState, leaves: list) -> list:
  """:math:`\\hat\\theta_n` for each leaf of ``state.ema``, in the dtype of the matching leaf
  of ``leaves`` (the params, returned themselves while :math:`n = 0`)."""
  # jnp.asarray unwraps the Variables that nnx.Optimizer puts around state leaves.
  started = jnp.asarray(state.count) > 0
  log_zero_weight = jnp.asarray(state.log_zero_weight) + jnp.asarray(
    state.log_zero_weight_compensation
  )
  denominator = jnp.where(started, -jnp.expm1(log_zero_weight), 1.0)

  def leaf(m, p):
    p = jnp.asarray(p)
    return jnp.where(started, m / denominator.astype(m.dtype), p).astype(p.dtype)

  return [leaf(m, p) for m, p in zip(jax.tree.leaves(state.ema), leaves, strict=True)]


def ema_params(state: Any, params: Any, *, index: int = 0) -> Any:
  """The averaged params of :func:`param_ema`, to evaluate with.

  Args:
    state: a :class:`ParamEmaState` or any optimizer state that holds one (a chain, a
      wrapper such as ``od.accumulate``, ``nnx.as_pure(optimizer.opt_state)``).
    params: the current params; returned as they are before the first update, and giving
      the result its structure and dtypes (an ``nnx.State`` of Variables works too).
    index: which :class:`ParamEmaState` to read when ``state`` holds several: 0 the
      outermost (the first in a chain), 1 the next, in chain order.

  Returns:
    :math:`m_n / (1 - \\prod_i \\mu_i)` (debiased) or :math:`m_n`, cast to the params'
    dtypes.

  Raises:
    ValueError: when ``state`` holds no :class:`ParamEmaState` (or ``index`` or fewer), or
      when ``params`` has a different number of leaves than the average.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> tx = od.param_ema(0.5)
    >>> params = {"w": jnp.array([2.0])}
    >>> state = tx.init(params)
    >>> od.ema_params(state, params)  # no update yet: the params
    {'w': Array([2.], dtype=float32)}
    >>> _, state = tx.update({"w": jnp.array([-1.0])}, state, params)
    >>> od.ema_params(state, {"w": jnp.array([1.0])})
    {'w': Array([1.], dtype=float32)}

    Two averages in one chain, read by index:

    >>> import optax
    >>> tx = optax.chain(optax.sgd(1.0), od.param_ema(0.5), od.param_ema(0.0))
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([1.0])}, state, params)
    >>> _, state = tx.update({"w": jnp.array([1.0])}, state, {"w": jnp.array([1.0])})
    >>> params = {"w": jnp.array([0.0])}
    >>> od.ema_params(state, params, index=0), od.ema_params(state, params, index=1)
    ({'w': Array([0.33333334], dtype=float32)}, {'w': Array([0.], dtype=float32)})
  """
  found = find_state(state, ParamEmaState, accessor="od.ema_params", index=index)
  leaves, treedef = jax.tree.flatten(params)
  ema_leaves = jax.tree.leaves(found.ema)
  if len(leaves) != len(ema_leaves):
    raise ValueError(
      f"od.ema_params: params have {len(leaves)} leaves, the average has {len(ema_leaves)}"
    )
  return jax.tree.unflatten(treedef, _averaged_params(found, leaves))
