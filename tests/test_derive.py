"""od.derive: the composition order, against explicit chains and a NumPy reference."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_keeps_dtype
from helpers import assert_trees_close
from helpers import run_scan

import optaxderived as od


def _params(key=0):
  keys = jax.random.split(jax.random.key(key), 3)
  return {
    "encoder": {"kernel": jax.random.normal(keys[0], (4, 3)), "bias": jnp.zeros(3)},
    "Norm": {"scale": jnp.ones(3)},
    "head": {"kernel": jax.random.normal(keys[1], (3, 2))},
  }


def _grads(params, steps, key=1):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(key), len(leaves))
  return treedef.unflatten(
    [jax.random.normal(k, (steps, *x.shape)) for k, x in zip(keys, leaves, strict=True)]
  )


def _run(tx, params, grads_seq, steps):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(steps):
    updates, state = update(jax.tree.map(lambda g, i=i: g[i], grads_seq), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_the_full_stack_with_correct_semantics_against_numpy():
  """The BERT stack (Adam without bias correction, weight decay, layer adaptation,
  warmup schedule, accumulation k=2) with the correct semantics: no phantom step, each
  window applied when it closes, the schedule counting real updates."""
  grads = np.array([[0.1, -0.2], [0.3, 0.1], [0.2, 0.2], [0.1, 0.1], [0.0, 0.3], [0.2, -0.1]])
  lr, decay, b1, b2, eps = 0.1, 0.01, 0.9, 0.999, 1e-6
  multiplier = lambda t: np.interp(t, [0, 4, 8], [0.0, 1.0, 0.0])
  w, m, v, expected = np.array([3.0, 4.0]), np.zeros(2), np.zeros(2), []
  for real_step, window in enumerate(grads.reshape(3, 2, 2)):
    g = window.mean(0)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
    u = m / (np.sqrt(v) + eps) + decay * w
    u = u * np.linalg.norm(w) / np.linalg.norm(u)
    w = w - lr * multiplier(real_step) * u
    expected += [None, w.copy()]

  tx = od.derive(
    lr,
    bias_correction=False,
    weight_decay=decay,
    layer_adaptation=True,
    lr_schedule={4: 1.0, 8: 0.0},
    grad_accum_steps=2,
  )
  with jax.enable_x64(True):
    params = jnp.array([3.0, 4.0])
    state = tx.init(params)
    for i, g in enumerate(grads):
      updates, state = tx.update(jnp.asarray(g), state, params)
      params = optax.apply_updates(params, updates)
      if expected[i] is not None:
        # float64 everywhere but the accumulator (float32 by default): ~1e-9 relative.
        np.testing.assert_allclose(params, expected[i], rtol=1e-8)
  np.testing.assert_allclose(expected[1], [3.0, 4.0])  # multiplier 0 at the first real update


def test_derive_equals_the_explicit_chain_its_docstring_shows():
  params, steps = _params(), 24
  grads = _grads(params, steps)
  kwargs = dict(
    weight_decay=0.01,
    exclude_from_weight_decay=["bias", "Norm"],
    layer_adaptation=True,
    exclude_from_layer_adaptation=["bias", "Norm"],
    lr_schedule={3: 1.0, 6: 0.2},
    paramwise_lr={"head": 0.5, "kernel": 0.5},
    clip=1.0,
    lookahead=(2, 0.5),
    ema=0.9,
    grad_accum_steps=3,
  )
  derived = od.derive(1e-2, **kwargs)
  multiplier = od.piecewise_linear({3: 1.0, 6: 0.2})
  explicit = od.accumulate(
    optax.chain(
      od.lookahead(
        optax.chain(
          od.clip_norm(1.0),
          optax.scale_by_adam(eps=1e-6),
          od.weight_decay(0.01, exclude=["bias", "Norm"]),
          od.layer_adaptation(exclude=["bias", "Norm"]),
          optax.scale_by_learning_rate(lambda t: 1e-2 * multiplier(t)),
          od.scale_by_path({"head": 0.5, "kernel": 0.5}),
        ),
        2,
        0.5,
      ),
      od.param_ema(od.ema_warmup(0.9)),
    ),
    3,
  )
  p1, s1 = _run(derived, params, grads, steps)
  p2, s2 = _run(explicit, params, grads, steps)
  assert_trees_close(p1, p2, rtol=1e-6, atol=1e-7)
  assert_trees_close(od.ema_params(s1, p1), od.ema_params(s2, p2), rtol=1e-6, atol=1e-7)
  assert_trees_close(od.lookahead_params(s1), od.lookahead_params(s2), rtol=1e-6, atol=1e-7)
  assert int(s1.step) == steps // 3  # the AccumulateState counts real updates


def test_defaults_are_adam_with_eps_1e6_and_a_custom_base_works():
  params, steps = _params(), 5
  grads = _grads(params, steps)
  assert_trees_close(
    _run(od.derive(1e-2), params, grads, steps)[0],
    _run(optax.adam(1e-2, eps=1e-6), params, grads, steps)[0],
    rtol=1e-6,
  )
  assert_trees_close(
    _run(od.derive(1e-3, base=optax.scale_by_lion()), params, grads, steps)[0],
    _run(optax.lion(1e-3, weight_decay=0.0), params, grads, steps)[0],
    rtol=1e-6,
  )


def test_the_schedule_counts_real_updates_under_accumulation():
  tx = od.derive(1.0, base=optax.identity(), lr_schedule={4: 1.0}, grad_accum_steps=3)
  params = jnp.zeros(())
  state = tx.init(params)
  moves = []
  for _ in range(12):
    updates, state = tx.update(jnp.ones(()), state, params)
    moves.append(float(updates))
  # real updates at micro steps 2, 5, 8, 11 with multipliers M(0..3) = 0, 0.25, 0.5, 0.75
  np.testing.assert_allclose(moves, [0, 0, -0.0, 0, 0, -0.25, 0, 0, -0.5, 0, 0, -0.75])


def test_lazy_patterns_wrap_the_base():
  params = {"embed": jnp.ones((4, 2)), "dense": jnp.ones(2)}
  grads = {"embed": jnp.zeros((4, 2)).at[1].set(1.0), "dense": jnp.ones(2)}
  tx = od.derive(0.1, lazy="embed")
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  untouched = np.delete(np.asarray(params["embed"]), 1, axis=0)
  np.testing.assert_array_equal(untouched, 1.0)
  assert np.all(np.asarray(params["embed"][1]) < 1.0)


def test_the_bert_recipe_scans_and_keeps_bf16():
  tx = od.derive(
    1e-3,
    bias_correction=False,
    weight_decay=0.01,
    exclude_from_weight_decay=["Norm", "bias"],
    layer_adaptation=True,
    exclude_from_layer_adaptation=["Norm", "bias"],
    lr_schedule={2: 1.0, 10: 0.0},
    grad_accum_steps=2,
  )
  params = _params()
  run_scan(tx, params, _grads(params, 6))
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert_keeps_dtype(tx, bf16, jax.tree.map(jnp.ones_like, bf16))


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(learning_rate=-1e-3), "learning_rate must be finite and >= 0.0"),
    (dict(learning_rate=1e-3, grad_accum_steps=0), "grad_accum_steps must be an integer >= 1"),
    (dict(learning_rate=1e-3, clip=-1.0), "clip must be > 0"),
    (dict(learning_rate=1e-3, exclude_from_weight_decay="bias"), "needs weight_decay > 0"),
    (
      dict(learning_rate=1e-3, exclude_from_layer_adaptation="bias"),
      "needs layer_adaptation=True",
    ),
    (
      dict(learning_rate=1e-3, base=optax.scale_by_lion(), bias_correction=False),
      "bias_correction=False applies to the default Adam base",
    ),
    (dict(learning_rate=1e-3, lookahead=5), "lookahead must be a"),
    (dict(learning_rate=1e-3, lr_schedule=3), "lr_schedule must be"),
    (dict(learning_rate=1e-3, weight_decay=-1.0), "weight_decay must be in"),
    (dict(learning_rate=1e-3, ema=1.0), "ema must be in"),
  ],
)
def test_invalid_combinations_raise_value_error(kwargs, message):
  with pytest.raises(ValueError, match=message):
    od.derive(**kwargs)


def test_inject_hyperparams_under_jit_and_scan():
  """inject_hyperparams injects the numeric defaults too (weight_decay=0.0,
  grad_accum_steps=1): traced, they must not decide the chain's structure."""
  params = {"w": jnp.asarray([1.0, -2.0, 0.5]), "b": jnp.asarray([0.1])}
  grads = jax.tree.map(lambda p: jnp.stack([0.3 * p + 0.1 * t for t in range(6)]), params)
  injected = optax.inject_hyperparams(od.derive)(learning_rate=1e-2, weight_decay=0.01)
  plain = od.derive(1e-2, weight_decay=0.01)
  want, _, _ = run_scan(plain, params, grads)
  got, state, _ = run_scan(injected, params, grads)
  assert_trees_close(got, want, rtol=1e-6)
  assert float(state.hyperparams["weight_decay"]) == pytest.approx(0.01)


