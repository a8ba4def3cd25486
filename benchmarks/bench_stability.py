"""Training-stability wrappers against the steps they guard.

`od.zclip`, `od.skip_spikes` and `od.autoclip` (targets: <= 1.05, <= 1.05, <= 1.1) are timed
against `chain(clip_by_global_norm(1.0), adam)`, the usual guard of a step; the benchmark feeds
the same finite gradient on every call, so none of them clips or skips (their steady state).
`od.dynamic_loss_scale(adam)` (target <= 1.1) is timed against `optax.adam`.

The two skipping wrappers are also timed against the same computation written by hand as one
jitted function, two ways: with the params updated inside the `lax.cond` (the backend's limit
for the algorithm: the guard must read every gradient before any state is written) and with
the updates returned from the `cond` and applied after it (the limit for any
`GradientTransformation` that skips, which returns updates). `optax.apply_if_finite(adam)`,
optax's own skipping wrapper, is timed against `optax.adam` for comparison.
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


def hand_guarded_adam(guard: str, how: str) -> Subject:
  """A guarded `optax.adam(1e-3)` step written by hand as one jitted function.

  `guard="loss_scale"` is `od.dynamic_loss_scale(optax.adam(1e-3))`: the finiteness check as
  ours (a sum of all the gradients, finite only when every entry is; the exact test only when
  it is not), Adam on the unscaled gradients under `lax.cond`, then the scale's rule.
  `guard="norm"` is a skip guard on the global norm (skip when it exceeds 1e6), the steady
  state of `od.skip_spikes(optax.adam(1e-3))`, whose history statistics are scalar work.

  `how="applied"` updates the params inside the `cond`: the backend's limit for the
  algorithm. `how="returned"` returns the updates from the `cond` and applies them after it,
  as any `GradientTransformation` that skips must (it returns updates, and
  `optax.apply_updates` runs outside it): the limit of the interface. `how="selected"` runs
  Adam on every call and selects the new or the old state and zero updates with `jnp.where`
  (no `cond`, as `optax.apply_if_finite` does).
  """
  b1, b2, eps = 0.9, 0.999, 1e-8
  scaled = guard == "loss_scale"

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    scale = jnp.asarray(SCALE if scaled else 1.0, jnp.float32)
    return params, zeros(), zeros(), jnp.zeros([], jnp.int32), scale, jnp.zeros([], jnp.int32)

  def step(carry, grads):
    params, mu, nu, count, scale, good = carry
    leaves = jax.tree.leaves(grads)
    if scaled:
      total = sum(jnp.sum(g) for g in leaves)
      take = jax.lax.cond(
        jnp.isfinite(total),
        lambda: jnp.ones([], jnp.bool_),
        lambda: jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves])),
      )
    else:
      take = optax.tree.norm(grads) <= 1e6

    def adam(params, mu, nu, count):
      inv = 1 / scale
      t = count + 1
      c1 = 1 - b1 ** t.astype(jnp.float32)
      c2 = 1 - b2 ** t.astype(jnp.float32)
      mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * (g * inv), mu, grads)
      nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g * inv), nu, grads)
      updates = jax.tree.map(lambda m, v: -LR * (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
      if how == "applied":
        return jax.tree.map(jnp.add, params, updates), mu, nu, t
      return updates, mu, nu, t

    def skip(params, mu, nu, count):
      return (params if how == "applied" else optax.tree.zeros_like(params)), mu, nu, count

    if how == "selected":
      new = adam(params, mu, nu, count)
      old = skip(params, mu, nu, count)
      out, mu, nu, count = jax.tree.map(lambda a, b: jnp.where(take, a, b), new, old)
    else:
      out, mu, nu, count = jax.lax.cond(take, adam, skip, params, mu, nu, count)
    params = out if how == "applied" else optax.apply_updates(params, out)
    if scaled:
      good = good + 1
      grow = good >= GROWTH_INTERVAL
      scale = jnp.where(take, jnp.where(grow, scale * 2, scale), jnp.maximum(scale / 2, 1))
      scale = jnp.minimum(scale, 2.0**24)
      good = jnp.where(take & ~grow, good, 0)
    return params, mu, nu, count, scale, good

  where = {
    "applied": "params updated in the cond",
    "returned": "updates returned from the cond",
    "selected": "selected, no cond",
  }[how]
  return Subject(f"hand-written {guard} guard, {where}", init, step)


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
  if_finite = tx_subject(
    "optax.apply_if_finite(optax.adam(1e-3), 5)", optax.apply_if_finite(optax.adam(LR), 5)
  )
  norm_returned, norm_applied, norm_selected = (
    hand_guarded_adam("norm", how) for how in ("returned", "applied", "selected")
  )
  scale_returned, scale_applied, scale_selected = (
    hand_guarded_adam("loss_scale", how) for how in ("returned", "applied", "selected")
  )
  # zclip's first 25 calls are warmup, skip_spikes judges once its window (128) is full and
  # autoclip's threshold on its first call is that call's norm: none clips or skips in the
  # first 3 steps, which must then be Adam's exactly.
  same_as_adam = lambda s: check_close(s, adam, cycle=3, rtol=1e-6, atol=1e-7)
  same_as_unscaled = lambda s: check_close(s, unscaled_adam, cycle=3)
  return [
    Case("zclip", zclip, _clip_adam(), target=1.05, check=same_as_adam(zclip)),
    Case("autoclip", autoclip, _clip_adam(), target=1.1, check=same_as_adam(autoclip)),
    Case("skip_spikes", spikes, _clip_adam(), target=1.05, check=same_as_adam(spikes)),
    Case(
      "skip_spikes vs hand-written",
      spikes,
      norm_returned,
      check=all_checks(same_as_adam(spikes), same_as_adam(norm_returned)),
    ),
    Case(
      "skip guard hand-written (returned)",
      norm_returned,
      _clip_adam(),
      check=same_as_adam(norm_returned),
    ),
    Case(
      "skip guard hand-written (applied)",
      norm_applied,
      _clip_adam(),
      check=same_as_adam(norm_applied),
    ),
    Case(
      "skip guard hand-written (selected)",
      norm_selected,
      _clip_adam(),
      check=same_as_adam(norm_selected),
    ),
    Case(
      "dynamic_loss_scale",
      loss_scale,
      adam,
      target=1.1,
      check=same_as_unscaled(loss_scale),
    ),
    Case(
      "dynamic_loss_scale vs hand-written",
      loss_scale,
      scale_returned,
      check=all_checks(same_as_unscaled(loss_scale), same_as_unscaled(scale_returned)),
    ),
    Case(
      "loss_scale hand-written (returned)",
      scale_returned,
      adam,
      check=same_as_unscaled(scale_returned),
    ),
    Case(
      "loss_scale hand-written (applied)",
      scale_applied,
      adam,
      check=same_as_unscaled(scale_applied),
    ),
    Case(
      "loss_scale hand-written (selected)",
      scale_selected,
      adam,
      check=same_as_unscaled(scale_selected),
    ),
    Case("apply_if_finite", if_finite, adam, check=same_as_adam(if_finite)),
  ]
