"""Lookahead against optax.lookahead, and the parameter EMA against a hand-written one.

``optax.lookahead`` keeps fast and slow weights in the params (``LookaheadParams``); ours
keeps the slow weights in the optimizer state, so both steps move the same bytes (params,
gradients, Adam's two moments, the slow weights) and the ratio should be about 1. Each call
times a whole cycle of ``sync_period`` steps, the sync included.

optax has no parameter EMA; its users keep one beside the optimizer and update it in the
training step with ``optax.incremental_update``. That is the baseline for ``param_ema``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxderived as od
from benchmarks.harness import Case
from benchmarks.harness import Subject
from benchmarks.harness import check_close
from benchmarks.harness import tx_subject

SYNC_PERIOD, SLOW_STEP_SIZE, DECAY = 5, 0.5, 0.999


def _inner() -> optax.GradientTransformation:
  return optax.adam(1e-3)


def _optax_lookahead_subject() -> Subject:
  tx = optax.lookahead(_inner(), SYNC_PERIOD, SLOW_STEP_SIZE)

  def init(params):
    # Two distinct buffers: the carry is donated, and one buffer cannot be donated twice.
    lparams = optax.LookaheadParams(fast=params, slow=jax.tree.map(jnp.copy, params))
    return lparams, tx.init(lparams)

  def step(carry, grads):
    lparams, state = carry
    updates, state = tx.update(grads, state, lparams)
    return optax.apply_updates(lparams, updates), state

  return Subject(f"optax.lookahead(adam, {SYNC_PERIOD}, {SLOW_STEP_SIZE})", init, step)


def _run(subject: Subject, params, grads, steps: int):
  carry = subject.init(jax.tree.map(jnp.copy, params))
  step = jax.jit(subject.step)
  history = []
  for _ in range(steps):
    carry = step(carry, grads)
    history.append(carry)
  return history


def _check_lookahead(ours: Subject, theirs: Subject):
  """After one cycle and a half, our params and slow weights are optax's fast and slow."""

  def check(params, grads):
    for (p, state), (lparams, _) in zip(
      _run(ours, params, grads, SYNC_PERIOD + 2),
      _run(theirs, params, grads, SYNC_PERIOD + 2),
      strict=True,
    ):
      for x, y in zip(
        jax.tree.leaves((p, od.lookahead_params(state))),
        jax.tree.leaves((lparams.fast, lparams.slow)),
        strict=True,
      ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)

  return check


def _ema_baseline_subject() -> Subject:
  tx = _inner()

  def init(params):
    return params, tx.init(params), jax.tree.map(jnp.copy, params)

  def step(carry, grads):
    params, state, ema = carry
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return params, state, optax.incremental_update(params, ema, 1.0 - DECAY)

  return Subject(f"adam + incremental_update({DECAY})", init, step)


def _check_ema(ours: Subject, baseline: Subject):
  """Same params as the baseline, and the debiased average of the baseline's params."""

  def check(params, grads):
    steps = 3
    ours_history = _run(ours, params, grads, steps)
    trajectory = [c[0] for c in _run(baseline, params, grads, steps)]
    mu = np.float64(np.float32(DECAY))
    weights = [(1 - mu) * mu ** (steps - 1 - i) / (1 - mu**steps) for i in range(steps)]
    final_params, state = ours_history[-1]
    expected = jax.tree.map(
      lambda *xs: sum(w * np.asarray(x, np.float64) for w, x in zip(weights, xs, strict=True)),
      *trajectory,
    )
    for x, y in zip(
      jax.tree.leaves(final_params), jax.tree.leaves(trajectory[-1]), strict=True
    ):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(
      jax.tree.leaves(od.ema_params(state, final_params)),
      jax.tree.leaves(expected),
      strict=True,
    ):
      np.testing.assert_allclose(np.asarray(x, np.float64), y, rtol=1e-5, atol=1e-6)

  return check


def cases() -> list[Case]:
  ours_lookahead = tx_subject(
    f"od.lookahead(adam, {SYNC_PERIOD}, {SLOW_STEP_SIZE})",
    od.lookahead(_inner(), SYNC_PERIOD, SLOW_STEP_SIZE),
  )
  optax_lookahead = _optax_lookahead_subject()
  ours_ema = tx_subject(
    f"chain(adam, od.param_ema({DECAY}))", optax.chain(_inner(), od.param_ema(DECAY))
  )
  ema_baseline = _ema_baseline_subject()
  adam = tx_subject("adam", _inner())
  averages = [
    ("swa", "chain(adam, od.swa())", od.swa()),
    (
      "param_ema_warmup",
      "chain(adam, od.param_ema(od.ema_warmup(), debias=False))",
      od.param_ema(od.ema_warmup(), debias=False),
    ),
  ]
  # Against the fixed-decay EMA (a fresh subject per row: a reused one would be a compile-cache
  # hit); the updates pass unchanged, so the params must be Adam's.
  average_rows = []
  for name, label, average in averages:
    ours = tx_subject(label, optax.chain(_inner(), average))
    fixed = tx_subject(
      f"chain(adam, od.param_ema({DECAY}))", optax.chain(_inner(), od.param_ema(DECAY))
    )
    average_rows.append(
      Case(name, ours, fixed, target=1.05, check=check_close(ours, adam, cycle=3))
    )
  return average_rows + [
    Case(
      "lookahead",
      ours_lookahead,
      optax_lookahead,
      cycle=SYNC_PERIOD,
      target=1.05,
      check=_check_lookahead(ours_lookahead, optax_lookahead),
    ),
    Case(
      "param_ema",
      ours_ema,
      ema_baseline,
      check=_check_ema(ours_ema, ema_baseline),
    ),
  ]