def test_grad_accum_steps_may_be_a_schedule():
  params = {"w": jnp.ones(2)}
  tx = od.derive(0.1, base=optax.identity(), grad_accum_steps=lambda step: 1 + step)
  state = tx.init(params)
  emitted = []
  for _ in range(6):  # windows of 1, 2, 3 micro-batches
    _, state = tx.update({"w": jnp.ones(2)}, state, params)
    emitted.append(bool(od.has_updated(state)))
  assert emitted == [True, False, True, False, False, True]


def test_inject_hyperparams_with_a_warmup_from_zero():
  """A learning-rate schedule that starts at 0 is valid: inject_hyperparams evaluates it at
  init (0 there) and under jit."""
  params = {"w": jnp.asarray([1.0, -2.0, 0.5])}
  warmup = optax.linear_schedule(0.0, 1e-2, 4)
  injected = optax.inject_hyperparams(od.derive)(learning_rate=warmup, weight_decay=0.01)
  state = injected.init(params)
  assert float(state.hyperparams["learning_rate"]) == 0.0
  plain = optax.inject_hyperparams(optax.adamw)(
    learning_rate=warmup, eps=1e-6, weight_decay=0.01
  )
  grads = jax.tree.map(lambda p: jnp.stack([0.3 * p + 0.1 * t for t in range(6)]), params)
  got, state, _ = run_scan(injected, params, grads)
  want, _, _ = run_scan(plain, params, grads)
  assert_trees_close(got, want, rtol=1e-5, atol=1e-7)
  assert float(od.learning_rate(state)) == pytest.approx(float(warmup(5)))


