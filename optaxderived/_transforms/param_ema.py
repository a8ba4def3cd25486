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
    count: updates averaged so far (int32).
    ema: the moving average of the params after each update, shaped like the params, in
      the accumulator dtype (zeros at ``init`` when ``debias=True``, the params otherwise).
    log_zero_weight: the log of the weight the zero initialisation still holds in ``ema``
      (a float32 scalar, float64 when an average is float64): the sum of the log-decays so
      far, :math:`n \\log\\mu`, when ``debias=True``; ``-inf`` when ``debias=False``.
      :func:`ema_params` divides ``ema`` by :math:`1 - \\mu^n`, computed as
      ``-expm1(log_zero_weight + log_zero_weight_compensation)``.
    log_zero_weight_compensation: the rounding error of that sum (compensated summation),
      so :math:`1 - \\mu^n` keeps its dtype's precision after many updates.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  ema: Any
  log_zero_weight: jax.Array
  log_zero_weight_compensation: jax.Array


def _accumulator_dtype(dtype: Any, accumulator_dtype: Any) -> Any:
  if accumulator_dtype is not None:
    return accumulator_dtype
  return numerics.wide_dtype(dtype)  # at least float32: bf16 would stall the EMA


def _widen(p: jax.Array, dtype: Any) -> jax.Array:
  """``p`` in ``dtype``, holding the value ``p`` has once stored in its own dtype.

  Under ``jit`` XLA may keep ``params + updates`` in excess precision (bf16 arithmetic
  done in float32, the rounding to bf16 dropped when the result is widened again), so the
  average would follow values the params never hold; ``reduce_precision`` rounds for sure.
  """
  wide = p.astype(dtype)
  if jnp.issubdtype(p.dtype, jnp.floating) and jnp.finfo(p.dtype).bits < jnp.finfo(dtype).bits:
    info = jnp.finfo(p.dtype)
    wide = jax.lax.reduce_precision(wide, exponent_bits=info.nexp, mantissa_bits=info.nmant)
  return wide


