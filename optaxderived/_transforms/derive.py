"""``od.derive``: the derived techniques composed around a base optimizer, in order."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import checks
from optaxderived._core import paths
from optaxderived._core.state import find_states
from optaxderived._transforms.accumulate import accumulate
from optaxderived._transforms.clip_norm import clip_norm
from optaxderived._transforms.ema_schedules import ema_warmup
from optaxderived._transforms.layer_adaptation import layer_adaptation as layer_adaptation_
from optaxderived._transforms.lazy import lazy as lazy_
from optaxderived._transforms.learning_rate import scale_by_learning_rate
from optaxderived._transforms.lookahead import lookahead as lookahead_
from optaxderived._transforms.loss_scale import dynamic_loss_scale as dynamic_loss_scale_
from optaxderived._transforms.param_ema import param_ema
from optaxderived._transforms.scale_by_path import scale_by_path
from optaxderived._transforms.schedules import piecewise_linear
from optaxderived._transforms.skip_spikes import skip_spikes as skip_spikes_
from optaxderived._transforms.weight_decay import weight_decay as weight_decay_
from optaxderived.sparse._row_sparse import RowSparse

FN = "od.derive"


class ScaleByAdamState(NamedTuple):
  """State of the Adam base of :func:`derive` without bias correction.

  Attributes:
    count: update calls seen, int32.
    mu: first moment, shaped like the params.
    nu: second moment, shaped like the params.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  mu: optax.Updates
  nu: optax.Updates