def test_learning_rate_is_the_rate_of_the_last_real_update():
  """Base rate times the schedule's multiplier at the real-update count, as
  optax.inject_hyperparams records its rates: the one the last update used."""
  params = {"w": jnp.ones(3)}
  tx = od.derive(2e-3, lr_schedule={4: 1.0, 8: 0.5}, grad_accum_steps=2)
  multiplier = od.piecewise_linear({4: 1.0, 8: 0.5})
  state = tx.init(params)
  assert float(od.learning_rate(state)) == pytest.approx(2e-3 * float(multiplier(0)))
  update = jax.jit(tx.update)
  for call in range(20):
    _, state = update({"w": jnp.full(3, 0.1 * call)}, state, params)
    real = (call + 1) // 2  # updates made so far; the last one had count real - 1
    expected = 2e-3 * float(multiplier(max(real - 1, 0)))
    assert float(od.learning_rate(state)) == pytest.approx(expected, rel=1e-6), call
  with pytest.raises(ValueError, match="od.learning_rate: the optimizer state holds no"):
    od.learning_rate(optax.adam(1e-3).init(params))


def test_the_learning_rate_step_is_optax_scale_by_learning_rate_bit_for_bit():
  params = {"w": jnp.linspace(-1.0, 1.0, 7, dtype=jnp.bfloat16), "v": jnp.ones(3)}
  for rate in (3e-3, optax.cosine_decay_schedule(1e-2, 10)):
    ours = od.derive(rate, base=optax.identity())
    ref = optax.scale_by_learning_rate(rate)
    s1, s2 = ours.init(params), ref.init(params)
    for t in range(4):
      grads = jax.tree.map(lambda p, t=t: (p * (t + 1)).astype(p.dtype), params)
      u1, s1 = ours.update(grads, s1, params)
      u2, s2 = ref.update(grads, s2, params)
      for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_a_base_that_applies_a_scheduled_learning_rate_is_refused():
  with pytest.raises(
    ValueError, match="od.derive: base must be a direction without a learning"
  ):
    od.derive(1e-3, base=optax.adam(optax.linear_schedule(0.0, 1e-3, 10)))
  with pytest.raises(ValueError, match="od.derive: base must be a direction"):
    od.derive(1e-3, base=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
  od.derive(1e-3, base=optax.scale_by_lion())  # a direction: fine
  od.derive(1e-3, base=optax.inject_hyperparams(optax.scale_by_adam)(b1=0.8))  # no rate


def test_pattern_warnings_come_at_init_and_name_derive_s_argument():
  params = _params()
  tx = od.derive(
    1e-3, weight_decay=0.01, exclude_from_weight_decay=["Norm", "LayerNorm"], grad_accum_steps=2
  )
  with pytest.warns(
    UserWarning, match=r"od.derive: exclude_from_weight_decay: pattern 'LayerNorm'"
  ):
    state = tx.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the update says nothing more
    jax.jit(tx.update)(params, state, params)
  strict = od.derive(
    1e-3, weight_decay=0.01, exclude_from_weight_decay="LayerNorm", strict=True
  )
  with pytest.raises(ValueError, match=r"od.derive: exclude_from_weight_decay: pattern"):
    strict.init(params)
  lazy = od.derive(1e-3, lazy="embed", strict=True)
  with pytest.raises(ValueError, match=r"od.derive: lazy: pattern 'embed'"):
    lazy.init(params)
  paramwise = od.derive(1e-3, paramwise_lr={"decoder": 0.1}, strict=True)
  with pytest.raises(ValueError, match=r"rule 'decoder': pattern 'decoder' matches no"):
    paramwise.init(params)


def test_a_predicate_excludes_every_vector_whatever_its_name():
  """The rule that works on Flax NNX names (a LayerNorm called ``ln1``): no decay on vectors."""
  params = {
    "ln1": {"scale": jnp.ones(3)},
    "dense": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)},
  }
  tx = od.derive(
    0.1,
    base=optax.identity(),
    weight_decay=0.5,
    exclude_from_weight_decay=lambda path, p: p.ndim < 2,
  )
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates["ln1"]["scale"]).max()) == 0.0
  assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0.0
  np.testing.assert_allclose(
    updates["dense"]["kernel"], -0.1 * 0.5 * np.ones((3, 3)), rtol=1e-6
  )


