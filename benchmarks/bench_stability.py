"""Training-stability wrappers against the steps they guard.

`od.zclip`, `od.skip_spikes` and `od.autoclip` (targets: <= 1.05, <= 1.05, <= 1.1) are timed
against `chain(clip_by_global_norm(1.0), adam)`, the usual guard of a step; the benchmark feeds
the same finite gradient on every call, so none of them clips or skips (their steady state).
`od.dynamic_loss_scale(adam)` (target <= 1.1) is timed against `optax.adam`, and against the
same computation written by hand as one jitted function (the finiteness check of all the
gradients, then Adam on the unscaled gradients under that condition, then the scale's
update), which tells the cost of the algorithm (one extra read of the gradients, finished
before any state is written) from the cost of our code.
"""

import jax
import jax.numpy as jnp
import optax

import optaxderived as od
from benchmarks.harness import Case
from benchmarks.harness import Subject
from benchmarks.harness import all_checks
from benchmarks.harness import check_close
from benchmarks.harness import tx_subject

LR = 1e-3
SCALE = 2.0**15  # od.dynamic_loss_scale's initial_scale (a power of two: exact unscaling)
GROWTH_INTERVAL = 2000  # its growth_interval

BASELINE = "chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))"


def _clip_adam():
  return tx_subject(BASELINE, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR)))


def _adam():
  return tx_subject("optax.adam(1e-3)", optax.adam(LR))


def hand_loss_scale_adam() -> Subject:
  """`od.dynamic_loss_scale(optax.adam(1e-3))` written by hand, with no abstraction.

  The finiteness check is the same as ours (a sum of all the gradients, which is finite only
  when every entry is; the exact test only when the sum is not), then Adam's update on the
  unscaled gradients under `lax.cond`, then the scale's rule.
  """
  b1, b2, eps = 0.9, 0.999, 1e-8

  def init(params):
    return (
      params,
      jax.tree.map(jnp.zeros_like, params),
      jax.tree.map(jnp.zeros_like, params),
      jnp.zeros([], jnp.int32),
      jnp.asarray(SCALE, jnp.float32),
      jnp.zeros([], jnp.int32),
    )

  def step(carry, grads):
    params, mu, nu, count, scale, good = carry
    leaves = jax.tree.leaves(grads)
    total = sum(jnp.sum(g) for g in leaves)
    finite = jax.lax.cond(
      jnp.isfinite(total),
      lambda: jnp.ones([], jnp.bool_),
      lambda: jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves])),
    )

    def run(params, mu, nu, count):
      inv = 1 / scale
      t = count + 1
      c1 = 1 - b1 ** t.astype(jnp.float32)
      c2 = 1 - b2 ** t.astype(jnp.float32)
      mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * (g * inv), mu, grads)
      nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g * inv), nu, grads)
      params = jax.tree.map(
        lambda p, m, v: p - LR * (m / c1) / (jnp.sqrt(v / c2) + eps), params, mu, nu
      )
      return params, mu, nu, t

    params, mu, nu, count = jax.lax.cond(
      finite, run, lambda *state: state, params, mu, nu, count
    )
    good = good + 1
    grow = good >= GROWTH_INTERVAL
    new_scale = jnp.where(finite, jnp.where(grow, scale * 2, scale), jnp.maximum(scale / 2, 1))
    new_scale = jnp.minimum(new_scale, 2.0**24)
    good = jnp.where(finite & ~grow, good, 0)
    return params, mu, nu, count, new_scale, good

  return Subject("hand-written, one jitted function", init, step)


def cases() -> list[Case]:
  adam = _adam()
  zclip = tx_subject(
    "chain(od.zclip(), optax.adam(1e-3))", optax.chain(od.zclip(), optax.adam(LR))
  )
  spikes = tx_subject("od.skip_spikes(optax.adam(1e-3))", od.skip_spikes(optax.adam(LR)))
  autoclip = tx_subject(
    "chain(od.autoclip(window=1000), optax.adam(1e-3))",
    optax.chain(od.autoclip(window=1000), optax.adam(LR)),
  )
  loss_scale = tx_subject(
    "od.dynamic_loss_scale(optax.adam(1e-3))", od.dynamic_loss_scale(optax.adam(LR))
  )
  unscaled_adam = tx_subject(
    "chain(optax.scale(2**-15), optax.adam(1e-3))",
    optax.chain(optax.scale(1 / SCALE), optax.adam(LR)),
  )
  hand = hand_loss_scale_adam()
  # zclip's first 25 calls are warmup, skip_spikes judges once its window (128) is full and
  # autoclip's threshold on its first call is that call's norm: none clips or skips in the
  # first 3 steps, which must then be Adam's exactly.
  return [
    Case(
      "zclip",
      zclip,
      _clip_adam(),
      target=1.05,
      check=check_close(zclip, adam, cycle=3, rtol=1e-6, atol=1e-7),
    ),
    Case(
      "skip_spikes",
      spikes,
      _clip_adam(),
      target=1.05,
      check=check_close(spikes, adam, cycle=3, rtol=1e-6, atol=1e-7),
    ),
    Case(
      "autoclip",
      autoclip,
      _clip_adam(),
      target=1.1,
      check=check_close(autoclip, adam, cycle=3, rtol=1e-6, atol=1e-7),
    ),
    Case(
      "dynamic_loss_scale",
      loss_scale,
      adam,
      target=1.1,
      check=all_checks(
        check_close(loss_scale, unscaled_adam, cycle=3), check_close(hand, loss_scale, cycle=3)
      ),
    ),
    Case(
      "dynamic_loss_scale vs hand-written",
      loss_scale,
      hand,
      check=check_close(hand, loss_scale, cycle=3),
    ),
    Case(
      "loss_scale hand-written vs adam",
      hand,
      adam,
      check=check_close(hand, unscaled_adam, cycle=3),
    ),
  ]
