"""od.derive's full recipe against optax.adamw, and against the same recipe written by hand as
one jitted function: the limit of the backend (targets: step <= 1.05x, compile <= 1.3x it).

The recipe moves about twice adamw's bytes, so its ratio to adamw has the hand-written
recipe's ratio as its floor (the "hand-written vs adamw" row)."""

import jax
import jax.numpy as jnp
import optax

import optaxderived as od
from benchmarks.harness import Case
from benchmarks.harness import Subject
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
LEARNING_RATE = 1e-3


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
    od.param_ema(od.ema_warmup(0.999)),
  )


def _derive() -> Subject:
  """A fresh od.derive subject (a new step function: its compile is never a cache hit)."""
  return tx_subject("od.derive(1e-3, ...full recipe)", od.derive(LEARNING_RATE, **RECIPE))


def _hand_written() -> Subject:
  """RECIPE as one jitted function, no optax or od pieces, one pass over each leaf after the
  global norm: hard global clipping, Adam (bias-corrected, eps=1e-6 as derive's default
  base ``optax.scale_by_adam(eps=1e-6)``), weight decay, the per-leaf trust ratio (RECIPE
  excludes no leaf), the piecewise-linear rate, lookahead and the warmed-up param EMA.

  The global norm is a plain float32 sum of squares (no overflow-safe recomputation: finite
  gradients beyond ~1e19 are where the two differ). A fresh subject each call.
  """
  lr, b1, b2, eps = LEARNING_RATE, 0.9, 0.999, 1e-6
  wd, max_norm, decay = RECIPE["weight_decay"], RECIPE["clip"], RECIPE["ema"]
  sync_period, alpha = RECIPE["lookahead"]
  multiplier = od.piecewise_linear(RECIPE["lr_schedule"])

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    state = dict(
      count=jnp.zeros([], jnp.int32),
      mu=zeros(),
      nu=zeros(),
      slow=jax.tree.map(lambda p: jnp.array(p, copy=True), params),
      ema=zeros(),  # warmed up: the first update copies the params (decay 0)
    )
    return params, state

  def step(carry, grads):
    params, state = carry
    count = state["count"] + 1
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    over = norm > max_norm
    clip = jnp.where(
      jnp.isnan(norm), norm, jnp.where(over, max_norm / jnp.where(over, norm, 1), 1)
    )
    correction1, correction2 = 1 - b1**count, 1 - b2**count
    rate = jnp.asarray(-lr * multiplier(state["count"]), jnp.float32)
    sync = count % sync_period == 0
    # timm's EMA warmup at the number of updates averaged before this one
    n = state["count"].astype(jnp.float32)
    ema_decay = jnp.where(n <= 0, 0.0, jnp.minimum(-jnp.expm1(-2 / 3 * jnp.log1p(n)), decay))
    new = {name: {} for name in ("params", "mu", "nu", "slow", "ema")}
    for key, p in params.items():
      g = grads[key] * clip
      mu = (1 - b1) * g + b1 * state["mu"][key]
      nu = (1 - b2) * jnp.square(g) + b2 * state["nu"][key]
      u = (mu / correction1) / (jnp.sqrt(nu / correction2) + eps) + wd * p
      p_norm, u_norm = jnp.sqrt(jnp.sum(jnp.square(p))), jnp.sqrt(jnp.sum(jnp.square(u)))
      u = rate * (jnp.where((p_norm == 0) | (u_norm == 0), 1, p_norm / u_norm) * u)
      fast, slow = p + u, state["slow"][key]
      slow = jnp.where(sync, slow + alpha * (fast - slow), slow)
      p = jnp.where(sync, slow, fast)
      new["params"][key], new["mu"][key], new["nu"][key], new["slow"][key] = p, mu, nu, slow
      new["ema"][key] = ema_decay * state["ema"][key] + (1 - ema_decay) * p
    return new.pop("params"), dict(count=count, **new)

  return Subject("hand-written recipe", init, step)


def _adamw() -> Subject:
  return tx_subject("optax.adamw(1e-3)", optax.adamw(LEARNING_RATE))


def cases() -> list[Case]:
  # Fresh subjects for every row and every check: JAX reuses a compiled program for the same
  # step function, and each row's compile seconds must be a real compile.
  return [
    Case(
      "derive(full recipe)",
      _derive(),
      _adamw(),
      cycle=5,
      check=check_close(_derive(), tx_subject("explicit chain", _explicit_chain()), cycle=5),
    ),
    Case(
      "derive vs hand-written",
      _derive(),
      _hand_written(),
      cycle=5,
      target=1.05,
      check=check_close(_derive(), _hand_written(), cycle=5),
    ),
    Case("hand-written vs adamw", _hand_written(), _adamw(), cycle=5),
  ]
