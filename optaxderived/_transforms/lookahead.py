"""Lookahead on plain params: the slow weights live in the optimizer state."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import checks
from optaxderived._core import numerics
from optaxderived._core.state import find_state


class LookaheadState(NamedTuple):
  """State of :func:`lookahead`.

  Attributes:
    slow: the slow weights :math:`\\phi` (the params' structure, dtypes and sharding), set
      to the params at ``init`` and moved on every sync; evaluate with these
      (:func:`lookahead_params`).
    step: inner steps taken so far (int32); a sync follows every ``sync_period``-th one.
    inner_state: the state of the inner (fast) optimizer.
  """

  slow: Any
  step: jax.Array
  inner_state: Any


def lookahead(
  inner: optax.GradientTransformation,
  sync_period: int = 5,
  slow_step_size: optax.ScalarOrSchedule = 0.5,
  *,
  reset_inner_state: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Lookahead: ``sync_period`` fast steps of ``inner``, then one step back toward them.

  The slow weights :math:`\phi` start at the params and live in the state. With the inner
  optimizer's update :math:`u_t` of the gradient taken at the params :math:`\theta_t`, call
  :math:`t = 1, 2, \dots` moves the params to

  .. math::

    \tilde\theta_{t+1} = \theta_t + u_t, \qquad
    \theta_{t+1} =
    \begin{cases}
      \phi \leftarrow \phi + \alpha\,(\tilde\theta_{t+1} - \phi) & \text{if } k \mid t, \\
      \tilde\theta_{t+1} & \text{otherwise,}
    \end{cases}

  with :math:`k` = ``sync_period`` and :math:`\alpha` = ``slow_step_size``: after every
  :math:`k`-th inner step the slow weights move a fraction :math:`\alpha` toward the fast
  ones and the params jump to the new slow weights (the paper's semantics). The emitted
  update is :math:`u_t` on the other steps and :math:`\phi_{\text{new}} - \theta_t` on a
  sync, so the params stay a plain pytree: this works in ``optax.chain``, Flax
  ``TrainState`` and ``nnx.Optimizer``. Evaluate with the slow weights,
  :func:`lookahead_params`. With :math:`\alpha = 1` it is exactly the inner optimizer. The
  new slow weights are the params the jump lands on (rounded as ``optax.apply_updates``
  rounds it), so after a sync the params and the slow weights are equal.

  Put it after everything that shapes the update (it needs the final fast step); only
  :func:`param_ema` belongs after it. Inside ``od.accumulate`` it counts real updates, so a
  sync never falls inside an accumulation window.

  Differences from ``optax.lookahead``: no ``LookaheadParams(fast, slow)`` wrapper around
  the params (optax issue #1429), so the params are not doubled and the loss reads them as
  they are, and it chains. Differences from the reference Keras code (bert4keras
  ``extend_with_lookahead``): the slow weights start at the params, not at zero (which
  halves every weight at the first sync with :math:`\alpha = 0.5`), and the first sync
  follows the ``sync_period``-th step, not the first one.

  Args:
    inner: the fast optimizer (any optax transformation or chain); extra keyword arguments
      of ``update`` reach it.
    sync_period: :math:`k`, inner steps per sync, an integer >= 1.
    slow_step_size: :math:`\alpha \in (0, 1]`, or a schedule of the number of update calls
      seen (0 at the first call), read at each sync.
    reset_inner_state: re-initialise the inner state (at the new params) on every sync,
      for example to drop Adam's moments. Its step counts restart too, so a schedule inside
      ``inner`` starts over at each sync (as with ``optax.lookahead(reset_state=True)``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  Example:
    A worked example: :math:`L = \theta^2/2`, SGD with learning rate 0.1, :math:`k = 2`,
    :math:`\alpha = 0.5`, :math:`\theta_0 = 1`:

    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> tx = od.lookahead(optax.sgd(0.1), sync_period=2, slow_step_size=0.5)
    >>> params = jnp.array(1.0)
    >>> state = tx.init(params)
    >>> for _ in range(4):
    ...   updates, state = tx.update(params, state, params)  # the gradient of L is params
    ...   params = optax.apply_updates(params, updates)
    ...   print(f"{params:.7f} slow {od.lookahead_params(state):.7f}")
    0.9000000 slow 1.0000000
    0.9050000 slow 0.9050000
    0.8145000 slow 0.9050000
    0.8190250 slow 0.8190250

  References:
    Zhang, Lucas, Hinton, Ba, "Lookahead Optimizer: k steps forward, 1 step back",
    NeurIPS 2019, https://arxiv.org/abs/1907.08610. Su Jianlin, "Keras实现两个优化器：
    Lookahead和LazyOptimizer", https://kexue.fm/archives/6869.
  """
  fn = "od.lookahead"
  checks.check_transformation(fn, "inner", inner)
  checks.check_int(fn, "sync_period", sync_period, low=1, schedule=False)
  checks.check_range(fn, "slow_step_size", slow_step_size, low=0.0, high=1.0, low_open=True)
  checks.check_bool(fn, "reset_inner_state", reset_inner_state)
  inner = optax.with_extra_args_support(inner)
  alpha_is_one = not callable(slow_step_size) and checks.concrete_scalar(slow_step_size) == 1

  def init_fn(params):
    return LookaheadState(
      slow=jax.tree.map(lambda p: jnp.array(p, copy=True), params),
      step=jnp.zeros([], jnp.int32),
      inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    checks.require_params(params, fn)
    # before the inner update, whose own error would not name lookahead
    checks.check_same_tree(fn, updates, params, "params")
    fast_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    alpha = numerics.value_at(slow_step_size, state.step)
    step = optax.safe_increment(state.step)
    sync = step % sync_period == 0

    def slow_leaf(u, p, s):
      fast = (p + u).astype(p.dtype)  # the fast params, as optax.apply_updates gives them
      if alpha_is_one:  # the update stays the inner one, exactly
        return fast
      target = s + alpha * (fast - s)
      # Where the params land: p plus the jump rounded to the update's dtype, rounded as
      # optax.apply_updates rounds it, so that after a sync the params equal the slow weights.
      return (p + (target - p).astype(u.dtype)).astype(p.dtype)

    # Branch-free, as optax.lookahead: both sides are computed and one is selected, so every
    # step reads and writes the same buffers and XLA fuses it all with the inner update. The
    # update is then taken from the new slow weights (not from the old ones, which the new
    # ones overwrite in place): p + (slow - p) is slow again, as the sum was rounded once.
    try:
      slow = jax.tree.map(
        lambda u, p, s: jnp.where(sync, slow_leaf(u, p, s), s).astype(s.dtype),
        fast_updates,
        params,
        state.slow,
      )
    except ValueError as error:
      raise ValueError(
        f"{fn}: the updates, params and slow weights must have the same tree structure: {error}"
      ) from None
    if alpha_is_one:
      new_updates = fast_updates
    else:
      new_updates = jax.tree.map(
        lambda u, p, s: jnp.where(sync, s - p, u).astype(u.dtype), fast_updates, params, slow
      )
    if reset_inner_state:
      fresh = inner.init(slow)
      inner_state = jax.tree.map(
        lambda current, init: jnp.where(sync, init, current).astype(jnp.result_type(current)),
        inner_state,
        fresh,
      )
    return new_updates, LookaheadState(slow=slow, step=step, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lookahead_params(state: Any) -> Any:
  """The slow weights of :func:`lookahead`: the params to evaluate with.

  Args:
    state: a :class:`LookaheadState` or any optimizer state that holds one (a chain, a
      wrapper such as ``od.accumulate``, ``nnx.as_pure(optimizer.opt_state)``); the
      outermost one is read.

  Returns:
    The slow weights, shaped like the params.

  Raises:
    ValueError: when ``state`` holds no :class:`LookaheadState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> tx = optax.chain(optax.clip(1.0), od.lookahead(optax.sgd(0.1)))
    >>> od.lookahead_params(tx.init({"w": jnp.ones(2)}))
    {'w': Array([1., 1.], dtype=float32)}
  """
  return find_state(state, LookaheadState, accessor="od.lookahead_params").slow