def test_mismatched_gradients_name_derive_and_both_structures():
  params = _params()
  tx = od.derive(1e-3, weight_decay=0.01, lookahead=(2, 0.5))
  state = tx.init(params)
  grads = {k: v for k, v in params.items() if k != "head"}
  with pytest.raises(
    ValueError,
    match=r"od.derive: the updates do not have the tree structure of the params: "
    r"PyTreeDef.* vs PyTreeDef",
  ):
    tx.update(grads, state, params)


def test_the_guards_go_outermost_and_equal_the_explicit_composition():
  params = _params()
  steps = 8
  grads = _grads(params, steps)
  spike = 6  # a micro-batch 100x larger: a spike once the history has 4 values
  grads = jax.tree.map(lambda g: g.at[spike].multiply(100.0), grads)
  kwargs = dict(weight_decay=0.01, grad_accum_steps=2)
  guarded = od.derive(
    1e-2,
    **kwargs,
    skip_spikes=dict(window=4, min_history=4, threshold=3.0),
    dynamic_loss_scale=dict(initial_scale=4.0, growth_interval=3),
  )
  explicit = od.dynamic_loss_scale(
    od.skip_spikes(od.derive(1e-2, **kwargs), window=4, min_history=4, threshold=3.0),
    initial_scale=4.0,
    growth_interval=3,
  )
  p1, s1 = _run(guarded, params, grads, steps)
  p2, s2 = _run(explicit, params, grads, steps)
  assert_trees_close(p1, p2, rtol=0, atol=0)
  spikes, window = s1.inner_state, s1.inner_state.inner_state  # the order of the wrappers
  assert int(s1.num_skipped) == 0  # every gradient was finite: the loss scale skipped none
  assert float(od.loss_scale(s1)) == 16.0  # 8 finite calls: grew at the 3rd and the 6th
  assert int(spikes.num_skipped) == 1 and bool(od.has_skipped(s1)) is False  # the spike
  # The skipped micro-batch did not count toward the window: 7 taken, 3 real updates.
  assert int(window.step) == 3 and int(window.micro_step) == 1
  with pytest.raises(ValueError, match=r"od.derive: skip_spikes: od.skip_spikes: window"):
    od.derive(1e-2, skip_spikes=dict(window=0))
  with pytest.raises(ValueError, match=r"od.derive: dynamic_loss_scale must be True or a dict"):
    od.derive(1e-2, dynamic_loss_scale=2.0**15)