def param_ema(
  decay: float = 0.999, *, debias: bool = True, accumulator_dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
  r"""An exponential moving average of the params, for evaluation; updates pass unchanged.

  After each update :math:`u_n` (:math:`n = 1, 2, \dots`) it averages the new params
  :math:`\theta_n = \theta_{n-1} + u_n`:

  .. math::

    m_n = \mu\, m_{n-1} + (1 - \mu)\, \theta_n, \qquad
    \hat\theta_n = \frac{m_n}{1 - \mu^n} \quad (\text{debias}), \qquad
    \hat\theta_n = m_n \quad (\text{no debias}),

  with :math:`\mu` = ``decay``, :math:`m_0 = 0` when ``debias=True`` and
  :math:`m_0 = \theta_0` otherwise. Read :math:`\hat\theta_n` with :func:`ema_params` (the
  params themselves before the first update). Debiasing weighs every update seen as a
  zero-initialised average would, without the pull toward the initial params that
  :math:`m_0 = \theta_0` gives for the first :math:`\sim 1/(1-\mu)` updates.

  Put it last in a chain: it averages ``params + updates`` for the updates it receives, so
  it must see the final ones. It counts the updates it sees: inside ``od.accumulate`` that
  is the real updates only, and the debiasing uses that count.

  Differences from ``optax.ema``: that averages the *updates*; this averages the params.
  Differences from the reference Keras code (bert4keras
  ``extend_with_exponential_moving_average``): inside gradient accumulation the debiasing
  there uses the micro-step count, which makes the average far too small; here it uses
  the EMA's own count. Before any update the params are returned (no division by zero).

  Args:
    decay: :math:`\mu \in [0, 1)`.
    debias: zero-initialise and divide by :math:`1 - \mu^n` (as ``optax.ema``), or start
      from the params and do not divide.
    accumulator_dtype: the dtype of the average (None: the params' dtype promoted to at
      least float32, so bf16 params get a float32 average; a bf16 average would stop
      moving when the update :math:`(1-\mu)(\theta - m)` is below half a bf16 step).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` that returns its updates unchanged;
    ``update`` needs ``params``.

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

  References:
    Polyak and Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J.
    Control Optim. 30(4), 1992. Kingma and Ba, "Adam: A Method for Stochastic
    Optimization", ICLR 2015, https://arxiv.org/abs/1412.6980 (zero-initialisation and
    debiasing, section 3). bert4keras ``extend_with_exponential_moving_average``,
    https://github.com/bojone/bert4keras/blob/master/bert4keras/optimizers.py.
  """
  fn = "od.param_ema"
  checks.check_range(fn, "decay", decay, low=0.0, high=1.0, high_open=True, schedule=False)
  checks.check_bool(fn, "debias", debias)
  if accumulator_dtype is not None:
    accumulator_dtype = checks.check_float_dtype(fn, "accumulator_dtype", accumulator_dtype)

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
    )

  def _average(m, p, dtype):
    # Computed with the decay that the debiasing uses (rounded to its float32 or float64
    # ``dtype``), stored in the average's dtype: a decay rounded to a narrow accumulator (0.999
    # is 1.0 in bf16) would disagree with the divisor 1 - mu**n, biasing the average or
    # freezing it at 0.
    wide = jnp.promote_types(m.dtype, dtype)
    mu = jnp.asarray(decay, dtype).astype(wide)
    return (mu * m.astype(wide) + (1 - mu) * _widen(p, wide)).astype(m.dtype)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    checks.require_params(params, fn)
    try:
      new_params = optax.apply_updates(params, updates)
      dtype = state.log_zero_weight.dtype
      ema = jax.tree.map(lambda m, p: _average(m, p, dtype), state.ema, new_params)
    except ValueError as error:
      raise ValueError(
        f"{fn}: the updates, params and average must have the same tree structure: {error}"
      ) from None
    log_zero_weight, compensation = state.log_zero_weight, state.log_zero_weight_compensation
    if debias:
      # The log of the product of the decays, summed (not decay**count), is right when decay
      # changes between calls (optax.inject_hyperparams); 1 - decay**n = -expm1(sum) keeps
      # its precision when decay**n is close to 1 (1 - 0.9999**10 in float32 loses 4
      # digits), and the compensated (Neumaier) sum keeps the sum's (a plain float32 sum
      # puts 1 - decay**n off by up to 3e-5 relative within 1e4 updates at decay 0.9999).
      # The floor at -100 (a weight of 4e-44) keeps decay = 0 finite.
      term = jnp.maximum(jnp.log1p(jnp.asarray(decay, dtype) - 1), -100.0)
      total = log_zero_weight + term
      compensation = compensation + jnp.where(
        jnp.abs(log_zero_weight) >= jnp.abs(term),
        (log_zero_weight - total) + term,
        (term - total) + log_zero_weight,
      )
      log_zero_weight = total
    return updates, ParamEmaState(
      count=optax.safe_increment(state.count),
      ema=ema,
      log_zero_weight=log_zero_weight,
      log_zero_weight_compensation=compensation,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ema_params(state: Any, params: Any) -> Any:
  """The averaged params of :func:`param_ema`, to evaluate with.

  Args:
    state: a :class:`ParamEmaState` or any optimizer state that holds one (a chain, a
      wrapper such as ``od.accumulate``, ``nnx.as_pure(optimizer.opt_state)``); the
      outermost one is read.
    params: the current params; returned as they are before the first update, and giving
      the result its structure and dtypes (an ``nnx.State`` of Variables works too).

  Returns:
    :math:`m_n / (1 - \\mu^n)` (debiased) or :math:`m_n`, cast to the params' dtypes.

  Raises:
    ValueError: when ``state`` holds no :class:`ParamEmaState`, or when ``params`` has a
      different number of leaves than the average.

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
  """
  found = find_state(state, ParamEmaState, accessor="od.ema_params")
  leaves, treedef = jax.tree.flatten(params)
  ema_leaves = jax.tree.leaves(found.ema)
  if len(leaves) != len(ema_leaves):
    raise ValueError(
      f"od.ema_params: params have {len(leaves)} leaves, the average has {len(ema_leaves)}"
    )
  # jnp.asarray unwraps the Variables that nnx.Optimizer puts around state leaves.
  started = jnp.asarray(found.count) > 0
  log_zero_weight = jnp.asarray(found.log_zero_weight) + jnp.asarray(
    found.log_zero_weight_compensation
  )
  denominator = jnp.where(started, -jnp.expm1(log_zero_weight), 1.0)

  def leaf(m, p):
    p = jnp.asarray(p)
    return jnp.where(started, m / denominator.astype(m.dtype), p).astype(p.dtype)

  return jax.tree.unflatten(
    treedef, [leaf(m, p) for m, p in zip(ema_leaves, leaves, strict=True)]
  )
