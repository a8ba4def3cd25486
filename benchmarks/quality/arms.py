"""The arms of the quality benchmark: each technique family, the recipe and the baselines.

Every arm is a function of the learning rate and the number of updates, swept over a few
learning rates with the same budget: the same examples in the same order, the same number of
updates (an accumulating arm takes each batch as ``MICRO`` micro-batches).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

import optaxderived as od

MICRO = 4  # micro-batches per batch in the accumulating arms

# Biases and norm scales: left out of weight decay and layer adaptation.
VECTORS = lambda path, p: p.ndim < 2  # noqa: E731

ADAM_RATES = (1e-3, 3e-3, 1e-2)
LAYER_ADAPTATION_RATES = (3e-3, 1e-2, 3e-2, 1e-1)


@dataclasses.dataclass(frozen=True)
class Arm:
  """One optimizer of the benchmark.

  Attributes:
    name: how the table names it.
    family: the technique family it shows, or ``"baseline"``.
    make: ``(learning_rate, updates) -> optax.GradientTransformation``.
    rates: the learning rates swept.
    micro: micro-batches per batch (an accumulating arm: ``MICRO``).
    eval_params: ``(state, params) -> params`` to evaluate with (default: the params).
  """

  name: str
  family: str
  make: Callable[[float, int], optax.GradientTransformation]
  rates: tuple[float, ...] = ADAM_RATES
  micro: int = 1
  eval_params: Callable[[Any, Any], Any] | None = None


def _warmup_decay(updates: int) -> dict[int, float]:
  """10% linear warmup, then linear decay to 0.1 of the peak."""
  return {max(1, updates // 10): 1.0, updates: 0.1}


def _recipe(lr: float, updates: int, *, ema: Any, accumulate: bool) -> Any:
  """The README's recipe: clipping, Adam, weight decay and layer adaptation without the
  vectors, warmup then decay, Lookahead and an EMA (accumulation optional)."""
  return od.derive(
    lr,
    weight_decay=0.01,
    exclude_from_weight_decay=VECTORS,
    layer_adaptation=True,
    exclude_from_layer_adaptation=VECTORS,
    lr_schedule=_warmup_decay(updates),
    clip=1.0,
    grad_accum_steps=MICRO if accumulate else 1,
    lookahead=(5, 0.5),
    ema=ema,
  )


_ema = lambda state, params: od.ema_params(state, params)  # noqa: E731

ARMS: tuple[Arm, ...] = (
  Arm("adam", "baseline", lambda lr, n: optax.adam(lr)),
  Arm(
    "adamw (wd 0.01, matrices)",
    "baseline",
    lambda lr, n: optax.adamw(
      lr, weight_decay=0.01, mask=od.path_mask(lambda q, p: p.ndim >= 2)
    ),
  ),
  Arm(
    "accumulate(adam, 4)",
    "accumulation",
    lambda lr, n: od.accumulate(optax.adam(lr), MICRO),
    micro=MICRO,
  ),
  Arm(
    "lookahead(adam, 5, 0.5)",
    "lookahead",
    lambda lr, n: od.lookahead(optax.adam(lr), 5, 0.5),
    eval_params=lambda state, params: od.lookahead_params(state),
  ),
  Arm(
    "adam + param_ema(0.999)",
    "averaging",
    lambda lr, n: optax.chain(optax.adam(lr), od.param_ema(0.999)),
    eval_params=_ema,
  ),
  Arm(
    "adam + param_ema(ema_warmup(0.999))",
    "averaging",
    lambda lr, n: optax.chain(optax.adam(lr), od.param_ema(od.ema_warmup(0.999), debias=False)),
    eval_params=_ema,
  ),
  Arm(
    "adam + swa(second half)",
    "averaging",
    lambda lr, n: optax.chain(optax.adam(lr), od.swa(start_step=n // 2)),
    eval_params=lambda state, params: od.swa_params(state, params),
  ),
  Arm(
    "soft clip(1.0) + adam",
    "clipping",
    lambda lr, n: optax.chain(od.clip_norm(1.0, soft=True), optax.adam(lr)),
  ),
  Arm(
    "adam, warmup then decay",
    "schedule",
    lambda lr, n: od.derive(lr, base=optax.scale_by_adam(), lr_schedule=_warmup_decay(n)),
  ),
  Arm(
    "layer adaptation (adam, trust ratio)",
    "layer adaptation",
    lambda lr, n: od.derive(
      lr,
      base=optax.scale_by_adam(),
      layer_adaptation=True,
      exclude_from_layer_adaptation=VECTORS,
    ),
    rates=LAYER_ADAPTATION_RATES,
  ),
  Arm(
    "eg_step_size(adam, 0.05)",
    "exponentiated gradient",
    lambda lr, n: od.eg_step_size(optax.adam(lr), 0.05),
  ),
  Arm(
    "recipe, EMA 0.999",
    "recipe",
    lambda lr, n: _recipe(lr, n, ema=od.param_ema(0.999), accumulate=False),
    rates=LAYER_ADAPTATION_RATES,
    eval_params=_ema,
  ),
  Arm(
    "recipe, warmed-up EMA",
    "recipe",
    lambda lr, n: _recipe(
      lr, n, ema=od.param_ema(od.ema_warmup(0.999), debias=False), accumulate=False
    ),
    rates=LAYER_ADAPTATION_RATES,
    eval_params=_ema,
  ),
  Arm(
    "recipe, warmed-up EMA, accumulate 4",
    "recipe",
    lambda lr, n: _recipe(
      lr, n, ema=od.param_ema(od.ema_warmup(0.999), debias=False), accumulate=True
    ),
    rates=LAYER_ADAPTATION_RATES,
    micro=MICRO,
    eval_params=_ema,
  ),
)