@pytest.mark.parametrize(
  "ema, read, count",
  [
    (od.ema_warmup(0.99), od.ema_params, 6),  # a schedule: od.param_ema(schedule)
    (od.param_ema(od.power_ema_decay(0.1), debias=False, every=2), od.ema_params, 3),
    (od.swa(start_step=2), od.swa_params, 4),
  ],
  ids=["schedule", "param_ema", "swa"],
)
def test_ema_may_be_a_schedule_or_an_averaging_transformation(ema, read, count):
  params, steps = _params(), 18
  grads = _grads(params, steps)
  kwargs = dict(weight_decay=0.01, lookahead=(2, 0.5))
  derived = od.derive(1e-2, **kwargs, ema=ema, grad_accum_steps=3)
  averaging = ema if isinstance(ema, optax.GradientTransformation) else od.param_ema(ema)
  explicit = od.accumulate(optax.chain(od.derive(1e-2, **kwargs), averaging), 3)
  p1, s1 = _run(derived, params, grads, steps)
  p2, s2 = _run(explicit, params, grads, steps)
  assert_trees_close(p1, p2, rtol=0, atol=0)
  assert_trees_close(read(s1, p1), read(s2, p2), rtol=0, atol=0)
  # The average is last inside the accumulation: it moved off the params, on real updates.
  assert not np.allclose(read(s1, p1)["head"]["kernel"], p1["head"]["kernel"])
  assert int(s1.inner_state[1].count) == count  # of 6 real updates


def test_an_injected_ema_decay_equals_the_constant_one():
  params, steps = _params(), 5
  grads = _grads(params, steps)
  injected = optax.inject_hyperparams(od.derive)(learning_rate=1e-2, ema=0.9)
  p1, s1 = _run(injected, params, grads, steps)
  p2, s2 = _run(od.derive(1e-2, ema=0.9), params, grads, steps)
  assert_trees_close(p1, p2, rtol=0, atol=0)
  assert_trees_close(od.ema_params(s1, p1), od.ema_params(s2, p2), rtol=1e-7)


def test_a_float_ema_is_the_decay_an_ema_warmup_tends_to():
  params, steps = _params(), 6
  grads = _grads(params, steps)
  p1, s1 = _run(od.derive(1e-2, ema=0.9), params, grads, steps)
  warmed = od.param_ema(od.ema_warmup(0.9))
  p2, s2 = _run(optax.chain(od.derive(1e-2), warmed), params, grads, steps)
  assert_trees_close(p1, p2, rtol=0, atol=0)
  assert_trees_close(s1, s2, rtol=0, atol=0)
  # timm's warmup, written out: decay_n = min(0.9, 1 - (1 + n)^(-2/3)), so the first update
  # copies the params and the average then forgets fast; debiasing changes nothing (Π d = 0).
  ema = np.zeros_like(np.asarray(params["head"]["kernel"], np.float64))
  for n in range(steps):
    p_n = _run(od.derive(1e-2), params, grads, n + 1)[0]
    decay = min(0.9, 1 - (1 + n) ** (-2 / 3))
    ema = decay * ema + (1 - decay) * np.asarray(p_n["head"]["kernel"], np.float64)
  np.testing.assert_allclose(od.ema_params(s1, p1)["head"]["kernel"], ema, rtol=1e-5)
  with pytest.raises(ValueError, match=r"^od\.derive: ema must be a real number or a schedule"):
    od.derive(1e-2, ema="0.9")