def _scale_by_adam_uncorrected(
  b1: float, b2: float, eps: float
) -> optax.GradientTransformation:
  """Adam's direction ``m / (sqrt(v) + eps)`` without bias correction (bert4keras's
  ``bias_correction=False``); optax's ``scale_by_adam`` always corrects."""

  def init_fn(params):
    return ScaleByAdamState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params),
      nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    updates = jax.tree.map(
      lambda g, m, v: (m / (jnp.sqrt(v) + eps)).astype(g.dtype), updates, mu, nu
    )
    return updates, ScaleByAdamState(optax.safe_increment(state.count), mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def _learning_rate(
  learning_rate: optax.ScalarOrSchedule, lr_schedule: Mapping | optax.Schedule | None
) -> optax.ScalarOrSchedule:
  """``learning_rate · multiplier(step)``, a constant when neither is a schedule."""
  if lr_schedule is None:
    return learning_rate
  if isinstance(lr_schedule, Mapping):
    multiplier = piecewise_linear(lr_schedule)
  elif callable(lr_schedule):
    multiplier = lr_schedule
  else:
    raise ValueError(
      f"{FN}: lr_schedule must be a {{step: multiplier}} dict or a schedule of multipliers, "
      f"got {lr_schedule!r}"
    )
  if callable(learning_rate):
    return lambda count: learning_rate(count) * multiplier(count)
  return lambda count: learning_rate * multiplier(count)


def _holds_learning_rate(base: optax.GradientTransformation) -> bool:
  """Whether ``base`` visibly applies a learning rate: its state holds a schedule's count
  (``optax.adam(schedule)``) or an injected ``learning_rate``. A constant rate
  (``optax.adam(1e-3)``) leaves no trace in the state and cannot be detected."""
  try:
    state = jax.eval_shape(base.init, {})
  except Exception:  # a base whose init needs real params: nothing to learn from it here
    return False
  injected = find_states(state, optax.InjectHyperparamsState) + find_states(
    state, optax.InjectStatefulHyperparamsState
  )
  return bool(find_states(state, optax.ScaleByScheduleState)) or any(
    "learning_rate" in s.hyperparams for s in injected
  )


@contextlib.contextmanager
def _argument(name: str) -> Iterator[None]:
  """Re-raises a nested factory's ``ValueError`` as one of ``od.derive``'s ``name``."""
  try:
    yield
  except ValueError as error:
    raise ValueError(f"{FN}: {name}: {error}") from None


def derive(
  learning_rate: optax.ScalarOrSchedule,
  *,
  base: optax.GradientTransformation | None = None,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  exclude_from_weight_decay: paths.Patterns = (),
  layer_adaptation: bool = False,
  exclude_from_layer_adaptation: paths.Patterns = (),
  lr_schedule: Mapping[int, float] | optax.Schedule | None = None,
  paramwise_lr: Mapping[paths.Patterns, optax.ScalarOrSchedule] | None = None,
  clip: float | optax.GradientTransformation | None = None,
  grad_accum_steps: int | optax.Schedule = 1,
  lookahead: tuple[int, float] | None = None,
  lazy: paths.Patterns | None = None,
  ema: float | optax.Schedule | optax.GradientTransformation | None = None,
  bias_correction: bool = True,
  strict: bool = False,
  skip_spikes: bool | Mapping[str, Any] | None = None,
  dynamic_loss_scale: bool | Mapping[str, Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Composes the derived techniques around a base optimizer, in the order that is right.

  The result is the chain below (pieces left out when not asked for). Accumulation is
  outermost, so everything inside it (clipping, Adam's bias correction, weight decay, the
  schedules, lookahead's sync, the EMA) sees and counts real updates only::

    od.accumulate(                                  # grad_accum_steps > 1
      optax.chain(
        od.lookahead(                               # lookahead=(sync_period, slow_step_size)
          optax.chain(
            od.clip_norm(clip),                     # clip: a max norm (hard, global)
                                                    #       or a transformation
            od.lazy(base, include=lazy),            # base: optax.scale_by_adam(eps=1e-6)
            od.weight_decay(weight_decay, exclude=exclude_from_weight_decay),
            od.layer_adaptation(exclude=exclude_from_layer_adaptation),
            optax.scale_by_learning_rate(lambda t: learning_rate * multiplier(t)),
                                                    # (its rate kept for od.learning_rate)
            od.scale_by_path(paramwise_lr),         # scales everything before it
          ),
          sync_period, slow_step_size,
        ),
        od.param_ema(od.ema_warmup(ema)),           # ema: the decay it warms up to,
                                                    #      od.param_ema(ema) for a schedule,
                                                    #      ema itself for a transformation
      ),
      grad_accum_steps,
    )

  and, outermost, the guards that judge each micro-batch before it is accumulated:
  ``od.dynamic_loss_scale(od.skip_spikes(<the above>, **skip_spikes), **dynamic_loss_scale)``
  (the gradients are unscaled first, then checked for a spike).

  where ``multiplier`` is ``od.piecewise_linear(lr_schedule)`` for a ``{step: multiplier}``
  dict, or ``lr_schedule`` itself for a schedule. With the defaults it is Adam with
  :math:`\epsilon = 10^{-6}`. Weight decay comes before layer adaptation, so the trust ratio
  :math:`\lVert\theta\rVert / \lVert u + \lambda\theta\rVert` includes the decay, as in LAMB.
  :func:`learning_rate` reads the rate of the last real update from the state, for logging.

  ``base`` is a *direction*: a transformation that applies a learning rate itself would apply
  it twice. A base whose state shows a scheduled or injected learning rate
  (``optax.adam(schedule)``, ``optax.inject_hyperparams(optax.sgd)(...)``) is refused; a
  constant rate (``optax.adam(1e-3)``) leaves no trace in the state and cannot be detected:
  pass ``optax.scale_by_adam()`` and the like.

  Under ``optax.inject_hyperparams(od.derive)`` every numeric hyperparameter may be injected;
  a learning-rate schedule that starts at 0 (a warmup) is valid.

  Args:
    learning_rate: the base learning rate (>= 0, finite), or a schedule of it.
    base: the base direction, an optax transformation without learning rate (e.g.
      ``optax.scale_by_lion()``); default ``optax.scale_by_adam(eps=1e-6)``.
    weight_decay: decoupled weight decay rate (or schedule); 0 for none.
    exclude_from_weight_decay: patterns of leaves not decayed: regexes (``["bias", "Norm"]``)
      or a predicate ``(path, leaf) -> bool``; ``lambda path, p: p.ndim < 2`` excludes every
      vector (biases, norm scales) whatever the model names them (Flax NNX calls a LayerNorm
      after its attribute, e.g. ``ln1``).
    layer_adaptation: rescale each leaf's update to the norm of its parameter.
    exclude_from_layer_adaptation: patterns of leaves left out of layer adaptation.
    lr_schedule: ``{step: multiplier}`` (see :func:`piecewise_linear`) or a schedule of
      multipliers of ``learning_rate``, counted in real updates.
    paramwise_lr: ``{patterns: multiplier}`` rules of :func:`scale_by_path`.
    clip: a max norm for hard global clipping, or a clipping transformation.
    grad_accum_steps: micro-batches per real update (:func:`accumulate`), or a schedule of
      the real-update count.
    lookahead: ``(sync_period, slow_step_size)`` of :func:`lookahead`.
    lazy: patterns of the embedding leaves updated lazily (:func:`lazy` around ``base``).
    ema: a parameter EMA (:func:`param_ema`) kept last, read with :func:`ema_params`: a
      number is the decay it warms up to (``od.ema_warmup(ema)``: the average forgets the
      first, poor params, so short runs are not hurt), a schedule is the decay itself
      (:func:`power_ema_decay`; ``od.param_ema(0.999)`` for a fixed decay); or an averaging
      transformation kept last as it is (``od.swa(start_step=1000)``, read with
      :func:`swa_params`).
    bias_correction: whether the default Adam base bias-corrects its moments (the author's
      BERT recipe turns it off); only with the default ``base``.
    skip_spikes: ``True`` or a dict of :func:`skip_spikes`'s keyword arguments: skip a
      micro-batch whose gradient norm (or ``loss=``, with ``metric="loss"``) is a spike.
    dynamic_loss_scale: ``True`` or a dict of :func:`dynamic_loss_scale`'s keyword
      arguments, for float16 training; read the scale with :func:`loss_scale`.
    strict: raise ``ValueError`` at ``init`` instead of warning when a pattern of
      ``exclude_from_weight_decay``, ``exclude_from_layer_adaptation``, ``lazy`` or
      ``paramwise_lr`` matches no leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params`` when weight
    decay, layer adaptation, lookahead or an average is on.

  Example:
    The author's BERT pretraining recipe in one call (warmup then linear decay to 0, counted in
    real updates):

    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> tx = od.derive(
    ...   1.76e-3,
    ...   bias_correction=False,
    ...   weight_decay=0.01,
    ...   exclude_from_weight_decay=["Norm", "bias"],
    ...   layer_adaptation=True,
    ...   exclude_from_layer_adaptation=["Norm", "bias"],
    ...   lr_schedule={3125: 1.0, 125000: 0.0},
    ...   grad_accum_steps=16,
    ... )
    >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)},
    ...           "Norm": {"scale": jnp.ones(2)}}
    >>> state = tx.init(params)
    >>> for _ in range(16):  # one real update
    ...   _, state = tx.update(params, state, params)
    >>> bool(od.has_updated(state)), float(od.learning_rate(state))  # warmup: starts at 0
    (True, 0.0)
  """
  checks.check_finite(FN, "learning_rate", learning_rate, low=0.0)
  checks.check_int(FN, "grad_accum_steps", grad_accum_steps)
  checks.check_range(FN, "weight_decay", weight_decay, low=0.0, high=math.inf, high_open=True)
  checks.check_bool(FN, "layer_adaptation", layer_adaptation)
  checks.check_bool(FN, "bias_correction", bias_correction)
  checks.check_bool(FN, "strict", strict)
  if ema is not None and not isinstance(ema, optax.GradientTransformation):
    checks.check_range(FN, "ema", ema, low=0.0, high=1.0, high_open=True)
  checks.check_transformation(FN, "base", base, optional=True)
  if base is not None and _holds_learning_rate(base):
    raise ValueError(
      f"{FN}: base must be a direction without a learning rate (optax.scale_by_adam(), not "
      f"optax.adam(...)): derive applies learning_rate after it, got {base!r}"
    )

  def select(patterns: Any, name: str) -> paths.Selector:
    return paths.selector(patterns, argname=f"{FN}: {name}", strict=strict)

  exclude_wd = select(exclude_from_weight_decay, "exclude_from_weight_decay")
  exclude_la = select(exclude_from_layer_adaptation, "exclude_from_layer_adaptation")
  parts = []
  if isinstance(clip, optax.GradientTransformation):
    parts.append(clip)
  elif clip is not None:
    if callable(clip):  # e.g. the optax.adam factory: neither a number nor a transformation
      raise ValueError(
        f"{FN}: clip must be a max norm or a GradientTransformation, got {clip!r}"
      )
    checks.check_positive(FN, "clip", clip)
    parts.append(clip_norm(clip))
  if base is None:
    base = (
      optax.scale_by_adam(eps=1e-6)
      if bias_correction
      else _scale_by_adam_uncorrected(0.9, 0.999, 1e-6)
    )
  elif not bias_correction:
    raise ValueError(
      f"{FN}: bias_correction=False applies to the default Adam base; got a base too"
    )
  parts.append(base if lazy is None else lazy_(base, include=select(lazy, "lazy")))
  # A Python 0 leaves weight decay out; anything else (a schedule, or the arrays and tracers
  # that optax.inject_hyperparams passes, whose value the structure cannot depend on) keeps it.
  if not isinstance(weight_decay, int | float) or weight_decay != 0:
    parts.append(weight_decay_(weight_decay, exclude=exclude_wd))
  elif exclude_wd:
    raise ValueError(f"{FN}: exclude_from_weight_decay needs weight_decay > 0")
  if layer_adaptation:
    parts.append(layer_adaptation_(exclude=exclude_la))
  elif exclude_la:
    raise ValueError(f"{FN}: exclude_from_layer_adaptation needs layer_adaptation=True")
  parts.append(scale_by_learning_rate(_learning_rate(learning_rate, lr_schedule)))
  if paramwise_lr is not None:
    with _argument("paramwise_lr"):
      parts.append(scale_by_path(paramwise_lr, strict=strict))
  tx = optax.chain(*parts)
  if lookahead is not None:
    if not isinstance(lookahead, tuple | list) or len(lookahead) != 2:
      raise ValueError(
        f"{FN}: lookahead must be a (sync_period, slow_step_size) pair, got {lookahead!r}"
      )
    with _argument("lookahead"):
      tx = lookahead_(tx, *lookahead)
  if ema is not None:
    if isinstance(ema, optax.GradientTransformation):
      averaging = ema
    else:
      averaging = param_ema(ema if callable(ema) else ema_warmup(ema))
    tx = optax.chain(tx, averaging)
  if not isinstance(grad_accum_steps, int) or grad_accum_steps > 1:  # (as weight_decay above)
    tx = accumulate(tx, grad_accum_steps)
  # The guards go outermost: they judge each micro-batch before it is accumulated.
  for name, guard, factory in (
    ("skip_spikes", skip_spikes, skip_spikes_),
    ("dynamic_loss_scale", dynamic_loss_scale, dynamic_loss_scale_),
  ):
    if guard is None or guard is False:
      continue
    if guard is not True and not isinstance(guard, Mapping):
      raise ValueError(
        f"{FN}: {name} must be True or a dict of od.{name}'s keyword arguments, got {guard!r}"
      )
    with _argument(name):
      tx = factory(tx, **({} if guard is True else guard))

  def update_fn(updates, state, params=None, **extra_args):
    if params is not None:  # before any piece, whose own error would not name derive
      is_row_sparse = lambda x: isinstance(x, RowSparse)
      checks.check_same_tree(FN, updates, params, "params", is_leaf=is_row_sparse)
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
