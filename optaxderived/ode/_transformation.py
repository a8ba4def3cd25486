r"""A stepper as an optax transformation, for chains and ``nnx.Optimizer``.

``update(grads, state, params, *, grad_fn)`` takes the first stage from the incoming
gradient and calls ``grad_fn`` at the other stage points (``nnx.Optimizer`` forwards
``grad_fn=``; for a Flax ``TrainState`` use :func:`~optaxderived.ode.apply_gradients`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import checks
from optaxderived.ode._stepper import Stepper
from optaxderived.ode._stepper import StepperState

_FN = "od.ode.as_transformation"


def as_transformation(stepper: Stepper) -> optax.GradientTransformationExtraArgs:
  r"""The same method as an optax transformation, for chains and ``nnx.Optimizer``.

  ``update(grads, state, params, *, grad_fn)``: ``grads`` must be :math:`\nabla L` at
  ``params`` and is the first stage; ``grad_fn(p) -> grads`` is called at the other
  ``s - 1`` stage points (it must compute the gradient of the same loss on the same
  mini-batch). The update is :math:`\theta_{n+1} - \theta_n` in the gradients' dtype, or
  zeros after a rejected adaptive step; the state is a :class:`StepperState` (read the step
  size, acceptance and error from it, e.g. ``optax.tree.get(state, "step_size")``).

  The learning rate is inside: do not scale the updates again. Transformations chained
  before it change the first stage only (not ``grad_fn``'s stages), so put gradient
  processing inside ``grad_fn`` and the loss instead; transformations after it (e.g. an
  EMA of params) see the parameter change. A stepper with ``fsal=True`` is refused: the
  first stage is the incoming gradient. With a Flax ``TrainState``, whose
  ``apply_gradients`` does not forward ``grad_fn``, use :func:`apply_gradients`.

  Args:
    stepper: a :class:`Stepper` (``od.ode.heun(0.1)``, ``od.ode.rk23(0.1)``, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> loss_fn = lambda p: 0.5 * jnp.sum(p["w"] ** 2)
    >>> tx = od.ode.as_transformation(od.ode.heun(0.1))
    >>> params = {"w": jnp.ones(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss_fn)(params), state, params,
    ...                            grad_fn=jax.grad(loss_fn))
    >>> optax.apply_updates(params, updates)["w"]
    Array([0.905, 0.905], dtype=float32)
  """
  if not isinstance(stepper, Stepper):
    raise ValueError(
      f"{_FN}: stepper must be an od.ode.Stepper (od.ode.heun(0.1), ...), got {stepper!r}"
    )
  if stepper.fsal:
    raise ValueError(
      f"{_FN}: stepper cannot reuse the last stage (the first stage is the incoming "
      "gradient): build it with fsal=False"
    )

  def init_fn(params: Any) -> StepperState:
    return stepper.init(params)

  def update_fn(
    updates: Any,
    state: StepperState,
    params: Any = None,
    *,
    grad_fn: Any = None,
    **extra_args: Any,
  ) -> tuple[Any, StepperState]:
    del extra_args
    checks.require_params(params, _FN)
    checks.check_same_tree(_FN, updates, params, "params")
    if grad_fn is None and stepper.num_stages > 1:
      raise ValueError(
        f"{_FN} needs grad_fn=: update(grads, state, params, grad_fn=g) where g(params) "
        "returns the gradient of the same loss on the same batch"
      )

    def stage(p: Any) -> tuple[Any, None]:
      return grad_fn(p), None

    _, delta, state, _ = stepper._advance(updates, state, params, stage, None)
    return jax.tree.map(lambda d, g: jnp.asarray(d, jnp.result_type(g)), delta, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
