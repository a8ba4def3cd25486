"""od.derive's full recipe against optax.adamw (targets: ratio <= 1.6, compile <= 3x)."""

import optax

import optaxderived as od
from benchmarks.harness import Case
from benchmarks.harness import check_close
from benchmarks.harness import tx_subject

RECIPE = dict(
  weight_decay=0.01,
  layer_adaptation=True,
  lr_schedule={100: 1, 1000: 0.1},
  lookahead=(5, 0.5),
  ema=0.999,
  clip=1.0,
)


def _explicit_chain():
  """The chain od.derive's docstring shows for RECIPE, built by hand."""
  multiplier = od.piecewise_linear(RECIPE["lr_schedule"])
  return optax.chain(
    od.lookahead(
      optax.chain(
        od.clip_norm(1.0),
        optax.scale_by_adam(eps=1e-6),
        od.weight_decay(0.01),
        od.layer_adaptation(),
        optax.scale_by_learning_rate(lambda t: 1e-3 * multiplier(t)),
      ),
      5,
      0.5,
    ),
    od.param_ema(0.999),
  )


def cases() -> list[Case]:
  ours = tx_subject("od.derive(1e-3, ...full recipe)", od.derive(1e-3, **RECIPE))
  return [
    Case(
      "derive(full recipe)",
      ours,
      tx_subject("optax.adamw(1e-3)", optax.adamw(1e-3)),
      cycle=5,
      target=1.6,
      check=check_close(ours, tx_subject("explicit chain", _explicit_chain()), cycle=5),
    )
  ]
